"""Weighted k-nearest-neighbour classification over the sharded bank (paper Section 3.4).

A query f is compared with every real bank row by cosine similarity s_i = v_i^T f; its k nearest
neighbours N_k vote for their classes with weight alpha_i = exp(s_i / tau):

  w_c = sum_{i in N_k} alpha_i * 1(c_i = c),  prediction = argmax_c w_c   (top-5: the 5 largest).

Sharded: each device finds its candidates among its own rows (every row above a threshold shared
by the shards, or its top k; chunked over queries and bank rows, so a 1.28M x 128 bank with 50k
queries fits in memory); the candidates (similarity, global index, label) are exchanged so that
each device merges every shard's candidates of its part of the queries, and the merged
neighbours are all-gathered at the end. Communication is O(Q * k * D), independent of n.

Ties are broken towards the lower global instance index everywhere (`lax.top_k` keeps the first
of equal values, and candidates are merged in global index order), so results do not depend on
the number of shards or the chunk sizes.

Selection. On a CPU, `lax.top_k` is a single-threaded partial sort, about 4 ns per entry plus
a cost per row that grows with k; over a (Q, n) block of similarities it cost as much as the
matmul that made them. On a CPU, when a shard fits in one bank chunk, the rows are therefore
selected by a threshold (knn_threshold.py): block maxima give a value T, shared by the shards,
that at least k entries over all shards reach; each device compacts its entries >= T (about
1.2 k over all shards for random unit vectors) in index order, and after the last chunk a
sorting network over the D * `candidate_buffer` candidates of each of its queries, vectorised
over the queries (`knn_select.network_top_k`: the same result as `lax.top_k`, in 55-60 % of its
time), picks the k best. Every pass over the block is a vectorised reduction. The candidates of
a device's Q / D queries are kept until then, 2 k + 32 D each: Q (2 k / D + 32) entries, about
the size of the (Q, k) result every device holds. A chunk whose candidates overflow a device's
buffer (rare; data with many equal similarities) is selected again exactly with `lax.top_k` per
shard and a merge, as are banks scored in several chunks and other backends
(`top_k_of_prefix`: two stages through group maxima once rows are long against k, see
`MIN_GROUP`). On a CPU host split into one device per core (as the trainer does), every device
scores and selects its own shard and merges its part of the queries, so all cores work on the
kNN.

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
from instdisc_jax.knn_select import canonical
from instdisc_jax.knn_select import group_size
from instdisc_jax.knn_select import merge_top_k
from instdisc_jax.knn_select import network_top_k
from instdisc_jax.knn_select import round_up
from instdisc_jax.knn_select import select
from instdisc_jax.knn_threshold import BLOCK
from instdisc_jax.knn_threshold import CPU_QUERY_CHUNK
from instdisc_jax.knn_threshold import SUPER_BLOCK
from instdisc_jax.knn_threshold import candidate_buffer
from instdisc_jax.knn_threshold import threshold_candidates
from instdisc_jax.sharding import AxisName
from instdisc_jax.sharding import ShardLayout

_MASKED = -jnp.inf


@flax.struct.dataclass
class Neighbors:
  """The k nearest bank rows of each query, best first: (Q, k) each. Replicated on devices."""

  scores: jax.Array    # cosine similarity (float32; -inf where fewer than k rows exist)
  indices: jax.Array   # global instance index (int32)
  labels: jax.Array    # bank label of that instance (int32)


def _shard_top_k(queries, rows, num_real, k, bank_chunk, approx_recall):
  """Top k of this shard's first `num_real` rows per query: (values, local row ids), (Q, k).

  -inf past the real rows. The bank is scored `bank_chunk` rows at a time (one block when it
  fits), each block padded with zero rows to a multiple of its selection's group size (a copy of
  the rows, not of the (Q, rows) similarities).
  """
  num_rows = rows.shape[0]
  if num_rows <= bank_chunk:
    width = max(num_rows, k)
    group = group_size(width, k)
    width = round_up(width, group)
    rows = jnp.pad(rows, ((0, width - num_rows), (0, 0)))
    return select(queries @ rows.T, num_real, k, group, approx_recall)

  chunk_k = min(k, bank_chunk)
  group = group_size(bank_chunk, chunk_k)
  width = round_up(bank_chunk, group)
  num_chunks = -(-num_rows // width)
  rows = jnp.pad(rows, ((0, num_chunks * width - num_rows), (0, 0)))
  rows = rows.reshape(num_chunks, width, -1)

  def step(carry, chunk):
    best, best_ids = carry
    chunk_rows, offset = chunk
    values, ids = select(queries @ chunk_rows.T, jnp.clip(num_real - offset, 0, width),
                          chunk_k, group, approx_recall)
    return merge_top_k(best, best_ids, values, ids + offset, k), None

  init = (jnp.full((queries.shape[0], k), _MASKED, jnp.float32),
          jnp.zeros((queries.shape[0], k), jnp.int32))
  offsets = jnp.arange(num_chunks, dtype=jnp.int32) * width
  (best, best_ids), _ = lax.scan(step, init, (rows, offsets))
  return best, best_ids


def _packed(values, ids, labels) -> jax.Array:
  """float32 values, int32 ids and labels of one shape, stacked as int32 (the values as their
  bits), so that one collective moves them all."""
  return jnp.stack([lax.bitcast_convert_type(values, jnp.int32), ids, labels])


def _unpacked(packed: jax.Array):
  """`_packed`'s arrays back: (values, ids, labels)."""
  return (lax.bitcast_convert_type(packed[0], jnp.float32), *packed[1:])


def _candidates_of_my_queries(candidates, overflow, axis_name):
  """Each shard's (values, global ids, labels) candidates (Q, c) -> all shards' candidates of
  this shard's part of the queries, (Q / D, D * c) in shard order (so in global index order),
  and whether any shard overflowed. One all-to-all: every shard merges Q / D queries. A shard
  that overflowed sends ids -1 (global ids are >= 0), so every shard learns it."""
  if axis_name is None:
    return candidates, overflow
  shards = sharding.num_shards(axis_name)
  values, ids, labels = candidates
  num_queries, width = ids.shape
  packed = _packed(values, jnp.where(overflow, -1, ids), labels)
  packed = packed.reshape(3, shards, num_queries // shards, width)
  # Received: (3, D sources, Q / D, c) -> (3, Q / D, D * c).
  packed = lax.all_to_all(packed, axis_name, split_axis=1, concat_axis=1, tiled=True)
  values, ids, labels = _unpacked(
      packed.transpose(0, 2, 1, 3).reshape(3, num_queries // shards, -1))
  return (values, ids, labels), jnp.any(ids < 0)


def _as_candidates(neighbors: "Neighbors", width: int):
  """(values, ids, labels) candidates (Q, width) holding these neighbours (-inf after them)."""
  def pad(x, fill):
    return jnp.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=fill)

  return pad(neighbors.scores, _MASKED), pad(neighbors.indices, 0), pad(neighbors.labels, 0)


def _my_queries(neighbors: "Neighbors", axis_name) -> "Neighbors":
  """This shard's part (Q / D rows) of neighbours of a chunk that every shard holds whole."""
  if axis_name is None:
    return neighbors
  part = neighbors.indices.shape[0] // sharding.num_shards(axis_name)
  start = sharding.shard_index(axis_name) * part
  return jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, start, part, axis=0), neighbors)


def _gather_my_queries(neighbors: "Neighbors", axis_name) -> "Neighbors":
  """(chunks, Q / D, k) parts of every shard -> (chunks, Q, k) on all, in one all-gather."""
  if axis_name is None:
    return neighbors
  packed = _packed(neighbors.scores, neighbors.indices, neighbors.labels)
  scores, indices, labels = _unpacked(lax.all_gather(packed, axis_name, axis=2, tiled=True))
  return Neighbors(scores=scores, indices=indices, labels=labels)


def nearest_neighbors(queries: jax.Array, rows: jax.Array, labels: jax.Array, *,
                      num_instances: int, k: int = 200, axis_name: AxisName = None,
                      query_chunk: Optional[int] = None, bank_chunk: int = 65536,
                      approx_recall: Optional[float] = None) -> Neighbors:
  """The k most similar real bank rows of each query, over all shards.

  Args:
    queries: (Q, d) L2-normalised query features, the same on every device.
    rows: this shard's (rows_per_shard, d) bank rows (any float dtype).
    labels: this shard's (rows_per_shard,) int32 labels of those rows.
    num_instances: n, the number of real rows over all shards.
    k: neighbours to return (capped at n).
    axis_name: mapped axis the bank is sharded over, or None.
    query_chunk: queries scored at once; None: `CPU_QUERY_CHUNK` on a CPU backend (a (64, n)
      block of similarities stays in cache across the selection's passes), 1024 elsewhere.
    bank_chunk: bank rows scored at once (a running top-k is kept across chunks; rounded up to
      a multiple of the selection's group size).
    approx_recall: use `lax.approx_max_k` with this recall target (TPU only pays off).
  """
  on_cpu = jax.default_backend() == "cpu"
  if query_chunk is None:
    query_chunk = CPU_QUERY_CHUNK if on_cpu else 1024
  layout = ShardLayout(num_instances, sharding.num_shards(axis_name))
  k = min(k, num_instances)
  rows = rows.astype(jnp.float32)
  labels = jnp.asarray(labels)                                 # may be a host array
  num_real = sharding.local_real_rows(layout, axis_name)
  offset = sharding.shard_index(axis_name) * layout.rows_per_shard
  local_k = min(k, layout.rows_per_shard)

  def labels_of(local_ids):
    # Ids past the real rows come only with -inf, which never reaches the final k (the shards'
    # real candidates number at least k); clipping keeps their label look-up in range.
    return labels.at[jnp.minimum(local_ids, layout.rows_per_shard - 1)].get(
        mode="promise_in_bounds")

  def exact_chunk(q):
    values, local_ids = _shard_top_k(q, rows, num_real, local_k, bank_chunk, approx_recall)
    return merged(values, local_ids, sorted_top_k=True)

  def merged(values, local_ids, sorted_top_k=False):
    cand_labels = labels_of(local_ids)
    cand_ids = local_ids + offset
    if axis_name is not None:
      # (Q, D * width) candidates in shard order, i.e. in global index order.
      values, cand_ids, cand_labels = (
          lax.all_gather(x, axis_name, axis=1, tiled=True)
          for x in (values, cand_ids, cand_labels))
    elif sorted_top_k:                                         # already the top k, in order
      return Neighbors(scores=values, indices=cand_ids, labels=cand_labels)
    best, pos = lax.top_k(values, k)
    return Neighbors(scores=best, indices=jnp.take_along_axis(cand_ids, pos, axis=1),
                     labels=jnp.take_along_axis(cand_labels, pos, axis=1))

  # GPU and TPU have a fast `lax.top_k`; the threshold selection was measured on CPUs only.
  by_threshold = on_cpu and approx_recall is None and layout.rows_per_shard <= bank_chunk
  num_queries = queries.shape[0]
  # The threshold selection merges each chunk's candidates split over the shards: its chunks
  # are a multiple of D queries (padded with zero queries, whose results are dropped).
  query_chunk = round_up(max(1, min(query_chunk, num_queries)),
                         layout.num_shards if by_threshold else 1)
  num_chunks = -(-num_queries // query_chunk)
  chunks = jnp.pad(queries, ((0, num_chunks * query_chunk - num_queries), (0, 0)))
  chunks = chunks.reshape(num_chunks, query_chunk, queries.shape[1])
  if not by_threshold:
    out = lax.map(lambda q: exact_chunk(q.astype(jnp.float32)), chunks)
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[:num_queries], out)

  width = round_up(layout.rows_per_shard, BLOCK * SUPER_BLOCK)
  padded_rows = jnp.pad(rows, ((0, width - rows.shape[0]), (0, 0)))
  buffer = min(candidate_buffer(k, layout.num_shards), width)

  def one_chunk(q):
    q = q.astype(jnp.float32)
    values, local_ids, overflow = threshold_candidates(padded_rows @ q.T, num_real, k, buffer,
                                                       axis_name)
    candidates = (canonical(values), local_ids + offset, labels_of(local_ids))
    candidates, overflow = _candidates_of_my_queries(candidates, overflow, axis_name)
    # Rare (about 1.2 k candidates are expected over all shards, up to 2 k + 32 D fit): the
    # whole chunk is selected again by `lax.top_k`, on every shard alike, and its k best stand
    # in for the candidates.
    slots = candidates[0].shape[1]
    return lax.cond(overflow,
                    lambda: _as_candidates(_my_queries(exact_chunk(q), axis_name), slots),
                    lambda: candidates)

  # Every chunk's candidates of this shard's part of its queries, (chunks * Q / D, D * buffer),
  # are sorted together at the end: the network runs over many queries at once.
  values, ids, cand_labels = (x.reshape(-1, x.shape[-1]) for x in lax.map(one_chunk, chunks))
  best, pos = network_top_k(values, k)
  part = (num_chunks, query_chunk // layout.num_shards, k)

  def picked(x):
    return jnp.take_along_axis(x, pos, axis=1, mode="promise_in_bounds").reshape(part)

  out = Neighbors(scores=best.reshape(part), indices=picked(ids), labels=picked(cand_labels))
  # Each shard holds the neighbours of its part of every chunk, gathered once at the end.
  out = _gather_my_queries(out, axis_name)
  return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[:num_queries], out)


def weighted_vote(neighbors: Neighbors, *, num_classes: int, temperature: float) -> jax.Array:
  """Class scores w_c = sum over neighbours of exp(s_i / tau) * 1(c_i = c): (Q, num_classes).

  Labels outside [0, num_classes) (unlabelled rows: -1) do not vote. Each class sums its weights
  in neighbour order. On a CPU the weights are scatter-added into their classes: the one-hot
  product materialises a (Q, k, classes) block and took 3.7x as long (55 against 15 ms for
  10,000 queries x 200 neighbours, 10 classes, 2 devices); both give the same bits on XLA:CPU
  (every shape tried, 1-4,096 queries, k 1-500, 2-1,000 classes). Elsewhere the one-hot product
  runs as a matmul, and a scatter-add would be atomic (its order, hence the bits, would vary).
  """
  weights = jnp.exp(neighbors.scores / temperature)           # exp(-inf) = 0 for missing rows
  if jax.default_backend() == "cpu":
    labels = neighbors.labels
    labels = jnp.where((labels >= 0) & (labels < num_classes), labels, num_classes)  # dropped
    queries = jnp.arange(labels.shape[0])[:, None]
    scores = jnp.zeros((labels.shape[0], num_classes), jnp.float32)
    return scores.at[queries, labels].add(weights, mode="drop")
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
