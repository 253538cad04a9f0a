"""Every bad input a user can give the trainer and the evaluator (issue 15): exit status 2, one
line on stderr naming the field or file and the fix, no traceback, nothing compiled, and every
file of the data directory and the workdir as it was (SHA-256 before and after; nothing new).

The trainer's cases run the real entry point, `cli.run(main.main)` with absl's `app.run`, in
this process, on a fresh parse of the flags each; they all fail before anything is compiled, so
each takes well under a second. The evaluator defines its flags when it starts, so its cases run
`python -m instdisc_jax.evaluate` in child processes, all at once. A finished run rerun is the
one case of the documented status 0: it says it is finished, prints its results and writes
nothing. (Damaged checkpoints are tested with the checkpoints, in test_checkpointing.py.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from typing import Callable, Optional

from absl import flags
import numpy as np
import pytest
import tiny_run

from instdisc_jax import checkpointing
from instdisc_jax import cli
from instdisc_jax import config_io
from instdisc_jax import data
from instdisc_jax import main as main_lib
from instdisc_jax import parallel
from instdisc_jax import train
from instdisc_jax import workdir as workdir_lib

# ml_collections loads config files with a deprecated importlib call.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

FLAGS = flags.FLAGS
N = 64                                  # training images of the tiny npz (4 classes, 16x16x1)
STEPS = 2 * N // 16                     # configs/tiny.py: 2 epochs of batch 16


# -- what every case asserts ---------------------------------------------------------------------


def snapshot(root) -> dict[str, str]:
  """{relative path: SHA-256 of its bytes, or "dir"} of everything under `root`."""
  found = {}
  for directory, dirnames, filenames in os.walk(root):
    for name in dirnames:
      found[os.path.relpath(os.path.join(directory, name), root)] = "dir"
    for name in filenames:
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return found


def assert_one_line(status: int, stderr: str, fragments, expected_status: int = 2) -> None:
  """Exit `expected_status`; stderr is one line, "error: ...", holding every fragment."""
  assert status == expected_status, stderr
  assert "Traceback" not in stderr, stderr
  lines = stderr.splitlines()
  assert len(lines) == 1, stderr
  assert lines[0].startswith("error: "), stderr
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])


# -- the trainer, in this process ----------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
  status: int
  stdout: str
  stderr: str


@contextlib.contextmanager
def logging_left_as_it_was():
  """Undoes what a command line does to logging in this process (`app.run` puts absl's handler
  on the root logger, `cli.run` sets levels), so later tests log as they would alone."""
  root, ours = logging.getLogger(), logging.getLogger("instdisc_jax")
  handlers, root_level, our_level = list(root.handlers), root.level, ours.level
  try:
    yield
  finally:
    root.handlers[:] = handlers
    root.setLevel(root_level)
    ours.setLevel(our_level)


def run_main(argv: list[str], capfd) -> Outcome:
  """`python -m instdisc_jax.main <argv>`, in this process: its status, stdout and stderr."""
  FLAGS.unparse_flags()
  # ml_collections loads every config file as the module `config_config` with the deprecated
  # `load_module`, which runs a file in the namespace of the one loaded before it: a name the
  # new file does not define (get_config!) would come from the previous case.
  sys.modules.pop("config_config", None)
  capfd.readouterr()
  saved_argv = sys.argv
  sys.argv = ["main.py", *argv]
  try:
    with pytest.raises(SystemExit) as exit_, logging_left_as_it_was():
      cli.run(main_lib.main)
  finally:
    sys.argv = saved_argv
    FLAGS.unparse_flags()
    # The config flag defines a flag per override it parses; the next run defines its own.
    for name in [name for name in FLAGS if name.startswith("config.")]:
      delattr(FLAGS, name)
  out, err = capfd.readouterr()
  return Outcome(exit_.value.code or 0, out, err)


@dataclasses.dataclass
class Case:
  """A bad command line: flags after --config/--workdir and what its one line must hold."""

  args: list[str]
  fragments: list[str]
  config: Optional[str] = tiny_run.TINY_CONFIG     # None: no --config
  workdir: Optional[str] = "run"                   # relative to the case's root; None: none
  env: dict = dataclasses.field(default_factory=dict)
  patch: Optional[Callable] = None                 # patch(monkeypatch, root), before the run

  def argv(self, root) -> list[str]:
    argv = [f"--config={self.config}"] if self.config else []
    if self.workdir is not None:
      argv.append(f"--workdir={os.path.join(root, self.workdir)}")
    return argv + list(self.args)


CASES: dict[str, Callable[[str], Case]] = {}


def case(name: str):
  """Registers `make(root) -> Case`; `root` holds `data/tiny.npz` (64 16x16 grey images, 4
  classes, 32 test images) and is where the case writes its own files."""
  def register(make):
    assert name not in CASES, name
    CASES[name] = make
    return make
  return register


def npz_flag(root, name="tiny.npz") -> str:
  return f"--config.dataset=npz:{os.path.join(root, 'data', name)}"


def write_file(root, relative: str, text: str) -> str:
  path = os.path.join(root, relative)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  return path


def write_arrays(root, name: str, **arrays) -> str:
  path = os.path.join(root, "data", name)
  np.savez(path, **arrays)
  return path


def images(n=N, shape=(16, 16, 1), seed=1):
  return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def labels(n=N, classes=4, seed=1):
  return np.random.default_rng(seed).integers(0, classes, n)


# Flags. --------------------------------------------------------------------------------------

for _name, _args, _fragments in [
    ("unknown config field", ["--config.batchsize=16"],
     ["config.batchsize is not a config field; did you mean 'batch_size'? "
      "(from --config.batchsize=16)"]),
    ("unknown nested field", ["--config.augment.zzz=1"],
     ["config.augment.zzz is not a config field (the fields of config.augment: color_jitter, "
      "crop_scale_min, flip, grayscale_prob)"]),
    ("unknown config group", ["--config.augmnt.flip=True"],
     ["config.augmnt is not a config field; did you mean 'augment'?"]),
    ("integer field given text", ["--config.batch_size=abc"],
     ["config.batch_size='abc': must be an integer"]),
    ("number field given text", ["--config.temperature=warm"],
     ["config.temperature='warm': must be a number"]),
    ("boolean field given text", ["--config.augment.flip=maybe"],
     ["config.augment.flip='maybe': must be True or False"]),
    ("tuple field unparsable", ["--config.lr_boundaries=(1,"],
     ["config.lr_boundaries='(1,': cannot be read"]),
    ("unknown flag", ["--bogus=1"], ["Unknown command line flag 'bogus'; see --helpfull"]),
    ("misspelt flag", ["--host_device=2"], ["Unknown command line flag 'host_device'"]),
    ("stray positional argument", ["stray"],
     ["unexpected argument 'stray': flags are written --name=value"]),
    ("flags after --", ["--", "--config.seed=1"],
     ["unexpected argument '--config.seed=1': flags are written --name=value"]),
    ("negative --host_devices", ["--host_devices=-1"], ["--host_devices='-1': must be >= 0"]),
    ("--host_devices given text", ["--host_devices=two"],
     ["--host_devices='two': must be an integer"]),
    ("--num_processes given text", ["--num_processes=two"],
     ["--num_processes='two': must be an integer"]),
    ("--num_processes without the other flags", ["--num_processes=2"],
     ["a multi-process run also needs --coordinator_address (or JAX_COORDINATOR_ADDRESS) and "
      "--process_id (or JAX_PROCESS_ID)"]),
]:
  case(_name)(lambda root, a=_args, f=_fragments: Case([npz_flag(root), *a], f))


@case("JAX_NUM_PROCESSES not a number")
def _(root):
  return Case([npz_flag(root)], ["JAX_NUM_PROCESSES='two' must be a whole number (or pass "
                                 "--num_processes)"], env={"JAX_NUM_PROCESSES": "two"})


@case("no --workdir")
def _(root):
  return Case([npz_flag(root)], ["missing --workdir: give a directory"], workdir=None)


@case("no --config")
def _(root):
  return Case([], ["missing --config: give a config file, e.g. configs/fashion_mnist.py"],
              config=None)


# Config files. -------------------------------------------------------------------------------


@case("config file missing")
def _(root):
  path = os.path.join(root, "nonexistent.py")
  return Case([], [f"--config={path}: cannot load the config file ([Errno 2] No such file or "
                   "directory"], config=path)


@case("config file with a syntax error")
def _(root):
  path = write_file(root, "configs/syntax.py", "def get_config(:\n  pass\n")
  return Case([], [f"--config={path}: cannot load the config file (SyntaxError: invalid "
                   "syntax"], config=path)


@case("config file that raises")
def _(root):
  path = write_file(root, "configs/raises.py", "def get_config():\n  return 1 / 0\n")
  return Case([], [f"--config={path}: cannot load the config file (ZeroDivisionError: "
                   "division by zero)"], config=path)


@case("config file without get_config")
def _(root):
  path = write_file(root, "configs/empty.py", "CONFIG = None\n")
  return Case([], [f"--config={path}: cannot load the config file (AttributeError: ",
                   "has no attribute 'get_config'"], config=path)


@case("config file building its own ConfigDict")
def _(root):
  path = write_file(root, "configs/own.py", (
      "import ml_collections\n\ndef get_config():\n  config = ml_collections.ConfigDict()\n"
      f"  config.dataset = 'npz:{root}/data/tiny.npz'\n  config.batch_size = 16\n"
      "  return config\n"))
  return Case([], ["is missing: start config files from "
                   "instdisc_jax.default_config.get_config()"], config=path)


@case("config file returning a dict")
def _(root):
  path = write_file(root, "configs/dict.py", "def get_config():\n  return {'batch_size': 16}\n")
  return Case([], ["the config is a dict, not an ml_collections ConfigDict: start config files "
                   "from instdisc_jax.default_config.get_config()"], config=path)


@case("config file with an unknown field")
def _(root):
  path = write_file(root, "configs/extra.py", (
      "from instdisc_jax import default_config\n\ndef get_config():\n"
      "  config = default_config.get_config()\n  config.batchsize = 16\n  return config\n"))
  return Case([], ["config.batchsize is not a config field; did you mean 'batch_size'?"],
              config=path)


@case("config file with a field of the wrong type")
def _(root):
  path = write_file(root, "configs/wrong_type.py", (
      "from instdisc_jax import default_config\n\ndef get_config():\n"
      "  config = default_config.get_config()\n"
      f"  config.dataset = 'npz:{root}/data/tiny.npz'\n  config.image_size = 16\n"
      "  config.batch_size = '16'\n  return config\n"))
  return Case([], [f"--config={path}: cannot load the config file (TypeError: Could not "
                   "override field 'batch_size'"], config=path)


# Config values (on the tiny npz: n = 64, 8 devices). -----------------------------------------

for _name, _override, _fragment in [
    ("temperature not positive", "temperature=-1", "config.temperature=-1.0: must be > 0"),
    ("learning rate zero", "learning_rate=0", "config.learning_rate=0.0: must be > 0"),
    ("batch not divisible by the devices", "batch_size=12",
     "config.batch_size=12: must be divisible by the number of devices (8), e.g. 8"),
    ("batch larger than the data", "batch_size=128",
     "config.batch_size=128: exceeds the 64 training images; use at most 64"),
    ("eval batch not divisible by the devices", "eval_batch_size=12",
     "config.eval_batch_size=12: must be divisible by the number of devices (8)"),
    ("m not below n", "num_negatives=64",
     "config.num_negatives=64: must be less than the number of training images n=64"),
    ("k above n", "knn_k=65",
     "config.knn_k=65: must be at most the number of training images n=64"),
    ("misspelt objective", "objective=ncee", "config.objective='ncee': must be one of "),
    ("unknown model", "model=resnet1", "config.model='resnet1': must be one of "),
    ("image size too small", "image_size=4", "config.image_size=4: must be >= 8"),
    ("decreasing lr boundaries", "lr_boundaries=(160,120)",
     "config.lr_boundaries=(160, 120): must be in increasing order"),
    ("warm-up past the end", "warmup_epochs=5.0",
     "config.warmup_epochs=5.0: must be less than num_epochs (2)"),
    ("zero training steps", "num_train_steps=0",
     "config.num_train_steps=0: use -1 to train for num_epochs, or a positive step count"),
    ("bank momentum of one", "bank_momentum=1.0", "config.bank_momentum=1.0: must be < 1"),
    ("unknown compute dtype", "compute_dtype=float16",
     "config.compute_dtype='float16': must be one of float32, bfloat16"),
    ("misspelt z mode", "z_mode=frozn", "did you mean 'frozen'?"),
    ("no checkpoints kept", "keep_checkpoints=0", "config.keep_checkpoints=0: must be >= 1"),
    ("misspelt tfds dataset", "dataset=cifar11", "did you mean 'cifar10'?"),
    ("npz: without a path", "dataset=npz:", "config.dataset='npz:': give a path after the "
     "prefix"),
]:
  case(_name)(lambda root, o=_override, f=_fragment: Case(
      [npz_flag(root), f"--config.{o}"], [f]))


# Data. ---------------------------------------------------------------------------------------


def data_case(name: str, arrays: Optional[dict], fragments, extra=()):
  """A case training on `data/<name>.npz` holding `arrays` (None: the file is not written)."""
  def make(root):
    path = os.path.join(root, "data", f"{name}.npz")
    if arrays is not None:
      np.savez(path, **arrays)
    return Case([f"--config.dataset=npz:{path}", *extra],
                [fragment.format(path=path) for fragment in fragments])
  case(f"npz: {name.replace('_', ' ')}")(make)


data_case("missing", None, ["npz:{path}: no such file"])
data_case("object_arrays", {"images": np.array([object()] * 4, dtype=object)},
          ["npz:{path}: `images` holds Python objects (dtype=object)", "save plain arrays"])
data_case("no_images", {"pictures": images()},
          ["npz:{path} has no `images` array (it has: pictures)"])
data_case("float_images", {"images": images().astype(np.float32)},
          ["npz:{path}: `images` is float32, expected uint8 (values 0..255)"])
data_case("five_dims", {"images": images(shape=(16, 16, 1, 1))},
          ["`images` has shape (64, 16, 16, 1, 1), expected (N, H, W) or (N, H, W, C)"])
data_case("two_channels", {"images": images(shape=(16, 16, 2))},
          ["with C 1 or 3"])
data_case("no_images_in_it", {"images": images(n=0)}, ["npz:{path}: `images` holds no images"])
data_case("labels_of_other_length", {"images": images(), "labels": labels(n=10)},
          ["npz:{path}: `labels` is int64 (10,), expected 64 integer labels"])
data_case("negative_labels", {"images": images(), "labels": labels() - 1},
          ["`labels` has negative labels; labels are 0..num_classes-1"])
data_case("test_images_of_another_size",
          {"images": images(), "test_images": images(n=8, shape=(8, 8, 1))},
          ["`test_images` images are (8, 8, 1), `images` are (16, 16, 1)"])
data_case("images_of_another_size_than_image_size", {"images": images(shape=(28, 28, 1))},
          ["config.image_size=16, but npz:{path}:train holds 28x28 images: set "
           "--config.image_size=28"])
data_case("non_square_images", {"images": images(shape=(16, 20, 1))},
          ["config.image_size=16, but npz:{path}:train holds 16x20 images: give dataset images "
           "of 16x16"])


@case("npz: not a zip file")
def _(root):
  path = write_file(root, "data/garbage.npz", "not an archive")
  return Case([f"--config.dataset=npz:{path}"], [f"npz:{path} is not a readable .npz file"])


@case("npz: a single .npy array")
def _(root):
  path = os.path.join(root, "data", "single.npz")
  with open(path, "wb") as f:
    np.save(f, images())
  return Case([f"--config.dataset=npz:{path}"],
              [f"npz:{path} is a single .npy array; save an .npz with np.savez"])


@case("eval npz missing")
def _(root):
  path = os.path.join(root, "data", "none.npz")
  return Case([npz_flag(root), f"--config.eval_dataset=npz:{path}"],
              [f"npz:{path}: no such file"])


@case("eval images of another size")
def _(root):
  path = write_arrays(root, "eval28.npz", images=images(32, (28, 28, 1)), labels=labels(32))
  return Case([npz_flag(root), f"--config.eval_dataset=npz:{path}"],
              [f"config.image_size=16, but npz:{path}:train holds 28x28 images (the training "
               "images are 16x16): give eval_dataset images of 16x16"])


@case("eval images of other channels")
def _(root):
  path = write_arrays(root, "rgb.npz", images=images(32, (16, 16, 3)), labels=labels(32))
  return Case([npz_flag(root), f"--config.eval_dataset=npz:{path}"],
              [f"the eval data npz:{path}:train has 3 channel(s), the training data "
               f"npz:{root}/data/tiny.npz:train 1: give an eval_dataset of 1-channel images"])


@case("eval labels of more classes")
def _(root):
  path = write_arrays(root, "ten.npz", images=images(32), labels=np.arange(32) % 10)
  return Case([npz_flag(root), f"--config.eval_dataset=npz:{path}"],
              [f"the eval data npz:{path}:train has labels of 10 classes, the training data "
               f"npz:{root}/data/tiny.npz:train of 4: kNN predicts only training labels"])


@case("folder missing")
def _(root):
  path = os.path.join(root, "data", "no_such_folder")
  return Case([f"--config.dataset=folder:{path}"], [path])


@case("folder without images")
def _(root):
  path = os.path.join(root, "data", "empty")
  os.makedirs(path)
  write_file(root, "data/empty/notes.txt", "no images here")
  return Case([f"--config.dataset=folder:{path}"], [path])


@case("tfds dataset not prepared")
def _(root):
  data_dir = os.path.join(root, "tfds")
  return Case([npz_flag(root), "--config.dataset=fashion_mnist",
               f"--config.data_dir={data_dir}"],
              [f"dataset fashion_mnist is not prepared in {data_dir}: run `python -m "
               f"instdisc_jax.data.prepare --dataset=fashion_mnist --data_dir={data_dir}`"])


# Workdirs. -----------------------------------------------------------------------------------


def used_workdir(root, npz="tiny.npz", steps=4) -> str:
  """`root/run` as a tiny run leaves it after `steps` steps: a checkpoint (of a stand-in state;
  only its meta is read), config.json, dataset_fingerprint.json and metrics.jsonl."""
  workdir = os.path.join(root, "run")
  config = tiny_run.config(os.path.join(root, "data", npz))
  trainer = train.Trainer(config, workdir)
  os.makedirs(workdir)
  checkpointer = checkpointing.Checkpointer(workdir, keep=2, sharded_keys=())
  checkpointer.save(steps, {"w": parallel.replicate(np.zeros(3, np.float32))}, {"step": steps},
                    trainer.meta)
  checkpointer.close()
  config_io.save_config(config, workdir)
  data.check_fingerprint(workdir, trainer.train_split)
  write_file(root, "run/metrics.jsonl", json.dumps({"step": steps, "loss": 1.0}) + "\n")
  return workdir


@case("workdir is a file")
def _(root):
  write_file(root, "run", "a file")
  return Case([npz_flag(root)], [f"cannot create --workdir {root}/run: File exists"])


@case("workdir inside a file")
def _(root):
  write_file(root, "file", "a file")
  return Case([npz_flag(root)], [f"cannot create --workdir {root}/file/run: Not a directory"],
              workdir="file/run")


@case("workdir not writable")
def _(root):
  os.makedirs(os.path.join(root, "run"))

  def deny(monkeypatch, root):
    # Tests run as root here, which may write anywhere: the check is made to see a read-only
    # directory (with a real chmod when not root).
    os.chmod(os.path.join(root, "run"), 0o555)
    if os.geteuid() == 0:
      real = os.access
      monkeypatch.setattr(workdir_lib.os, "access", lambda path, mode: (
          False if os.path.abspath(path) == os.path.join(root, "run") else real(path, mode)))
  return Case([npz_flag(root)], [f"--workdir {root}/run is not writable by this user; give it "
                                 "write permission (chmod u+w) or use another --workdir"],
              patch=deny)


@case("workdir whose lock cannot be written")
def _(root):
  os.makedirs(os.path.join(root, "run"))

  def deny(monkeypatch, root):
    # What a directory the user may not write to does to the lock's temp file (whatever the
    # access check above it says, e.g. on file systems with ACLs it does not see).
    def no_write(path, mode="r", *args, **kwargs):
      if "w" in mode and os.path.dirname(os.path.abspath(path)) == os.path.join(root, "run"):
        raise PermissionError(13, "Permission denied", path)
      return open(path, mode, *args, **kwargs)
    monkeypatch.setattr(workdir_lib, "open", no_write, raising=False)
  return Case([npz_flag(root)], [f"cannot write the lock file of --workdir {root}/run "
                                 "(Permission denied); give it write permission or use "
                                 "another --workdir"], patch=deny)


@case("workdir locked by a live run")
def _(root):
  os.makedirs(os.path.join(root, "run"))
  write_file(root, "run/lock.json", json.dumps({
      "pid": os.getpid(), "host": socket.gethostname(),
      "start": workdir_lib._start_time(os.getpid()), "since": time.time()}))  # pylint: disable=protected-access
  return Case([npz_flag(root)], [f"workdir {root}/run is in use by pid {os.getpid()}",
                                 "wait for that run to finish, or use another --workdir"])


@case("workdir locked from another host")
def _(root):
  os.makedirs(os.path.join(root, "run"))
  write_file(root, "run/lock.json", json.dumps({"pid": 1, "host": "elsewhere", "since": 0}))
  return Case([npz_flag(root)], [f"(if that run is gone, delete {root}/run/lock.json)"])


@case("workdir lock damaged")
def _(root):
  os.makedirs(os.path.join(root, "run"))
  write_file(root, "run/lock.json", "{")
  return Case([npz_flag(root)], [f"{root}/run/lock.json is damaged; delete it if no run is "
                                 "using the workdir"])


@case("workdir of another config")
def _(root):
  workdir = used_workdir(root)
  return Case([npz_flag(root), "--config.low_dim=32"],
              [f"workdir {workdir} holds a run with a different low_dim (saved 16, now 32)"])


@case("workdir of other data")
def _(root):
  workdir = used_workdir(root)
  other = write_arrays(root, "other.npz", images=images(48), labels=labels(48))
  return Case([f"--config.dataset=npz:{other}"],
              [f"is not what {workdir} was started with (64 records before, 48 now)",
               "restore the data as it was"])


@case("workdir with a damaged dataset_fingerprint.json")
def _(root):
  workdir = used_workdir(root)
  write_file(root, "run/dataset_fingerprint.json", '{"train": ')
  return Case([npz_flag(root)], [f"{workdir}/dataset_fingerprint.json is damaged "
                                 "(JSONDecodeError: ", "restore it from a copy"])


@case("workdir with a dataset_fingerprint.json of another shape")
def _(root):
  used_workdir(root)
  write_file(root, "run/dataset_fingerprint.json", '["train"]')
  return Case([npz_flag(root)], ["dataset_fingerprint.json is damaged (ValueError: not a map"])


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
  """The tiny npz, written once; each case copies it into its root."""
  return tiny_run.write_npz(tmp_path_factory.mktemp("shared") / "tiny.npz")


@pytest.fixture
def case_root(tmp_path, tiny_data):
  root = tmp_path / "case"
  (root / "data").mkdir(parents=True)
  with open(tiny_data, "rb") as src, open(root / "data" / "tiny.npz", "wb") as dst:
    dst.write(src.read())
  return str(root)


def shown_log_records(caplog) -> list[str]:
  """Log records the command line would show on stderr (in this process pytest takes them):
  this project's from INFO up, everyone's from WARNING up (cli.configure_logging)."""
  return [record.getMessage() for record in caplog.records
          if record.levelno >= logging.WARNING or (record.name.startswith("instdisc_jax")
                                                   and record.levelno >= logging.INFO)]


@pytest.mark.parametrize("name", list(CASES))
def test_trainer_refuses_with_one_line(name, case_root, capfd, caplog, monkeypatch):
  bad = CASES[name](case_root)
  for variable, value in bad.env.items():
    monkeypatch.setenv(variable, value)
  if bad.patch is not None:
    bad.patch(monkeypatch, case_root)
  before = snapshot(case_root)
  with tiny_run.counting_compilations() as compiled:
    outcome = run_main(bad.argv(case_root), capfd)
  assert_one_line(outcome.status, outcome.stderr, bad.fragments)
  assert shown_log_records(caplog) == []
  assert outcome.stdout == ""
  assert compiled == []
  assert snapshot(case_root) == before


def test_there_are_enough_cases():
  assert len(CASES) >= 60


# -- a finished run, rerun -----------------------------------------------------------------------


def test_a_finished_run_rerun_says_so_prints_its_results_and_writes_nothing(case_root, capfd,
                                                                           caplog):
  workdir = used_workdir(case_root, steps=STEPS)
  results = {"step": STEPS, "knn_bank": {"top1": 31.25, "top5": 100.0},
             "knn_recomputed": {"top1": 34.375, "top5": 100.0}}
  write_file(case_root, "run/results.json", json.dumps(results))
  before = snapshot(case_root)
  with tiny_run.counting_compilations() as compiled:
    outcome = run_main([f"--config={tiny_run.TINY_CONFIG}", f"--workdir={workdir}",
                        npz_flag(case_root)], capfd)
  assert outcome.status == 0, outcome.stderr
  assert outcome.stdout.splitlines() == [
      "final weighted kNN (bank features): top-1 31.25%  top-5 100.00%",
      "final weighted kNN (recomputed features): top-1 34.38%  top-5 100.00%"]
  [notice] = shown_log_records(caplog)
  assert notice.startswith(f"{workdir} has already finished training (step {STEPS} of {STEPS}); "
                           "its results are in results.json and nothing was written")
  assert outcome.stderr == ""
  assert compiled == []
  assert snapshot(case_root) == before


def test_a_finished_run_given_more_epochs_is_not_finished(case_root):
  workdir = used_workdir(case_root, steps=STEPS)
  write_file(case_root, "run/results.json", json.dumps({"step": STEPS}))
  trainer = train.Trainer(tiny_run.config(os.path.join(case_root, "data", "tiny.npz"),
                                          num_epochs=3), workdir)
  assert trainer.finished_results() is None
  trainer = train.Trainer(tiny_run.config(os.path.join(case_root, "data", "tiny.npz")), workdir)
  assert trainer.finished_results() == {"step": STEPS}


@pytest.mark.slow
def test_rerunning_a_trained_run_evaluates_nothing_and_records_each_step_once(case_root,
                                                                              capfd, caplog):
  """End to end: a real tiny run (4 steps), then the same command again."""
  npz = os.path.join(case_root, "data", "tiny.npz")
  workdir = os.path.join(case_root, "run")
  args = [f"--config={tiny_run.TINY_CONFIG}", f"--workdir={workdir}", f"--config.dataset=npz:{npz}",
          "--config.num_epochs=1"]
  first = run_main(args, capfd)
  assert first.status == 0, first.stderr
  before = snapshot(case_root)
  with tiny_run.counting_compilations() as compiled:
    again = run_main(args, capfd)
  assert again.status == 0, again.stderr
  assert again.stdout == first.stdout and "final weighted kNN" in again.stdout
  assert "has already finished training" in caplog.text
  assert compiled == []
  assert snapshot(case_root) == before           # metrics.jsonl included: no second record


# -- the evaluator, in child processes -----------------------------------------------------------


# Workdirs of the evaluator's cases (under its root): name -> config.json text (None: none).
EVALUATOR_WORKDIRS = {"no_config": None, "damaged": '{"batch_size": ', "a_list": "[1, 2]",
                      "unknown_field": json.dumps({"batchsize": 3}),
                      "bad_value": json.dumps({"temperature": -1.0})}


def evaluator_cases(root: str) -> dict[str, tuple[list[str], list[str]]]:
  """name -> (its arguments, fragments of its one line). `root/trained` is a workdir as a run
  starts it (config.json), without a checkpoint; none of these cases gets further."""
  trained, no_config, damaged, a_list, unknown, bad_value = (
      os.path.join(root, name) for name in ("trained", *EVALUATOR_WORKDIRS))
  return {
      "unknown eval field": ([f"--workdir={trained}", "--config.eval.bogus=1"],
                             ["config.eval.bogus is not a config field (the fields of "
                              "config.eval: batch_size, "]),
      "misspelt eval field": ([f"--workdir={trained}", "--config.eval.knn_kk=(10,)"],
                              ["config.eval.knn_kk is not a config field; did you mean "
                               "'knn_k'? (from --config.eval.knn_kk=(10,))"]),
      "unknown eval group": ([f"--workdir={trained}", "--config.evl.knn=False"],
                             ["config.evl is not a config field; did you mean 'eval'?"]),
      "eval field given text": ([f"--workdir={trained}", "--config.eval.knn=maybe"],
                                ["config.eval.knn='maybe': must be True or False"]),
      "eval k of zero": ([f"--workdir={trained}", "--config.eval.knn_k=(0,)"],
                         ["config.eval.knn_k=0: must be >= 1"]),
      "too many retrieval queries": ([f"--workdir={trained}",
                                      "--config.eval.retrieval_queries=100"],
                                     ["config.eval.retrieval_queries=100: must be <= 64"]),
      "stray argument": ([f"--workdir={trained}", "stray"],
                         ["unexpected argument 'stray': flags are written --name=value"]),
      "negative --host_devices": ([f"--workdir={trained}", "--host_devices=-1"],
                                  ["--host_devices='-1': must be >= 0"]),
      "no --workdir": ([], ["missing --workdir: give the directory of a training run"]),
      "workdir without config.json": ([f"--workdir={no_config}"],
                                      [f"{no_config}/config.json not found: --workdir must be a "
                                       "directory written by instdisc_jax.main"]),
      "damaged config.json": ([f"--workdir={damaged}"],
                              [f"{damaged}/config.json is damaged (JSONDecodeError: ",
                               "rerun training with the run's command line"]),
      "config.json not an object": ([f"--workdir={a_list}"],
                                    [f"{a_list}/config.json is damaged (ValueError: a JSON "
                                     "list, not an object)"]),
      "config.json with an unknown field": ([f"--workdir={unknown}"],
                                            [f"{unknown}/config.json is damaged "
                                             "(config.batchsize is not a config field; did "
                                             "you mean 'batch_size'?)"]),
      "config.json with a bad value": ([f"--workdir={bad_value}"],
                                       [f"{bad_value}/config.json is damaged "
                                        "(config.temperature=-1.0: must be > 0)"]),
      "no checkpoint": ([f"--workdir={trained}"],
                        [f"{trained} has no checkpoint to evaluate; train it first"]),
  }


def run_evaluator(argv: list[str], capfd) -> Outcome:
  """`python -m instdisc_jax.evaluate <argv>`, in this process.

  The evaluator defines flags of the names main.py defined when this module imported it
  (--workdir, --config, the runtime flags): main's are set aside for the run, and the
  evaluator's removed after it.
  """
  import instdisc_jax.evaluate as evaluate  # pylint: disable=g-import-not-at-top
  FLAGS.unparse_flags()
  aside = {name: FLAGS[name] for name in ("workdir", "config", *RUNTIME_FLAGS)}
  for name in aside:
    delattr(FLAGS, name)
  before = set(FLAGS)
  capfd.readouterr()
  saved_argv = sys.argv
  sys.argv = ["evaluate.py", *argv]
  try:
    with pytest.raises(SystemExit) as exit_, logging_left_as_it_was():
      cli.run(evaluate.main, define_flags=evaluate.define_flags)
  finally:
    sys.argv = saved_argv
    FLAGS.unparse_flags()
    for name in set(FLAGS) - before:
      delattr(FLAGS, name)
    for name, flag in aside.items():
      FLAGS[name] = flag
  out, err = capfd.readouterr()
  return Outcome(exit_.value.code or 0, out, err)


RUNTIME_FLAGS = ("host_devices", "verbose", "coordinator_address", "num_processes", "process_id")


@pytest.fixture(scope="module")
def evaluator_root(tmp_path_factory):
  """The evaluator's workdirs: `trained` (config.json of the tiny npz, no checkpoint) and one
  per `EVALUATOR_WORKDIRS`."""
  root = str(tmp_path_factory.mktemp("evaluator"))
  npz = tiny_run.write_npz(os.path.join(root, "tiny.npz"))
  os.makedirs(os.path.join(root, "trained"))
  config_io.save_config(tiny_run.config(npz), os.path.join(root, "trained"))
  for name, text in EVALUATOR_WORKDIRS.items():
    os.makedirs(os.path.join(root, name))
    if text is not None:
      write_file(root, f"{name}/config.json", text)
  return root


@pytest.mark.parametrize("name", list(evaluator_cases("")))
def test_evaluator_refuses_with_one_line(name, evaluator_root, capfd, caplog):
  args, fragments = evaluator_cases(evaluator_root)[name]
  before = snapshot(evaluator_root)
  with tiny_run.counting_compilations() as compiled:
    outcome = run_evaluator(args, capfd)
  assert_one_line(outcome.status, outcome.stderr, fragments)
  assert shown_log_records(caplog) == []
  assert outcome.stdout == ""
  assert compiled == []
  assert snapshot(evaluator_root) == before


def test_evaluator_command_refuses_an_unknown_field_with_one_line(evaluator_root):
  """End to end, `python -m instdisc_jax.evaluate`: its flags are defined as it starts, which is
  where an unknown --config.eval field used to escape as a traceback."""
  before = snapshot(evaluator_root)
  args, fragments = evaluator_cases(evaluator_root)["misspelt eval field"]
  result = subprocess.run([sys.executable, "-m", "instdisc_jax.evaluate", *args],
                          capture_output=True, text=True, env=tiny_run.environment(),
                          cwd=tiny_run.REPO, timeout=300)
  assert_one_line(result.returncode, result.stderr, fragments)
  assert snapshot(evaluator_root) == before
