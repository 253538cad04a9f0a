"""Multi-process training: 2 processes x 4 CPU devices against 1 process x 8 devices.

Every run is the real trainer (`python -m instdisc_jax.main`) on a tiny npz dataset, in its own
processes on this machine, joined through `jax.distributed` on localhost as the hosts of a pod
slice would be; CPU collectives go over gloo. Four runs serve all the tests:

* `one` (1 x 8) and `two` (2 x 4, through launch/local_multiprocess.sh) train steps 1-4 from
  scratch with the same seed: their losses, banks and kNN results must agree.
* `killed` (2 x 4, processes started directly, as on separate hosts) resumes `one`'s step-4
  checkpoint, trains on, and loses process 1 to SIGKILL mid-run: process 0 must exit non-zero
  with a one-line error within 120 s, and leave its completed checkpoints intact.
* `resumed` (1 x 8) resumes what `killed` left and trains 2 more steps.

`killed` and `resumed` carry checkpoints across topologies both ways (1 x 8 -> 2 x 4 -> 1 x 8),
and their overlapping steps must agree with each other.

Tolerances: the two topologies sum the same numbers in different orders (a gloo all-reduce
across processes, XLA's in-process one within), so results agree to float32 rounding, not
bitwise. Measured on this tiny config: losses (values 7 to 15) differ by at most 1e-6, relative
7e-8, over steps 1-4 (3e-7 relative with 64 training images), bank entries (|v| < 0.7) by at
most 8e-7. The checks allow 2e-6 relative on losses and 5e-6 absolute on the bank.

The runs compile with `--xla_backend_optimization_level=0` (the tiny network runs fast enough
unoptimised, and compiles ~10x faster) and share a persistent compilation cache.
"""

import json
import os
from pathlib import Path
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from instdisc_jax.metric_writers import read_metrics

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
FAST_COMPILE = "--xla_backend_optimization_level=0"
NUM_TRAIN, NUM_TEST = 60, 40   # 60 over 8 devices leaves padding rows in the last bank shard;
EVAL_BATCH = 32                # 40 test images in batches of 32: process 1 reads only padding.
FIRST_STEPS = 4
RUN_TIMEOUT = 600
LOSS_RTOL = 2e-6
BANK_ATOL = 5e-6
SURVIVOR_DEADLINE = 120


# -- running the trainer ---------------------------------------------------------------------------


def overrides(data: Path, steps: int) -> list[str]:
  return [f"--config.dataset=npz:{data}", f"--config.num_train_steps={steps}",
          f"--config.eval_batch_size={EVAL_BATCH}", "--config.log_every_steps=1",
          "--config.checkpoint_every_steps=2"]


def trainer_env(cache: Path, xla_flags: str) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache))
  return env


def trainer_command(workdir: Path, args: list[str]) -> list[str]:
  return [sys.executable, "-m", "instdisc_jax.main", "--config=configs/tiny.py",
          f"--workdir={workdir}", *args]


def start_one_process(workdir: Path, data: Path, steps: int, cache: Path,
                      log: Path) -> subprocess.Popen:
  """1 process x 8 devices, its output to `log`."""
  with open(log, "w") as out:
    return subprocess.Popen(
        trainer_command(workdir, overrides(data, steps)), cwd=REPO, stdout=out,
        stderr=subprocess.STDOUT,
        env=trainer_env(cache, f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}"))


def start_launcher(workdir: Path, data: Path, steps: int, cache: Path,
                   log: Path) -> subprocess.Popen:
  """2 processes x 4 devices through launch/local_multiprocess.sh, its output to `log` (the
  processes' own in <workdir>/logs)."""
  with open(log, "w") as out:
    return subprocess.Popen(
        [str(REPO / "launch" / "local_multiprocess.sh"), "--num_processes=2",
         "--devices_per_process=4", "--config=configs/tiny.py", f"--workdir={workdir}",
         f"--python={sys.executable}", "--", *overrides(data, steps)],
        cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=trainer_env(cache, FAST_COMPILE))


def finish(process: subprocess.Popen, log: Path) -> str:
  """Waits for a run; fails the test with the end of its log unless it exited 0."""
  try:
    process.wait(timeout=RUN_TIMEOUT)
  finally:
    if process.poll() is None:
      process.kill()
  text = log.read_text()
  assert process.returncode == 0, f"exit status {process.returncode}; end of {log}:\n{text[-3000:]}"
  return text


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_two_processes(workdir: Path, data: Path, steps: int, cache: Path):
  """2 processes x 4 devices started directly (not through the launcher, which stops the
  others when one fails): (processes, their log paths)."""
  address = f"127.0.0.1:{free_port()}"
  env = trainer_env(cache, f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}")
  processes, logs = [], []
  for i in range(2):
    logs.append(Path(f"{workdir}.process_{i}.log"))
    with open(logs[-1], "w") as out:
      processes.append(subprocess.Popen(
          trainer_command(workdir, [f"--coordinator_address={address}", "--num_processes=2",
                                    f"--process_id={i}", *overrides(data, steps)]),
          cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env))
  return processes, logs


# -- reading results --------------------------------------------------------------------------------


def losses(workdir: Path) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in read_metrics(str(workdir)) if "loss" in r}


def completed_checkpoints(workdir: Path) -> list[int]:
  """Steps of the finished checkpoints (orbax renames a checkpoint to its step when complete)."""
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def read_state(workdir: Path, step: int) -> dict:
  """The saved train state of checkpoint `step`, as numpy arrays."""
  path = workdir / "checkpoints" / str(step) / "state"
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.metadata(path).item_metadata.tree
    return checkpointer.restore(path, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))


def assert_losses_match(actual: dict, expected: dict, steps) -> None:
  steps = list(steps)
  np.testing.assert_allclose([actual[s] for s in steps], [expected[s] for s in steps],
                             rtol=LOSS_RTOL, err_msg=f"losses of steps {steps}")


# -- the runs ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
  path = tmp_path_factory.mktemp("data") / "tiny.npz"
  rng = np.random.default_rng(0)
  np.savez(path, images=rng.integers(0, 256, (NUM_TRAIN, 16, 16, 1), dtype=np.uint8),
           labels=rng.integers(0, 4, NUM_TRAIN),
           test_images=rng.integers(0, 256, (NUM_TEST, 16, 16, 1), dtype=np.uint8),
           test_labels=rng.integers(0, 4, NUM_TEST))
  return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp("compilation_cache")


@pytest.fixture(scope="module")
def first_runs(runs, data, cache) -> tuple[Path, Path]:
  """(`one`, `two`): 4 steps from scratch on 1 x 8 and 2 x 4 devices, run side by side."""
  one, two = runs / "one", runs / "two"
  logs = runs / "one.log", runs / "two.log"
  started = [start_one_process(one, data, FIRST_STEPS, cache, logs[0]),
             start_launcher(two, data, FIRST_STEPS, cache, logs[1])]
  for process, log in zip(started, logs):
    finish(process, log)
  return one, two


@pytest.fixture(scope="module")
def killed(first_runs, runs, data, cache) -> dict:
  """`one`'s workdir resumed on 2 x 4 devices; process 1 is killed once a step after a
  completed checkpoint of step >= 6 is logged. What happened, measured from the kill."""
  workdir = runs / "killed"
  shutil.copytree(first_runs[0], workdir)
  processes, logs = start_two_processes(workdir, data, 1000, cache)
  survivor, victim = processes
  try:
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
      assert time.monotonic() < deadline, "the 2-process run made no progress"
      assert all(p.poll() is None for p in processes), (
          "a process ended before the kill:\n" + "\n".join(log.read_text()[-2000:] for log in logs))
      done = [s for s in completed_checkpoints(workdir) if s >= 6]
      logged = max(losses(workdir), default=0)
      if done and logged > done[-1]:
        break
      time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    try:
      survivor.wait(timeout=SURVIVOR_DEADLINE + 60)
    except subprocess.TimeoutExpired:
      pass
    waited = time.monotonic() - killed_at
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
      p.wait()
  return {"workdir": workdir, "status": survivor.returncode, "seconds": waited,
          "log": logs[0].read_text(), "losses": losses(workdir),
          "checkpoints": completed_checkpoints(workdir)}


@pytest.fixture(scope="module")
def resumed(killed, data, cache) -> tuple[Path, str]:
  """What `killed` left, resumed on 1 x 8 devices for 2 more steps: (workdir, log)."""
  workdir = killed["workdir"]
  steps = killed["checkpoints"][-1] + 2
  log = Path(f"{workdir}.resumed.log")
  return workdir, finish(start_one_process(workdir, data, steps, cache, log), log)


# -- the tests --------------------------------------------------------------------------------------


def test_two_processes_train_as_one(first_runs):
  one, two = first_runs
  expected, actual = losses(one), losses(two)
  assert sorted(expected) == sorted(actual) == list(range(1, FIRST_STEPS + 1))
  assert_losses_match(actual, expected, range(1, FIRST_STEPS + 1))
  bank_one = read_state(one, FIRST_STEPS)["bank"]["rows"]
  bank_two = read_state(two, FIRST_STEPS)["bank"]["rows"]
  assert bank_one.shape == bank_two.shape == (8, 8, 16)
  np.testing.assert_allclose(bank_two, bank_one, rtol=0, atol=BANK_ATOL)
  # Exact multi-host kNN: every test image counted once, padding rows never; after epoch 1 (step
  # 3) and in the final evaluation.
  assert json.loads((two / "results.json").read_text()) == json.loads(
      (one / "results.json").read_text())
  knn = {run: [(r["step"], r["knn_bank/top1"], r["knn_bank/top5"])
               for r in read_metrics(str(run)) if "knn_bank/top1" in r] for run in first_runs}
  assert [step for step, _, _ in knn[two]] == [3, 4]
  assert knn[two] == knn[one]


def test_only_process_zero_writes_logs(first_runs):
  _, two = first_runs
  steps = [r["step"] for r in read_metrics(str(two)) if "loss" in r]
  assert steps == sorted(set(steps))                    # one record per step, not one per process
  assert len(list((two / "tensorboard").iterdir())) == 1  # one event file
  process_1 = (two / "logs" / "process_1.log").read_text()
  assert "process 1 of 2; 4 local and 8 global devices" in process_1
  assert "kNN" not in process_1
  assert not (two / "lock.json").exists()


def test_survivor_of_a_killed_process_exits_with_one_line(killed):
  assert killed["status"] not in (0, None), killed["log"][-3000:]
  assert killed["seconds"] < SURVIVOR_DEADLINE
  last = killed["log"].strip().splitlines()[-1]
  # 30 s without a heartbeat, or 3 s if an error from a collective came first.
  assert last.startswith("error: process 1 of 2 stopped responding (no heartbeat for "), last
  assert last.endswith("restart every process to resume from the newest."), last


def test_last_completed_checkpoint_restores_on_one_process(killed, resumed):
  workdir, log = resumed
  newest = killed["checkpoints"][-1]
  assert newest >= 6
  assert f"resumed from the checkpoint of step {newest}" in log
  assert "unreadable" not in log
  assert completed_checkpoints(workdir)[-1] == newest + 2


def test_checkpoints_move_between_topologies(killed, resumed):
  # `killed` resumed `one`'s 1 x 8 checkpoint of step 4 on 2 x 4 devices; `resumed` took its
  # newest 2 x 4 checkpoint back to 1 x 8. Where both logged a step, they agree.
  assert f"resumed from the checkpoint of step {FIRST_STEPS}" in killed["log"]
  before = killed["losses"]
  assert FIRST_STEPS + 1 in before
  after = losses(resumed[0])
  newest = killed["checkpoints"][-1]
  assert sorted(after)[-2:] == [newest + 1, newest + 2]
  overlap = sorted(set(before) & {newest + 1, newest + 2})
  assert overlap, (sorted(before), newest)
  assert_losses_match(after, before, overlap)
