"""The parts of a seeds run: training and evaluating a run in a child process (`Parts`), with
a record per finished part so a rerun resumes, and the in-process baselines (`Baselines`)."""

from __future__ import annotations

import datetime
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from typing import Mapping, Optional, Sequence

import ml_collections
import numpy as np

from instdisc_jax.experiments.seeds_table import Row

log = logging.getLogger(__name__)

RECORDS_DIR = "records"
LOGS_DIR = "logs"
# Exit statuses of a child that end this program with the same status (see main.py).
CHILD_STATUSES = {1: "diverged", 2: "refused", 75: "stopped"}




def format_override(value) -> str:
  """A config value as a command-line override understands it."""
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, (tuple, list)):
    items = ",".join(repr(v) if isinstance(v, str) else format_override(v) for v in value)
    return f"({items},)" if len(value) == 1 else f"({items})"
  return str(value)


def evaluator_flags(eval_config: ml_collections.ConfigDict, seed: int) -> list[str]:
  """`--config.eval.<field>=<value>` for every field that differs from the evaluator's
  default, and its seed."""
  from instdisc_jax.evaluation import config as eval_config_lib  # pylint: disable=g-import-not-at-top
  defaults = eval_config_lib.get_config().eval
  fields = {name: value for name, value in eval_config.items() if value != defaults[name]}
  fields["seed"] = seed
  return [f"--config.eval.{name}={format_override(value)}" for name, value in fields.items()]


class Parts:
  """Runs the parts of the seeds and keeps a record of each finished one."""

  def __init__(self, workdir: str, config_file: str, overrides: Sequence[str],
               host_devices: int, env: Optional[Mapping[str, str]] = None):
    self.workdir = workdir
    self.config_file = config_file
    self.overrides = list(overrides)
    self.host_devices = host_devices
    self.env = dict(os.environ if env is None else env)

  def record_path(self, row: str, seed: int, part: str) -> str:
    return os.path.join(self.workdir, RECORDS_DIR, f"{row}_seed{seed}_{part}.json")

  def record(self, row: str, seed: int, part: str) -> Optional[dict]:
    """The record of a finished part, else None."""
    path = self.record_path(row, seed, part)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  def write_record(self, row: str, seed: int, part: str, record: dict) -> dict:
    path = self.record_path(row, seed, part)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    record = dict(record, finished=datetime.datetime.now().isoformat(timespec="seconds"))
    with open(path + ".tmp", "w") as f:
      json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)          # a record is whole or absent
    return record

  def run_workdir(self, row: str, seed: int) -> str:
    return os.path.join(self.workdir, row, f"seed_{seed}")

  def _child(self, module: str, args: Sequence[str], row: str, seed: int, part: str) -> float:
    """Runs `python -m module args`, its output to DIR/logs; returns its wall time."""
    command = [sys.executable, "-m", module, *args]
    if self.host_devices:
      command.append(f"--host_devices={self.host_devices}")
    log_path = os.path.join(self.workdir, LOGS_DIR, f"{row}_seed{seed}_{part}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "a") as out:
      out.write(f"$ {shlex.join(command)}\n")
      out.flush()
      status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                              check=False).returncode
    wall = time.perf_counter() - start
    if status != 0:
      with open(log_path) as f:
        lines = [line.strip() for line in f if line.strip()]
      last = lines[-1] if lines else "(no output)"
      message = (f"{part} of {row} seed {seed} {CHILD_STATUSES.get(status, 'failed')} "
                 f"(exit {status}, log {log_path}): {last}")
      raise ChildFailed(message, status if status in CHILD_STATUSES else 1)
    return wall

  def train(self, row: Row, seed: int) -> dict:
    """Trains the row's run of `seed` unless finished; returns its record (results, wall_s)."""
    done = self.record(row.name, seed, "train")
    workdir = self.run_workdir(row.name, seed)
    if done is not None and os.path.exists(os.path.join(workdir, "results.json")):
      return done
    args = [f"--config={self.config_file}", f"--workdir={workdir}", *self.overrides,
            f"--config.seed={seed}"]
    if row.name == "supervised":
      args.append("--config.objective=supervised")
    log.info("seed %d: training %s in %s", seed, row.name, workdir)
    wall = self._child("instdisc_jax.main", args, row.name, seed, "train")
    with open(os.path.join(workdir, "results.json")) as f:
      results = json.load(f)
    return self.write_record(row.name, seed, "train", {"results": results, "wall_s": wall})

  def evaluate(self, row: Row, seed: int, eval_config: ml_collections.ConfigDict,
               step: int) -> dict:
    """Evaluates the row's run of `seed` unless its checkpoint of `step` (the run's last) was
    evaluated already; returns the record (results, wall_s)."""
    done = self.record(row.name, seed, "evaluate")
    if done is not None and done["results"].get("step") == step:
      return done
    if not (eval_config.linear_probe or eval_config.semi_supervised_fractions):
      return {"results": {}, "wall_s": 0.0}            # nothing the table reads: no evaluator
    workdir = self.run_workdir(row.name, seed)
    log.info("seed %d: evaluating %s", seed, row.name)
    wall = self._child("instdisc_jax.evaluate",
                       [f"--workdir={workdir}", *evaluator_flags(eval_config, seed)],
                       row.name, seed, "evaluate")
    with open(os.path.join(workdir, "eval_results.json")) as f:
      results = json.load(f)
    return self.write_record(row.name, seed, "evaluate", {"results": results, "wall_s": wall})


class ChildFailed(Exception):
  """A child process failed; `status` is the exit status to end with (its line is printed)."""

  def __init__(self, message: str, status: int):
    super().__init__(message)
    self.status = status


def knn_setting(results: Mapping, config: ml_collections.ConfigDict) -> tuple[int, float]:
  """(k, tau) of a run: the one chosen on validation if its results.json says, else the
  config's."""
  choice = results.get("knn_choice")
  if isinstance(choice, Mapping):
    k = choice.get("k")
    tau = choice.get("tau", choice.get("temperature"))
    if k is not None and tau is not None:
      return int(k), float(tau)
  return int(config.knn_k), float(config.knn_temperature)


class Baselines:
  """The in-process baselines (raw pixels, random init) of a config, data loaded once."""

  def __init__(self, config: ml_collections.ConfigDict, eval_config: ml_collections.ConfigDict):
    from instdisc_jax import restore  # pylint: disable=g-import-not-at-top
    from instdisc_jax.evaluation import features as features_lib  # pylint: disable=g-import-not-at-top
    self.config = config
    self.eval_config = eval_config
    # What the run is (data, model, layout, init) as training builds it; writes nothing.
    self.spec = restore.RunSpec.from_config(config)
    self.initializer = self.spec.initializer(self.spec.optimizer()[1])
    size = config.image_size
    self.splits = {}
    for role, split in (("train", self.spec.train_split), ("test", self.spec.eval_split)):
      indices = np.arange(split.num_examples)
      labels = np.full(len(indices), -1, np.int32) if split.labels is None else split.labels
      self.splits[role] = (features_lib.load_images(split, indices, size),
                           np.asarray(labels, np.int32))

  def probe_config(self, seed: int):
    from instdisc_jax.evaluation import linear_probe  # pylint: disable=g-import-not-at-top
    e = self.eval_config
    if not e.linear_probe:
      return None
    return linear_probe.ProbeConfig(epochs=e.probe_epochs, batch_size=e.probe_batch_size,
                                    learning_rate=e.probe_learning_rate,
                                    weight_decay=e.probe_weight_decay, seed=seed)

  def run(self, name: str, seed: int, k: int, temperature: float) -> dict:
    """The baseline `name` ("raw_pixels" or "random_init") of `seed`, with kNN (k, tau)."""
    import jax  # pylint: disable=g-import-not-at-top

    from instdisc_jax import parallel  # pylint: disable=g-import-not-at-top
    from instdisc_jax.evaluation import baselines  # pylint: disable=g-import-not-at-top
    data = (*self.splits["train"], *self.splits["test"])
    num_classes = self.spec.num_classes
    if name == "raw_pixels":
      return baselines.raw_pixels(*data, num_classes=num_classes, k=k, temperature=temperature,
                                  probe_config=self.probe_config(seed))
    # The run's initial state for this seed: what training starts from, never trained.
    state = self.initializer(parallel.replicate(jax.random.key_data(jax.random.key(seed))))
    embed_fn = baselines.state_embed_fn(state, model=self.spec.model, hp=self.spec.hp)
    evaluator = baselines.FeatureBaseline(
        embed_fn, num_classes=num_classes, k=k, temperature=temperature,
        probe_config=self.probe_config(seed), probe_kinds=self.eval_config.probe_features,
        batch_size=self.config.eval_batch_size)
    return evaluator.run(*data)
