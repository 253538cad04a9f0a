"""Checkpoint integrity on 8 fake devices, with a small stand-in for the train state.

A checkpoint is visible only when complete; a damaged, partial or unreadable newest checkpoint
is reported by name and the previous one restored; a state holding NaN is never written; a
workdir of an incompatible run is refused with the differing fields.
"""

import asyncio
import gc
import logging
import os
import shutil
import sys
import types
import warnings

import jax
import numpy as np
import pytest

from instdisc_jax import checkpoint_leaves
from instdisc_jax import checkpoint_orbax
from instdisc_jax import checkpointing
from instdisc_jax import config_io
from instdisc_jax import parallel
from instdisc_jax.checkpointing import Checkpointer
from instdisc_jax.errors import NonFiniteLossError
from instdisc_jax.errors import WorkdirError

# Restoring a damaged checkpoint leaves tensorstore futures that complete after orbax's event
# loop closed; Python reports them as unraisable exceptions. They are harmless here.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

SHARDED = ("rows",)
META = {"num_instances": 32, "low_dim": 3, "model": "small_resnet"}


def make_state(offset: float = 0.0):
  """Replicated leaves (one copy per device) and an instance-sharded `rows` leaf."""
  weights = np.random.default_rng(0).standard_normal(200_000).astype(np.float32) + offset
  return {
      "params": parallel.replicate({"w": weights, "b": np.full((3,), offset, np.float32)}),
      "step": parallel.replicate(np.int32(offset)),
      "rows": parallel.shard_local_rows(
          np.arange(8 * 4 * 3, dtype=np.float32).reshape(8, 4, 3) + offset),
  }


def host(state):
  """{leaf name: numpy value} (replicated leaves from the first device)."""
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return {checkpoint_leaves.leaf_name(path): np.asarray(parallel.first_replica(x))
          if checkpoint_leaves.leaf_name(path) != "rows" else np.asarray(x) for path, x in flat}


def assert_same(a, b):
  a, b = host(a), host(b)
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture
def saved(tmp_path):
  """A workdir with checkpoints 4 and 8 (keep 2); returns (workdir, states by step)."""
  states = {4: make_state(4.0), 8: make_state(8.0)}
  checkpointer = Checkpointer(tmp_path, keep=2, sharded_keys=SHARDED)
  for step, state in states.items():
    checkpointer.save(step, state, {"step": step}, META)
  checkpointer.close()
  return str(tmp_path), states


def restore(workdir, meta=META):
  checkpointer = Checkpointer(workdir, keep=2, sharded_keys=SHARDED)
  try:
    return checkpointer.restore(make_state(), meta, compatible=config_io.incompatible_fields), \
        checkpointer.all_steps()
  finally:
    checkpointer.close()


def files_of(step_dir, sub=""):
  """The files under a checkpoint's directory (or `sub` of it), largest first."""
  found = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, sub))
           for name in names]
  return sorted(found, key=os.path.getsize, reverse=True)


def test_round_trip_is_exact(saved):
  workdir, states = saved
  (state, data_state, step), steps = restore(workdir)
  assert (step, data_state, steps) == (8, {"step": 8}, [4, 8])
  assert_same(state, states[8])


def test_relative_workdir_saves_and_restores(tmp_path, monkeypatch):
  """`--workdir=workdirs/run` (the README's default job) is relative; orbax needs absolute."""
  monkeypatch.chdir(tmp_path)
  checkpointer = Checkpointer("workdirs/run", keep=2, sharded_keys=SHARDED)
  checkpointer.save(4, make_state(4.0), {"step": 4}, META)
  checkpointer.close()
  (state, _, step), steps = restore("workdirs/run")
  assert (step, steps) == (4, [4])
  assert_same(state, make_state(4.0))
  assert checkpointing.absolute_path("gs://b/run") == "gs://b/run"


def test_damaged_data_chunk_is_caught_by_the_checksum(saved, caplog):
  """A flipped byte in a data chunk reads back without error from tensorstore; the checksum
  catches it, the warning names the checkpoint, and the previous checkpoint is restored."""
  workdir, states = saved
  newest = os.path.join(workdir, "checkpoints", "8")
  chunk = files_of(newest, "state/ocdbt.process_0/d")[0]
  content = bytearray(open(chunk, "rb").read())
  content[len(content) // 2] ^= 0x10
  open(chunk, "wb").write(bytes(content))
  with caplog.at_level(logging.WARNING, logger="instdisc_jax.checkpointing"):
    (state, data_state, step), steps = restore(workdir)
  assert (step, data_state, steps) == (4, {"step": 4}, [4])
  assert_same(state, states[4])
  (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert f"checkpoint {newest} is unreadable" in warning
  assert "params/w does not match its checksum" in warning
  assert "restoring the previous one (step 4)" in warning
  assert os.path.isdir(os.path.join(workdir, "unreadable_checkpoints", "8"))


@pytest.mark.parametrize("damage", ["delete the largest file", "truncate the largest file",
                                    "delete the state index", "delete the meta item"])
def test_unreadable_newest_checkpoint_falls_back(saved, damage, caplog):
  workdir, states = saved
  newest = os.path.join(workdir, "checkpoints", "8")
  if damage == "delete the largest file":
    os.remove(files_of(newest)[0])
  elif damage == "truncate the largest file":
    path = files_of(newest)[0]
    content = open(path, "rb").read()
    open(path, "wb").write(content[:len(content) // 2])
  elif damage == "delete the state index":
    os.remove(os.path.join(newest, "state", "manifest.ocdbt"))
  else:
    os.remove(os.path.join(newest, "meta", "metadata"))
  with caplog.at_level(logging.WARNING, logger="instdisc_jax.checkpointing"):
    (state, _, step), steps = restore(workdir)
  assert (step, steps) == (4, [4])
  assert_same(state, states[4])
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and warnings[0].startswith(f"checkpoint {newest} is unreadable (")


def test_read_only_restore_falls_back_without_moving_anything(saved, caplog):
  """Evaluators and pre-run checks read a workdir that another run may be writing."""
  workdir, states = saved
  newest = os.path.join(workdir, "checkpoints", "8")
  os.remove(os.path.join(newest, "state", "manifest.ocdbt"))
  checkpointer = Checkpointer(workdir, keep=None, sharded_keys=SHARDED, read_only=True)
  with caplog.at_level(logging.WARNING, logger="instdisc_jax.checkpointing"):
    state, _, step = checkpointer.restore(make_state(), META)
  checkpointer.close()
  assert step == 4
  assert_same(state, states[4])
  assert f"checkpoint {newest} is unreadable" in caplog.text
  assert os.path.isdir(newest)
  assert not os.path.exists(os.path.join(workdir, "unreadable_checkpoints"))


def test_a_checkpoint_deleted_while_it_is_listed_is_listed_again(saved, monkeypatch):
  """orbax stats every checkpoint while it lists them; the run's `keep` may delete one in
  between (seen on a loaded CI machine: FileNotFoundError out of `manager.reload`)."""
  workdir, states = saved
  checkpointer = Checkpointer(workdir, keep=None, sharded_keys=SHARDED, read_only=True)
  reload, calls = checkpointer.manager.reload, []

  def flaky_reload():
    calls.append(1)
    if len(calls) == 1:
      raise FileNotFoundError("checkpoints/4 vanished while listed")
    return reload()

  monkeypatch.setattr(checkpointer.manager, "reload", flaky_reload)
  state, _, step = checkpointer.restore(make_state(), META)
  checkpointer.close()
  assert step == 8 and len(calls) >= 2
  assert_same(state, states[8])


def test_no_readable_checkpoint_starts_over(saved, caplog):
  workdir, _ = saved
  for step in ("4", "8"):
    os.remove(os.path.join(workdir, "checkpoints", step, "state", "manifest.ocdbt"))
  with caplog.at_level(logging.WARNING, logger="instdisc_jax.checkpointing"):
    restored, steps = restore(workdir)
  assert restored is None and steps == []
  assert "no older checkpoint: training starts from step 0" in caplog.text
  assert sorted(os.listdir(os.path.join(workdir, "unreadable_checkpoints"))) == ["4", "8"]


def test_a_new_checkpoint_replaces_a_set_aside_one(saved):
  """After falling back to step 4, saving step 8 again works (the bad 8 is out of the way)."""
  workdir, states = saved
  os.remove(os.path.join(workdir, "checkpoints", "8", "state", "manifest.ocdbt"))
  checkpointer = Checkpointer(workdir, keep=2, sharded_keys=SHARDED)
  checkpointer.restore(make_state(), META)
  checkpointer.save(8, states[8], {"step": 8}, META)
  checkpointer.close()
  (state, _, step), steps = restore(workdir)
  assert (step, steps) == (8, [4, 8])
  assert_same(state, states[8])


def test_failed_save_is_invisible_and_keeps_the_last_good_checkpoint(tmp_path):
  """keep=1: a save that fails midway neither shows up nor costs the previous checkpoint."""
  checkpointer = Checkpointer(tmp_path, keep=1, sharded_keys=SHARDED)
  checkpointer.save(4, make_state(4.0), {"step": 4}, META)
  with pytest.raises(TypeError):
    checkpointer.save(8, make_state(8.0), {"step": object()}, META)   # not JSON
  assert checkpointer.all_steps() == [4]
  checkpointer.close()
  (state, _, step), steps = restore(str(tmp_path))
  assert (step, steps) == (4, [4])
  assert_same(state, make_state(4.0))


def test_unfinished_checkpoint_directory_is_ignored_then_removed(saved):
  """What a kill during a save leaves (a temporary directory) is never restored, and the next
  writer removes it."""
  workdir, states = saved
  directory = os.path.join(workdir, "checkpoints")
  partial = os.path.join(directory, "12.orbax-checkpoint-tmp-1700000000000000")
  shutil.copytree(os.path.join(directory, "8"), partial)
  os.remove(os.path.join(partial, "commit_success.txt"))
  (state, _, step), steps = restore(workdir)
  assert (step, steps) == (8, [4, 8])
  assert_same(state, states[8])
  assert sorted(os.listdir(directory)) == ["4", "8"]


def test_nonfinite_state_is_never_written(saved):
  workdir, _ = saved
  state = make_state(12.0)
  state["params"]["b"] = parallel.replicate(np.array([0.0, np.nan, np.inf], np.float32))
  checkpointer = Checkpointer(workdir, keep=2, sharded_keys=SHARDED)
  with pytest.raises(NonFiniteLossError) as error:
    checkpointer.save(12, state, {"step": 12}, META)
  assert str(error.value).startswith(
      "the train state after step 12 holds NaN or infinite values (params/b), so it is not "
      "checkpointed; the last checkpoint (step 8) is kept")
  assert checkpointer.all_steps() == [4, 8]
  checkpointer.close()


def test_incompatible_run_is_refused_with_the_differing_fields(saved):
  workdir, _ = saved
  other = dict(META, low_dim=128, model="resnet50")
  expected = (f"workdir {workdir} holds a run with a different low_dim (saved 3, now 128), "
              "model (saved 'small_resnet', now 'resnet50'); use a new --workdir or the "
              "original config")
  with pytest.raises(WorkdirError) as error:
    checkpointing.check_compatible(workdir, other, config_io.incompatible_fields)
  assert str(error.value) == expected
  with pytest.raises(WorkdirError) as error:
    restore(workdir, other)
  assert str(error.value) == expected
  checkpointing.check_compatible(workdir, META, config_io.incompatible_fields)


def test_checksums_do_not_depend_on_the_layout():
  """The same values checksum the same whether replicated, sharded or on one device."""
  values = np.random.default_rng(1).standard_normal((8, 5, 3)).astype(np.float32)
  sharded, _ = checkpoint_leaves.inspect_leaves({"x": parallel.shard_local_rows(values)})
  single, _ = checkpoint_leaves.inspect_leaves({"x": jax.numpy.asarray(values)})
  assert sharded == single
  changed = values.copy()
  changed[3, 2, 1] = np.nextafter(changed[3, 2, 1], np.float32(1))
  assert checkpoint_leaves.inspect_leaves({"x": jax.numpy.asarray(changed)})[0] != single
  swapped = values.copy()
  swapped[0, 0, [0, 1]] = swapped[0, 0, [1, 0]]
  assert checkpoint_leaves.inspect_leaves({"x": jax.numpy.asarray(swapped)})[0] != single


# -- asynchronous saves --------------------------------------------------------------------------


@pytest.fixture
def slow_writes(monkeypatch):
  """Every save's background part takes at least 2 s (the test-only hook)."""
  monkeypatch.setenv(checkpoint_orbax.WRITE_DELAY_ENV, "2")


def test_save_returns_while_the_checkpoint_is_written(tmp_path, slow_writes):
  """`save` returns before the checkpoint is finalised; `wait_until_finished` finalises it."""
  checkpointer = Checkpointer(tmp_path, keep=2, sharded_keys=SHARDED)
  checkpointer.save(4, make_state(4.0), {"step": 4}, META)
  directory = os.path.join(tmp_path, "checkpoints")
  assert "4" not in os.listdir(directory)          # Only its temporary directory exists.
  assert checkpointer.latest_step() == 4           # ... but a second save of it is not started.
  checkpointer.wait_until_finished()
  assert os.listdir(directory) == ["4"]
  checkpointer.close()
  (state, _, step), _ = restore(str(tmp_path))
  assert step == 4
  assert_same(state, make_state(4.0))


def test_donating_the_state_during_a_save_does_not_change_the_checkpoint(tmp_path, slow_writes):
  """The train step donates its input state; a save in flight must hold its own copy.

  (On CPU this also passes without `save`'s device copy, since orbax 0.12 moves the arrays to
  host memory before `save` returns; the copy keeps the guarantee independent of that.)
  """
  state = make_state(4.0)
  checkpointer = Checkpointer(tmp_path, keep=2, sharded_keys=SHARDED)
  checkpointer.save(4, state, {"step": 4}, META)
  step = jax.pmap(lambda s: jax.tree.map(lambda x: x * 0 - 1, s), axis_name="devices",
                  donate_argnums=0)
  overwritten = step(state)          # Reuses (or frees) the buffers of `state` while it writes.
  jax.block_until_ready(overwritten)
  checkpointer.close()               # Waits for the write.
  (restored, _, _), _ = restore(str(tmp_path))
  assert_same(restored, make_state(4.0))


def test_synchronous_saves_are_finalised_on_return(tmp_path):
  checkpointer = Checkpointer(tmp_path, keep=2, sharded_keys=SHARDED, asynchronous=False)
  checkpointer.save(4, make_state(4.0), {"step": 4}, META)
  assert os.listdir(os.path.join(tmp_path, "checkpoints")) == ["4"]
  checkpointer.close()


# -- readers of a run that is still training -----------------------------------------------------


def test_a_checkpoint_deleted_while_it_is_read_is_passed_over_quietly(saved, caplog,
                                                                      monkeypatch):
  """The training run deletes old checkpoints (`keep`) while an evaluator reads: the reader
  takes the newest that exists then, and warns about nothing."""
  workdir, states = saved
  checkpointer = Checkpointer(workdir, keep=None, sharded_keys=SHARDED, read_only=True)
  read = checkpointer._read

  def deleted_by_the_trainer_first(step, *args):
    if step == 8:
      shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))
    return read(step, *args)

  monkeypatch.setattr(checkpointer, "_read", deleted_by_the_trainer_first)
  with caplog.at_level(logging.INFO, logger="instdisc_jax.checkpointing"):
    state, _, step = checkpointer.restore(make_state(), META)
  checkpointer.close()
  assert step == 4
  assert_same(state, states[4])
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
  assert "checkpoint 8 was deleted while it was read" in caplog.text


def test_a_checkpoint_written_after_the_reader_started_is_the_one_read(saved):
  workdir, _ = saved
  checkpointer = Checkpointer(workdir, keep=None, sharded_keys=SHARDED, read_only=True)
  assert checkpointer.all_steps() == [4, 8]
  writer = Checkpointer(workdir, keep=2, sharded_keys=SHARDED)
  writer.save(12, make_state(12.0), {"step": 12}, META)
  writer.close()                     # Keeps 8 and 12: 4, which the reader listed, is gone.
  state, _, step = checkpointer.restore(make_state(), META)
  checkpointer.close()
  assert step == 12
  assert_same(state, make_state(12.0))


def test_abandoned_read_callbacks_are_dropped_and_other_unraisables_kept(monkeypatch):
  """Only the noise of abandoned orbax reads is dropped."""
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
  checkpoint_orbax.install_quiet_fallback()
  checkpoint_orbax.install_quiet_fallback()          # Installed once, however often called.
  loop = asyncio.new_event_loop()
  loop.close()
  for error_of in (lambda: loop.call_soon_threadsafe(print), lambda: 1 / 0):
    try:
      error_of()
    except Exception as e:  # pylint: disable=broad-except
      sys.unraisablehook(types.SimpleNamespace(exc_type=type(e), exc_value=e,
                                               exc_traceback=e.__traceback__, err_msg=None,
                                               object=None))
  assert [type(e) for e in seen] == [ZeroDivisionError]
  # A read coroutine of orbax's finalised with its own read error, never awaited: dropped; the
  # same from any other coroutine: kept.
  read = (lambda: None).__code__.replace(co_name="_read_array_index_and_device_put",
                                         co_filename=os.path.join("site", "orbax", "io.py"))
  other = read.replace(co_filename=os.path.join("site", "mine", "io.py"))
  for code in (read, other):
    sys.unraisablehook(types.SimpleNamespace(exc_type=ValueError, exc_value=ValueError(code),
                                             exc_traceback=None, err_msg=None,
                                             object=types.SimpleNamespace(cr_code=code)))
  assert [type(e) for e in seen] == [ZeroDivisionError, ValueError]
  assert str(seen[-1].args[0]) == str(other)


def _task_failing_in(filename: str):
  """A finished asyncio task whose coroutine, defined in `filename`, raised; nobody retrieves it."""
  namespace = {}
  exec(compile("async def read():\n  raise ValueError('NOT_FOUND')\n", filename, "exec"),
       namespace)
  loop = asyncio.new_event_loop()
  task = loop.create_task(namespace["read"]())
  loop.run_until_complete(asyncio.sleep(0))
  loop.close()
  return task


def test_abandoned_orbax_read_tasks_are_not_reported_and_other_tasks_are(caplog, monkeypatch):
  """asyncio's "Task/Future exception was never retrieved" (logged when the task or future is
  collected) is dropped for a read of orbax's or tensorstore's abandoned by a failed restore,
  kept for any other."""
  asyncio_logger = logging.getLogger("asyncio")
  monkeypatch.setattr(asyncio_logger, "filters", list(asyncio_logger.filters))  # Restored after.
  checkpoint_orbax.install_quiet_fallback()
  with caplog.at_level(logging.ERROR, logger="asyncio"):
    for where in ("orbax", "mine"):
      task = _task_failing_in(os.path.join("site", where, "serialization.py"))
      del task
      gc.collect()
    # A future whose error tensorstore set from C++ (no Python frame): dropped; another: kept.
    for error in (ValueError("NOT_FOUND: Error opening \"zarr\" driver [tensorstore_spec='{}']"),
                  ValueError("mine")):
      loop = asyncio.new_event_loop()
      future = loop.create_future()
      future.set_exception(error)
      loop.close()
      del future, error
      gc.collect()
  reported = [r for r in caplog.records if "never retrieved" in r.getMessage()]
  assert len(reported) == 2
  assert f"{os.sep}mine{os.sep}" in reported[0].exc_info[2].tb_frame.f_code.co_filename
  assert str(reported[1].exc_info[1]) == "mine"


def test_unawaited_orbax_coroutines_are_not_warned_of_and_others_are(monkeypatch):
  """Python's RuntimeWarning for a coroutine created and never awaited: dropped when orbax's code
  defines it (an abandoned read of a failed restore), kept for any other."""
  monkeypatch.setattr(warnings, "_warn_unawaited_coroutine", warnings._warn_unawaited_coroutine)
  checkpoint_orbax.install_quiet_fallback()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for where in ("orbax", "mine"):
      namespace = {}
      exec(compile("async def _get_array_metadatas():\n  pass\n",
                   os.path.join("site", where, "store.py"), "exec"), namespace)
      coroutine = namespace["_get_array_metadatas"]()
      del coroutine
      gc.collect()
  unawaited = [w for w in caught if "was never awaited" in str(w.message)]
  assert len(unawaited) == 1 and issubclass(unawaited[0].category, RuntimeWarning)
  assert f"{os.sep}mine{os.sep}" in unawaited[0].source.cr_code.co_filename


def test_orbax_warning_about_missing_step_metadata_is_dropped(saved, caplog, monkeypatch):
  """A reader may list a checkpoint the run then deletes: orbax's "Metadata file does not exist"
  for it is dropped (the Checkpointer says what matters); orbax's other warnings are kept."""
  absl_logger = logging.getLogger("absl")
  monkeypatch.setattr(absl_logger, "filters", list(absl_logger.filters))   # Restored after.
  workdir, states = saved
  os.remove(os.path.join(workdir, "checkpoints", "8", "_CHECKPOINT_METADATA"))
  with caplog.at_level(logging.WARNING):
    checkpointer = Checkpointer(workdir, keep=None, sharded_keys=SHARDED, read_only=True)
    state, _, step = checkpointer.restore(make_state(), META)
    checkpointer.close()
    absl_logger.warning("another orbax warning")
  assert step == 8
  assert_same(state, states[8])
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
      "another orbax warning"]
