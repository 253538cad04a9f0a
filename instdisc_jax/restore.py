"""Opens a trained workdir for evaluation, without the training loop.

A run is a function of its config and its data: `RunSpec.from_config` rebuilds what the train
step was built from (the splits, the instance layout, the encoder, the transforms, the step's
static hyper-parameters, the bank's labels and the run's identity) and compiles and writes
nothing. The trainer (`train.Trainer`) and the programs that use a trained run
(`python -m instdisc_jax.evaluate`, `search`, `export_encoder`) build it the same way, so an
evaluator sees exactly the network and the bank layout that training saw.

`open_run(workdir)` reads `<workdir>/config.json`, builds the spec and restores the newest
readable checkpoint read-only (`restore_newest`): the workdir is not locked and nothing in it is
written, so a run can be evaluated while it trains. A damaged newest checkpoint is named in a
warning and the previous one is restored (`checkpointing.Checkpointer.restore`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from instdisc_jax import augment
from instdisc_jax import config_io
from instdisc_jax import config_validation
from instdisc_jax import data
from instdisc_jax import dataset_stats
from instdisc_jax import models
from instdisc_jax import optim
from instdisc_jax import parallel
from instdisc_jax.checkpointing import Checkpointer
from instdisc_jax.errors import UserError
from instdisc_jax.parallel import AXIS
from instdisc_jax.sharding import ShardLayout
from instdisc_jax.steps import INSTANCE_SHARDED_KEYS
from instdisc_jax.steps import StepConfig
from instdisc_jax.steps import TrainState
from instdisc_jax.steps import init_state
from instdisc_jax.steps import pmapped


def build_model(config: ml_collections.ConfigDict) -> models.ResNet:
  """The encoder `config` describes, as the trainer (and the benchmarks) build it."""
  return models.get_model(
      config.model, low_dim=config.low_dim, dtype=jnp.dtype(config.compute_dtype),
      bn_axis_name=AXIS if config.cross_device_bn else None,
      head_batchnorm=config.head_batchnorm,
      **({"width": config.model_width} if config.model_width else {}))


def augment_config(config: ml_collections.ConfigDict, split) -> augment.AugmentConfig:
  """The transforms for `split`: the config's strengths, the dataset's normalisation.

  Known datasets use their published statistics; others (folders, npz) are measured on up to
  2,000 of their images.
  """
  stats = dataset_stats.DATASET_STATS.get(config.dataset) or data.pixel_stats(split)
  jitter = config.augment.color_jitter
  return augment.AugmentConfig(
      image_size=config.image_size, mean=stats.mean, std=stats.std,
      crop_scale=(config.augment.crop_scale_min, 1.0), crop_on_device=split.fixed_size,
      grayscale_prob=config.augment.grayscale_prob, brightness=jitter, contrast=jitter,
      saturation=jitter, hue=jitter, flip=config.augment.flip)


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """What a run is, rebuilt from its config and data; building it compiles and writes nothing.

  `bank_labels` are the training labels in the bank's layout (-1 unknown and on padding rows),
  this process's shards on its devices, as the kNN steps take them.
  """

  config: ml_collections.ConfigDict
  train_split: data.DatasetSplit
  eval_split: Optional[data.DatasetSplit]
  data_notice: Optional[str]       # Why kNN is skipped (no labelled eval split), or None.
  # Held out of the training split (config.validation_size > 0), and validation.json's record.
  validation_split: Optional[data.DatasetSplit]
  validation_record: Optional[dict]
  layout: ShardLayout              # The training instances over all devices (the bank's).
  steps_per_epoch: int
  total_steps: int
  num_classes: int
  image_shape: tuple[int, int, int]
  model: models.ResNet
  augment_config: augment.AugmentConfig
  hp: StepConfig
  bank_labels: jax.Array
  meta: dict                       # The run's identity, checked against its checkpoints.

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "RunSpec":
    """Loads the splits, checks the config against them (UserError), builds the rest."""
    splits = data.load_run_splits(config)
    train_split, eval_split, data_notice = splits.train, splits.evaluation, splits.notice
    n = train_split.num_examples
    config_validation.validate_against_data(config, n)
    if config.objective == "supervised" and (train_split.labels is None
                                             or not np.any(train_split.labels >= 0)):
      raise UserError(f"config.objective=supervised, but {train_split.name} has no labels: "
                      "train it on a labelled split, or choose an unsupervised objective")
    layout = ShardLayout(n, jax.device_count())
    steps_per_epoch = n // config.batch_size
    total_steps = (config.num_train_steps if config.num_train_steps > 0
                   else config.num_epochs * steps_per_epoch)
    num_classes = (eval_split or train_split).num_classes or 1
    transforms = augment_config(config, train_split)
    labels = train_split.labels
    if labels is None:
      labels = np.full((n,), -1, np.int32)
    bank_labels = parallel.shard_local_rows(
        layout.shard_array(labels.astype(np.int32), fill=-1)[parallel.local_device_indices()])
    return cls(
        config=config, train_split=train_split, eval_split=eval_split, data_notice=data_notice,
        validation_split=splits.validation, validation_record=splits.validation_record,
        layout=layout, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        num_classes=num_classes,
        image_shape=(config.image_size, config.image_size, train_split.channels),
        model=build_model(config), augment_config=transforms,
        hp=StepConfig.from_config(config, layout, transforms, num_classes),
        bank_labels=bank_labels,
        meta=config_io.run_meta(config, layout, train_split.fingerprint))

  def optimizer(self) -> tuple[optax.Schedule, optax.GradientTransformation]:
    """The learning-rate schedule and the optimizer training uses (its state is checkpointed,
    so a restore's template needs it too)."""
    learning_rate_fn = optim.learning_rate_schedule(self.config, self.steps_per_epoch,
                                                    self.total_steps)
    return learning_rate_fn, optim.sgd(self.config, learning_rate_fn)

  def initializer(self, tx: optax.GradientTransformation) -> Callable[[jax.Array], TrainState]:
    """The pmapped `steps.init_state`: replicated key data -> the initial train state."""
    config = self.config
    return pmapped(init_state, model=self.model, hp=self.hp, tx=tx,
                   image_shape=self.image_shape, low_dim=config.low_dim,
                   bank_init=config.bank_init, bank_dtype=jnp.dtype(config.bank_dtype))

  def fresh_state(self, initializer: Optional[Callable] = None) -> TrainState:
    """The initial train state of `config.seed` (also the target a checkpoint restores into)."""
    initializer = initializer or self.initializer(self.optimizer()[1])
    key = jax.random.key_data(jax.random.key(self.config.seed))
    return initializer(parallel.replicate(key))


def restore_newest(workdir: str, meta: dict,
                   template: Callable[[], TrainState]) -> tuple[TrainState, int]:
  """The newest readable checkpoint of `workdir`, read-only, and its step.

  template: makes the state the checkpoint restores into (called only when there is a
  checkpoint). Raises UserError when the workdir has none, or none that can be read.
  """
  checkpointer = Checkpointer(workdir, keep=None, sharded_keys=INSTANCE_SHARDED_KEYS,
                              read_only=True)
  try:
    if checkpointer.latest_step() is None:
      raise UserError(f"{workdir} has no checkpoint to evaluate; train it first with "
                      "python -m instdisc_jax.main")
    restored = checkpointer.restore(template(), meta, compatible=config_io.incompatible_fields)
  finally:
    checkpointer.close()
  if restored is None:
    raise UserError(f"no checkpoint of {workdir} could be read (see the warnings above)")
  state = restored[0]
  return state, int(parallel.first_replica(state.step))


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """A restored run: its spec, its workdir and the train state of its newest checkpoint."""

  spec: RunSpec
  workdir: str
  state: TrainState
  step: int


def open_run(workdir: str, config: Optional[ml_collections.ConfigDict] = None) -> TrainedRun:
  """Restores the newest checkpoint of `workdir` (config: its config.json unless given)."""
  spec = RunSpec.from_config(config if config is not None else config_io.load_config(workdir))
  state, step = restore_newest(workdir, spec.meta, spec.fresh_state)
  return TrainedRun(spec=spec, workdir=workdir, state=state, step=step)
