"""How the n training instances are split over D devices.

Instance i lives on shard `i // rows_per_shard` at row `i % rows_per_shard`, with
`rows_per_shard = ceil(n / D)`. The last shards may hold padding rows (global index >= n): they are
never sampled as noise, never scored and never returned by kNN.

Inside a mapped function (`jax.pmap` or `jax.shard_map` over `axis_name`) `shard_index` is the
device's position on that axis; with `axis_name=None` there is one shard holding everything.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

AxisName = Optional[str]


@dataclasses.dataclass(frozen=True)
class ShardLayout:
  """Static description of the instance axis split into `num_shards` contiguous blocks."""

  num_instances: int
  num_shards: int = 1

  def __post_init__(self):
    if self.num_instances < 1:
      raise ValueError(f"num_instances must be >= 1, got {self.num_instances}")
    if self.num_shards < 1:
      raise ValueError(f"num_shards must be >= 1, got {self.num_shards}")

  @property
  def rows_per_shard(self) -> int:
    return -(-self.num_instances // self.num_shards)

  @property
  def padded_size(self) -> int:
    return self.rows_per_shard * self.num_shards

  def real_rows(self) -> np.ndarray:
    """Number of real (non-padding) rows on each shard, shape (num_shards,)."""
    starts = np.arange(self.num_shards) * self.rows_per_shard
    return np.clip(self.num_instances - starts, 0, self.rows_per_shard).astype(np.int32)

  def owner(self, global_index):
    """Shard holding each global instance index (numpy or jax arrays)."""
    return global_index // self.rows_per_shard

  def to_global(self, shard, local_row):
    """Global instance index of row `local_row` of shard `shard` (inverse of `owner` and
    `owned_rows`), e.g. to name the instances behind `NoiseSample.rows` or kNN neighbours."""
    return shard * self.rows_per_shard + local_row

  def shard_array(self, full: np.ndarray, fill=0) -> np.ndarray:
    """(n, ...) host array -> (num_shards, rows_per_shard, ...) with `fill` in padding rows."""
    full = np.asarray(full)
    if full.shape[0] != self.num_instances:
      raise ValueError(f"expected {self.num_instances} rows, got {full.shape[0]}")
    pad = np.full((self.padded_size - self.num_instances,) + full.shape[1:], fill, full.dtype)
    return np.concatenate([full, pad]).reshape(
        (self.num_shards, self.rows_per_shard) + full.shape[1:])

  def unshard_array(self, sharded) -> np.ndarray:
    """Inverse of `shard_array`: (num_shards, rows_per_shard, ...) -> (n, ...), e.g. the whole
    bank as an (n, d) host array, row i for instance i (padding rows dropped)."""
    sharded = np.asarray(sharded)
    return sharded.reshape((self.padded_size,) + sharded.shape[2:])[:self.num_instances]


def shard_index(axis_name: AxisName) -> jax.Array:
  """This device's shard on `axis_name` (0 when not mapped)."""
  if axis_name is None:
    return jnp.zeros((), jnp.int32)
  return lax.axis_index(axis_name)


def num_shards(axis_name: AxisName) -> int:
  """Static size of the mapped axis (1 when not mapped)."""
  return 1 if axis_name is None else lax.axis_size(axis_name)


def local_real_rows(layout: ShardLayout, axis_name: AxisName) -> jax.Array:
  """Number of real rows on this device's shard (a traced int32 scalar)."""
  return jnp.asarray(layout.real_rows())[shard_index(axis_name)]


def real_row_mask(layout: ShardLayout, axis_name: AxisName) -> jax.Array:
  """Bool (rows_per_shard,): True on this shard's real rows, False on padding."""
  return jnp.arange(layout.rows_per_shard) < local_real_rows(layout, axis_name)


def owned_rows(layout: ShardLayout, global_index: jax.Array, axis_name: AxisName):
  """Maps global instance indices to this shard's rows.

  Returns `(local_row, owned)`: `owned` is True where this shard holds the instance, and
  `local_row` is its row there (clipped into range where not owned, so it is always a safe
  gather index; mask the result with `owned`).
  """
  local = global_index - shard_index(axis_name) * layout.rows_per_shard
  owned = (local >= 0) & (local < layout.rows_per_shard)
  return jnp.clip(local, 0, layout.rows_per_shard - 1), owned


def gather_batch(x: jax.Array, axis_name: AxisName) -> jax.Array:
  """All-gathers the per-device batch into the global batch (concatenated in device order).

  This is the one collective the loss gradient flows through: its transpose is a
  reduce-scatter, which returns to each device the gradient of the whole loss with respect to
  its own examples.
  """
  if axis_name is None:
    return x
  return lax.all_gather(x, axis_name, tiled=True)


def psum(x, axis_name: AxisName):
  """`lax.psum` that is the identity when not mapped."""
  return x if axis_name is None else lax.psum(x, axis_name)


def pmax(x, axis_name: AxisName):
  """`lax.pmax` that is the identity when not mapped."""
  return x if axis_name is None else lax.pmax(x, axis_name)
