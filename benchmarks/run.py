"""Runs a benchmark suite, prints its report and writes `results.json` and `results.md`.

  python -m benchmarks.run [--quick] [--suite cpu|gpu] [--out DIR] [--only NAME ...]

Each benchmark module runs in its own subprocess (`python -m benchmarks.<module> --size SIZE
--json FILE`) with a time limit; one that fails or runs out of time is reported as an error
(with what it finished) and the others still run. They run one after the other unless --jobs
says otherwise. Sizes: the CPU suite runs "full" (or "quick" with --quick), the GPU suite "gpu"
(or "quick"). --quick is the smoke test: tiny sizes, and XLA's LLVM optimisations off to shorten
compiles, so its timings mean nothing.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

from benchmarks import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# (module, time limit in seconds) per suite and size, in running order. The quick limits only
# stop a hung smoke test; the GPU ones keep benchmarks/gpu.sh under 8 minutes.
SUITES = {
    "cpu": {
        "full": (("bank_step", 2400), ("knn_eval", 1200), ("train_step", 2400),
                 ("input_pipeline", 600)),
        "quick": (("bank_step", 300), ("knn_eval", 300), ("train_step", 300),
                  ("input_pipeline", 300)),
    },
    "gpu": {
        "gpu": (("knn_eval", 180), ("train_step", 280)),
        "quick": (("knn_eval", 300), ("train_step", 300)),
    },
}
TITLES = {
    "bank_step": "NCE + bank step cost vs n (8 fake CPU devices)",
    "knn_eval": "Weighted kNN evaluation",
    "train_step": "Train-step throughput",
    "input_pipeline": "Input pipeline",
}
_LOG_TAIL_LINES = 30


def git_revision() -> str:
  try:
    return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


class Child:
  """One benchmark module running in a subprocess, its stderr echoed to ours line by line."""

  def __init__(self, name: str, size: str, timeout: float, env: dict, tmp: str):
    self.name, self.timeout = name, timeout
    self.json_path = os.path.join(tmp, f"{name}.json")
    command = [sys.executable, "-m", f"benchmarks.{name}", "--size", size, "--json",
               self.json_path]
    self.start = time.perf_counter()
    self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
    self.tail = collections.deque(maxlen=_LOG_TAIL_LINES)
    self.reader = threading.Thread(target=self._echo, daemon=True)
    self.reader.start()

  def _echo(self) -> None:
    for line in self.process.stderr:
      self.tail.append(line.rstrip("\n"))
      sys.stderr.write(f"  [{self.name}] {line}")

  def done(self) -> bool:
    """Finished, or past its time limit."""
    return (self.process.poll() is not None
            or time.perf_counter() - self.start > self.timeout)

  def record(self) -> dict:
    """The module's record, with "error" (and what it finished) when it failed or ran out of
    time; kills the process if it is still running."""
    error = None
    if self.process.poll() is None:
      self.process.kill()
      error = f"timed out after {self.timeout:.0f} s"
    returncode = self.process.wait()
    self.reader.join()
    wall_s = time.perf_counter() - self.start
    if error is None and returncode != 0:
      error = f"exit status {returncode}"
    record = {}
    if os.path.exists(self.json_path):  # Complete, or what a stopped module finished.
      with open(self.json_path) as f:
        record = json.load(f)
    record["wall_s"] = wall_s
    if error is not None:
      record.update(error=error, log_tail=list(self.tail))
    return record


def run_modules(modules, size: str, env: dict, jobs: int) -> dict:
  """Runs (name, time limit) modules, at most `jobs` at a time; {name: record} in order."""
  records = {}
  pending = list(modules)
  running: list[Child] = []
  with tempfile.TemporaryDirectory() as tmp:
    while pending or running:
      while pending and len(running) < jobs:
        name, timeout = pending.pop(0)
        common.log(f"== {name} ({size})")
        running.append(Child(name, size, timeout, env, tmp))
      time.sleep(0.1)
      for child in [c for c in running if c.done()]:
        running.remove(child)
        records[child.name] = child.record()
        if "error" in records[child.name]:
          common.log(f"== {child.name} FAILED: {records[child.name]['error']}")
  return {name: records[name] for name, _ in modules}


def environment_line(env: dict) -> str:
  return (f"{env['backend']} ({env['device_count']} x {env['device_kind']}), "
          f"jax {env['jax']}, {env['cpu_count']} CPUs, {env['date_utc']}"
          + (f", XLA_FLAGS='{env['xla_flags']}'" if env["xla_flags"] else ""))


def train_images_per_s(records: dict, config: str) -> Optional[float]:
  """images/s of `config`'s train step in this run, if it was measured."""
  result = records.get("train_step", {}).get("result")
  for case in (result or {}).get("cases", []):
    if case["config"] == config:
      return case["with_nce_bank"]["images_per_s"]
  return None


def section(name: str, record: dict, records: dict) -> str:
  title = f"## {TITLES[name]} (`benchmarks/{name}.py`)"
  parts = [title]
  if "error" in record:
    log = "\n".join(f"    {line}" for line in record["log_tail"])
    finished = "; the parts it finished follow" if "result" in record else ""
    parts.append(f"FAILED: {record['error']}{finished}. The end of its log:\n\n{log}")
  if "result" in record:
    module = importlib.import_module(f"benchmarks.{name}")
    if name == "input_pipeline":
      body = module.markdown(record["result"], train_images_per_s(records, module.CONFIG))
    else:
      body = module.markdown(record["result"])
    parts += [f"{environment_line(record['environment'])}; {record['wall_s']:.0f} s in all.",
              body]
  return "\n\n".join(parts)


def comparisons(records: dict) -> dict:
  """Headline ratios: the input path over the train step (two benchmarks), and our kNN on the
  trainer's device split over faiss (median times, measured side by side in one process)."""
  out = {}
  knn = records.get("knn_eval", {}).get("result") or {}
  if "ours_over_faiss" in knn:
    out["knn_ours_over_faiss"] = knn["ours_over_faiss"]["median_ratio"]
  pipeline = records.get("input_pipeline", {}).get("result")
  train = pipeline and train_images_per_s(
      records, importlib.import_module("benchmarks.input_pipeline").CONFIG)
  if train:
    out["input_pipeline_over_fashion_mnist_train_step"] = (
        pipeline["host_and_augment_images_per_s"] / train)
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes (the CI smoke test)")
  parser.add_argument("--suite", choices=tuple(SUITES), default="cpu")
  parser.add_argument("--out", default=os.path.join("benchmarks", "results"),
                      help="directory for results.json and results.md")
  parser.add_argument("--only", nargs="+", choices=tuple(TITLES),
                      help="run only these benchmarks")
  parser.add_argument("--jobs", type=int, default=1,
                      help="benchmarks run at once; more than 1 only for smoke tests, since "
                      "concurrent benchmarks slow each other down")
  args = parser.parse_args(argv)
  size = "quick" if args.quick else ("full" if args.suite == "cpu" else "gpu")
  env = dict(os.environ)
  if args.quick:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + QUICK_XLA_FLAGS).strip()

  modules = [(name, timeout) for name, timeout in SUITES[args.suite][size]
             if not args.only or name in args.only]
  records = run_modules(modules, size, env, max(1, args.jobs))

  os.makedirs(args.out, exist_ok=True)
  combined = {
      "suite": args.suite, "size": size, "command": " ".join(["python -m benchmarks.run"]
                                                             + (argv or sys.argv[1:])),
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "git": git_revision(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
      "benchmarks": records, "comparisons": comparisons(records),
  }
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(combined, f, indent=2)
  header = (f"# instdisc_jax benchmarks: {args.suite} suite, {size} sizes\n\n"
            f"`{combined['command']}` at {combined['git']}, {combined['date_utc']}."
            + ("\n\nQuick sizes with LLVM optimisations off: a smoke test, the timings mean "
               "nothing." if args.quick else ""))
  sections = [section(name, record, records) for name, record in records.items()]
  report = "\n\n".join([header] + sections) + "\n"
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(report)
  sys.stdout.write(report)
  common.log(f"wrote {os.path.join(args.out, 'results.json')} and results.md")
  return 1 if any("error" in record for record in records.values()) else 0


if __name__ == "__main__":
  sys.exit(main())
