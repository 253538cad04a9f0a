"""Choosing the kNN's (k, tau) on the validation set, before the test set is looked at.

The final evaluation of a run with a validation set (`config.validation_size` > 0) scores the
validation images for every (k, tau) of `knn_select_k` x `knn_select_temperatures` from one
neighbour search, `choose`s the best pair per feature kind, and only then scores the test split,
once, with that pair. Pure Python: no JAX, no data, so the rule is easy to test and to audit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple


class Setting(NamedTuple):
  """One kNN setting: k neighbours voting with weights exp(s / temperature)."""

  k: int
  temperature: float


def choose(hits: Mapping[Setting, int], preferred: Setting) -> Setting:
  """The setting with the most validation top-1 hits.

  Ties go to `preferred` (the config's `knn_k`, `knn_temperature`) when it is among the best,
  else to the larger k, then the larger tau: more neighbours and flatter weights are the
  smoother classifier, the safer bet when the validation set cannot tell them apart.

  Args:
    hits: top-1 hit counts per setting. Counts, not percentages, so that ties are exact.
    preferred: the setting the config names.
  """
  if not hits:
    raise ValueError("no settings to choose from")
  best = max(hits.values())
  tied = [Setting(*setting) for setting, count in hits.items() if count == best]
  return Setting(*preferred) if Setting(*preferred) in tied else max(tied)


def grid(ks, temperatures, num_instances: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
  """The sorted grids, k capped at the number of training instances."""
  return (tuple(sorted({min(int(k), num_instances) for k in ks})),
          tuple(sorted({float(t) for t in temperatures})))
