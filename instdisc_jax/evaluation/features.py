"""Features of a whole split under the eval transform, extracted once and shared by evaluators.

The features stay where they are computed, instance-sharded over the devices with the memory
bank's layout (`sharding.ShardLayout`, a leading device axis): shard k holds records
`[k * rows_per_shard, (k + 1) * rows_per_shard)` of the split, its last shards padding rows
(label -1). No host and no device ever holds a whole split. Extraction runs the pmapped encoder
over `data.eval_batches` (every record once, padded to whole global batches, padding masked);
each step all-gathers the batch's features (B rows: constant in the split's size, like the
train step's all-gather) and every device writes the rows it owns into its shard, in place (the
tables are donated). For ImageNet's pooled ResNet-50 features that is 1.28M x 2048 x 4 B / D
per device instead of 10.5 GB on one device and on every host.

Evaluators read the tables inside pmapped steps (`knn_sweep`, `linear_probe`), fetch a few rows
(`take_rows`, for pictures) or write each process's own rows (`export`).
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from instdisc_jax import data
from instdisc_jax import parallel
from instdisc_jax import sharding
from instdisc_jax import steps
from instdisc_jax.data import images as images_lib
from instdisc_jax.parallel import AXIS
from instdisc_jax.sharding import AxisName
from instdisc_jax.sharding import ShardLayout

KINDS = ("embedding", "pooled")

# `(state, images) -> (embedding, pooled)`: this device's images through the encoder under the
# eval transform (`embed_fn`). The only thing evaluators know of the network.
EmbedFn = Callable[[steps.TrainState, jax.Array], tuple[jax.Array, jax.Array]]


def embed_fn(model, hp: steps.StepConfig) -> EmbedFn:
  """The run's `EmbedFn`: `steps.embed` with the pooled backbone features."""
  return functools.partial(steps.embed, model=model, hp=hp, return_pooled=True)


@flax.struct.dataclass
class Features:
  """One split's features, instance-sharded: global arrays with a leading device axis D.

  Row r of shard k is record `layout.to_global(k, r)`; rows past the split's end are padding
  (zero features, label -1).
  """

  embedding: jax.Array    # float32 (D, R, low_dim), L2-normalised
  pooled: jax.Array       # float32 (D, R, P), the pooled backbone features
  labels: jax.Array       # int32 (D, R), -1 when unknown and on padding rows
  layout: ShardLayout = flax.struct.field(pytree_node=False)

  def kind(self, name: str) -> jax.Array:
    """The features called `name` ("embedding" or "pooled")."""
    return {"embedding": self.embedding, "pooled": self.pooled}[name]

  @classmethod
  def from_host(cls, embedding: np.ndarray, pooled: np.ndarray, labels: np.ndarray,
                devices: parallel.Devices = None) -> "Features":
    """Shards (N, ...) host arrays over `devices` (all by default); each process places only
    its own shards. For tests and for features computed elsewhere."""
    layout = ShardLayout(len(labels), len(jax.devices() if devices is None else devices))
    local = parallel.local_device_indices(devices)
    return cls(**{name: parallel.shard_local_rows(
        layout.shard_array(np.asarray(value, dtype), fill=fill)[local], devices)
        for name, value, dtype, fill in (("embedding", embedding, np.float32, 0),
                                         ("pooled", pooled, np.float32, 0),
                                         ("labels", labels, np.int32, -1))}, layout=layout)

  def local_rows(self) -> dict[str, np.ndarray]:
    """This process's real rows as host arrays, in record order: {"features", "pooled",
    "labels", "indices"} (the export's fields; "indices" are the record indices)."""
    shards = sorted(self.embedding.addressable_shards, key=lambda s: s.index[0].start)
    by_device = {name: {s.device: s.data for s in getattr(self, name).addressable_shards}
                 for name in ("embedding", "pooled", "labels")}
    parts = []
    for shard in shards:
      k = shard.index[0].start
      indices = self.layout.to_global(k, np.arange(self.layout.rows_per_shard))
      real = indices < self.layout.num_instances
      parts.append({"features": np.asarray(by_device["embedding"][shard.device])[0][real],
                    "pooled": np.asarray(by_device["pooled"][shard.device])[0][real],
                    "labels": np.asarray(by_device["labels"][shard.device])[0][real],
                    "indices": indices[real].astype(np.int32)})
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def write_rows(table: jax.Array, indices: jax.Array, values: jax.Array, valid: jax.Array, *,
               layout: ShardLayout, axis_name: AxisName) -> jax.Array:
  """Writes the rows of `values` (global batch, (B, ...)) that this shard owns into `table`.

  table: this shard's (rows_per_shard, ...); indices: (B,) global record indices; valid: (B,)
  False on padding (whose index is -1, owned by no shard). Rows owned elsewhere are dropped.
  """
  local, owned = sharding.owned_rows(layout, indices, axis_name)
  target = jnp.where(owned & valid, local, layout.rows_per_shard)   # out of range: dropped
  return table.at[target].set(values.astype(table.dtype), mode="drop")


def take_rows(table: jax.Array, indices: jax.Array, *, layout: ShardLayout,
              axis_name: AxisName) -> jax.Array:
  """Rows `indices` (Q,) of a sharded table, replicated on every device: (Q, ...).

  Each shard contributes the rows it owns and zeros elsewhere; one psum of Q rows joins them.
  """
  local, owned = sharding.owned_rows(layout, indices, axis_name)
  mine = table[local]
  mine = jnp.where(owned.reshape(owned.shape + (1,) * (mine.ndim - 1)), mine, 0)
  return sharding.psum(mine, axis_name)


def _extract_step(state: steps.TrainState, tables: dict, batch, *, embed: EmbedFn,
                  layout: ShardLayout) -> dict:
  """Features of this device's part of an eval batch, written into the owners' shards."""
  embedding, pooled = embed(state, batch["image"])
  indices, valid = (sharding.gather_batch(batch[name], AXIS) for name in ("index", "mask"))
  values = {"embedding": embedding, "pooled": pooled, "labels": batch["label"]}
  return {name: write_rows(tables[name], indices, sharding.gather_batch(values[name], AXIS),
                           valid, layout=layout, axis_name=AXIS)
          for name in tables}


def _take_step(table, indices, *, layout: ShardLayout):
  return take_rows(table, indices, layout=layout, axis_name=AXIS)


def empty_tables(layout: ShardLayout, low_dim: int, pooled_dim: int) -> dict:
  """Zero feature tables and -1 labels, (D, R, ...), made on the devices (nothing on a host)."""
  shapes = {"embedding": ((low_dim,), jnp.float32, 0), "pooled": ((pooled_dim,), jnp.float32, 0),
            "labels": ((), jnp.int32, -1)}

  @functools.partial(jax.jit, out_shardings=parallel.device_sharding())
  def make():
    return {name: jnp.full((layout.num_shards, layout.rows_per_shard) + shape, fill, dtype)
            for name, (shape, dtype, fill) in shapes.items()}
  return make()


def batches(split, batch_size: int, image_size: int):
  """This process's padded eval batches of `split` (global batches of `batch_size`), as the
  trainer reads them."""
  return data.eval_batches(split, global_batch_size=batch_size,
                           process_index=jax.process_index(),
                           process_count=jax.process_count(), image_size=image_size)


def recomputed_bank(state: steps.TrainState, split, write_step, *, batch_size: int,
                    image_size: int):
  """A copy of `state.bank` holding eval-transform features of every training image.

  write_step: the pmapped `steps.write_features_step` of the run (bank donated). The bank keeps
  its layout and dtype, so the kNN steps take its rows as they take the memory bank's.
  """
  bank = state.bank.replace(rows=jnp.zeros_like(state.bank.rows))
  for batch in batches(split, batch_size, image_size):
    bank = write_step(state, bank, parallel.shard_local_batch(batch))
  return bank


def load_images(split, indices: np.ndarray, image_size: int) -> np.ndarray:
  """uint8 images of the records `indices`; variable-size records get the eval crop."""
  if split.in_memory:
    return split.images[indices]
  box = None if split.fixed_size else images_lib.eval_box
  return np.stack([split.load(int(i), image_size, box)["image"] for i in indices])


class FeatureCache:
  """Extracts each split's features at most once for the train state last asked about.

  embed: the run's `EmbedFn` (`embed_fn`); batch_size: global batch of the extraction (a
  multiple of the devices); image_size: the run's, for decoding variable-size records.
  """

  def __init__(self, embed: EmbedFn, *, batch_size: int, image_size: int):
    self.embed = embed
    self.batch_size = batch_size
    self.image_size = image_size
    self._p_extract = {}
    self._p_take = {}
    self._state = None
    self._cache: dict = {}

  def layout(self, split) -> ShardLayout:
    """The split's instance layout over all devices (the bank's, for the training split)."""
    return ShardLayout(split.num_examples, jax.device_count())

  def dims(self, state: steps.TrainState, channels: int) -> tuple[int, int]:
    """(low_dim, pooled_dim) of the embedding function, from its shapes alone (no compute)."""
    one_device = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), state)
    images = jax.ShapeDtypeStruct((1, self.image_size, self.image_size, channels), jnp.uint8)
    embedding, pooled = jax.eval_shape(self.embed, one_device, images)
    return embedding.shape[-1], pooled.shape[-1]

  def get(self, state: steps.TrainState, split) -> Features:
    """The features of `split` under `state`'s network (computed again for another state)."""
    if state is not self._state:
      self._state, self._cache = state, {}
    if split.name not in self._cache:
      layout = self.layout(split)
      if layout not in self._p_extract:
        self._p_extract[layout] = steps.pmapped(_extract_step, donate_argnums=(1,),
                                                embed=self.embed, layout=layout)
      tables = empty_tables(layout, *self.dims(state, split.channels))
      for batch in batches(split, self.batch_size, self.image_size):
        tables = self._p_extract[layout](state, tables, parallel.shard_local_batch(batch))
      # With several processes pmap returns this process's (L, ...) slices: make them the
      # global (D, ...) arrays they are part of, so shard positions are global ones.
      tables = jax.tree.map(parallel.to_global, tables)
      self._cache[split.name] = Features(**tables, layout=layout)
    return self._cache[split.name]

  def bank_rows(self, state: steps.TrainState, train_split) -> jax.Array:
    """Recomputed training features as bank rows (the bank's layout and dtype)."""
    rows = self.get(state, train_split).embedding
    dtype = state.bank.dtype
    return rows if rows.dtype == dtype else rows.astype(dtype)

  def take(self, table: jax.Array, layout: ShardLayout, indices: np.ndarray) -> np.ndarray:
    """Host copy of rows `indices` of a sharded table: a few rows, for pictures."""
    if layout not in self._p_take:
      self._p_take[layout] = steps.pmapped(_take_step, layout=layout)
    rows = self._p_take[layout](table, parallel.replicate(np.asarray(indices, np.int32)))
    return parallel.first_replica(rows)


def gathered_bytes(layout: ShardLayout, low_dim: int, pooled_dim: int) -> int:
  """Bytes of one split's features held whole (every row on one device or host)."""
  return layout.num_instances * (low_dim + pooled_dim + 1) * 4


def sharded_bytes(layout: ShardLayout, low_dim: int, pooled_dim: int) -> int:
  """Bytes of one split's features on each device (its shard, padding rows included)."""
  return layout.rows_per_shard * (low_dim + pooled_dim + 1) * 4

