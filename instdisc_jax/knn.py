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

Selection. On a CPU, `lax.top_k` is a single-threaded partial sort whose cost grows with the
row length; over a (Q, n) block of similarities it cost more than the matmul that made them.
Each block is therefore selected in two exact stages (`top_k_of_prefix`): the row is cut into
groups of g consecutive entries, the k groups with the largest maxima are kept, and `lax.top_k`
runs on their k * g entries. Only n / g + k * g entries are sorted, about 2 * sqrt(n * k) for
g = sqrt(n / k) (6,900 instead of 60,000 for n = 60,000 and k = 200); the group maxima are one
vectorised pass. The result is that of `lax.top_k` on the whole row, ties included (the proof
is in `top_k_of_prefix`). Rows of fewer than about 240 k entries keep one `lax.top_k`
(`MIN_GROUP`). On a CPU host split into one device per core (as the trainer does), every device
scores and selects its own shard, so all cores work on the kNN.

`approx_recall` switches the per-chunk selection to `lax.approx_max_k`, which is only faster on
TPU (on CPU and GPU it is an exact top-k under another name).
"""

from __future__ import annotations

import math
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


# Smallest group length worth two stages. Measured on a 2-core CPU (k = 200, 10,000 queries, side
# by side with one `lax.top_k`): groups of 16 over 60,000 rows took 6 % less CPU time for the
# whole kNN; groups of 12 over 30,000 rows (a 2-device shard) took 7 % more.
MIN_GROUP = 16


def group_size(n: int, k: int) -> int:
  """The group length g of the two-stage selection over rows of n entries: about sqrt(n / k).

  The two stages sort n / g + k * g entries, fewest at g = sqrt(n / k); the sum is flat near
  there, so a divisor of n within a third of it is preferred (rows of n entries then need no
  padding rows, and the similarity matmul keeps the shard's shape). Returns 1 (one stage, plain
  `lax.top_k`) below g = MIN_GROUP: `lax.top_k`'s cost per row grows with k as well as with n,
  so two stages only pay once n is large against k.
  """
  best = math.sqrt(n / k) if k > 0 else 1.0
  if round(best) < MIN_GROUP:
    return 1
  divisors = [g for g in range(max(MIN_GROUP, math.ceil(0.75 * best)),
                               math.floor(1.34 * best) + 1) if n % g == 0]
  return min(divisors, key=lambda g: abs(g - best)) if divisors else int(round(best))


def _canonical(x: jax.Array) -> jax.Array:
  """-0.0 -> +0.0, so that `max` and `lax.top_k` agree on one total order of the values."""
  return jnp.where(x == 0, jnp.zeros_like(x), x)


def top_k_of_prefix(values: jax.Array, num_valid: jax.Array, k: int, group: int = 1):
  """`lax.top_k` of each row of `values` (Q, n) restricted to its first `num_valid` entries.

  Entries at positions >= num_valid count as -inf, and -0.0 counts as +0.0. With `group` g > 1
  (n a multiple of g, n / g >= k) the selection takes two exact stages:

  1. The row is cut into G = n / g groups of g consecutive entries, and the k groups with the
     largest maxima are kept (`lax.top_k` of the (Q, G) maxima).
  2. `lax.top_k` of the k * g entries of the kept groups, laid out in increasing position.

  Why this is exact, ties included (`lax.top_k` ranks larger values first and equal values by
  lower position). Let x be an entry of a group h that stage 1 dropped. Each of the k kept groups
  j has max_j >= max_h >= x, and max_j = max_h only if j < h (stage 1 prefers the lower group on
  ties), so each kept group holds an entry ranked before x. With k entries ranked before it, x
  is not in the top k. Stage 2 sees the kept groups in position order, so it breaks ties as one
  `lax.top_k` over the whole row would. The argument needs a total order that `max` respects,
  hence -0.0 -> +0.0; the values must not be NaN.

  On a CPU, `lax.top_k` is a single-threaded partial sort whose cost grows with the row length
  (and with k log k), so stage 1 and 2 together cost less than one `lax.top_k` of the row once
  n is large against k; the group maxima are one vectorised, read-only pass. Positions past
  num_valid (padding rows of the shard) are masked in the (Q, G) maxima and the (Q, k * g)
  candidates only, so no (Q, n)-sized masked copy is written.

  Args:
    values: (Q, n) float32.
    num_valid: int32 scalar (may be traced), 0 <= num_valid <= n.
    k: entries to return, k <= n.
    group: g; 1 selects with one `lax.top_k`.

  Returns:
    (values, positions), each (Q, k), best first.
  """
  num_rows, n = values.shape
  positions = jnp.arange(n, dtype=jnp.int32)
  if group <= 1:
    return lax.top_k(jnp.where(positions < num_valid, _canonical(values), _MASKED), k)
  num_groups = n // group
  assert num_groups * group == n and num_groups >= k, (n, group, k)
  grouped = values.reshape(num_rows, num_groups, group)
  maxima = jnp.max(grouped, axis=-1)
  # Group `partial` holds the last valid entry and padding after it; groups after it are padding.
  partial = num_valid // group
  start = jnp.minimum(partial, num_groups - 1) * group
  partial_max = jnp.max(jnp.where(start + positions[:group] < num_valid,
                                  lax.dynamic_slice_in_dim(values, start, group, axis=1),
                                  _MASKED), axis=-1)
  group_ids = positions[:num_groups]
  maxima = jnp.where(group_ids < partial, maxima,
                     jnp.where(group_ids == partial, partial_max[:, None], _MASKED))
  _, kept = lax.top_k(_canonical(maxima), k)
  kept = jnp.sort(kept, axis=-1)                               # position order, for the ties
  candidates = jnp.take_along_axis(grouped, kept[:, :, None], axis=1).reshape(num_rows, -1)
  candidate_pos = (kept[:, :, None] * group + positions[:group]).reshape(num_rows, -1)
  best, pos = lax.top_k(jnp.where(candidate_pos < num_valid, _canonical(candidates), _MASKED), k)
  return best, jnp.take_along_axis(candidate_pos, pos, axis=1)


def _select(values, num_valid, k, group, approx_recall):
  if approx_recall is None:
    return top_k_of_prefix(values, num_valid, k, group)
  masked = jnp.where(jnp.arange(values.shape[-1]) < num_valid, values, _MASKED)
  return lax.approx_max_k(masked, k, recall_target=approx_recall)


def _merge(values_a, ids_a, values_b, ids_b, k):
  """Top k of two candidate lists; a's candidates win ties (they have the lower indices)."""
  values = jnp.concatenate([values_a, values_b], axis=-1)
  ids = jnp.concatenate([ids_a, ids_b], axis=-1)
  best, pos = lax.top_k(values, k)
  return best, jnp.take_along_axis(ids, pos, axis=-1)


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


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
    width = _round_up(width, group)
    rows = jnp.pad(rows, ((0, width - num_rows), (0, 0)))
    return _select(queries @ rows.T, num_real, k, group, approx_recall)

  chunk_k = min(k, bank_chunk)
  group = group_size(bank_chunk, chunk_k)
  width = _round_up(bank_chunk, group)
  num_chunks = -(-num_rows // width)
  rows = jnp.pad(rows, ((0, num_chunks * width - num_rows), (0, 0)))
  rows = rows.reshape(num_chunks, width, -1)

  def step(carry, chunk):
    best, best_ids = carry
    chunk_rows, offset = chunk
    values, ids = _select(queries @ chunk_rows.T, jnp.clip(num_real - offset, 0, width),
                          chunk_k, group, approx_recall)
    return _merge(best, best_ids, values, ids + offset, k), None

  init = (jnp.full((queries.shape[0], k), _MASKED, jnp.float32),
          jnp.zeros((queries.shape[0], k), jnp.int32))
  offsets = jnp.arange(num_chunks, dtype=jnp.int32) * width
  (best, best_ids), _ = lax.scan(step, init, (rows, offsets))
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
    bank_chunk: bank rows scored at once (a running top-k is kept across chunks; rounded up to
      a multiple of the selection's group size).
    approx_recall: use `lax.approx_max_k` with this recall target (TPU only pays off).
  """
  layout = ShardLayout(num_instances, sharding.num_shards(axis_name))
  k = min(k, num_instances)
  rows = rows.astype(jnp.float32)
  num_real = sharding.local_real_rows(layout, axis_name)
  offset = sharding.shard_index(axis_name) * layout.rows_per_shard
  local_k = min(k, layout.rows_per_shard)

  def one_chunk(q):
    values, local_ids = _shard_top_k(q.astype(jnp.float32), rows, num_real, local_k,
                                     bank_chunk, approx_recall)
    # Ids past the real rows come only with -inf, which never reaches the final k (the shards'
    # real candidates number at least k); clipping keeps their label look-up in range.
    cand_labels = labels[jnp.minimum(local_ids, layout.rows_per_shard - 1)]
    cand_ids = local_ids + offset
    if axis_name is None:                                      # already the sorted top k
      return Neighbors(scores=values, indices=cand_ids, labels=cand_labels)
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
