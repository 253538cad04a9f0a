"""Choosing the kNN's (k, tau) on the validation set, before the test set is looked at.

The final evaluation of a run with a validation set (`config.validation_size` > 0) scores the
validation images for every (k, tau) of `knn_select_k` x `knn_select_temperatures` from one
neighbour search, `choose`s the best pair per feature kind, and only then scores the test split,
once, with that pair. Pure Python: no JAX, no data, so the rule is easy to test and to audit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import logging
from typing import NamedTuple

log = logging.getLogger(__name__)


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


def select_and_test(kinds: Mapping[str, object], sweep: Callable, validation_split, test_split,
                    ks: tuple, temperatures: tuple, *, preferred: Setting) -> dict:
  """Chooses (k, tau) per feature kind on the validation set, then scores the test split once.

  Args:
    kinds: the training features per kind ("bank", "recomputed"), as `sweep` takes them.
    sweep: (rows, split, ks, temperatures) -> {Setting: {"top1", "top5" (%), "hits"}}, every
      setting from one neighbour search (`train.Trainer.knn_sweep`).
    validation_split, test_split: what is chosen on, and what is reported.
    ks, temperatures: the grids (`grid`).
    preferred: the config's setting, which wins ties (`choose`).

  Returns the results' "validation" (every setting), "knn_choice", "test" and, as without a
  validation set, "knn_bank"/"knn_recomputed": the test accuracies at the chosen pair. The test
  split is read only after every kind's choice is made.
  """
  validation, choices = {}, {}
  for kind, rows in kinds.items():
    scores = sweep(rows, validation_split, ks, temperatures)
    chosen = choose({s: v["hits"] for s, v in scores.items()}, preferred)
    validation[kind] = {f"k={s.k},tau={s.temperature:g}": {"top1": v["top1"], "top5": v["top5"]}
                        for s, v in scores.items()}
    choices[kind] = {"k": chosen.k, "temperature": chosen.temperature,
                     "top1": scores[chosen]["top1"], "top5": scores[chosen]["top5"]}
  # Only now, with every choice made, is the test split read: once, at the chosen pair.
  test = {}
  for kind, rows in kinds.items():
    chosen = Setting(choices[kind]["k"], choices[kind]["temperature"])
    score = sweep(rows, test_split, (chosen.k,), (chosen.temperature,))[chosen]
    test[kind] = {"k": chosen.k, "temperature": chosen.temperature,
                  "top1": score["top1"], "top5": score["top5"]}
    log.info("kNN (%s features): k=%d, tau=%g chosen on validation (top-1 %.2f%%); test "
             "top-1 %.2f%% top-5 %.2f%%", kind, chosen.k, chosen.temperature,
             choices[kind]["top1"], score["top1"], score["top5"])
  results = {"validation": validation, "knn_choice": choices, "test": test}
  for kind, scores in test.items():
    results[f"knn_{kind}"] = {"top1": scores["top1"], "top5": scores["top5"]}
  return results
