"""Orbax checkpoints of the train state, the data iterator position and the run's identity.

Each checkpoint `<workdir>/checkpoints/<step>/` has three items:
* `state`: the TrainState. Replicated leaves are saved once (not once per device); instance-
  sharded leaves (bank, parametric weights) are saved as the global (D, rows_per_shard, ...)
  array, every process writing its own shards.
* `data`: the input iterator's state (JSON).
* `meta`: what the state's shapes depend on (n, d, D, model, objective, ...), so that a workdir
  is never resumed with an incompatible config.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
checkpoint is visible only when whole, and it deletes old checkpoints only after a newer one is
finalised. If the newest checkpoint cannot be read, `restore` warns, names it, and falls back to
the previous one.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp

from instdisc_jax import parallel
from instdisc_jax.errors import WorkdirError

log = logging.getLogger(__name__)


def _is_instance_sharded(path, sharded_keys) -> bool:
  names = {getattr(p, "name", getattr(p, "key", None)) for p in path}
  return bool(names & set(sharded_keys))


def for_saving(state, sharded_keys):
  """Replicated (D, ...) leaves -> one copy; instance-sharded leaves unchanged."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x if _is_instance_sharded(path, sharded_keys)
      else parallel.to_single_copy(x), state)


def from_saved(saved, sharded_keys):
  """Inverse of `for_saving`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x if _is_instance_sharded(path, sharded_keys)
      else parallel.from_single_copy(x), saved)


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)


class Checkpointer:
  """Saves and restores (state, data iterator state) under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, *, keep: int, sharded_keys):
    self.directory = os.path.join(os.fspath(workdir), "checkpoints")
    self.sharded_keys = tuple(sharded_keys)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False),
        item_names=("state", "data", "meta"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(for_saving(state, self.sharded_keys)),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
        "meta"]

  def restore(self, target_state, meta: dict,
              compatible: Callable[[dict, dict], list] = None) -> Optional[tuple[Any, dict, int]]:
    """(state, data_state, step) of the newest readable checkpoint, or None if there is none.

    `target_state` gives the shapes and device layout to restore onto. Raises WorkdirError if the
    checkpoint's meta differs from `meta` in a field that `compatible(old, new)` lists.
    """
    steps = self.all_steps()
    for position, step in enumerate(reversed(steps)):
      try:
        saved_meta = self.read_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        self._warn_unreadable(step, e, fallback=position + 1 < len(steps))
        continue
      if compatible is not None:
        differing = compatible(saved_meta, meta)
        if differing:
          raise WorkdirError(
              f"workdir {os.path.dirname(self.directory)} holds a run with a different "
              f"{', '.join(differing)}; use a new --workdir or the original config")
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(
                _abstract(for_saving(target_state, self.sharded_keys))),
            data=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        self._warn_unreadable(step, e, fallback=position + 1 < len(steps))
        continue
      return from_saved(restored["state"], self.sharded_keys), restored["data"], step
    return None

  def _warn_unreadable(self, step: int, error: Exception, fallback: bool) -> None:
    log.warning("checkpoint %s is unreadable (%s: %s); %s",
                os.path.join(self.directory, str(step)), type(error).__name__,
                str(error).splitlines()[0] if str(error) else "", 
                "trying the previous one" if fallback else "no older checkpoint to fall back to")

  def close(self) -> None:
    self.manager.close()
