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

Asynchronous saves: `save` returns once the state is safe from the train step that follows it,
and the checkpoint is written while training goes on. The train step donates its input state, so
the state's buffers are reused by the next step: `save` first makes its own device copy of every
leaf (in one compiled function that also computes the leaf checksums and finiteness flags), checks
the flags on the host, and hands the copy to orbax, which moves it to host memory before
`save` returns and writes it from a background thread. The cost of a save on the training thread
is one copy of the state on the device, its checksums, and the device-to-host transfer; the
write itself overlaps the following steps. At most one save is in flight: the next `save` (and
`wait_until_finished`, `close`) waits for it, and an error of the background write is raised
there. A killed process leaves the in-flight checkpoint as a temporary directory, which is never
restored and is removed by the next writer, so a run resumes from the last finalised one.

Corruption: tensorstore detects damaged or missing index files, but a damaged data chunk can be
read back silently, so `restore` compares every leaf with its checksum. A checkpoint that cannot
be read or fails the comparison is reported in a warning that names it, moved to
`<workdir>/unreadable_checkpoints/`, and the previous one is restored. A state holding NaN or
infinite values is never written.

This module is the policy: when to save, what to restore, what to do with a checkpoint that
cannot be used. The `state` item's layout and the checksums are in checkpoint_leaves.py; orbax's
handler of the `integrity` item (with the tests' write delay) and the quiet fallback of a failed
restore are in checkpoint_orbax.py.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Optional

from etils import epath
import jax
import orbax.checkpoint as ocp

from instdisc_jax import checkpoint_leaves
from instdisc_jax import checkpoint_orbax
from instdisc_jax import parallel
from instdisc_jax.errors import NonFiniteLossError
from instdisc_jax.errors import WorkdirError

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
UNREADABLE_DIR = "unreadable_checkpoints"
ITEMS = ("state", "data", "meta", "integrity")
_MAX_REASON = 300
_DELETION_GRACE_S = 2.0


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
  mode is not used: it logs warnings on every start.) Saves are asynchronous unless
  `asynchronous=False` (see the module doc).
  """

  def __init__(self, workdir: str, *, keep: Optional[int], sharded_keys,
               read_only: bool = False, asynchronous: bool = True):
    self.workdir = absolute_path(workdir)
    self.directory = os.path.join(self.workdir, CHECKPOINTS_DIR)
    self.sharded_keys = tuple(sharded_keys)
    self.read_only = read_only
    checkpoint_orbax.install_quiet_fallback()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, create=not read_only,
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=asynchronous and not read_only),
        item_names=ITEMS, item_handlers={"integrity": checkpoint_orbax.IntegrityHandler()})

  def latest_step(self) -> Optional[int]:
    """The newest checkpoint's step, counting one whose asynchronous save is in flight."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict, meta: dict) -> None:
    """Starts writing checkpoint `step`, unless the state holds NaN or inf (NonFiniteLossError).

    Returns once `state` may be changed or donated; the write goes on in the background (waits
    first for a save still in flight, raising its error if it failed).
    """
    saved = checkpoint_leaves.for_saving(state, self.sharded_keys)
    snapshot, checksums, nonfinite = checkpoint_leaves.snapshot_and_inspect(saved)
    if nonfinite:
      self.manager.wait_until_finished()      # So that "kept" names a finalised checkpoint.
      last = self.latest_step()
      kept = (f"the last checkpoint (step {last}) is kept" if last is not None
              else "no checkpoint was written")
      shown = ", ".join(nonfinite[:3]) + (", ..." if len(nonfinite) > 3 else "")
      raise NonFiniteLossError(
          f"the train state after step {step} holds NaN or infinite values ({shown}), so it "
          f"is not checkpointed; {kept}; lower learning_rate or raise temperature, then rerun")
    # JSON items are encoded in the background; a value that cannot be encoded must fail here,
    # on the caller's thread, before anything is written.
    json.dumps(data_state)
    json.dumps(meta)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(snapshot),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta),
        integrity=checkpoint_orbax.IntegritySave({"checksums": checksums})), force=True)

  def wait_until_finished(self) -> None:
    """Blocks until the save in flight (if any) is finalised; raises its error if it failed."""
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

    The checkpoints are listed again before every attempt, so a reader of a run that is still
    training (an evaluator) reads the newest checkpoint that exists at that moment; one that
    vanished meanwhile (deleted by the run's `keep`) is passed over without a warning.
    """
    abstract = checkpoint_leaves.abstract(
        checkpoint_leaves.for_saving(target_state, self.sharded_keys))
    failed = set()
    while True:
      self._reload()
      steps = [step for step in self.all_steps() if step not in failed]
      if not steps:
        return None
      step = steps[-1]
      restored, problem = self._read(step, meta, compatible, abstract)
      if problem is None:
        state = checkpoint_leaves.from_saved(restored["state"], self.sharded_keys)
        return state, restored["data"], step
      failed.add(step)
      if self._vanished(step):
        log.info("checkpoint %d was deleted while it was read; reading the newest one", step)
        continue
      self._set_aside(step, problem, steps[-2] if len(steps) > 1 else None)

  def _reload(self, attempts: int = 20) -> None:
    """Lists the checkpoints on disk again. orbax stats every checkpoint while it lists them, so
    a reader of a run that is still training can see one vanish between the listing and the
    stat (the run's `keep` deleting it): that listing is simply taken again."""
    for attempt in range(attempts):
      try:
        self.manager.reload()
        return
      except FileNotFoundError:
        if attempt == attempts - 1:
          raise
        time.sleep(0.05)

  def _vanished(self, step: int) -> bool:
    """Whether checkpoint `step` no longer exists (on any process's view).

    A reader may catch the run's deletion of a checkpoint half done (its directory still there,
    its files partly gone). Deletion (`keep`) only ever takes checkpoints older than the newest,
    so a reader gives one that is no longer the newest `_DELETION_GRACE_S` to disappear before
    calling it unreadable.
    """
    path = epath.Path(self.directory) / str(step)
    self._reload()
    newer = self.read_only and any(other > step for other in self.all_steps())
    deadline = time.monotonic() + (_DELETION_GRACE_S if newer else 0.0)
    while path.exists() and time.monotonic() < deadline:
      time.sleep(0.05)
    return parallel.any_process(not path.exists())

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
            integrity=checkpoint_orbax.IntegrityRestore()))
      except Exception as e:  # pylint: disable=broad-except
        problem = _reason(e)
    if parallel.any_process(problem is not None):
      return None, problem or "another process could not read its part"
    checksums, _ = checkpoint_leaves.inspect_leaves(restored["state"])
    expected = restored["integrity"]["checksums"]
    damaged = sorted(name for name in checksums if checksums[name] != expected.get(name))
    if damaged:
      return None, f"the data of {', '.join(damaged[:3])} does not match its checksum"
    return restored, None

  def _set_aside(self, step: int, problem: str, older: Optional[int]) -> None:
    """Warns about checkpoint `step` and (unless read-only) moves it out of the way of new
    checkpoints."""
    source = epath.Path(self.directory) / str(step)
    if older is not None:
      then = f"restoring the previous one (step {older})"
    elif self.read_only:
      then = "no older checkpoint"
    else:
      then = "no older checkpoint: training starts from step 0"
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
    """Waits for the save in flight (if any), then releases orbax's resources."""
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
