"""Feature export: each process writes the rows it holds to `features_<split>.process<p>.npz`.

No process gathers a split: process p writes the real rows of its devices' shards (`features`)
to `<workdir>/features_train.process<p>.npz` and `features_eval.process<p>.npz`,
in record order. Each archive holds `features` (float32 (N_p, low_dim), the L2-normalised
embedding under the eval transform), `pooled` (float32 (N_p, P), the pooled backbone features),
`labels` (int32 (N_p,), -1 where unknown) and `indices` (int32 (N_p,), the record index; record i
of the training split is memory-bank row i). Together the processes' archives hold every record
once; `read` (or the README's snippet) joins them into one table ordered by index.
"""

from __future__ import annotations

import glob
import os
import re

import jax
import numpy as np

from instdisc_jax import steps
from instdisc_jax.evaluation import features as features_lib

FIELDS = ("features", "pooled", "labels", "indices")


def path(workdir: str, role: str, process: int) -> str:
  """Where process `process` writes the features of split `role` ("train" or "eval")."""
  return os.path.join(workdir, f"features_{role}.process{process}.npz")


def pattern(workdir: str, role: str) -> str:
  """A glob pattern matching every process's archive of split `role`."""
  return os.path.join(workdir, f"features_{role}.process*.npz")


def save(file_path: str, rows: dict) -> None:
  """Writes one process's rows of a split (`Features.local_rows()`) to `file_path`, atomically."""
  tmp = file_path + ".tmp"
  with open(tmp, "wb") as f:
    np.savez(f, **{name: rows[name] for name in FIELDS})
  os.replace(tmp, file_path)      # A reader never sees half an archive.


def read(workdir: str, role: str) -> dict[str, np.ndarray]:
  """Every process's archive of split `role` joined into one table, row i = record i."""
  parts = [np.load(p) for p in glob.glob(pattern(workdir, role))]
  if not parts:
    raise FileNotFoundError(f"no {pattern(workdir, role)}")
  table = {name: np.concatenate([p[name] for p in parts]) for name in FIELDS}
  order = np.argsort(table["indices"])
  return {name: value[order] for name, value in table.items()}


class Export:
  """`run(state)` -> {role: pattern} of the archives written for each split of `splits`
  ({"train": split, "eval": split or None}; None is skipped)."""

  def __init__(self, cache: features_lib.FeatureCache, splits: dict, workdir: str):
    self.cache = cache
    self.splits = dict(splits)
    self.workdir = workdir

  def _remove_stale(self, role: str) -> None:
    """Archives of processes this run does not have (left by an export with more processes)."""
    for stale in glob.glob(pattern(self.workdir, role)):
      process = re.search(r"\.process(\d+)\.npz$", stale)
      if process and int(process.group(1)) >= jax.process_count():
        os.remove(stale)

  def run(self, state: steps.TrainState) -> dict:
    patterns = {}
    for role, split in self.splits.items():
      if split is None:
        continue
      rows = self.cache.get(state, split).local_rows()
      save(path(self.workdir, role, jax.process_index()), rows)
      if jax.process_index() == 0:
        self._remove_stale(role)
      patterns[role] = pattern(self.workdir, role)
    return patterns
