"""Weighted kNN over several (k, tau) from one neighbour search (paper Section 3.4).

The neighbours of each query are found once with the largest k (`knn.nearest_neighbors`, over
the sharded bank); every (k, tau) then votes with the first k of them (`knn.weighted_vote`). The
result for k = `config.knn_k`, tau = `config.knn_temperature` is the training run's final kNN.

The queries (the eval split's features) are instance-sharded like the bank (`features`): each
step all-gathers one chunk of every device's query rows, so a device holds its query shard, its
bank shard and one chunk of replicated queries, never a whole split.
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from instdisc_jax import knn
from instdisc_jax import parallel
from instdisc_jax import sharding
from instdisc_jax import steps
from instdisc_jax.evaluation import features as features_lib
from instdisc_jax.parallel import AXIS
from instdisc_jax.sharding import AxisName
from instdisc_jax.sharding import ShardLayout


def setting_name(k: int, temperature: float) -> str:
  """The key of one (k, tau) in the results, e.g. "k=200,tau=0.07"."""
  return f"k={k},tau={temperature:g}"


def sweep_counts(queries: jax.Array, targets: jax.Array, valid: jax.Array, rows: jax.Array,
                 labels: jax.Array, *, num_instances: int, num_classes: int, ks: Sequence[int],
                 temperatures: Sequence[float], axis_name: AxisName = None) -> dict:
  """Top-1/top-5 hit counts of the queries for every (k, tau): {setting_name: {"top1", "top5"}}.

  queries: (Q, d) unit-norm features (replicated); targets: (Q,) labels; valid: (Q,) bool, False
  rows are not counted; rows, labels: this shard of the bank and its labels (see `knn`).
  """
  neighbors = knn.nearest_neighbors(queries, rows, labels, num_instances=num_instances,
                                    k=max(ks), axis_name=axis_name)
  counts = {}
  for k in ks:
    first_k = jax.tree.map(lambda x, k=k: x[:, :k], neighbors)
    for temperature in temperatures:
      scores = knn.weighted_vote(first_k, num_classes=num_classes, temperature=temperature)
      counts[setting_name(k, temperature)] = knn.count_correct(scores, targets, valid=valid)
  return counts


def _sweep_step(query_table, query_labels, chunk, rows, labels, *, query_layout: ShardLayout,
                chunk_rows: int, num_instances: int, num_classes: int, ks: tuple,
                temperatures: tuple):
  """`sweep_counts` of one chunk of the sharded queries against the sharded bank.

  Every device takes rows [chunk * chunk_rows, ...) of its own query shard (the last chunk is
  moved back to end at the shard's end, its rows already counted marked invalid) and all-gathers
  them: D * chunk_rows replicated queries per step, whatever the number of queries.
  """
  per_shard = query_layout.rows_per_shard
  start = jnp.minimum(chunk * chunk_rows, per_shard - chunk_rows)
  position = start + jnp.arange(chunk_rows)
  valid = ((position >= chunk * chunk_rows) &
           (position < sharding.local_real_rows(query_layout, AXIS)))
  queries, targets = (lax.dynamic_slice_in_dim(x, start, chunk_rows)
                      for x in (query_table, query_labels))
  queries, targets, valid = (sharding.gather_batch(x, AXIS) for x in (queries, targets, valid))
  return sweep_counts(queries, targets, valid, rows, labels, num_instances=num_instances,
                      num_classes=num_classes, ks=ks, temperatures=temperatures, axis_name=AXIS)


class KnnSweep:
  """kNN accuracy (%) of the eval split for every (k, tau), against each bank asked for.

  The queries are the eval split's features from the shared `FeatureCache`; the training
  instances are the memory bank ("bank", `state.bank.values()`) and/or their features under the
  eval transform ("recomputed"), with `bank_labels` (the training labels in the bank's layout,
  `restore.RunSpec.bank_labels`). `run(state)` returns {bank: {setting_name(k, tau):
  {"top1": %, "top5": %}}}. Values of k above n are capped at n (and named so).
  """

  def __init__(self, cache: features_lib.FeatureCache, *, train_split, eval_split,
               bank_labels: jax.Array, num_classes: int, ks: Sequence[int],
               temperatures: Sequence[float], banks: Sequence[str]):
    self.cache = cache
    self.train_split = train_split
    self.eval_split = eval_split
    self.bank_labels = bank_labels
    self.banks = tuple(banks)
    query_layout = cache.layout(eval_split)
    # The cache's global batch of queries per step, split over the devices' shards.
    self.chunk_rows = min(max(1, cache.batch_size // query_layout.num_shards),
                          query_layout.rows_per_shard)
    self.num_chunks = -(-query_layout.rows_per_shard // self.chunk_rows)
    n = train_split.num_examples
    self._p_sweep = steps.pmapped(_sweep_step, query_layout=query_layout,
                                  chunk_rows=self.chunk_rows, num_instances=n,
                                  num_classes=num_classes,
                                  ks=tuple(sorted({min(k, n) for k in ks})),
                                  temperatures=tuple(temperatures))

  def run(self, state: steps.TrainState) -> dict:
    queries = self.cache.get(state, self.eval_split)
    results = {}
    for bank in self.banks:
      rows = (state.bank.values() if bank == "bank"
              else self.cache.bank_rows(state, self.train_split))
      totals: dict = {}
      for chunk in range(self.num_chunks):
        counts = self._p_sweep(queries.embedding, queries.labels,
                               parallel.replicate(np.int32(chunk)), rows, self.bank_labels)
        for setting, hits in counts.items():
          for name, value in hits.items():
            totals.setdefault(setting, {}).setdefault(name, 0)
            totals[setting][name] += int(parallel.first_replica(value))
      total = max(queries.layout.num_instances, 1)
      results[bank] = {setting: {name: 100.0 * hits / total for name, hits in by_name.items()}
                       for setting, by_name in totals.items()}
    return results
