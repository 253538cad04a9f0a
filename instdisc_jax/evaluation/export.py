"""Feature export: `<workdir>/features_train.npz` and `features_eval.npz` for use elsewhere.

Each archive holds `features` (float32 (N, low_dim), the L2-normalised embedding under the eval
transform), `pooled` (float32 (N, D), the pooled backbone features), `labels` (int32 (N,), -1
where unknown) and `indices` (int32 (N,), the record index; row i of the training archive is
memory-bank row i). Written by process 0.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from instdisc_jax import train
from instdisc_jax.evaluation import features as features_lib


def save(path: str, features: features_lib.Features) -> None:
  """Writes one split's features to `path` (an .npz)."""
  np.savez(path, features=features.embedding, pooled=features.pooled, labels=features.labels,
           indices=features.indices)


class Export:
  """`run(state)` -> {"train": path, "eval": path} of the archives written."""

  def __init__(self, trainer: train.Trainer, cache: features_lib.FeatureCache, workdir: str):
    self.trainer = trainer
    self.cache = cache
    self.workdir = workdir

  def run(self, state: train.TrainState) -> dict:
    splits = {"train": self.trainer.train_split, "eval": self.trainer.eval_split}
    paths = {}
    for role, split in splits.items():
      if split is None:
        continue
      features = self.cache.get(state, split)
      paths[role] = os.path.join(self.workdir, f"features_{role}.npz")
      if jax.process_index() == 0:
        save(paths[role], features)
    return paths
