"""The memory bank V: one 128-d feature per training instance, sharded over devices.

Paper Section 3.2: "we maintain a feature memory bank V for storing v_j", updated with the
features computed in the current step. We follow the reference implementation
(lemniscate.pytorch `NCEAverage`) exactly:

* initial rows are uniform in [-1/sqrt(d/3), +1/sqrt(d/3)] and NOT normalised (their expected
  squared norm is 1); `init="unit"` gives normalised Gaussian rows instead, as the paper's text
  describes;
* after a step, v_i <- normalise(momentum * v_i + (1 - momentum) * f_i), where v_i is the value
  from BEFORE the step. **`momentum` weights the OLD value** (the reference's `nce_m = 0.5`);
  some re-implementations call 1 - momentum the momentum, so say which you mean when comparing.
  momentum = 0 writes f_i itself (the paper's Section 3.2 description).

The rows are an instance-sharded array (see `sharding.py`): global shape
`(num_shards, rows_per_shard, d)`, and `(rows_per_shard, d)` inside a mapped step. Functions that
take an `axis_name` are meant to be called inside the mapped step; the `init_*` functions build
the host-side/global value.

A low-precision bank (bfloat16) keeps its rows as their bit pattern (`uint16`), see `MemoryBank`:
a step gathers and bit-casts only the rows it reads and scatters the bits of the rows it writes,
so no bank-sized conversion exists on any backend. Read a whole bank with `MemoryBank.values()`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from instdisc_jax import sharding
from instdisc_jax.sharding import AxisName
from instdisc_jax.sharding import ShardLayout

INITS = ("uniform", "unit")


@flax.struct.dataclass
class MemoryBank:
  """Bank rows plus the static facts needed to interpret them.

  A bank is stored either as its values (float32, the default) or, for a low-precision bank, as
  their bit pattern: `rows` then holds unsigned integers of the same width (uint16 for bfloat16)
  and `value_dtype` names the values' dtype. Bit patterns because XLA:CPU has no bfloat16
  scatter and rewrites one into a float32 round trip of the whole shard, and does not turn a
  same-width `bitcast-convert` into a free bitcast either: bit-casting the shard inside the step
  would materialise a bank-sized copy each way. Stored as bits, a step bit-casts only the
  (B + m) x d rows it gathers and scatters uint16 rows, in place, on every backend. The bits are
  those of the values, so a bank's numbers do not depend on how it is stored; checkpoints hold
  the values (`values()`), as they did before banks were stored as bits.

  Build banks with `init_bank` or `MemoryBank.from_values`; read them whole with `values()` (a
  bank-sized bit-cast for a bfloat16 bank: for kNN over the bank, evaluation and saving, never
  in the train step).

  Attributes:
    rows: the stored rows, (rows_per_shard, d) inside a mapped step and (num_shards,
      rows_per_shard, d) outside: the values (float32; a bank built directly may hold values of
      any float dtype), or the bit pattern of `value_dtype` values. All arithmetic on them is
      float32.
    num_instances: n, the number of real instances (static).
    num_shards: D, the number of devices the instance axis is split over (static).
    value_dtype: the dtype whose bit pattern `rows` holds (bfloat16), or None when `rows` holds
      the values themselves (static).
  """

  rows: jax.Array
  num_instances: int = flax.struct.field(pytree_node=False)
  num_shards: int = flax.struct.field(pytree_node=False, default=1)
  value_dtype: Optional[jnp.dtype] = flax.struct.field(pytree_node=False, default=None)

  @classmethod
  def from_values(cls, values: jax.Array, *, num_instances: int,
                  num_shards: int = 1) -> "MemoryBank":
    """A bank of `values`: stored as they are if 32 bits wide or more, else (bfloat16) as
    their bit pattern."""
    dtype = jnp.dtype(values.dtype)
    if dtype.itemsize >= 4:
      return cls(rows=values, num_instances=num_instances, num_shards=num_shards)
    return cls(rows=jax.lax.bitcast_convert_type(values, _bits_dtype(dtype)),
               num_instances=num_instances, num_shards=num_shards, value_dtype=dtype)

  @property
  def layout(self) -> ShardLayout:
    return ShardLayout(self.num_instances, self.num_shards)

  @property
  def dim(self) -> int:
    return self.rows.shape[-1]

  @property
  def dtype(self) -> jnp.dtype:
    """The dtype of the bank's values (bfloat16 for a bank stored as bits)."""
    return jnp.dtype(self.rows.dtype if self.value_dtype is None else self.value_dtype)

  def values(self) -> jax.Array:
    """All rows as values of `dtype`, shaped like `rows`."""
    return self.decode(self.rows)

  def decode(self, stored: jax.Array) -> jax.Array:
    """Values of stored rows (e.g. a gather of `rows`)."""
    if self.value_dtype is None:
      return stored
    return jax.lax.bitcast_convert_type(stored, self.value_dtype)

  def encode(self, values: jax.Array) -> jax.Array:
    """Stored form of rows: `values` rounded to `dtype` (once), as bits if the bank holds bits."""
    values = values.astype(self.dtype)
    if self.value_dtype is None:
      return values
    return jax.lax.bitcast_convert_type(values, self.rows.dtype)

  def as_values(self) -> "MemoryBank":
    """The same bank with `rows` holding the values (for a checkpoint: the format it has always
    had). `from_values` of its rows is this bank again."""
    if self.value_dtype is None:
      return self
    return MemoryBank(rows=self.values(), num_instances=self.num_instances,
                      num_shards=self.num_shards)


def _bits_dtype(dtype) -> jnp.dtype:
  """The unsigned integer dtype as wide as `dtype`."""
  return jnp.dtype(f"uint{8 * jnp.dtype(dtype).itemsize}")


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """`x / max(||x||, eps)` along `axis`, as `torch.nn.functional.normalize`; safe at zero.

  The one normalisation of the project: the encoders' embeddings (`models.py`) and the bank's
  rows use it, so a bank row written from a feature is exactly that feature.
  """
  sum_sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sum_sq, eps * eps))


def init_shard_rows(key: jax.Array, layout: ShardLayout, dim: int, shard, *,
                    init: str = "uniform", dtype=jnp.float32) -> jax.Array:
  """Initial (rows_per_shard, dim) rows of one shard; `shard` may be traced (e.g. an axis index).

  Row i's value depends only on (key, i), not on the number of shards, so a run on 8 devices and
  a run on 1 start from the same bank. Padding rows are zero.

  Args:
    key: PRNG key.
    layout: the instance layout.
    dim: feature dimension d.
    shard: index of the shard to build.
    init: "uniform" (reference: U(-1/sqrt(d/3), 1/sqrt(d/3)), unnormalised) or "unit" (normalised
      Gaussian rows).
    dtype: storage dtype.
  """
  if init not in INITS:
    raise ValueError(f"bank init must be one of {INITS}, got {init!r}")
  global_rows = shard * layout.rows_per_shard + jnp.arange(layout.rows_per_shard)

  def one_row(i):
    row_key = jax.random.fold_in(key, i)
    if init == "uniform":
      bound = 1.0 / np.sqrt(dim / 3.0)
      return jax.random.uniform(row_key, (dim,), jnp.float32, -bound, bound)
    return l2_normalize(jax.random.normal(row_key, (dim,), jnp.float32))

  rows = jax.vmap(one_row)(global_rows)
  real = (global_rows < layout.num_instances)[:, None]
  return jnp.where(real, rows, 0.0).astype(dtype)


def init_rows(key: jax.Array, layout: ShardLayout, dim: int, *, init: str = "uniform",
              shards: Optional[Sequence[int]] = None, dtype=jnp.float32) -> jax.Array:
  """`init_shard_rows` for several shards (default: all): (len(shards), rows_per_shard, dim).

  A multi-host run builds only the shards of its local devices.
  """
  shards = np.arange(layout.num_shards) if shards is None else np.asarray(shards)
  build = jax.jit(jax.vmap(lambda s: init_shard_rows(key, layout, dim, s, init=init,
                                                     dtype=dtype)))
  return build(jnp.asarray(shards, jnp.int32))


def init_bank(key: jax.Array, num_instances: int, dim: int, *, num_shards: int = 1,
              init: str = "uniform", shards: Optional[Sequence[int]] = None,
              dtype=jnp.float32) -> MemoryBank:
  """A bank with rows from `init_rows`; `rows` has a leading shard axis (bfloat16 rows are
  stored as bits, see `MemoryBank`)."""
  layout = ShardLayout(num_instances, num_shards)
  rows = init_rows(key, layout, dim, init=init, shards=shards, dtype=dtype)
  return MemoryBank.from_values(rows, num_instances=num_instances, num_shards=num_shards)


@flax.struct.dataclass
class StepRows:
  """The pre-step bank rows one training step reads, fetched by a single gather.

  A step should read the donated bank once: when it is read by two different ops and then
  updated in place, XLA's copy insertion (on CPU at least, without region analysis) cannot order
  the reads before the update and copies the whole bank every step, an O(n) cost. So the step
  gathers everything it needs here, the objectives score these rows (and return them in
  `aux["rows"]`), and `update` writes the new rows from them without reading the bank again.

  Attributes:
    positives: float32 (B, d) rows of the batch's instances; zero where `owned` is False.
    owned: bool (B,): the instance lives on this shard.
    local_rows: int32 (B,): its row on this shard (clipped into range where not owned).
    noise: float32 rows of this shard's noise draws, (B, slots, d) or (slots, d); None if the
      step draws no noise.
  """

  positives: jax.Array
  owned: jax.Array
  local_rows: jax.Array
  noise: Optional[jax.Array] = None


def gather_step_rows(bank: MemoryBank, indices: jax.Array, axis_name: AxisName,
                     noise_rows: Optional[jax.Array] = None) -> StepRows:
  """The batch positives' rows (and the noise rows, local indices) in one gather.

  Args:
    bank: the bank shard.
    indices: int (B,) global instance indices of the global batch.
    axis_name: mapped axis the bank is sharded over, or None.
    noise_rows: optional int local row indices of this shard's noise draws (`NoiseSample.rows`).

  The rows carry no gradient. The positives of the global batch, replicated on every device,
  are `sharding.psum(rows.positives, axis_name)` (each instance is owned by one shard).
  """
  local_rows, owned = sharding.owned_rows(bank.layout, indices, axis_name)
  wanted = local_rows if noise_rows is None else jnp.concatenate(
      [local_rows, noise_rows.reshape(-1)])
  # Only the gathered rows are decoded (bit-cast), never the shard.
  gathered = jax.lax.stop_gradient(bank.decode(bank.rows[wanted]).astype(jnp.float32))
  batch = indices.shape[0]
  positives = jnp.where(owned[:, None], gathered[:batch], 0.0)
  noise = None
  if noise_rows is not None:
    noise = gathered[batch:].reshape(noise_rows.shape + (bank.dim,))
  return StepRows(positives=positives, owned=owned, local_rows=local_rows, noise=noise)


def update(bank: MemoryBank, rows: StepRows, features: jax.Array, *, momentum: float,
           valid: Optional[jax.Array] = None) -> MemoryBank:
  """Momentum update of the batch's rows owned by this shard (paper Sec. 3.2).

  v_i <- normalise(momentum * v_i + (1 - momentum) * f_i), v_i being the pre-step value.

  The pre-step rows come from `rows`, the step's one read of the bank (the `aux["rows"]` an
  objective returns, or `gather_step_rows`), so the update reads nothing from the bank and the
  donated bank is updated in place: a step written this way has no bank-sized temporaries.

  Args:
    bank: the bank (per-shard view).
    rows: the step's `StepRows` for the same global batch (positives, owners, local rows).
    features: (B, d) features of the global batch (gradients are stopped).
    momentum: weight of the OLD value, in [0, 1).
    valid: optional bool (B,); False rows are not written.

  An instance should appear at most once per batch (the epoch sampler guarantees it); if it
  appears twice, one of its updates is kept.
  """
  new = l2_normalize(momentum * rows.positives
                     + (1.0 - momentum) * jax.lax.stop_gradient(features).astype(jnp.float32))
  return _write_rows(bank, rows.local_rows, rows.owned if valid is None else rows.owned & valid,
                     new)


def write(bank: MemoryBank, indices: jax.Array, features: jax.Array, *, axis_name: AxisName,
          valid: Optional[jax.Array] = None) -> MemoryBank:
  """Overwrites rows with normalised features (the update with momentum 0, which reads no old
  row), e.g. to fill the bank from a model."""
  local_rows, owned = sharding.owned_rows(bank.layout, indices, axis_name)
  new = l2_normalize(jax.lax.stop_gradient(features).astype(jnp.float32))
  return _write_rows(bank, local_rows, owned if valid is None else owned & valid, new)


def _write_rows(bank: MemoryBank, local_rows: jax.Array, write_mask: jax.Array,
                new: jax.Array) -> MemoryBank:
  # Rows not written get an out-of-range target and are dropped by the scatter.
  target = jnp.where(write_mask, local_rows, bank.layout.rows_per_shard)
  return bank.replace(rows=_scatter_rows(bank.rows, target, bank.encode(new)))


def _scatter_rows(rows: jax.Array, target: jax.Array, values: jax.Array) -> jax.Array:
  """rows.at[target].set(values, mode="drop"), in place in the donated buffer.

  Float32 rows and bit patterns (`MemoryBank.value_dtype`) are scattered in place on every
  backend. Bank rows that hold low-precision values themselves (a `MemoryBank` built without
  `from_values`) are scattered natively, except on CPU: XLA:CPU has no half-precision scatter
  and would convert the whole shard to float32 and back, so their bits are scattered instead,
  through a bank-sized bit-cast that XLA:CPU materialises (one temporary the size of the shard,
  which storing the bank as bits avoids).
  """
  def scatter(rows, target, values):
    return rows.at[target].set(values, mode="drop")

  if not jnp.issubdtype(rows.dtype, jnp.floating) or rows.dtype.itemsize >= 4:
    return scatter(rows, target, values)

  def scatter_bits(rows, target, values):
    bits = _bits_dtype(rows.dtype)
    updated = scatter(jax.lax.bitcast_convert_type(rows, bits), target,
                      jax.lax.bitcast_convert_type(values, bits))
    return jax.lax.bitcast_convert_type(updated, rows.dtype)

  return jax.lax.platform_dependent(rows, target, values, cpu=scatter_bits, default=scatter)
