"""The pure step functions: the train state, the train step and the evaluation steps.

Everything here is a function of arrays and static configuration, to be mapped by `jax.pmap`
over every device of every process (`pmapped`). Bodies use only named-axis collectives over
`parallel.AXIS`. Per step, the devices exchange the batch's features and instance indices
(B x d and B numbers), B-sized per-example statistics and a few scalars, plus the encoder
gradients and BatchNorm running statistics that any data-parallel step exchanges; nothing grows
with n or m.

This module imports nothing of the training loop, the data pipeline, checkpoints or the command
line (tests/test_import_graph.py checks it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from instdisc_jax import augment
from instdisc_jax import knn
from instdisc_jax import memory_bank
from instdisc_jax import noise as noise_lib
from instdisc_jax import objectives
from instdisc_jax import sharding
from instdisc_jax.config_fields import get_field
from instdisc_jax.config_schema import STEP_FIELDS
from instdisc_jax.memory_bank import MemoryBank
from instdisc_jax.parallel import AXIS
from instdisc_jax.sharding import ShardLayout

# Leaves of the train state that are sharded along the instance axis (everything else is
# replicated): the bank and the parametric softmax weights, with their optimizer traces.
INSTANCE_SHARDED_KEYS = ("rows", "instance_weights")


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes. Outside the step every leaf has a leading device axis.

  Attributes:
    step: number of steps taken.
    params: {"encoder": Flax params} plus {"instance_weights": (rows_per_shard, d)} for the
      parametric softmax, or {"classifier": (d, num_classes)} (replicated) for the supervised
      objective.
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
  """The static hyper-parameters of the step (hashable, closed over by pmap).

  The config fields among them are those `config_schema.SCHEMA` tags `step` (batch_size is
  `global_batch`); `layout`, `augment` and `num_classes` come from the data.
  """

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
    """The config's fields tagged `step` in `config_schema`, plus what the run derives."""
    return cls(**{attr: get_field(config, name) for attr, name in STEP_FIELDS.items()},
               layout=layout, augment=augment_config, num_classes=num_classes)

  @property
  def uses_noise(self) -> bool:
    return self.objective in ("nce", "infonce")

  @property
  def uses_labels(self) -> bool:
    """Whether the step reads the batch's labels (the supervised upper bound)."""
    return self.objective == "supervised"


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
  if hp.objective == "supervised":
    # Zeros: the loss is convex in W, and the first step's gradient moves W, then the encoder.
    params["classifier"] = jnp.zeros((low_dim, hp.num_classes), jnp.float32)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
      bank=MemoryBank.from_values(rows, num_instances=layout.num_instances,
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


def compute_objective(hp: StepConfig, params, features, indices, bank: MemoryBank,
                      noise: Optional[noise_lib.NoiseSample], partition: objectives.Partition,
                      rows: memory_bank.StepRows, labels: Optional[jax.Array] = None):
  """This device's loss share for the configured objective (+ proximal term), and its aux.

  `rows` are the step's pre-step bank rows, gathered once (`objectives.step_rows`); `labels`
  the global batch's labels, read only by the supervised objective.
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
  elif hp.objective == "supervised":
    share, aux = objectives.supervised_loss(features, labels, params["classifier"],
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

  batch: {"image": uint8 (b, H, W, C), "index": int32 (b,)} for this device, plus
    {"label": int32 (b,)} when the objective reads labels (`hp.uses_labels`).
  Returns (new state, metrics), the metrics identical on every device.
  """
  augment_key, noise_key = step_keys(state)
  images = augment.train_augment(augment_key, batch["image"], hp.augment)
  indices = sharding.gather_batch(batch["index"], AXIS)
  labels = sharding.gather_batch(batch["label"], AXIS) if hp.uses_labels else None
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
                                   state.partition, rows, labels)
    return share, (aux, new_model_state, features)

  (share, (aux, new_model_state, features)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  # Replicated parameters (the encoder, the supervised classifier): each device holds the
  # gradient of its share; sum them. Instance-sharded gradients are complete on their shard.
  grads = {name: grad if name in INSTANCE_SHARDED_KEYS else jax.lax.psum(grad, AXIS)
           for name, grad in grads.items()}
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


def knn_sweep_step(state: TrainState, batch, bank_rows, bank_labels, *, model, hp: StepConfig,
                   sweep_counts, ks: tuple, temperatures: tuple):
  """Top-1/top-5 hit counts of a global eval batch for every (k, tau), from one neighbour search.

  `sweep_counts` is `evaluation.knn_sweep.sweep_counts`, passed in: this module imports nothing
  of the evaluation package. Returns ({setting_name: {"top1", "top5"}}, the number of real rows), identical
  on every device.
  """
  queries = sharding.gather_batch(embed(state, batch["image"], model=model, hp=hp), AXIS)
  targets = sharding.gather_batch(batch["label"], AXIS)
  valid = sharding.gather_batch(batch["mask"], AXIS)
  counts = sweep_counts(queries, targets, valid, bank_rows, bank_labels,
                        num_instances=hp.layout.num_instances, num_classes=hp.num_classes,
                        ks=ks, temperatures=temperatures, axis_name=AXIS)
  return counts, jnp.sum(valid, dtype=jnp.int32)


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
