"""Training: the train state, the pmapped train step, evaluation steps and the training loop.

`train_step` is a pure function of (state, batch) whose body uses only named-axis collectives
over `parallel.AXIS`; `jax.pmap` maps it over every device of every process. Per step, the
devices exchange the batch's features and instance indices (B x d and B numbers), B-sized
per-example statistics and a few scalars, plus the encoder gradients and BatchNorm running
statistics that any data-parallel step exchanges; nothing grows with n or m.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any, Optional

from etils import epath
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from instdisc_jax import augment
from instdisc_jax import config_validation
from instdisc_jax import data
from instdisc_jax import default_config
from instdisc_jax import knn
from instdisc_jax import memory_bank
from instdisc_jax import models
from instdisc_jax import noise as noise_lib
from instdisc_jax import objectives
from instdisc_jax import optim
from instdisc_jax import parallel
from instdisc_jax import sharding
from instdisc_jax.checkpointing import CHECKPOINTS_DIR
from instdisc_jax.checkpointing import Checkpointer
from instdisc_jax.checkpointing import check_compatible
from instdisc_jax.errors import NonFiniteLossError
from instdisc_jax.errors import UserError
from instdisc_jax.errors import one_line
from instdisc_jax.memory_bank import MemoryBank
from instdisc_jax.metric_writers import MetricWriter
from instdisc_jax.parallel import AXIS
from instdisc_jax.preemption import StopSignal
from instdisc_jax.sharding import ShardLayout
from instdisc_jax.workdir import WorkdirLock
from instdisc_jax.workdir import create_workdir

log = logging.getLogger(__name__)

# Leaves of the train state that are sharded along the instance axis (everything else is
# replicated): the bank and the parametric softmax weights, with their optimizer traces.
INSTANCE_SHARDED_KEYS = ("rows", "instance_weights")


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes. Outside the step every leaf has a leading device axis.

  Attributes:
    step: number of steps taken.
    params: {"encoder": Flax params} plus {"instance_weights": (rows_per_shard, d)} for the
      parametric softmax.
    batch_stats: BatchNorm running statistics (kept identical on all devices).
    opt_state: optax state of `params`.
    bank: the memory bank shard (pre-step values during a step).
    partition: the NCE partition estimate Z (replicated).
    key: base PRNG key data; the key of step s is fold_in(key, s), so resuming needs no RNG
      state beyond the step.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  bank: MemoryBank
  partition: objectives.Partition
  key: jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static hyper-parameters of the step (hashable, closed over by pmap)."""

  objective: str
  temperature: float
  num_negatives: int
  shared_noise: bool
  z_mode: str
  z_momentum: float
  bank_momentum: float
  proximal_weight: float
  layout: ShardLayout
  global_batch: int
  augment: augment.AugmentConfig
  knn_k: int
  knn_temperature: float
  num_classes: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, layout: ShardLayout,
                  augment_config: augment.AugmentConfig, num_classes: int) -> "StepConfig":
    return cls(objective=config.objective, temperature=config.temperature,
               num_negatives=config.num_negatives, shared_noise=config.shared_noise,
               z_mode=config.z_mode, z_momentum=config.z_momentum,
               bank_momentum=config.bank_momentum, proximal_weight=config.proximal_weight,
               layout=layout, global_batch=config.batch_size, augment=augment_config,
               knn_k=config.knn_k, knn_temperature=config.knn_temperature,
               num_classes=num_classes)

  @property
  def uses_noise(self) -> bool:
    return self.objective in ("nce", "infonce")


# ------------------------------------------------------------------------------------------------
# Initialisation.
# ------------------------------------------------------------------------------------------------


def init_state(key: jax.Array, *, model, tx: optax.GradientTransformation, hp: StepConfig,
               image_shape, low_dim: int, bank_init: str, bank_dtype) -> TrainState:
  """The initial state of THIS device (call under pmap: the bank shard is the device's own).

  `key` must be the same on every device: params are identical everywhere, and bank row i
  depends only on (key, i).
  """
  model_key, bank_key = jax.random.split(key)
  variables = model.init(model_key, jnp.zeros((1,) + tuple(image_shape), jnp.float32),
                         train=False)
  params = {"encoder": variables["params"]}
  layout = hp.layout
  shard = sharding.shard_index(AXIS)
  init = "uniform" if bank_init == "features" else bank_init
  rows = memory_bank.init_shard_rows(bank_key, layout, low_dim, shard, init=init,
                                     dtype=bank_dtype)
  if hp.objective == "parametric_softmax":
    params["instance_weights"] = memory_bank.init_shard_rows(
        jax.random.fold_in(bank_key, 1), layout, low_dim, shard, init="uniform")
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
      bank=MemoryBank(rows=rows, num_instances=layout.num_instances,
                      num_shards=layout.num_shards),
      partition=objectives.Partition.create(), key=jax.random.key_data(key))


# ------------------------------------------------------------------------------------------------
# The train step.
# ------------------------------------------------------------------------------------------------


def step_keys(state: TrainState):
  """(augmentation key of this device, noise key shared by all devices) for this step."""
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
  noise_key, augment_key = jax.random.split(step_key)
  return jax.random.fold_in(augment_key, sharding.shard_index(AXIS)), noise_key


def build_model(config: ml_collections.ConfigDict) -> models.ResNet:
  """The encoder `config` describes, as the trainer (and the benchmarks) build it."""
  return models.get_model(
      config.model, low_dim=config.low_dim, dtype=jnp.dtype(config.compute_dtype),
      bn_axis_name=AXIS if config.cross_device_bn else None,
      head_batchnorm=config.head_batchnorm,
      **({"width": config.model_width} if config.model_width else {}))


def compute_objective(hp: StepConfig, params, features, indices, bank: MemoryBank,
                      noise: Optional[noise_lib.NoiseSample], partition: objectives.Partition,
                      rows: memory_bank.StepRows):
  """This device's loss share for the configured objective (+ proximal term), and its aux.

  `rows` are the step's pre-step bank rows, gathered once (`objectives.step_rows`).
  """
  if hp.objective == "nce":
    share, aux = objectives.nce_loss(features, indices, bank, noise, partition,
                                     temperature=hp.temperature, z_mode=hp.z_mode,
                                     z_momentum=hp.z_momentum, axis_name=AXIS, rows=rows)
  elif hp.objective == "infonce":
    share, aux = objectives.infonce_loss(features, indices, bank, noise,
                                         temperature=hp.temperature, axis_name=AXIS, rows=rows)
  elif hp.objective == "softmax":
    share, aux = objectives.softmax_loss(features, indices, bank, temperature=hp.temperature,
                                         axis_name=AXIS, rows=rows)
  elif hp.objective == "parametric_softmax":
    share, aux = objectives.parametric_softmax_loss(
        features, indices, params["instance_weights"], num_instances=bank.num_instances,
        temperature=hp.temperature, axis_name=AXIS)
  else:
    raise ValueError(f"unknown objective {hp.objective!r}")
  if hp.proximal_weight:
    prox = objectives.proximal_term(features, indices, bank, weight=hp.proximal_weight,
                                    axis_name=AXIS, rows=rows)
    share = share + prox
    aux["metrics"]["proximal"] = objectives.global_loss(prox, AXIS)
  return share, aux


def train_step(state: TrainState, batch, *, model, tx: optax.GradientTransformation,
               hp: StepConfig, learning_rate_fn):
  """One SGD step on this device's part of the global batch (call under pmap over AXIS).

  batch: {"image": uint8 (b, H, W, C), "index": int32 (b,)} for this device.
  Returns (new state, metrics), the metrics identical on every device.
  """
  augment_key, noise_key = step_keys(state)
  images = augment.train_augment(augment_key, batch["image"], hp.augment)
  indices = sharding.gather_batch(batch["index"], AXIS)
  noise = None
  if hp.uses_noise:
    noise = noise_lib.sample(noise_key, hp.layout, hp.num_negatives, hp.global_batch,
                             shared=hp.shared_noise, axis_name=AXIS)
  # Every bank row the step reads, in one gather (see memory_bank.StepRows).
  rows = objectives.step_rows(state.bank, indices, noise, AXIS)

  def loss_fn(params):
    features, new_model_state = model.apply(
        {"params": params["encoder"], "batch_stats": state.batch_stats}, images, train=True,
        mutable=["batch_stats"])
    features = sharding.gather_batch(features, AXIS)          # (B, d): the global batch
    share, aux = compute_objective(hp, params, features, indices, state.bank, noise,
                                   state.partition, rows)
    return share, (aux, new_model_state, features)

  (share, (aux, new_model_state, features)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  # Encoder gradients: each device holds d(total loss)/d(its examples); sum them. Instance-
  # sharded gradients are already complete on their shard.
  grads = dict(grads, encoder=jax.lax.psum(grads["encoder"], AXIS))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # Running BN statistics are per device during the step (as the reference); keep the
  # replicated copy identical by averaging them.
  batch_stats = jax.lax.pmean(new_model_state["batch_stats"], AXIS)
  bank = memory_bank.update(state.bank, rows, features, momentum=hp.bank_momentum)

  metrics = dict(aux["metrics"], loss=objectives.global_loss(share, AXIS),
                 learning_rate=learning_rate_fn(state.step))
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, bank=bank,
                            partition=aux.get("partition", state.partition))
  return new_state, metrics


# ------------------------------------------------------------------------------------------------
# Evaluation steps.
# ------------------------------------------------------------------------------------------------


def embed(state: TrainState, images, *, model, hp: StepConfig, return_pooled: bool = False):
  """Features of uint8 images under the eval transform (no augmentation), this device's part."""
  return model.apply({"params": state.params["encoder"], "batch_stats": state.batch_stats},
                     augment.eval_transform(images, hp.augment), train=False,
                     return_pooled=return_pooled)


def knn_eval_step(state: TrainState, batch, bank_rows, bank_labels, *, model, hp: StepConfig):
  """Top-1/top-5 hit counts of the weighted kNN for a global eval batch against a bank.

  batch: this device's {"image", "label", "mask"}; padding rows (mask False) are not counted.
  Returns counts identical on every device (all devices score all queries of the batch).
  """
  queries = sharding.gather_batch(embed(state, batch["image"], model=model, hp=hp), AXIS)
  targets = sharding.gather_batch(batch["label"], AXIS)
  valid = sharding.gather_batch(batch["mask"], AXIS)
  scores = knn.knn_classify(queries, bank_rows, bank_labels,
                            num_instances=hp.layout.num_instances, num_classes=hp.num_classes,
                            k=hp.knn_k, temperature=hp.knn_temperature, axis_name=AXIS)
  counts = knn.count_correct(scores, targets, valid=valid)
  counts["total"] = jnp.sum(valid, dtype=jnp.int32)
  return counts


def write_features_step(state: TrainState, bank: MemoryBank, batch, *, model, hp: StepConfig):
  """Writes eval-transform features of a batch of training images into `bank` (its own rows).

  Used to fill the bank from the initial network (`bank_init = features`) and to recompute
  the training features for the final kNN.
  """
  features = sharding.gather_batch(embed(state, batch["image"], model=model, hp=hp), AXIS)
  indices = sharding.gather_batch(batch["index"], AXIS)
  valid = sharding.gather_batch(batch["mask"], AXIS)
  return memory_bank.write(bank, indices, features, axis_name=AXIS, valid=valid)


def pmapped(fn, donate_argnums=(), **static):
  """`jax.pmap(functools.partial(fn, **static))` over every device, on AXIS."""
  return jax.pmap(functools.partial(fn, **static), axis_name=AXIS,
                  donate_argnums=donate_argnums)


# ------------------------------------------------------------------------------------------------
# The training loop.
# ------------------------------------------------------------------------------------------------


class Preempted(Exception):
  """SIGTERM/SIGINT arrived; a checkpoint of the last completed step was written."""

  def __init__(self, step: int, signal_name: str):
    super().__init__(f"stopped by {signal_name} after step {step}; checkpoint written, rerun the "
                     "same command to resume")
    self.step = step


def augment_config(config: ml_collections.ConfigDict, split) -> augment.AugmentConfig:
  """The transforms for `split`: the config's strengths, the dataset's normalisation.

  Known datasets use their published statistics; others (folders, npz) are measured on up to
  2,000 of their images.
  """
  stats = augment.DATASET_STATS.get(config.dataset) or data.pixel_stats(split)
  jitter = config.augment.color_jitter
  return augment.AugmentConfig(
      image_size=config.image_size, mean=stats.mean, std=stats.std,
      crop_scale=(config.augment.crop_scale_min, 1.0), crop_on_device=split.fixed_size,
      grayscale_prob=config.augment.grayscale_prob, brightness=jitter, contrast=jitter,
      saturation=jitter, hue=jitter, flip=config.augment.flip)


def run_meta(config: ml_collections.ConfigDict, layout: ShardLayout, dataset_fingerprint: str):
  """What a checkpoint's shapes and meaning depend on (compared on resume)."""
  return {
      "num_instances": layout.num_instances, "num_devices": layout.num_shards,
      "low_dim": config.low_dim, "model": config.model, "model_width": config.model_width,
      "head_batchnorm": config.head_batchnorm,
      "objective": config.objective, "bank_dtype": config.bank_dtype,
      "image_size": config.image_size, "dataset": config.dataset,
      "dataset_fingerprint": dataset_fingerprint,
  }


def incompatible_fields(saved: dict, current: dict) -> list[str]:
  """Fields of `run_meta` that differ, as 'name (saved X, now Y)' strings."""
  return [f"{k} (saved {saved.get(k)!r}, now {current[k]!r})"
          for k in current if saved.get(k) != current[k]]


@dataclasses.dataclass
class _Pending:
  """Per-step metrics not yet fetched from the devices (fetching every step would stall them)."""

  metrics: list = dataclasses.field(default_factory=list)
  first_step: int = 0

  def add(self, step: int, metrics) -> None:
    if not self.metrics:
      self.first_step = step
    self.metrics.append(metrics)

  def fetch(self) -> list[dict]:
    fetched = [jax.tree.map(parallel.first_replica, m) for m in self.metrics]
    self.metrics = []
    return fetched


class Trainer:
  """Builds the run from a config, restores it from the workdir, and trains it.

  The pieces (`state`, `p_train_step`, `evaluate_knn`, ...) are attributes so that tests and
  the evaluator can use them.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = workdir
    # The notice that kNN is skipped waits for `initialize`: a refusal must be the only line.
    self.train_split, self.eval_split, self.data_notice = data.load_splits_and_notice(config)
    n = self.train_split.num_examples
    config_validation.validate_against_data(config, n)
    self.layout = ShardLayout(n, jax.device_count())
    self.steps_per_epoch = n // config.batch_size
    self.total_steps = (config.num_train_steps if config.num_train_steps > 0
                        else config.num_epochs * self.steps_per_epoch)
    self.num_classes = (self.eval_split or self.train_split).num_classes or 1
    channels = self.train_split.channels
    self.image_shape = (config.image_size, config.image_size, channels)

    self.model = build_model(config)
    self.learning_rate_fn = optim.learning_rate_schedule(config, self.steps_per_epoch,
                                                         self.total_steps)
    self.tx = optim.sgd(config, self.learning_rate_fn)
    self.augment_config = augment_config(config, self.train_split)
    self.hp = StepConfig.from_config(config, self.layout, self.augment_config, self.num_classes)

    static = dict(model=self.model, hp=self.hp)
    self.p_init = pmapped(init_state, tx=self.tx, image_shape=self.image_shape,
                          low_dim=config.low_dim, bank_init=config.bank_init,
                          bank_dtype=jnp.dtype(config.bank_dtype), **static)
    self.p_train_step = pmapped(train_step, donate_argnums=(0,), tx=self.tx,
                                learning_rate_fn=self.learning_rate_fn, **static)
    self.p_knn = pmapped(knn_eval_step, **static)
    self.p_write_features = pmapped(write_features_step, donate_argnums=(1,), **static)

    labels = self.train_split.labels
    if labels is None:
      labels = np.full((n,), -1, np.int32)
    self.bank_labels = parallel.shard_local_rows(
        self.layout.shard_array(labels.astype(np.int32), fill=-1)[
            parallel.local_device_indices()])
    self.meta = run_meta(config, self.layout, self.train_split.fingerprint)
    self.checkpointer = None      # Made by `initialize`: building a Trainer writes nothing.
    self.state = None
    self.iterator = None

  # -- set-up -------------------------------------------------------------------------------------

  def check_workdir(self) -> None:
    """Refuses a workdir holding another run (other data, or a different n, d, model, ...).

    Reads only, so it can run before the workdir is locked or anything is written to it. The
    data are compared first: when only they changed, the fix is the data, not the config.
    """
    data.check_fingerprint(self.workdir, self.train_split, write=False)
    check_compatible(self.workdir, self.meta, incompatible_fields)

  def finished_results(self) -> Optional[dict]:
    """The results of this run if it has already finished, else None. Reads only.

    Finished means: `results.json` was written (the final evaluation ran) and the newest
    checkpoint has reached `total_steps`. Rerunning such a run must neither evaluate again nor
    write a second record of its last step into metrics.jsonl.
    """
    path = epath.Path(self.workdir) / RESULTS_NAME
    checkpoints = epath.Path(self.workdir) / CHECKPOINTS_DIR
    if not parallel.any_process(path.exists() and checkpoints.exists()):
      return None
    checkpointer = Checkpointer(self.workdir, keep=None, sharded_keys=INSTANCE_SHARDED_KEYS,
                                read_only=True)
    try:
      latest = checkpointer.latest_step()
    finally:
      checkpointer.close()
    try:
      results = json.loads(path.read_text()) if path.exists() else {"step": latest}
    except (OSError, ValueError):
      results = None                          # Damaged: evaluating again rewrites it.
    finished = (latest is not None and latest >= self.total_steps and isinstance(results, dict)
                and results.get("step") == latest)
    return results if parallel.any_process(finished) else None

  def fresh_state(self) -> TrainState:
    """The initial train state of `config.seed` (also the target a checkpoint restores into)."""
    key = jax.random.key_data(jax.random.key(self.config.seed))
    return self.p_init(parallel.replicate(key))

  def initialize(self) -> int:
    """Restores the newest checkpoint, or builds a fresh state. Returns the step reached.

    Records the data's fingerprint in the workdir; call it holding the workdir's lock.
    """
    data.check_fingerprint(self.workdir, self.train_split, write=jax.process_index() == 0)
    if self.data_notice:
      log.warning("%s", self.data_notice)
    self.checkpointer = Checkpointer(self.workdir, keep=self.config.keep_checkpoints,
                                     sharded_keys=INSTANCE_SHARDED_KEYS)
    self.state = self.fresh_state()
    restored = self.checkpointer.restore(self.state, self.meta, compatible=incompatible_fields)
    data_state = None
    if restored is not None:
      self.state, data_state, step = restored
      log.info("resumed from the checkpoint of step %d", step)
    elif self.config.bank_init == "features":
      self.state = self.state.replace(bank=self.features_bank())
    self.iterator = data.TrainIterator(
        self.train_split, global_batch_size=self.config.batch_size, seed=self.config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        image_size=self.config.image_size, host_crop=not self.train_split.fixed_size)
    if data_state is not None:
      self.iterator.set_state(data_state)
    return self.step

  def restore_for_evaluation(self) -> int:
    """Restores the newest checkpoint into `state` without training (for evaluators); returns
    its step. Raises UserError when the workdir has no checkpoint that can be read."""
    checkpointer = Checkpointer(self.workdir, keep=None, sharded_keys=INSTANCE_SHARDED_KEYS,
                                read_only=True)
    try:
      if checkpointer.latest_step() is None:
        raise UserError(f"{self.workdir} has no checkpoint to evaluate; train it first with "
                        "python -m instdisc_jax.main")
      restored = checkpointer.restore(self.fresh_state(), self.meta,
                                      compatible=incompatible_fields)
    finally:
      checkpointer.close()
    if restored is None:
      raise UserError(f"no checkpoint of {self.workdir} could be read (see the warnings above)")
    self.state = restored[0]
    return self.step

  @property
  def step(self) -> int:
    return int(parallel.first_replica(self.state.step))

  # -- evaluation ---------------------------------------------------------------------------------

  def _eval_batches(self, split):
    return data.eval_batches(split, global_batch_size=self.config.eval_batch_size,
                             process_index=jax.process_index(),
                             process_count=jax.process_count(),
                             image_size=self.config.image_size)

  def features_bank(self) -> MemoryBank:
    """A bank holding eval-transform features of every training image under the current net."""
    bank = self.state.bank.replace(rows=jnp.zeros_like(self.state.bank.rows))
    for batch in self._eval_batches(self.train_split):
      bank = self.p_write_features(self.state, bank, parallel.shard_local_batch(batch))
    return bank

  def evaluate_knn(self, bank_rows) -> dict:
    """Weighted kNN top-1/top-5 (%) of the eval split against `bank_rows`."""
    totals = {"top1": 0, "top5": 0, "total": 0}
    for batch in self._eval_batches(self.eval_split):
      batch = {k: batch[k] for k in ("image", "label", "mask")}
      counts = self.p_knn(self.state, parallel.shard_local_batch(batch), bank_rows,
                          self.bank_labels)
      for k, v in counts.items():
        totals[k] += int(parallel.first_replica(v))
    total = max(totals.pop("total"), 1)
    return {k: 100.0 * v / total for k, v in totals.items()}

  # -- checkpoints --------------------------------------------------------------------------------

  def save(self) -> None:
    """Starts checkpointing the current step (unless it already is); returns while the
    checkpoint is written in the background (`Checkpointer.save`)."""
    if self.checkpointer.latest_step() != self.step:
      self.checkpointer.save(self.step, self.state, self.iterator.get_state(), self.meta)

  # -- the loop -----------------------------------------------------------------------------------

  def train(self, stop: Optional[StopSignal] = None) -> dict:
    """Trains to `total_steps` from the current step; returns the final evaluation."""
    config = self.config
    stop = stop or StopSignal()
    writer = MetricWriter(self.workdir, resume_step=self.step)
    step = self.step
    pending = _Pending()
    bar = tqdm.tqdm(total=self.total_steps, initial=step, unit="step", dynamic_ncols=True,
                    disable=not (config.progress_bar and jax.process_index() == 0))
    clock = _Throughput(step)
    try:
      while step < self.total_steps:
        batch = next(self.iterator)
        self.state, metrics = self.p_train_step(
            self.state, parallel.shard_local_batch({"image": batch["image"],
                                                    "index": batch["index"]}))
        step += 1
        pending.add(step, metrics)
        bar.update(1)
        if not clock.started:                       # the first step compiled: time from here
          jax.block_until_ready(metrics)
          clock.restart(step)
        epoch_done = step % self.steps_per_epoch == 0
        save_now = bool(config.checkpoint_every_steps) and (
            step % config.checkpoint_every_steps == 0)
        flush_now = (step % config.log_every_steps == 0 or epoch_done or save_now
                     or step == self.total_steps)
        signal_name = stop.poll(step, at_sync_point=flush_now)
        if flush_now or signal_name:
          scalars = self._check_and_summarise(pending.fetch(), pending.first_step)
          scalars["images_per_sec"] = clock.rate(step, config.batch_size)
          writer.write(step, scalars)
          bar.set_postfix(loss=f"{scalars['loss']:.4f}",
                          img_s=f"{scalars['images_per_sec']:.0f}", refresh=False)
        epoch = step // self.steps_per_epoch
        if (epoch_done and self.eval_split is not None and config.eval_every_epochs
            and epoch % config.eval_every_epochs == 0 and step < self.total_steps):
          result = self.evaluate_knn(self.state.bank.rows)
          writer.write(step, {f"knn_bank/{k}": v for k, v in result.items()} | {"epoch": epoch})
          if jax.process_index() == 0:
            bar.write(f"epoch {epoch}: kNN on bank features top-1 {result['top1']:.2f}% "
                      f"top-5 {result['top5']:.2f}%")
          clock.restart(step)
        if save_now or signal_name:
          self.save()
          clock.restart(step)
        if signal_name:
          self.checkpointer.wait_until_finished()     # Exit 75 promises a written checkpoint.
          raise Preempted(step, signal_name)
      bar.close()
      self.save()
      results = self.final_evaluation(writer)       # Overlaps the final checkpoint's write.
      self.checkpointer.wait_until_finished()
    finally:
      bar.close()
      writer.close()
    return results

  def _check_and_summarise(self, fetched: list[dict], first_step: int) -> dict:
    """Raises NonFiniteLossError naming the first bad step; else the interval's mean metrics."""
    for offset, metrics in enumerate(fetched):
      if not np.isfinite(metrics["loss"]):
        last = self.checkpointer.latest_step()
        kept = f"the last checkpoint (step {last}) is kept" if last is not None else \
            "no checkpoint was written"
        raise NonFiniteLossError(
            f"loss is {metrics['loss']} at step {first_step + offset}; {kept}; lower "
            "learning_rate or raise temperature, then rerun")
    summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
    summary["learning_rate"] = float(fetched[-1]["learning_rate"])
    summary["epoch"] = (first_step + len(fetched) - 1) / self.steps_per_epoch
    return summary

  def final_evaluation(self, writer: MetricWriter) -> dict:
    """kNN on the bank and (if configured) on recomputed features; written to results.json."""
    results = {"step": self.step}
    if self.eval_split is None:
      log.info("no labelled eval split: kNN evaluation skipped")
    else:
      results["knn_bank"] = self.evaluate_knn(self.state.bank.rows)
      if self.config.recompute_features:
        results["knn_recomputed"] = self.evaluate_knn(self.features_bank().rows)
      writer.write(self.step, {f"{name}/{k}": v for name in ("knn_bank", "knn_recomputed")
                               for k, v in results.get(name, {}).items()})
    if jax.process_index() == 0:
      with open(os.path.join(self.workdir, RESULTS_NAME), "w") as f:
        json.dump(results, f, indent=2)
    return results

  def close(self) -> None:
    if self.checkpointer is not None:
      self.checkpointer.close()


class _Throughput:
  """Images per second of training, excluding evaluation and checkpoint time."""

  def __init__(self, step: int):
    self.started = False
    self._step, self._time = step, time.perf_counter()

  def restart(self, step: int) -> None:
    self.started = True
    self._step, self._time = step, time.perf_counter()

  def rate(self, step: int, batch_size: int) -> float:
    now = time.perf_counter()
    rate = (step - self._step) * batch_size / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    return rate


CONFIG_NAME = "config.json"
RESULTS_NAME = "results.json"           # The final kNN accuracies, written by `final_evaluation`.


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the run's config to `<workdir>/config.json` (process 0), for the evaluator."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, CONFIG_NAME), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (the schema's defaults for fields it lacks)."""
  path = os.path.join(workdir, CONFIG_NAME)
  if not os.path.exists(path):
    raise UserError(f"{path} not found: --workdir must be a directory written by "
                    "instdisc_jax.main")
  try:
    with open(path) as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError(f"a JSON {type(saved).__name__}, not an object")
    config = default_config.get_config()
    config.update_from_flattened_dict(_flatten(saved))
    # Fields it does not know, or values no run could have trained with, are damage too.
    config_validation.validate(config)
  except (OSError, ValueError, KeyError, TypeError, AttributeError, UserError) as e:
    reason = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {one_line(e)}"
    raise UserError(
        f"{path} is damaged ({reason}); rerun training with the run's command line, which "
        "writes it again, or restore it from a copy") from e
  return config


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
  return flat


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop: Optional[StopSignal] = None) -> dict:
  """Trains per `config` in `workdir` (resuming what is there) and returns the final kNN.

  Everything that can be wrong with the config, the data or the workdir is found before
  anything is compiled or written to the workdir.
  """
  config_validation.validate(config, num_devices=jax.device_count(),
                             num_processes=jax.process_count())
  trainer = Trainer(config, workdir)     # Loads the data and validates the config against it.
  trainer.check_workdir()
  results = trainer.finished_results()
  if results is not None:
    log.warning("%s has already finished training (step %d of %d); its results are in %s and "
                "nothing was written. Raise num_epochs (or num_train_steps) to train on, or run "
                "python -m instdisc_jax.evaluate --workdir=%s for more evaluations", workdir,
                results["step"], trainer.total_steps, RESULTS_NAME, workdir)
    return results
  create_workdir(workdir)
  with WorkdirLock(workdir):
    save_config(config, workdir)
    try:
      step = trainer.initialize()
      log.info("training %s on %s for %d steps (%d per epoch) from step %d on %d devices",
                   config.model, trainer.train_split.name, trainer.total_steps,
                   trainer.steps_per_epoch, step, jax.device_count())
      return trainer.train(stop)
    finally:
      trainer.close()
