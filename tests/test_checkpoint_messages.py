"""What a user sees when checkpoints are damaged: the warning and the error, nothing else.

Real runs (`python -m instdisc_jax.main` / `python -m instdisc_jax.evaluate` on configs/tiny.py,
8 fake CPU devices) on a workdir whose checkpoints (steps 9 and 12) are damaged on disk. A failed
read used to be followed by hundreds of orbax/asyncio "Event loop is closed" tracebacks; now
stderr holds the program's own log lines (absl INFO records, "I<date> ..."), one warning per
damaged checkpoint and, when nothing can be read, one error line, last.
"""

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import tiny_run

pytestmark = pytest.mark.slow

INFO = re.compile(r"^I\d{4} ")
NOISE = ("Traceback", "Exception ignored", "Event loop is closed", "RuntimeWarning")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return tiny_run.cached_environment(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def flags(tmp_path_factory):
  npz = tiny_run.write_npz(tmp_path_factory.mktemp("data") / "tiny.npz")
  return [f"--config.dataset=npz:{npz}", "--config.num_epochs=3",
          "--config.checkpoint_every_steps=3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, flags, env):
  """A finished run with checkpoints 9 and 12."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  finished = tiny_run.run_main(workdir, *flags, env=env)
  assert finished.returncode == 0, finished.stderr
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "9"]
  return workdir


@pytest.fixture
def workdir(trained, tmp_path):
  copy = str(tmp_path / "run")
  shutil.copytree(trained, copy)
  return copy


# -- damage --------------------------------------------------------------------------------------


def checkpoint(workdir, step: int) -> str:
  return os.path.join(workdir, "checkpoints", str(step))


def truncate_data_files(workdir, step: int) -> None:
  """Cuts every data file of the state to 64 bytes, so tensorstore fails reading it. (Cutting only
  the largest was not always enough: a state written in several files may keep values no longer
  referenced, and the largest file was then not read at all.)"""
  chunks = os.path.join(checkpoint(workdir, step), "state", "ocdbt.process_0", "d")
  for name in os.listdir(chunks):
    path = os.path.join(chunks, name)
    with open(path, "rb") as f:
      content = f.read()
    with open(path, "wb") as f:
      f.write(content[:64])


def delete_state_index(workdir, step: int) -> None:
  os.remove(os.path.join(checkpoint(workdir, step), "state", "manifest.ocdbt"))


# -- what is printed -----------------------------------------------------------------------------


def evaluate(workdir, env) -> subprocess.CompletedProcess:
  """The evaluator with every evaluation switched off: it restores and writes its results."""
  off = ["--config.eval.knn=False", "--config.eval.linear_probe=False",
         "--config.eval.semi_supervised_fractions=()", "--config.eval.export=False",
         "--config.eval.retrieval_grid=False", "--config.eval.curves=False"]
  return subprocess.run([sys.executable, "-m", "instdisc_jax.evaluate", f"--workdir={workdir}",
                         *off], capture_output=True, text=True, env=env, cwd=tiny_run.REPO,
                        timeout=300)


def messages(stderr: str) -> list[str]:
  """The lines of stderr other than the program's INFO log records (the tests compare them
  with what they expect, line by line); asserts that no traceback is among any."""
  for noise in NOISE:
    assert noise not in stderr, stderr
  return [line for line in stderr.splitlines() if not INFO.match(line)]


def unreadable_warning(workdir, step: int, then: str) -> re.Pattern:
  return re.compile(rf"^W\d{{4}} .* checkpoint {re.escape(checkpoint(workdir, step))} is "
                    rf"unreadable \(.+\); .*{re.escape(then)}$")


def hashes(directory) -> dict:
  """{path: sha256} of every file under `directory`."""
  found = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        found[path] = hashlib.sha256(f.read()).hexdigest()
  return found


# -- the tests -----------------------------------------------------------------------------------


def test_training_falls_back_past_a_damaged_newest_checkpoint_with_one_warning(workdir, flags,
                                                                                env):
  truncate_data_files(workdir, 12)
  # A run stopped before its final evaluation: a finished run (with results.json) reruns nothing.
  os.remove(os.path.join(workdir, "results.json"))
  rerun = tiny_run.run_main(workdir, *flags, env=env)
  assert rerun.returncode == 0, rerun.stderr
  (warning,) = messages(rerun.stderr)
  assert unreadable_warning(workdir, 12, "restoring the previous one (step 9)").match(warning)
  assert "resumed from the checkpoint of step 9" in rerun.stderr
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "9"]
  assert os.listdir(os.path.join(workdir, "unreadable_checkpoints")) == ["12"]


def test_evaluator_falls_back_past_a_damaged_newest_checkpoint_with_one_warning(workdir, env):
  delete_state_index(workdir, 12)
  evaluated = evaluate(workdir, env)
  assert evaluated.returncode == 0, evaluated.stderr
  (warning,) = messages(evaluated.stderr)
  assert unreadable_warning(workdir, 12, "restoring the previous one (step 9)").match(warning)
  assert evaluated.stdout.splitlines()[0] == "checkpoint of step 9"


def test_evaluator_with_every_checkpoint_damaged_says_so_in_one_line(workdir, env):
  truncate_data_files(workdir, 12)
  delete_state_index(workdir, 9)
  before = hashes(workdir)
  evaluated = evaluate(workdir, env)
  assert evaluated.returncode == 2, evaluated.stderr
  lines = messages(evaluated.stderr)
  assert len(lines) == 3, evaluated.stderr
  first, second, error = lines
  assert unreadable_warning(workdir, 12, "restoring the previous one (step 9)").match(first)
  assert unreadable_warning(workdir, 9, "no older checkpoint").match(second)
  assert error == f"error: no checkpoint of {workdir} could be read (see the warnings above)"
  assert evaluated.stdout == ""
  assert hashes(workdir) == before


def test_evaluating_a_run_that_is_still_training(tmp_path, env):
  """The run saves every 2 steps and keeps 2, so checkpoints live well under a second; the
  evaluator, restoring meanwhile, must read the newest that exists when it reads, and never
  say there is none or warn about one the run deleted."""
  npz = tiny_run.write_npz(tmp_path / "tiny.npz")
  workdir = str(tmp_path / "training")
  command = tiny_run.main_command(
      workdir, f"--config.dataset=npz:{npz}", "--config.num_epochs=10000",
      "--config.checkpoint_every_steps=2", "--config.keep_checkpoints=2",
      "--config.eval_every_epochs=0")
  training = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=env, cwd=tiny_run.REPO, text=True)
  directory = os.path.join(workdir, "checkpoints")
  try:
    deadline = time.monotonic() + 180
    while not (os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))):
      assert training.poll() is None, training.stderr.read()
      assert time.monotonic() < deadline, "no checkpoint written in 180 s"
      time.sleep(0.05)
    listed = max(int(n) for n in os.listdir(directory) if n.isdigit())
    evaluated = evaluate(workdir, env)
    assert evaluated.returncode == 0, evaluated.stderr
    assert messages(evaluated.stderr) == []
    step = int(evaluated.stdout.splitlines()[0].removeprefix("checkpoint of step "))
    assert step >= listed
    assert training.poll() is None
    # While the evaluator ran, the run went on saving and deleting what it had listed.
    assert listed not in [int(n) for n in os.listdir(directory) if n.isdigit()]
  finally:
    training.send_signal(signal.SIGTERM)
    assert training.wait(timeout=120) == 75, training.stderr.read()
