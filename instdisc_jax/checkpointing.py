"""Orbax checkpoints of the train state, the data iterator position and the run's identity.

Each checkpoint `<workdir>/checkpoints/<step>/` has four items:
* `state`: the TrainState. Replicated leaves are saved once (not once per device); instance-
  sharded leaves (bank, parametric weights) are saved as the global (D, rows_per_shard, ...)
  array, every process writing its own shards.
* `data`: the input iterator's state (JSON).
* `meta`: what the state's shapes depend on (n, d, D, model, objective, ...), so that a workdir
  is never resumed with an incompatible config.
* `integrity`: a checksum of every leaf of `state` (JSON).

Completeness: orbax writes a checkpoint into `<step>.orbax-checkpoint-tmp-<time>` and renames it
to `<step>` when every item is written (on object stores, where there is no rename, a
`commit_success.txt` file marks it complete), so a checkpoint is visible only when whole; a
writer removes temporary directories left by a killed run when it starts. Old checkpoints are
deleted only after a newer one is finalised.

Corruption: tensorstore detects damaged or missing index files, but a damaged data chunk can be
read back silently, so `restore` compares every leaf with its checksum. A checkpoint that cannot
be read or fails the comparison is reported in a warning that names it, moved to
`<workdir>/unreadable_checkpoints/`, and the previous one is restored. A state holding NaN or
infinite values is never written.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Optional

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from instdisc_jax import parallel
from instdisc_jax.errors import NonFiniteLossError
from instdisc_jax.errors import WorkdirError

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
UNREADABLE_DIR = "unreadable_checkpoints"
ITEMS = ("state", "data", "meta", "integrity")
_MAX_REASON = 300


def _is_instance_sharded(path, sharded_keys) -> bool:
  names = {getattr(p, "name", getattr(p, "key", None)) for p in path}
  return bool(names & set(sharded_keys))


def for_saving(state, sharded_keys):
  """Replicated (D, ...) leaves -> one copy; instance-sharded leaves -> global (D, ...) arrays."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: parallel.to_global(x) if _is_instance_sharded(path, sharded_keys)
      else parallel.to_single_copy(x), state)


def from_saved(saved, sharded_keys):
  """Inverse of `for_saving`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x if _is_instance_sharded(path, sharded_keys)
      else parallel.from_single_copy(x), saved)


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)


# -- leaf checksums and finiteness ---------------------------------------------------------------


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


# -- agreement between processes -----------------------------------------------------------------


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _reason(error: Exception) -> str:
  """The first line of an error, shortened (tensorstore errors run to pages)."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  text = f"{type(error).__name__}: {text}" if text else type(error).__name__
  return text if len(text) <= _MAX_REASON else text[:_MAX_REASON] + "..."


def refuse_if_incompatible(workdir: str, saved_meta: dict, meta: dict,
                           compatible: Callable[[dict, dict], list]) -> None:
  """WorkdirError listing the fields in which `saved_meta` and `meta` differ, if any."""
  differing = compatible(saved_meta, meta)
  if differing:
    raise WorkdirError(
        f"workdir {workdir} holds a run with a different {', '.join(differing)}; use a new "
        "--workdir or the original config")


def absolute_path(path) -> str:
  """`path` made absolute when it is local (orbax refuses relative paths); URLs unchanged."""
  path = os.fspath(path)
  return path if "://" in path else os.path.abspath(path)


class Checkpointer:
  """Saves and restores (state, data iterator state) under `<workdir>/checkpoints`.

  A writer (the default) creates the directory, removes temporary directories of unfinished
  saves and moves unreadable checkpoints aside; with `read_only=True` it does none of these (for
  checks before a run starts, and for evaluators) and must not `save`. (Orbax's own read-only
  mode is not used: it logs warnings on every start.)
  """

  def __init__(self, workdir: str, *, keep: Optional[int], sharded_keys,
               read_only: bool = False):
    self.workdir = absolute_path(workdir)
    self.directory = os.path.join(self.workdir, CHECKPOINTS_DIR)
    self.sharded_keys = tuple(sharded_keys)
    self.read_only = read_only
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, create=not read_only,
            cleanup_tmp_directories=not read_only, enable_async_checkpointing=False),
        item_names=ITEMS)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict, meta: dict) -> None:
    """Writes checkpoint `step`, unless the state holds NaN or inf (NonFiniteLossError)."""
    saved = for_saving(state, self.sharded_keys)
    checksums, nonfinite = inspect_leaves(saved)
    if nonfinite:
      last = self.latest_step()
      kept = (f"the last checkpoint (step {last}) is kept" if last is not None
              else "no checkpoint was written")
      shown = ", ".join(nonfinite[:3]) + (", ..." if len(nonfinite) > 3 else "")
      raise NonFiniteLossError(
          f"the train state after step {step} holds NaN or infinite values ({shown}), so it "
          f"is not checkpointed; {kept}; lower learning_rate or raise temperature, then rerun")
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(saved),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta),
        integrity=ocp.args.JsonSave({"checksums": checksums})), force=True)
    self.manager.wait_until_finished()

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
        "meta"]

  def newest_meta(self) -> Optional[dict]:
    """The meta of the newest checkpoint whose meta is readable, or None."""
    for step in reversed(self.all_steps()):
      try:
        return self.read_meta(step)
      except Exception:  # pylint: disable=broad-except  # `restore` reports it.
        continue
    return None

  def restore(self, target_state, meta: dict,
              compatible: Optional[Callable[[dict, dict], list]] = None
              ) -> Optional[tuple[Any, dict, int]]:
    """(state, data_state, step) of the newest good checkpoint, or None if there is none.

    `target_state` gives the shapes and device layout to restore onto. Raises WorkdirError if
    the checkpoint's meta differs from `meta` in a field that `compatible(old, new)` lists.
    Unreadable or corrupted checkpoints are set aside with a warning (see the module doc).
    """
    abstract = _abstract(for_saving(target_state, self.sharded_keys))
    steps = self.all_steps()
    for position, step in enumerate(reversed(steps)):
      restored, problem = self._read(step, meta, compatible, abstract)
      if problem is None:
        return from_saved(restored["state"], self.sharded_keys), restored["data"], step
      older = steps[len(steps) - position - 2] if position + 1 < len(steps) else None
      self._set_aside(step, problem, older)
    return None

  def _read(self, step: int, meta: dict, compatible, abstract):
    """(restored items, None) or (None, why checkpoint `step` cannot be used).

    Every process takes part, and they agree: one process failing to read its part fails the
    checkpoint for all.
    """
    restored, problem = None, None
    try:
      saved_meta = self.read_meta(step)
    except Exception as e:  # pylint: disable=broad-except
      problem = _reason(e)
    else:
      if compatible is not None:
        refuse_if_incompatible(self.workdir, saved_meta, meta, compatible)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
            integrity=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        problem = _reason(e)
    if parallel.any_process(problem is not None):
      return None, problem or "another process could not read its part"
    checksums, _ = inspect_leaves(restored["state"])
    expected = restored["integrity"]["checksums"]
    damaged = sorted(name for name in checksums if checksums[name] != expected.get(name))
    if damaged:
      return None, f"the data of {', '.join(damaged[:3])} does not match its checksum"
    return restored, None

  def _set_aside(self, step: int, problem: str, older: Optional[int]) -> None:
    """Warns about checkpoint `step` and (unless read-only) moves it out of the way of new
    checkpoints."""
    source = epath.Path(self.directory) / str(step)
    then = (f"restoring the previous one (step {older})" if older is not None
            else "no older checkpoint: training starts from step 0")
    if self.read_only:
      log.warning("checkpoint %s is unreadable (%s); %s", source, problem, then)
      return
    target = epath.Path(self.workdir) / UNREADABLE_DIR / str(step)
    if target.exists():
      target = target.parent / f"{step}-{int(time.time())}"
    moved = f"moved it to {target}"
    if jax.process_index() == 0:
      try:
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)
      except OSError:  # Stores that cannot rename directories: it is of no use, delete it.
        source.rmtree()
        moved = "deleted it"
    _sync(f"instdisc_set_aside_{step}")
    self.manager.reload()
    log.warning("checkpoint %s is unreadable (%s); %s; %s", source, problem, moved, then)

  def close(self) -> None:
    self.manager.close()


def check_compatible(workdir: str, meta: dict,
                     compatible: Callable[[dict, dict], list]) -> None:
  """WorkdirError if `workdir`'s newest checkpoint is of a run incompatible with `meta`.

  Reads only: for checking a workdir before anything is written to it.
  """
  # Every process must take the same branch (the read-only manager has barriers), and decide
  # before any of them goes on to create the directory.
  if not parallel.any_process((epath.Path(workdir) / CHECKPOINTS_DIR).exists()):
    return
  checkpointer = Checkpointer(workdir, keep=None, sharded_keys=(), read_only=True)
  try:
    saved_meta = checkpointer.newest_meta()
  finally:
    checkpointer.close()
  if saved_meta is not None:
    refuse_if_incompatible(workdir, saved_meta, meta, compatible)
