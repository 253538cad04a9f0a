"""The evaluator on 2 processes x 4 CPU devices against 1 process x 8 devices, same checkpoint.

Sharded evaluation must not depend on the topology: every process holds only its devices'
feature rows, the probe and the fine-tuning reduce over all processes (gloo on CPU), and each
process exports its own rows. The results agree up to the order of float sums across processes,
and the two processes' archives joined by index are the single process's archive.
"""

import json
import os
from pathlib import Path
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import tiny_run

from instdisc_jax import train
from instdisc_jax.evaluation import export

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
FAST_COMPILE = "--xla_backend_optimization_level=0"
TIMEOUT = 900
EVAL_FLAGS = ["--config.eval.knn_k=(10,200)", "--config.eval.probe_epochs=2",
              "--config.eval.semi_supervised_fractions=(0.1,)", "--config.eval.finetune_steps=3",
              "--config.eval.finetune_batch_size=16", "--config.eval.curves=False"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def evaluator(workdir: Path, devices: int, log: Path, *flags: str) -> subprocess.Popen:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  with open(log, "w") as out:
    return subprocess.Popen(
        [sys.executable, "-m", "instdisc_jax.evaluate", f"--workdir={workdir}", *EVAL_FLAGS,
         *flags], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)


def finish(processes, logs) -> None:
  for process, log in zip(processes, logs):
    try:
      process.wait(timeout=TIMEOUT)
    finally:
      if process.poll() is None:
        process.kill()
    assert process.returncode == 0, f"end of {log}:\n{log.read_text()[-3000:]}"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  """One trained tiny workdir, copied and evaluated on 1 x 8 and on 2 x 4 devices side by side."""
  root = tmp_path_factory.mktemp("runs")
  data = tiny_run.write_blobs_npz(root / "blobs.npz", n=90)   # padding rows in the last shards
  trained = root / "trained"
  train.train_and_evaluate(tiny_run.config(data, num_epochs=1), str(trained))
  one, two = root / "one", root / "two"
  shutil.copytree(trained, one)
  shutil.copytree(trained, two)
  address = f"127.0.0.1:{free_port()}"
  logs = [root / "one.log", root / "two.0.log", root / "two.1.log"]
  processes = [evaluator(one, 8, logs[0])] + [
      evaluator(two, 4, logs[1 + i], f"--coordinator_address={address}", "--num_processes=2",
                f"--process_id={i}") for i in range(2)]
  finish(processes, logs)
  return {name: (path, json.loads((path / "eval_results.json").read_text()))
          for name, path in (("one", one), ("two", two))}


def test_results_do_not_depend_on_the_topology(evaluated):
  one, two = evaluated["one"][1], evaluated["two"][1]
  assert one["knn"] == two["knn"]
  assert one["linear_probe"] == two["linear_probe"]
  assert one["retrieval_grid"]["neighbors"] == two["retrieval_grid"]["neighbors"]
  tuned_one, tuned_two = one["semi_supervised"]["10%"], two["semi_supervised"]["10%"]
  assert tuned_one["top1"] == tuned_two["top1"]
  assert tuned_one["labelled"] == tuned_two["labelled"]
  assert tuned_one["final_loss"] == pytest.approx(tuned_two["final_loss"], rel=1e-5)


def test_each_process_exports_its_own_rows(evaluated):
  one_dir, two_dir = evaluated["one"][0], evaluated["two"][0]
  for role, n in (("train", 90), ("eval", 40)):
    parts = [np.load(export.path(str(two_dir), role, p)) for p in (0, 1)]
    indices = [part["indices"] for part in parts]
    assert len(indices[0]) and len(indices[1])      # each process wrote rows, disjoint ones,
    assert not set(indices[0]) & set(indices[1])    # and together all of them
    joined, single = export.read(str(two_dir), role), export.read(str(one_dir), role)
    assert np.array_equal(joined["indices"], np.arange(n))
    assert np.array_equal(joined["labels"], single["labels"])
    for name in ("features", "pooled"):
      np.testing.assert_allclose(joined[name], single[name], rtol=1e-5, atol=1e-6)
