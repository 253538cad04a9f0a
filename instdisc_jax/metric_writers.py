"""Metrics to TensorBoard (tensorboardX), `metrics.jsonl` and the console; process 0 only.

`metrics.jsonl` has one JSON object per line: {"step": s, "<name>": value, ...}. Training
scalars are logged under their names (loss, z, learning_rate, images_per_sec, ...); evaluation
results under "knn/..." names. Appending keeps the history of a resumed run in one file: a
writer opened with `resume_step=s` first drops the records (and hides the TensorBoard events)
after step s, which a preempted or killed run wrote past its last checkpoint and a resumed run
writes again, so every step is recorded once.

The loop's two helpers live here too: `PendingMetrics` (per-step metrics fetched from the
devices in batches) and `Throughput` (images/s of training alone).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Mapping, Optional

import jax
import numpy as np

from instdisc_jax import parallel

log = logging.getLogger(__name__)


def _to_python(value):
  value = np.asarray(value)
  return value.item() if value.size == 1 else value.tolist()


class MetricWriter:
  """Writes scalars on process 0; a no-op on other processes."""

  def __init__(self, workdir: str, *, enabled: Optional[bool] = None,
               resume_step: Optional[int] = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      os.makedirs(workdir, exist_ok=True)
      if resume_step is not None:
        drop_records_after(workdir, resume_step)
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                               purge_step=None if resume_step is None else resume_step + 1)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "time": time.time()}
    record.update({k: _to_python(v) for k, v in scalars.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for name, value in scalars.items():
      self._tb.add_scalar(name, float(np.asarray(value)), int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def drop_records_after(workdir: str, step: int) -> None:
  """Rewrites `<workdir>/metrics.jsonl` without its records of steps after `step` and without a
  torn last line (atomically; the file is left alone when there is nothing to drop)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.read().splitlines()
  kept = [r for r in read_metrics(workdir) if r.get("step", 0) <= step]
  if len(kept) == len(lines):
    return
  log.info("dropping %d records after step %d from %s", len(lines) - len(kept), step, path)
  with open(path + ".tmp", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)
  os.replace(path + ".tmp", path)


def read_metrics(workdir: str) -> list[dict]:
  """The records of `<workdir>/metrics.jsonl`, in order (skips a torn last line)."""
  path = os.path.join(workdir, "metrics.jsonl")
  records = []
  if not os.path.exists(path):
    return records
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        log.warning("skipping a malformed line in %s", path)
  return records


@dataclasses.dataclass
class PendingMetrics:
  """Per-step metrics not yet fetched from the devices (fetching every step would stall them)."""

  metrics: list = dataclasses.field(default_factory=list)
  first_step: int = 0

  def add(self, step: int, metrics) -> None:
    if not self.metrics:
      self.first_step = step
    self.metrics.append(metrics)

  def fetch(self) -> list[dict]:
    fetched = [jax.tree.map(parallel.first_replica, m) for m in self.metrics]
    self.metrics = []
    return fetched


class Throughput:
  """Images per second of training, excluding evaluation and checkpoint time."""

  def __init__(self, step: int):
    self.started = False
    self._step, self._time = step, time.perf_counter()

  def restart(self, step: int) -> None:
    self.started = True
    self._step, self._time = step, time.perf_counter()

  def rate(self, step: int, batch_size: int) -> float:
    now = time.perf_counter()
    rate = (step - self._step) * batch_size / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    return rate
