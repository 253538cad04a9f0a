"""Never lose a run: real training processes on 8 fake CPU devices, killed, stopped and resumed.

Every run here is the same command, `python -m instdisc_jax.main` on configs/tiny.py: 64
images, batch 16, 3 epochs = 12 steps, a checkpoint every 3 steps (2 kept), metrics every step,
kNN after epochs 1 and 2 and at the end. One uninterrupted run is the reference; the others must
end with exactly its params, bank, Z (every leaf of the train state, bitwise), metrics and kNN
results.

How metrics are compared: `metrics.jsonl` without the wall-clock fields (`time`,
`images_per_sec`), record by record. A resumed run first drops the records after the step it
resumed from (what the interrupted run wrote past its last checkpoint), so a resumed run's file
has every step once and must equal the reference's.

The runs share a persistent XLA compilation cache: only the reference compiles, the other
processes load its executables (bitwise equality with the reference also shows the cached
executables compute what freshly compiled ones do).
"""

import json
import os
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tiny_run

from instdisc_jax import checkpoint_leaves
from instdisc_jax import checkpoint_orbax
from instdisc_jax import checkpointing

pytestmark = pytest.mark.slow

TOTAL_STEPS = 12
WALL_CLOCK_FIELDS = ("time", "images_per_sec")


# -- running the trainer -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
  return tiny_run.write_npz(tmp_path_factory.mktemp("data") / "tiny.npz")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return tiny_run.cached_environment(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def flags(npz):
  return [f"--config.dataset=npz:{npz}", "--config.num_epochs=3",
          "--config.checkpoint_every_steps=3", "--config.log_every_steps=1"]


def run(workdir, flags, env, *extra):
  return tiny_run.run_main(workdir, *flags, *extra, env=env)


def start(workdir, flags, env):
  """The command in the background; its stderr goes to <workdir>.stderr."""
  stderr = open(f"{workdir}.stderr", "w")
  process = subprocess.Popen(tiny_run.main_command(workdir, *flags),
                             stdout=subprocess.DEVNULL, stderr=stderr, env=env,
                             cwd=tiny_run.REPO)
  process.started = time.time()
  return process


def stderr_of(workdir) -> str:
  with open(f"{workdir}.stderr") as f:
    return f.read()


def loss_records(workdir) -> list[dict]:
  """The complete training records of metrics.jsonl so far."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith("\n") and '"loss"' in line]


def logged_steps(workdir) -> list[int]:
  return [record["step"] for record in loss_records(workdir)]


def pause_after(process, workdir, step: int, timeout: float = 240) -> int:
  """SIGSTOPs `process` once it has itself logged `step` or a later one (records left by an
  earlier run do not count); returns the last step logged."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    records = loss_records(workdir)
    if records and records[-1]["step"] >= step and records[-1]["time"] > process.started:
      process.send_signal(signal.SIGSTOP)
      return logged_steps(workdir)[-1]
    assert process.poll() is None, f"exited with {process.returncode}: {stderr_of(workdir)}"
    time.sleep(0.005)
  raise AssertionError(f"step {step} not reached in {timeout}s: {stderr_of(workdir)}")


def checkpoint_steps(workdir) -> list[int]:
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


# -- what a finished run leaves ------------------------------------------------------------------


def final_state(workdir) -> dict:
  """{leaf name: value} of the newest checkpoint's train state, read back as saved."""
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                  item_names=checkpointing.ITEMS)
  restored = manager.restore(manager.latest_step(),
                             args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  flat = jax.tree_util.tree_flatten_with_path(restored["state"])[0]
  return {checkpoint_leaves.leaf_name(path): np.asarray(leaf) for path, leaf in flat}


def metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if k not in WALL_CLOCK_FIELDS} for r in records]


def results(workdir) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def assert_same_run(workdir, reference):
  """Bitwise the same train state, the same metrics and the same kNN results."""
  state, expected = final_state(workdir), final_state(reference)
  assert state.keys() == expected.keys()
  assert {"bank/rows", "partition/log_z", "params/encoder/head/kernel", "step"} <= state.keys()
  for name in expected:
    assert state[name].dtype == expected[name].dtype, name
    assert state[name].tobytes() == expected[name].tobytes(), f"{name} differs"
  assert int(state["step"]) == TOTAL_STEPS
  assert metrics(workdir) == metrics(reference)
  assert results(workdir) == results(reference)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, flags, env):
  """One uninterrupted run (it compiles; the others reuse its executables)."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  finished = run(workdir, flags, env)
  assert finished.returncode == 0, finished.stderr
  return workdir


# -- the tests -----------------------------------------------------------------------------------


def test_reference_run_is_complete(reference):
  steps = logged_steps(reference)
  assert steps == list(range(1, TOTAL_STEPS + 1))
  assert checkpoint_steps(reference) == [9, 12]
  assert all(np.isfinite(r["loss"]) for r in metrics(reference) if "loss" in r)
  assert not os.path.exists(os.path.join(reference, "lock.json"))


def test_same_seed_same_devices_same_result(reference, flags, env, tmp_path):
  workdir = str(tmp_path / "again")
  finished = run(workdir, flags, env)
  assert finished.returncode == 0, finished.stderr
  assert_same_run(workdir, reference)


def test_stopped_killed_and_interrupted_run_resumes_exactly(reference, flags, env, tmp_path):
  """One run stopped four ways, each time by rerunning the same command: SIGTERM (with a second
  run refused meanwhile), SIGKILL at whatever step it has reached, SIGINT, and finally to the
  end, which must be the reference's."""
  workdir = str(tmp_path / "interrupted")
  first = start(workdir, flags, env)
  pause_after(first, workdir, 2)

  # While it runs, a second run on the same workdir is refused and changes nothing.
  listing = sorted(os.listdir(workdir))
  second = run(workdir, flags, env)
  assert second.returncode == 2
  assert second.stderr.splitlines()[-1].startswith(
      f"error: workdir {workdir} is in use by pid {first.pid} on host ")
  assert sorted(os.listdir(workdir)) == listing

  # SIGTERM: the current step finishes, a checkpoint of it is written, exit 75.
  first.send_signal(signal.SIGTERM)
  first.send_signal(signal.SIGCONT)
  assert first.wait(timeout=120) == 75, stderr_of(workdir)
  terminated = stopped_at(workdir, "SIGTERM")
  assert checkpoint_steps(workdir)[-1] == terminated < TOTAL_STEPS
  assert logged_steps(workdir)[-1] == terminated
  assert not os.path.exists(os.path.join(workdir, "lock.json"))

  # SIGKILL, two steps later or wherever the run has got to: nothing is written, the lock stays.
  killed = start(workdir, flags, env)
  logged = pause_after(killed, workdir, terminated + 2)
  killed.kill()
  killed.wait()
  assert f"resumed from the checkpoint of step {terminated}" in stderr_of(workdir)
  saved = checkpoint_steps(workdir)[-1]
  assert terminated <= saved <= logged < TOTAL_STEPS
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  assert os.path.exists(os.path.join(workdir, "lock.json"))

  # SIGINT (Ctrl-C) stops the rerun like SIGTERM; it takes over the killed run's stale lock.
  interrupted_run = start(workdir, flags, env)
  pause_after(interrupted_run, workdir, saved + 1)
  interrupted_run.send_signal(signal.SIGINT)
  interrupted_run.send_signal(signal.SIGCONT)
  assert interrupted_run.wait(timeout=120) == 75, stderr_of(workdir)
  assert f"taking over the stale lock of pid {killed.pid}" in stderr_of(workdir)
  assert f"resumed from the checkpoint of step {saved}" in stderr_of(workdir)
  interrupted = stopped_at(workdir, "SIGINT")
  assert saved < interrupted == checkpoint_steps(workdir)[-1] < TOTAL_STEPS

  last = run(workdir, flags, env)
  assert last.returncode == 0, last.stderr
  assert f"resumed from the checkpoint of step {interrupted}" in last.stderr
  assert_same_run(workdir, reference)


def save_in_flight(process, workdir, step: int, timeout: float = 240) -> int:
  """Waits until checkpoint `step` is being written (its temporary directory exists, it is not
  finalised) while `process` has logged a later step; returns that later step."""
  directory = os.path.join(workdir, "checkpoints")
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    names = os.listdir(directory) if os.path.isdir(directory) else []
    writing = any(name.startswith(f"{step}.orbax-checkpoint-tmp") for name in names)
    records = loss_records(workdir)
    if writing and str(step) not in names and records and records[-1]["step"] > step:
      return records[-1]["step"]
    assert process.poll() is None, f"exited with {process.returncode}: {stderr_of(workdir)}"
    time.sleep(0.005)
  raise AssertionError(f"no save of step {step} in flight in {timeout}s: {stderr_of(workdir)}")


def test_sigkill_during_an_asynchronous_save_resumes_exactly(reference, flags, env, tmp_path):
  """Saves are asynchronous: the loop steps on while a checkpoint is written. A SIGKILL then
  leaves that checkpoint unfinished; the rerun resumes from the one before and ends bitwise as
  the reference. The test-only hook makes every background write take 3 s, so the kill lands
  inside one for certain."""
  workdir = str(tmp_path / "killed_while_saving")
  slow = dict(env, **{checkpoint_orbax.WRITE_DELAY_ENV: "3"})
  killed = start(workdir, flags, slow)
  stepped_to = save_in_flight(killed, workdir, 6)
  killed.kill()
  killed.wait()
  assert 6 < stepped_to < TOTAL_STEPS
  assert checkpoint_steps(workdir) == [3]        # 6 was in flight: only its temporary directory.

  last = run(workdir, flags, slow)                # Its own saves slow too: the last is waited on.
  assert last.returncode == 0, last.stderr
  assert "resumed from the checkpoint of step 3" in last.stderr
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "9"]
  assert_same_run(workdir, reference)


def stopped_at(workdir, signal_name: str) -> int:
  """The step that the run's exit message says it stopped after."""
  message = stderr_of(workdir).splitlines()[-1]
  prefix = f"stopped by {signal_name} after step "
  assert message.startswith(prefix), message
  assert message.endswith("; checkpoint written, rerun the same command to resume")
  return int(message[len(prefix):].split(";")[0])


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_checkpoint(reference, flags, env,
                                                                       tmp_path):
  """The reference's last checkpoint gets a finite but extreme Z (log Z = -3e38), so the next
  step's NCE loss overflows to inf; training on for 2 more steps must stop at step 13."""
  workdir = str(tmp_path / "diverged")
  shutil.copytree(reference, workdir)
  set_log_z(workdir, TOTAL_STEPS, -3e38)
  before = metrics(workdir)

  diverged = run(workdir, flags, env, f"--config.num_train_steps={TOTAL_STEPS + 2}")
  assert diverged.returncode == 1, diverged.stderr
  assert diverged.stderr.splitlines()[-1] == (
      f"error: loss is inf at step {TOTAL_STEPS + 1}; the last checkpoint (step {TOTAL_STEPS}) "
      "is kept; lower learning_rate or raise temperature, then rerun")
  assert checkpoint_steps(workdir) == [9, 12]
  assert metrics(workdir) == before
  assert not os.path.exists(os.path.join(workdir, "lock.json"))


def set_log_z(workdir, step: int, log_z: float) -> None:
  """Rewrites checkpoint `step` with the partition's log Z replaced (checksums updated)."""
  directory = os.path.join(workdir, "checkpoints")
  manager = ocp.CheckpointManager(directory, item_names=checkpointing.ITEMS)
  items = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore(),
      meta=ocp.args.JsonRestore()))
  manager.close()
  state = items["state"]
  old = state["partition"]["log_z"]
  state["partition"]["log_z"] = jax.device_put(np.float32(log_z), old.sharding)
  shutil.rmtree(os.path.join(directory, str(step)))
  manager = ocp.CheckpointManager(
      directory, item_names=checkpointing.ITEMS,
      options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(items["data"]),
      meta=ocp.args.JsonSave(items["meta"]),
      integrity=ocp.args.JsonSave(
          {"checksums": checkpoint_leaves.inspect_leaves(state)[0]})))
  manager.wait_until_finished()
  manager.close()
