"""One writer per workdir, and a workdir is never touched by a run that cannot use it.

The lock: a live holder is refused by name; stale locks (dead pid, or a reused pid) are taken
over. `train_and_evaluate` refuses a locked workdir, a workdir of an incompatible run, a bad
config and missing data before it compiles or writes anything.
"""

import json
import logging
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tiny_run

from instdisc_jax import checkpointing
from instdisc_jax import config_io
from instdisc_jax import parallel
from instdisc_jax import train
from instdisc_jax import workdir as workdir_lib
from instdisc_jax.errors import ConfigError
from instdisc_jax.errors import DataError
from instdisc_jax.errors import WorkdirError
from instdisc_jax.workdir import WorkdirLock


def write_lock(directory, **record):
  record = {"pid": os.getpid(), "host": socket.gethostname(), "start": None, "since": 0.0,
            **record}
  with open(os.path.join(directory, "lock.json"), "w") as f:
    json.dump(record, f)


def dead_pid() -> int:
  child = subprocess.Popen([sys.executable, "-c", "pass"])
  child.wait()
  return child.pid


def snapshot(directory):
  """{relative path: bytes} of every file under `directory`."""
  files = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, directory)] = f.read()
  return files


def test_lock_names_its_holder_and_is_released(tmp_path):
  with WorkdirLock(tmp_path):
    with open(tmp_path / "lock.json") as f:
      record = json.load(f)
    assert (record["pid"], record["host"]) == (os.getpid(), socket.gethostname())
    with pytest.raises(WorkdirError) as error:
      WorkdirLock(tmp_path).__enter__()
    assert str(error.value).startswith(
        f"workdir {tmp_path} is in use by pid {os.getpid()} on host {socket.gethostname()} "
        "since ")
    assert str(error.value).endswith("wait for that run to finish, or use another --workdir")
  assert os.listdir(tmp_path) == []


def test_lock_is_released_when_the_run_fails(tmp_path):
  with pytest.raises(RuntimeError):
    with WorkdirLock(tmp_path):
      raise RuntimeError("boom")
  assert os.listdir(tmp_path) == []


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
  pid = dead_pid()
  write_lock(tmp_path, pid=pid)
  with caplog.at_level(logging.WARNING, logger="instdisc_jax.workdir"):
    with WorkdirLock(tmp_path):
      with open(tmp_path / "lock.json") as f:
        assert json.load(f)["pid"] == os.getpid()
  assert f"taking over the stale lock of pid {pid} (no longer running)" in caplog.text


def test_lock_of_an_earlier_process_with_a_reused_pid_is_stale(tmp_path, caplog):
  """A restarted container can give the new run the pid of the old one."""
  write_lock(tmp_path, start="1")
  with caplog.at_level(logging.WARNING, logger="instdisc_jax.workdir"):
    with WorkdirLock(tmp_path):
      pass
  assert f"taking over the stale lock of pid {os.getpid()}" in caplog.text


def test_lock_from_another_host_says_which_file_to_delete(tmp_path):
  write_lock(tmp_path, pid=1, host="elsewhere")
  with pytest.raises(WorkdirError) as error:
    WorkdirLock(tmp_path).__enter__()
  assert str(error.value).endswith(
      f"(if that run is gone, delete {tmp_path / 'lock.json'})")
  assert "in use by pid 1 on host elsewhere" in str(error.value)


def test_damaged_lock_is_refused_by_name(tmp_path):
  (tmp_path / "lock.json").write_text("{")
  with pytest.raises(WorkdirError, match="lock.json is damaged; delete it if no run"):
    WorkdirLock(tmp_path).__enter__()


def test_unusable_workdir_is_a_one_line_error(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(WorkdirError, match=r"^cannot create --workdir .*file/run: "):
    workdir_lib.create_workdir(str(tmp_path / "file" / "run"))


# -- train_and_evaluate refuses before writing or compiling ---------------------------------------


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
  return tiny_run.write_npz(tmp_path_factory.mktemp("data") / "tiny.npz")


@pytest.fixture
def used_workdir(npz, tmp_path):
  """A workdir holding a checkpoint of the tiny config (a stand-in state; only its meta is
  read), the config and the data fingerprint, as a run leaves them."""
  config = tiny_run.config(npz)
  trainer = train.Trainer(config, str(tmp_path))
  checkpointer = checkpointing.Checkpointer(tmp_path, keep=2, sharded_keys=())
  checkpointer.save(4, {"w": parallel.replicate(np.zeros(3, np.float32))}, {"step": 4},
                    trainer.meta)
  checkpointer.close()
  config_io.save_config(config, str(tmp_path))
  from instdisc_jax import data  # pylint: disable=g-import-not-at-top
  data.check_fingerprint(str(tmp_path), trainer.train_split)
  return str(tmp_path)


def test_incompatible_config_is_refused_listing_the_fields(npz, used_workdir):
  before = snapshot(used_workdir)
  config = tiny_run.config(npz, low_dim=32, model="cifar_resnet18")
  with tiny_run.counting_compilations() as compilations:
    with pytest.raises(WorkdirError) as error:
      train.train_and_evaluate(config, used_workdir)
  assert compilations == []
  assert str(error.value) == (
      f"workdir {used_workdir} holds a run with a different low_dim (saved 16, now 32), model "
      "(saved 'small_resnet', now 'cifar_resnet18'); use a new --workdir or the original "
      "config")
  assert snapshot(used_workdir) == before


def test_other_data_is_refused_listing_n(used_workdir, tmp_path_factory):
  # The data are compared before the config: only the data changed, so the fix is the data.
  other = tiny_run.write_npz(tmp_path_factory.mktemp("other") / "tiny.npz", n=48)
  before = snapshot(used_workdir)
  with pytest.raises(DataError) as error:
    train.train_and_evaluate(tiny_run.config(other), used_workdir)
  message = str(error.value)
  assert "(64 records before, 48 now)" in message and "restore the data as it was" in message
  assert "original config" not in message
  assert snapshot(used_workdir) == before


def test_locked_workdir_is_refused_before_anything_is_written(npz, tmp_path):
  with WorkdirLock(tmp_path):
    with pytest.raises(WorkdirError, match="is in use by pid"):
      train.train_and_evaluate(tiny_run.config(npz), str(tmp_path))
    assert os.listdir(tmp_path) == ["lock.json"]


@pytest.mark.parametrize("overrides, error_type, message", [
    ({"temperature": 0.0}, ConfigError, "config.temperature=0.0: must be > 0"),
    ({"batch_size": 12}, ConfigError, "config.batch_size=12: must be divisible by the number "
     "of devices (8), e.g. 8"),
    ({"num_negatives": 64}, ConfigError, "config.num_negatives=64: must be less than the "
     "number of training images n=64"),
    ({"dataset": "npz:/nonexistent/tiny.npz"}, DataError, "npz:/nonexistent/tiny.npz: no such "
     "file"),
])
def test_bad_config_or_data_leaves_no_files(npz, tmp_path, overrides, error_type, message):
  workdir = tmp_path / "new" / "run"
  with tiny_run.counting_compilations() as compilations:
    with pytest.raises(error_type) as error:
      train.train_and_evaluate(tiny_run.config(npz, **overrides), str(workdir))
  assert str(error.value) == message
  assert not (tmp_path / "new").exists()
  assert compilations == []


def test_bad_config_does_not_touch_an_existing_run(npz, used_workdir):
  before = snapshot(used_workdir)
  with pytest.raises(ConfigError):
    train.train_and_evaluate(tiny_run.config(npz, knn_k=65), used_workdir)
  assert snapshot(used_workdir) == before


