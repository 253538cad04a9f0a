"""What a checkpoint's `state` item holds, and the checksums that verify it.

Layout: under `pmap` every leaf of the train state has a leading device axis. Replicated leaves
(params, optimizer state, Z, ...) hold D equal copies: `for_saving` keeps one, so a checkpoint's
size does not grow with the number of devices. Instance-sharded leaves (the bank, the parametric
weights; named by `sharded_keys`) are saved as the global (D, rows_per_shard, ...) array, every
process writing its own shards. `from_saved` is the inverse.

Checksums: tensorstore detects damaged or missing index files, but a damaged data chunk can be
read back silently, so every leaf's checksum is saved with it (the checkpoint's `integrity` item)
and compared after a restore. The checksum is a position-weighted integer sum of the leaf's bit
patterns, so it does not depend on the order of the reduction: it is the same on any number of
devices and processes.
`snapshot_and_inspect` computes it in the same compiled function that copies the state for an
asynchronous save, together with every leaf's finiteness, so a state holding NaN or inf is
never written.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from instdisc_jax import parallel
from instdisc_jax.memory_bank import MemoryBank


def _is_instance_sharded(path, sharded_keys) -> bool:
  names = {getattr(p, "name", getattr(p, "key", None)) for p in path}
  return bool(names & set(sharded_keys))


def _map_banks(fn, tree):
  """`fn` applied to every `MemoryBank` node of `tree`."""
  return jax.tree.map(lambda x: fn(x) if isinstance(x, MemoryBank) else x, tree,
                      is_leaf=lambda x: isinstance(x, MemoryBank))


def for_saving(state, sharded_keys):
  """Replicated (D, ...) leaves -> one copy; instance-sharded leaves -> global (D, ...) arrays.

  A bank stored as bits is saved as its values (`MemoryBank.as_values`, the same bits), so a
  checkpoint's format does not depend on how the bank is stored in memory.
  """
  saved = jax.tree_util.tree_map_with_path(
      lambda path, x: parallel.to_global(x) if _is_instance_sharded(path, sharded_keys)
      else parallel.to_single_copy(x), state)
  return _map_banks(MemoryBank.as_values, saved)


def from_saved(saved, sharded_keys):
  """Inverse of `for_saving` (a bfloat16 bank comes back stored as bits)."""
  saved = _map_banks(lambda bank: MemoryBank.from_values(
      bank.rows, num_instances=bank.num_instances, num_shards=bank.num_shards), saved)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x if _is_instance_sharded(path, sharded_keys)
      else parallel.from_single_copy(x), saved)


def abstract(tree):
  """The shapes, dtypes and shardings of `tree`'s arrays, for restoring onto them."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)


# -- leaf checksums and finiteness ----------------------------------------------------------------


def leaf_name(path) -> str:
  """'params/encoder/Conv_0/kernel' for a pytree key path."""
  parts = []
  for entry in path:
    for attribute in ("name", "key", "idx"):
      if hasattr(entry, attribute):
        parts.append(str(getattr(entry, attribute)))
        break
  return "/".join(parts)


def _as_uint32(x: jax.Array) -> jax.Array:
  """The bit pattern of every element, widened to uint32."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _checksums_and_finiteness(leaves):
  """Per leaf (stacked in leaf order): sum_i bits_i * (2i + 1) mod 2^32, and whether every
  element is finite.

  An odd weight is invertible mod 2^32, so any single changed element changes the sum; the
  position weights also make reordered elements change it. Integer sums do not depend on the
  reduction order, so the result is the same on any number of devices.
  """
  sums, finite = [], []
  for x in leaves:
    weights = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape) * 2 + 1
    sums.append(jnp.sum(_as_uint32(x) * weights, dtype=jnp.uint32))
    finite.append(jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
                  else jnp.bool_(True))
  return jnp.stack(sums), jnp.stack(finite)    # Two arrays: two transfers to the host.


@jax.jit
def _snapshot_and_inspect(leaves):
  """(a fresh copy of every leaf, their checksums, their finiteness) in one compiled function.

  The copies are new buffers (a compiled function's outputs never alias its non-donated
  inputs), so the next train step, which donates the state, cannot overwrite what a save is
  still writing.
  """
  sums, finite = _checksums_and_finiteness(leaves)
  return [jnp.copy(x) for x in leaves], sums, finite


def _host(x: jax.Array) -> np.ndarray:
  """A replicated (possibly multi-process) array on the host."""
  return np.asarray(x.addressable_data(0))


def inspect_leaves(tree) -> tuple[dict[str, int], list[str]]:
  """(checksum of every leaf by `leaf_name`, names of the leaves holding NaN or inf)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = [leaf_name(path) for path, _ in flat]
  sums, finite = _checksums_and_finiteness([leaf for _, leaf in flat])
  sums, finite = _host(sums), _host(finite)
  checksums = {name: int(s) for name, s in zip(names, sums)}
  return checksums, [name for name, ok in zip(names, finite) if not ok]


def snapshot_and_inspect(tree) -> tuple[Any, dict[str, int], list[str]]:
  """(a device copy of `tree`, checksum of every leaf, names of the leaves holding NaN or inf).

  Waits for `tree`'s values to be computed (the checksums come to the host), not for more.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  names = [leaf_name(path) for path, _ in flat]
  copies, sums, finite = _snapshot_and_inspect([leaf for _, leaf in flat])
  sums, finite = _host(sums), _host(finite)
  checksums = {name: int(s) for name, s in zip(names, sums)}
  return (jax.tree_util.tree_unflatten(treedef, copies), checksums,
          [name for name, ok in zip(names, finite) if not ok])
