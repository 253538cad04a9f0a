"""Weighted k-nearest-neighbour classification over the sharded bank (paper Section 3.4).

A query f is compared with every real bank row by cosine similarity s_i = v_i^T f; its k nearest
neighbours N_k vote for their classes with weight alpha_i = exp(s_i / tau):

  w_c = sum_{i in N_k} alpha_i * 1(c_i = c),  prediction = argmax_c w_c   (top-5: the 5 largest).

Sharded: each device finds the top k among its own rows (chunked over queries and bank rows, so a
1.28M x 128 bank with 50k queries fits in memory), the D * k candidates (similarity, global index,
label) are all-gathered and merged. Communication is O(Q * k * D), independent of n.

Ties are broken towards the lower global instance index everywhere (`lax.top_k` keeps the first
of equal values, and candidates are merged in global index order), so results do not depend on
the number of shards or the chunk sizes.

`approx_recall` switches the per-chunk selection to `lax.approx_max_k`, which is only faster on
TPU (on CPU and GPU it is an exact top-k under another name).
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.struct
import jax
from jax import lax
import jax.numpy as jnp

from instdisc_jax import sharding
from instdisc_jax.sharding import AxisName
from instdisc_jax.sharding import ShardLayout

_MASKED = -jnp.inf


@flax.struct.dataclass
class Neighbors:
  """The k nearest bank rows of each query, best first: (Q, k) each. Replicated on devices."""

  scores: jax.Array    # cosine similarity (float32; -inf where fewer than k rows exist)
  indices: jax.Array   # global instance index (int32)
  labels: jax.Array    # bank label of that instance (int32)


def _select(values: jax.Array, k: int, approx_recall: Optional[float]):
  if approx_recall is None:
    return lax.top_k(values, k)
  return lax.approx_max_k(values, k, recall_target=approx_recall)


def _merge(values_a, ids_a, values_b, ids_b, k):
  """Top k of two candidate lists; a's candidates win ties (they have the lower indices)."""
  values = jnp.concatenate([values_a, values_b], axis=-1)
  ids = jnp.concatenate([ids_a, ids_b], axis=-1)
  best, pos = lax.top_k(values, k)
  return best, jnp.take_along_axis(ids, pos, axis=-1)


def _shard_top_k(queries, rows, real, k, bank_chunk, approx_recall):
  """Top k local rows per query: (values, local row ids), each (Q, k); -inf past the real rows."""
  num_rows = rows.shape[0]
  if num_rows <= bank_chunk:
    sims = jnp.where(real, queries @ rows.T, _MASKED)
    if num_rows < k:
      sims = jnp.pad(sims, ((0, 0), (0, k - num_rows)), constant_values=_MASKED)
    return _select(sims, k, approx_recall)

  num_chunks = -(-num_rows // bank_chunk)
  pad = num_chunks * bank_chunk - num_rows
  rows = jnp.pad(rows, ((0, pad), (0, 0))).reshape(num_chunks, bank_chunk, -1)
  real = jnp.pad(real, (0, pad)).reshape(num_chunks, bank_chunk)
  chunk_k = min(k, bank_chunk)

  def step(carry, chunk):
    best, best_ids = carry
    chunk_rows, chunk_real, offset = chunk
    sims = jnp.where(chunk_real, queries @ chunk_rows.T, _MASKED)
    values, ids = _select(sims, chunk_k, approx_recall)
    return _merge(best, best_ids, values, ids + offset, k), None

  init = (jnp.full((queries.shape[0], k), _MASKED, jnp.float32),
          jnp.zeros((queries.shape[0], k), jnp.int32))
  offsets = jnp.arange(num_chunks, dtype=jnp.int32) * bank_chunk
  (best, best_ids), _ = lax.scan(step, init, (rows, real, offsets))
  return best, best_ids


def nearest_neighbors(queries: jax.Array, rows: jax.Array, labels: jax.Array, *,
                      num_instances: int, k: int = 200, axis_name: AxisName = None,
                      query_chunk: int = 1024, bank_chunk: int = 65536,
                      approx_recall: Optional[float] = None) -> Neighbors:
  """The k most similar real bank rows of each query, over all shards.

  Args:
    queries: (Q, d) L2-normalised query features, the same on every device.
    rows: this shard's (rows_per_shard, d) bank rows (any float dtype).
    labels: this shard's (rows_per_shard,) int32 labels of those rows.
    num_instances: n, the number of real rows over all shards.
    k: neighbours to return (capped at n).
    axis_name: mapped axis the bank is sharded over, or None.
    query_chunk: queries scored at once.
    bank_chunk: bank rows scored at once (a running top-k is kept across chunks).
    approx_recall: use `lax.approx_max_k` with this recall target (TPU only pays off).
  """
  layout = ShardLayout(num_instances, sharding.num_shards(axis_name))
  k = min(k, num_instances)
  rows = rows.astype(jnp.float32)
  real = sharding.real_row_mask(layout, axis_name)
  offset = sharding.shard_index(axis_name) * layout.rows_per_shard
  local_k = min(k, layout.rows_per_shard)

  def one_chunk(q):
    values, local_ids = _shard_top_k(q.astype(jnp.float32), rows, real, local_k, bank_chunk,
                                     approx_recall)
    cand_labels = labels[local_ids]
    cand_ids = local_ids + offset
    if axis_name is not None:
      # (Q, D * local_k) candidates in shard order, i.e. in global index order.
      values, cand_ids, cand_labels = (
          lax.all_gather(x, axis_name, axis=1, tiled=True)
          for x in (values, cand_ids, cand_labels))
    best, pos = lax.top_k(values, k)
    return Neighbors(scores=best, indices=jnp.take_along_axis(cand_ids, pos, axis=1),
                     labels=jnp.take_along_axis(cand_labels, pos, axis=1))

  num_queries = queries.shape[0]
  if num_queries <= query_chunk:
    return one_chunk(queries)
  num_chunks = -(-num_queries // query_chunk)
  padded = jnp.pad(queries, ((0, num_chunks * query_chunk - num_queries), (0, 0)))
  out = lax.map(one_chunk, padded.reshape(num_chunks, query_chunk, -1))
  return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[:num_queries], out)


def weighted_vote(neighbors: Neighbors, *, num_classes: int, temperature: float) -> jax.Array:
  """Class scores w_c = sum over neighbours of exp(s_i / tau) * 1(c_i = c): (Q, num_classes)."""
  weights = jnp.exp(neighbors.scores / temperature)           # exp(-inf) = 0 for missing rows
  one_hot = jax.nn.one_hot(neighbors.labels, num_classes, dtype=jnp.float32)
  return jnp.einsum("qk,qkc->qc", weights, one_hot)


def predict(class_scores: jax.Array, top: int = 5) -> jax.Array:
  """The `top` best classes per query, best first (ties to the lower class id): (Q, top)."""
  return lax.top_k(class_scores, min(top, class_scores.shape[-1]))[1]


def knn_classify(queries: jax.Array, rows: jax.Array, labels: jax.Array, *, num_instances: int,
                 num_classes: int, k: int = 200, temperature: float = 0.07,
                 axis_name: AxisName = None, **chunking) -> jax.Array:
  """Weighted kNN class scores (Q, num_classes) for the queries; see `nearest_neighbors`."""
  neighbors = nearest_neighbors(queries, rows, labels, num_instances=num_instances, k=k,
                                axis_name=axis_name, **chunking)
  return weighted_vote(neighbors, num_classes=num_classes, temperature=temperature)


def count_correct(class_scores: jax.Array, targets: jax.Array, *,
                  valid: Optional[jax.Array] = None, ks: Sequence[int] = (1, 5)) -> dict:
  """Number of queries whose target is among the top-k predictions, for each k (int32)."""
  ranked = predict(class_scores, max(ks))
  hits = ranked == targets[:, None]
  if valid is None:
    valid = jnp.ones(targets.shape, bool)
  return {f"top{k}": jnp.sum(jnp.any(hits[:, :k], axis=1) & valid, dtype=jnp.int32)
          for k in ks}
