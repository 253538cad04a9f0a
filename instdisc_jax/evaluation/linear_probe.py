"""Linear probe: softmax regression on frozen features, trained data-parallel with optax.

Each kind of feature (the L2-normalised embedding, the pooled backbone features) is standardised
per dimension with the labelled training rows' mean and standard deviation, so one learning rate
suits both; then a linear classifier (weights and bias, zero-initialised: the problem is convex)
is trained with AdamW and a cosine-decayed learning rate on minibatches drawn from a fresh
permutation every epoch, and scored on the eval split (top-1).

The features stay instance-sharded (`features.Features`): training is a pmapped step over all
devices and processes, like the train step. The global batch of step s is a function of (seed,
s) only: rows `perm_e[j * B, (j + 1) * B)` of the labelled rows, with `perm_e` the epoch's
`jax.random.permutation`. Every device holds the B record indices; each owner contributes the
rows it holds and one reduce-scatter (B x P numbers per step, whatever n) hands device j the
rows [j * B / D, (j + 1) * B / D) of the batch. Each device differentiates its share of the
batch's mean loss, and the shares' gradients are summed (`design.md`, "Loss shares"). So the
fit is the one-device fit on the same batches, up to the order of float additions: on 8 devices
the weights match the 1-device fit, and the fit of the code before sharding, within 1e-6
(5e-8 measured; `tests/test_evaluation_sharded.py`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from instdisc_jax import parallel
from instdisc_jax import sharding
from instdisc_jax import steps
from instdisc_jax.evaluation import features as features_lib
from instdisc_jax.parallel import AXIS
from instdisc_jax.sharding import AxisName
from instdisc_jax.sharding import ShardLayout

# Optimizer steps per pmapped call (a `lax.scan`): the batches' indices of one call are
# STEPS_PER_CALL x B numbers, never an epoch's permutation of the whole split.
STEPS_PER_CALL = 64
# Rows scored at once by `correct_counts` (bounds the (rows, classes) logits).
SCORE_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """The probe's optimisation (see `evaluation.config`)."""

  epochs: int
  batch_size: int
  learning_rate: float
  weight_decay: float
  seed: int


def moments(table: jax.Array, labels: jax.Array, *, axis_name: AxisName):
  """Mean and standard deviation (floored at 1e-6) per dimension of the labelled rows.

  table: this shard's (R, P) features; labels: (R,), -1 on unlabelled and padding rows. Two
  passes (mean, then squared deviations), each a psum of P numbers.
  """
  keep = (labels >= 0)[:, None]
  count = sharding.psum(jnp.sum(keep, dtype=jnp.float32), axis_name)
  mean = sharding.psum(jnp.sum(jnp.where(keep, table, 0.0), axis=0), axis_name) / count
  var = sharding.psum(jnp.sum(jnp.where(keep, jnp.square(table - mean), 0.0), axis=0),
                      axis_name) / count
  return mean, jnp.maximum(jnp.sqrt(var), 1e-6)


def batch_slice(table: jax.Array, labels: jax.Array, rows: jax.Array, *, layout: ShardLayout,
                axis_name: AxisName):
  """This device's part of the global batch `rows`: (x, y, weight) of B / D examples.

  rows: (B,) global record indices, the same on every device (-1: no example, weight 0). Owners
  put their rows in place, zeros elsewhere, and a reduce-scatter (sum) gives device j the batch
  rows [j * B / D, (j + 1) * B / D). Unmapped, the whole batch.
  """
  local, owned = sharding.owned_rows(layout, rows, axis_name)
  owned = owned & (rows >= 0)
  x = jnp.where(owned[:, None], table[local], 0.0)
  y = jnp.where(owned, labels[local], 0)
  weight = owned.astype(jnp.float32)
  if axis_name is not None:
    x, y, weight = (lax.psum_scatter(v, axis_name, scatter_dimension=0, tiled=True)
                    for v in (x, y, weight))
  return x, y, weight


def logits_of(params: dict, x: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """The classifier on standardised features."""
  return ((x - mean) / std) @ params["w"] + params["b"]


def train_steps(carry, table: jax.Array, labels: jax.Array, rows: jax.Array, live: jax.Array,
                mean: jax.Array, std: jax.Array, *, layout: ShardLayout,
                tx: optax.GradientTransformation, axis_name: AxisName):
  """Up to S optimizer steps: rows (S, B) global batches; steps where `live` is False keep the
  carry (so every call has the same shape). carry: (params, opt_state), replicated."""

  def step(carry, inputs):
    batch_rows, is_live = inputs
    params, opt_state = carry
    x, y, weight = batch_slice(table, labels, batch_rows, layout=layout, axis_name=axis_name)
    batch_size = jnp.sum(batch_rows >= 0).astype(jnp.float32)

    def share(params):   # This device's share of the batch's mean cross-entropy.
      losses = optax.softmax_cross_entropy_with_integer_labels(logits_of(params, x, mean, std),
                                                               y)
      return jnp.sum(weight * losses) / batch_size

    grads = sharding.psum(jax.grad(share)(params), axis_name)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new = (optax.apply_updates(params, updates), new_opt_state)
    return jax.tree.map(lambda a, b: jnp.where(is_live, a, b), new, carry), None

  carry, _ = lax.scan(step, carry, (rows, live))
  return carry


def correct_counts(params: dict, table: jax.Array, labels: jax.Array, mean: jax.Array,
                   std: jax.Array, *, axis_name: AxisName, chunk: int = SCORE_CHUNK):
  """(correct, labelled) counts of the classifier over all shards' labelled rows (int32)."""
  num_rows = table.shape[0]
  chunk = min(chunk, num_rows)

  def body(i, counts):
    start = jnp.minimum(i * chunk, num_rows - chunk)      # the last chunk ends at the shard end
    position = start + jnp.arange(chunk)
    x, y = (lax.dynamic_slice_in_dim(v, start, chunk) for v in (table, labels))
    count = (position >= i * chunk) & (y >= 0)
    hits = (jnp.argmax(logits_of(params, x, mean, std), axis=-1) == y) & count
    return counts + jnp.stack([jnp.sum(hits), jnp.sum(count)]).astype(jnp.int32)

  counts = lax.fori_loop(0, -(-num_rows // chunk), body, jnp.zeros((2,), jnp.int32))
  return sharding.psum(counts, axis_name)


def epoch_batches(labelled: np.ndarray, batch: int, num_devices: int, config: ProbeConfig):
  """(epoch, (steps, B_pad) record indices) for every epoch; B_pad pads B to a multiple of the
  devices with -1. Steps of epoch e take `jax.random.permutation(key_e, len(labelled))`."""
  num = len(labelled)
  steps = num // batch
  pad = -batch % num_devices
  for epoch, key in enumerate(jax.random.split(jax.random.key(config.seed), config.epochs)):
    order = np.asarray(jax.random.permutation(key, num))[:steps * batch]
    rows = labelled[order].reshape(steps, batch).astype(np.int32)
    yield epoch, np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)


class Probe:
  """The linear probe over `devices` (all by default): `fit`, then `top1`.

  The steps are compiled once per (layout, kind of feature); inputs are the sharded tables of
  `features.Features` placed on the same devices.
  """

  def __init__(self, num_classes: int, config: ProbeConfig, devices: parallel.Devices = None):
    self.num_classes = num_classes
    self.config = config
    self.devices = devices
    self.num_devices = len(jax.devices() if devices is None else devices)

  def _pmap(self, fn, **static):
    return jax.pmap(functools.partial(fn, axis_name=AXIS, **static), axis_name=AXIS,
                    devices=self.devices)

  def _replicate(self, tree):
    return parallel.replicate(tree, self.devices)

  def fit(self, table: jax.Array, labels: jax.Array, layout: ShardLayout,
          host_labels: np.ndarray):
    """The classifier {"w": (P, C), "b": (C,)} and the standardisation (mean, std), all
    replicated (leading device axis), trained on the labelled rows of the sharded `table`.

    host_labels: the split's (N,) labels (-1 unknown), for the epochs' batches of record indices.
    """
    config = self.config
    labelled = np.flatnonzero(np.asarray(host_labels) >= 0)
    batch = min(config.batch_size, len(labelled))
    steps_per_epoch = len(labelled) // batch
    schedule = optax.cosine_decay_schedule(config.learning_rate,
                                           config.epochs * steps_per_epoch)
    tx = optax.adamw(schedule, weight_decay=config.weight_decay)
    mean, std = self._pmap(moments)(table, labels)
    dim = table.shape[-1]
    params = {"w": np.zeros((dim, self.num_classes), np.float32),
              "b": np.zeros((self.num_classes,), np.float32)}
    carry = self._replicate((params, jax.tree.map(np.asarray, tx.init(params))))
    p_steps = self._pmap(train_steps, layout=layout, tx=tx)
    for _, rows in epoch_batches(labelled, batch, self.num_devices, config):
      for start in range(0, len(rows), STEPS_PER_CALL):
        part = rows[start:start + STEPS_PER_CALL]
        live = np.arange(STEPS_PER_CALL) < len(part)
        part = np.pad(part, ((0, STEPS_PER_CALL - len(part)), (0, 0)), constant_values=-1)
        carry = p_steps(carry, table, labels, *self._replicate((part, live)), mean, std)
    return carry[0], mean, std

  def top1(self, params, table: jax.Array, labels: jax.Array, mean, std) -> float:
    """Accuracy (%) over the labelled rows of a sharded table."""
    correct, total = parallel.first_replica(
        self._pmap(correct_counts)(params, table, labels, mean, std))
    return 100.0 * int(correct) / max(int(total), 1)

  def probe(self, train: features_lib.Features, test: features_lib.Features, kind: str,
            host_labels: np.ndarray) -> dict:
    """Fit on the training features of `kind`, score both splits: {"top1", "train_top1"} (%)."""
    params, mean, std = self.fit(train.kind(kind), train.labels, train.layout, host_labels)
    return {"top1": self.top1(params, test.kind(kind), test.labels, mean, std),
            "train_top1": self.top1(params, train.kind(kind), train.labels, mean, std)}


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
          num_classes: int, config: ProbeConfig, devices: parallel.Devices = None) -> dict:
  """The probe on host features (N, P) sharded over `devices`: {"top1", "train_top1"} (%)."""
  def sharded(x, y):
    return features_lib.Features.from_host(x, x, y, devices)
  return Probe(num_classes, config, devices).probe(sharded(train_x, train_y),
                                                   sharded(test_x, test_y), "pooled", train_y)


class LinearProbe:
  """`run(state)` -> {feature kind: {"top1", "train_top1"}} for each kind asked for: the probe
  fit on `train_split`'s features from the shared `FeatureCache`, scored on both splits."""

  def __init__(self, cache: features_lib.FeatureCache, *, train_split, eval_split,
               num_classes: int, kinds: Sequence[str], config: ProbeConfig):
    self.cache = cache
    self.train_split = train_split
    self.eval_split = eval_split
    self.kinds = tuple(kinds)
    self.probe = Probe(num_classes, config)

  def run(self, state: steps.TrainState) -> dict:
    train_features = self.cache.get(state, self.train_split)
    test_features = self.cache.get(state, self.eval_split)
    return {kind: self.probe.probe(train_features, test_features, kind, self.train_split.labels)
            for kind in self.kinds}
