"""The evaluators that draw: the nearest-neighbour retrieval grid and the training curves.

Retrieval: queries are drawn from the eval split by `seed` (one per class before any class
repeats), embedded under the eval transform, and their nearest training images are found over
the sharded bank with `knn.nearest_neighbors` (exact, ties to the lower index), in the memory
bank or in recomputed features. Without an eval split the queries come from the training split
and each query's own image is left out of its neighbours.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import jax
import numpy as np

from instdisc_jax import knn
from instdisc_jax import metric_writers
from instdisc_jax import parallel
from instdisc_jax import plots
from instdisc_jax import steps
from instdisc_jax.evaluation import features as features_lib
from instdisc_jax.parallel import AXIS

log = logging.getLogger(__name__)


def pick_queries(labels: Optional[np.ndarray], num_records: int, num: int,
                 seed: int) -> np.ndarray:
  """`num` record indices in a seeded random order; with labels, the first of every class
  comes before the second of any."""
  order = np.random.default_rng(seed).permutation(num_records)
  if labels is not None:
    seen: dict = {}
    rank = np.empty(num_records, np.int64)
    for position, index in enumerate(order):
      label = int(labels[index])
      rank[position] = seen.get(label, 0)
      seen[label] = rank[position] + 1
    order = order[np.argsort(rank, kind="stable")]
  return order[:num]


def _neighbors_step(queries, rows, labels, *, num_instances: int, k: int):
  return knn.nearest_neighbors(queries, rows, labels, num_instances=num_instances, k=k,
                               axis_name=AXIS)


def drop_self(neighbors: knn.Neighbors, queries: np.ndarray, k: int) -> knn.Neighbors:
  """The first k neighbours of each query other than the query's own record."""
  keep = neighbors.indices != queries[:, None]
  order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
  return jax.tree.map(lambda x: np.take_along_axis(np.asarray(x), order, axis=1), neighbors)


class RetrievalGrid:
  """`run(state)` draws `<workdir>/retrieval.png` (process 0); returns the path, the query and
  neighbour indices, and the fraction of neighbours of the query's class (None without labels).
  """

  def __init__(self, cache: features_lib.FeatureCache, workdir: str, *, train_split,
               eval_split, bank_labels: jax.Array, num_queries: int, num_neighbors: int,
               bank: str, seed: int):
    self.cache = cache
    self.train_split = train_split
    self.eval_split = eval_split
    self.bank_labels = bank_labels
    self.path = os.path.join(workdir, "retrieval.png")
    self.num_queries = num_queries
    self.bank = bank
    self.seed = seed
    self.from_train = eval_split is None
    n = train_split.num_examples
    self.k = min(num_neighbors, n - 1 if self.from_train else n)
    self._p_neighbors = steps.pmapped(_neighbors_step, num_instances=n,
                                      k=min(self.k + self.from_train, n))

  def run(self, state: steps.TrainState) -> dict:
    query_split = self.train_split if self.from_train else self.eval_split
    query_features = self.cache.get(state, query_split)
    labels = query_split.labels
    labelled = labels is not None and bool((labels >= 0).any())
    picks = pick_queries(labels if labelled else None, query_split.num_examples,
                         self.num_queries, self.seed)
    # Only the picked rows leave their shards.
    queries = self.cache.take(query_features.embedding, query_features.layout, picks)
    rows = (state.bank.values() if self.bank == "bank"
            else self.cache.bank_rows(state, self.train_split))
    found = self._p_neighbors(parallel.replicate(queries), rows, self.bank_labels)
    neighbors = jax.tree.map(parallel.first_replica, found)
    if self.from_train:
      neighbors = drop_self(neighbors, picks, self.k)
    indices = np.asarray(neighbors.indices)
    image_size = self.cache.image_size
    query_labels = (labels[picks] if labels is not None
                    else np.full(len(picks), -1, np.int32))
    if jax.process_index() == 0:
      plots.retrieval_grid(
          self.path, features_lib.load_images(query_split, picks, image_size), query_labels,
          np.stack([features_lib.load_images(self.train_split, row, image_size)
                    for row in indices]),
          np.asarray(neighbors.labels), np.asarray(neighbors.scores),
          class_names=self.train_split.class_names)
    same = None
    if labelled:
      same = float(np.mean(np.asarray(neighbors.labels) == query_labels[:, None]))
    return {"path": self.path, "bank": self.bank, "queries": picks.tolist(),
            "neighbors": indices.tolist(), "same_class_fraction": same}


def curves_title(config) -> str:
  """The title of a run's curves: its dataset and objective (with m for the sampled ones)."""
  objective = config.objective + (f" m={config.num_negatives}"
                                  if config.objective in ("nce", "infonce") else "")
  return f"{config.dataset}, {objective}: training loss vs test kNN accuracy"


class TrainingCurves:
  """`run(state)` draws `<workdir>/curves.png` from `metrics.jsonl` (the paper's Fig. 4)."""

  def __init__(self, workdir: str, title: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, "curves.png")
    self.title = title

  def run(self, state: steps.TrainState) -> dict:
    del state  # The curves come from the run's log.
    if jax.process_index() != 0:
      return {"path": self.path}
    records = metric_writers.read_metrics(self.workdir)
    try:
      curves = plots.training_curves(self.path, records, self.title)
    except ValueError as error:
      log.warning("training curves skipped: %s", error)
      return {"skipped": str(error)}
    return {"path": self.path, "loss_points": int(len(curves.loss[0])),
            "knn_points": int(len(curves.knn_bank[0]) + len(curves.knn_recomputed[0]))}
