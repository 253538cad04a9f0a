"""Noise samples for NCE and sampled softmax: m instances drawn uniformly, P_n(i) = 1/n.

Stratified over shards, so no bank row ever crosses devices: shard k draws m_k of the m noise
indices, uniformly from its own n_k real rows. For the expected loss to equal the i.i.d.-uniform
one, every real row must be drawn m/n times in expectation, i.e. E[m_k] = q_k = m * n_k / n.

How m is spread (m and n need not divide by D): systematic sampling. With N_k the number of real
rows on shards 0..k and one r drawn uniformly from {0, ..., n-1} and shared by all shards (the
same key on every device), shard k takes

    m_k = floor((m * N_k + r) / n) - floor((m * N_{k-1} + r) / n)

draws. Then m_k is floor(q_k) or ceil(q_k) with E[m_k] = q_k, the m_k sum to exactly m, and when D
divides both n and m every shard takes exactly m / D. The arithmetic is exact in int32 (the
quotients and remainders of m * N_k / n are precomputed on the host). Shapes are static: every
shard has `slots` (the largest m_k any r can give) slots and a `valid` mask marks the m_k in use.
Padding rows are never drawn, since each shard draws below its n_k.

Two modes:
* per-example (the reference): each example of the global batch gets its own m noise indices
  (and its own r), a batched gather of (B, slots, d) bank rows;
* shared: one set of m indices serves the whole batch, so scoring is one (B, d) x (d, slots)
  matrix product instead of a batched gather. A speed option: the noise is then correlated
  across the examples of a batch, which leaves each example's expected loss unchanged.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from instdisc_jax import sharding
from instdisc_jax.sharding import AxisName
from instdisc_jax.sharding import ShardLayout


@flax.struct.dataclass
class NoiseSample:
  """This shard's noise draws.

  Attributes:
    rows: int32 local row indices into this shard's bank rows: (B, slots) per-example or
      (slots,) shared.
    valid: bool, same shape: True on the m_k slots in use.
    num_noise: m, the total number of noise samples per example over all shards (static).
  """

  rows: jax.Array
  valid: jax.Array
  num_noise: int = flax.struct.field(pytree_node=False)

  @property
  def shared(self) -> bool:
    return self.rows.ndim == 1


def _quota_table(layout: ShardLayout, num_noise: int):
  """Quotient and remainder of m * N_k / n for k = -1..D-1 (so shape (D + 1,), from N_{-1} = 0)."""
  cumulative_rows = np.concatenate([[0], np.cumsum(layout.real_rows().astype(np.int64))])
  quotient, remainder = np.divmod(num_noise * cumulative_rows, layout.num_instances)
  return quotient.astype(np.int32), remainder.astype(np.int32)


def slots_per_shard(layout: ShardLayout, num_noise: int) -> int:
  """Static number of noise slots every shard carries: the largest m_k any r can give."""
  quotient, remainder = _quota_table(layout, num_noise)
  largest = np.diff(quotient) + (np.diff(remainder) > 0)
  return max(1, int(largest.max()))


def draws_on_shard(layout: ShardLayout, num_noise: int, r: jax.Array,
                   axis_name: AxisName) -> jax.Array:
  """m_k for this shard given the shared r (int32, any shape, values in [0, n))."""
  quotient, remainder = (jnp.asarray(t) for t in _quota_table(layout, num_noise))
  k = sharding.shard_index(axis_name)
  n = layout.num_instances
  carry_hi = (remainder[k + 1] + r >= n).astype(jnp.int32)
  carry_lo = (remainder[k] + r >= n).astype(jnp.int32)
  return quotient[k + 1] - quotient[k] + carry_hi - carry_lo


def sample(key: jax.Array, layout: ShardLayout, num_noise: int, batch_size: int, *,
           shared: bool = False, axis_name: AxisName = None) -> NoiseSample:
  """Draws this shard's part of the noise for a global batch of `batch_size` examples.

  Args:
    key: PRNG key, THE SAME on every device (it is folded with the shard index here, after the
      shared r is drawn).
    layout: the bank's layout.
    num_noise: m, noise samples per example.
    batch_size: B, the global batch size (ignored in shared mode).
    shared: one noise set for the whole batch.
    axis_name: the mapped axis the bank is sharded over, or None.
  """
  if num_noise < 1:
    raise ValueError(f"num_noise must be >= 1, got {num_noise}")
  r_key, draw_key = jax.random.split(key)
  shape = (slots_per_shard(layout, num_noise),)
  if not shared:
    shape = (batch_size,) + shape
  r = jax.random.randint(r_key, shape[:-1], 0, layout.num_instances, dtype=jnp.int32)
  m_k = draws_on_shard(layout, num_noise, r, axis_name)
  draw_key = jax.random.fold_in(draw_key, sharding.shard_index(axis_name))
  n_k = sharding.local_real_rows(layout, axis_name)
  rows = jax.random.randint(draw_key, shape, 0, jnp.maximum(n_k, 1), dtype=jnp.int32)
  valid = jnp.arange(shape[-1]) < m_k[..., None]
  return NoiseSample(rows=rows, valid=valid, num_noise=num_noise)


def from_global_indices(global_indices: np.ndarray, layout: ShardLayout, shard: int,
                        slots: int) -> NoiseSample:
  """Host helper: shard `shard`'s `NoiseSample` holding exactly the given global noise indices.

  `sample` draws the noise inside the step; this injects noise chosen elsewhere instead, so a
  sharded computation can be checked against another implementation (the reference's, a NumPy
  formula, a single-device run) on identical noise. Build one sample per shard and stack them
  along a leading device axis for `pmap`.

  Args:
    global_indices: int (B, m) per-example or (m,) shared global noise indices in [0, n).
    layout: the bank's layout.
    shard: the shard to build.
    slots: noise slots per shard; at least the largest number of indices any example has on
      this shard (a ValueError names the excess otherwise).

  Returns:
    The shard's `NoiseSample`: its indices (local rows) first in each example, `valid` marking
    them, and `num_noise` = m.
  """
  global_indices = np.asarray(global_indices)
  flat = global_indices.reshape(-1, global_indices.shape[-1])
  rows = np.zeros((flat.shape[0], slots), np.int32)
  valid = np.zeros((flat.shape[0], slots), bool)
  for b, example in enumerate(flat):
    mine = example[layout.owner(example) == shard] - shard * layout.rows_per_shard
    if len(mine) > slots:
      raise ValueError(f"{len(mine)} noise indices on shard {shard} exceed {slots} slots")
    rows[b, :len(mine)] = mine
    valid[b, :len(mine)] = True
  out_shape = global_indices.shape[:-1] + (slots,)
  return NoiseSample(rows=jnp.asarray(rows.reshape(out_shape)),
                     valid=jnp.asarray(valid.reshape(out_shape)),
                     num_noise=global_indices.shape[-1])
