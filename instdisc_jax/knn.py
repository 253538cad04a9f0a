"""Weighted k-nearest-neighbour classification over the sharded bank (paper Section 3.4).

A query f is compared with every real bank row by cosine similarity s_i = v_i^T f; its k nearest
neighbours N_k vote for their classes with weight alpha_i = exp(s_i / tau):

  w_c = sum_{i in N_k} alpha_i * 1(c_i = c),  prediction = argmax_c w_c   (top-5: the 5 largest).

Sharded: each device finds its candidates among its own rows (every row above a threshold shared
by the shards, or its top k; chunked over queries and bank rows, so a 1.28M x 128 bank with 50k
queries fits in memory), the candidates (similarity, global index, label) of all devices are
all-gathered and merged. Communication is O(Q * k * D), independent of n.

Ties are broken towards the lower global instance index everywhere (`lax.top_k` keeps the first
of equal values, and candidates are merged in global index order), so results do not depend on
the number of shards or the chunk sizes.

Selection. On a CPU, `lax.top_k` is a single-threaded partial sort, about 4 ns per entry plus
a cost per row that grows with k; over a (Q, n) block of similarities it cost as much as the
matmul that made them. On a CPU, when a shard fits in one bank chunk, the rows are therefore
selected by a threshold (`threshold_candidates`): block maxima give a value T that at least k
entries over all shards reach (found by bisection, the counts summed over shards), the entries
>= T (about 1.3 k for random unit vectors) are compacted in index order on each device,
all-gathered, and one `lax.top_k` over D * `candidate_buffer` entries picks the k best. Every
pass over the block is a vectorised reduction. A chunk whose candidates overflow a device's
buffer (rare; data with many equal similarities) is selected again exactly with `lax.top_k` per
shard and a merge, as are banks scored in several chunks and other backends (`top_k_of_prefix`:
two stages through group maxima once rows are long against k, see `MIN_GROUP`). On a CPU host
split into one device per core (as the trainer does), every device scores and selects its own
shard, so all cores work on the kNN.

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


# Threshold selection (`threshold_candidates`): entries per block, blocks per super-block, and
# bisection steps for the threshold.
BLOCK = 16
SUPER_BLOCK = 4
BISECTION_STEPS = 16
# Queries per chunk on a CPU. Measured side by side (2 devices, 30,000-row shards, k = 200,
# 2,048 queries, loaded 2-core machine): the threshold selection took 1.17 CPU s with chunks of
# 1,024, 0.96 with 256, 0.86 with 128, 0.81 with 64, 0.84 with 32 and 1.44 with 16.
CPU_QUERY_CHUNK = 64


def candidate_buffer(k: int, num_shards: int) -> int:
  """Candidates each device keeps for the threshold selection: 2 k / D + 32 slots (multiple of 8).

  The threshold leaves about 1.3 k candidates over all shards for random unit vectors (see
  `threshold_candidates`), 1.3 k / D of them on a device on average; a chunk whose candidates
  overflow any device's buffer is selected again exactly (`nearest_neighbors`).
  """
  return _round_up(2 * k // num_shards + 32, 8)


def _all(x, reduce, axis_name):
  return x if axis_name is None else reduce(x, axis_name)


def threshold_candidates(scores: jax.Array, num_valid: jax.Array, k: int, buffer: int,
                         axis_name: AxisName = None):
  """Every entry at least a threshold T <= the k-th largest over all shards, in position order.

  `scores` (n, Q) holds this shard's similarities with bank rows along axis 0 (n a multiple of
  BLOCK * SUPER_BLOCK); positions >= num_valid are padding. Without a per-row `lax.top_k` over
  n entries (XLA:CPU's is a single-threaded partial sort, about 4 ns per entry):

  1. Maxima of blocks of BLOCK rows, then of super-blocks of SUPER_BLOCK blocks: (n / 64, Q),
     reductions over a major axis, vectorised over the queries.
  2. T: the largest value found by bisection such that at least k super-blocks over all shards
     have their maximum >= T (counts summed with `psum`, so every shard gets the same T). Each
     such super-block holds a real entry >= T, so at least k entries are >= T: the k-th largest
     entry is >= T, and every entry of the top k, ties at the k-th place included, is >= T.
  3. The entries >= T are compacted, in position order, into `buffer` slots: prefix sums of
     the per-block counts, a binary search for the block of each slot, and a look-up within it.

  For random unit vectors (k = 200, one shard of 30,000 rows) 260 entries on average (at most
  289 over 1,024 queries) were >= T (measured). Selecting among the candidates with
  `lax.top_k` (in position order, so ties go to the lower position; -0.0 made +0.0 first) gives
  the same result as one `lax.top_k` over all entries. The values must not be NaN.

  Returns:
    (values, positions): (Q, buffer) each; -inf and position 0 in unused slots.
    overflow: bool scalar, whether some query has more than `buffer` candidates on this shard
      (its candidates are then incomplete).
  """
  n, q = scores.shape
  num_blocks = n // BLOCK
  assert num_blocks * BLOCK == n and num_blocks % SUPER_BLOCK == 0, (n, BLOCK, SUPER_BLOCK)
  blocks = scores.reshape(num_blocks, BLOCK, q)
  # Padding is masked in per-block results only: block `partial` holds the last real row and
  # padding after it, later blocks only padding. (A mask inside the (n, Q) reductions costs
  # XLA:CPU their vectorisation: 7x slower, measured.)
  partial = num_valid // BLOCK
  start = jnp.minimum(partial, num_blocks - 1) * BLOCK
  partial_scores = lax.dynamic_slice_in_dim(scores, start, BLOCK, axis=0)
  partial_valid = start + jnp.arange(BLOCK, dtype=jnp.int32)[:, None] < num_valid
  block_ids = jnp.arange(num_blocks, dtype=jnp.int32)[:, None]

  def per_block(full, masked_partial, fill):
    return jnp.where(block_ids < partial, full, jnp.where(block_ids == partial, masked_partial,
                                                          fill))

  block_max = per_block(jnp.max(blocks, axis=1),
                        jnp.max(jnp.where(partial_valid, partial_scores, _MASKED), axis=0),
                        _MASKED)
  super_max = jnp.max(block_max.reshape(-1, SUPER_BLOCK, q), axis=1)

  def enough(t):
    above = jnp.sum(super_max >= t, axis=0, dtype=jnp.int32)
    return _all(above, lax.psum, axis_name) >= k

  finite = super_max > _MASKED
  lo = -_all(jnp.max(jnp.where(finite, -super_max, -jnp.inf), axis=0), lax.pmax, axis_name)
  hi = _all(jnp.max(super_max, axis=0), lax.pmax, axis_name)
  # Fewer than k real super-blocks: every real entry is a candidate.
  lo = jnp.where(enough(lo), lo, _MASKED)

  def bisect(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) / 2
    ok = (lo > _MASKED) & enough(mid)
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  threshold, _ = lax.fori_loop(0, BISECTION_STEPS, bisect, (lo, hi))
  # Per block: the number of entries >= T and their bit mask (bit i: row i of the block).
  # Row by row over the block: elementwise ops on (blocks, Q) slices, which XLA:CPU vectorises
  # (a broadcast bit pattern inside a reduction over the block's axis is not).
  partial_hits = (partial_valid & (partial_scores >= threshold)).astype(jnp.int32)
  counts = masks = partial_counts = partial_masks = 0
  for i in range(BLOCK):
    hit = (blocks[:, i] >= threshold).astype(jnp.int32)
    counts, masks = counts + hit, masks | (hit << i)
    partial_counts, partial_masks = (partial_counts + partial_hits[i],
                                     partial_masks | (partial_hits[i] << i))
  counts = per_block(counts, partial_counts, 0)
  masks = per_block(masks, partial_masks, 0)
  # A work-efficient scan: XLA:CPU's cumsum over 1,876 blocks cost 6x as much (a reduce window).
  inclusive = lax.associative_scan(jnp.add, counts, axis=0)
  overflow = jnp.any(inclusive[-1] > buffer)
  # The look-ups below follow one query each: (Q, blocks), so that a query's blocks are
  # contiguous in memory. The barrier keeps XLA from fusing their producers into the gathers
  # below, which would recompute them per gathered element.
  inclusive, masks = lax.optimization_barrier((inclusive.T, masks.T))

  # Block of slot s: the first block whose inclusive count exceeds s (binary search).
  slots = jnp.arange(buffer, dtype=jnp.int32)[None, :]

  def search(_, bounds):
    lo, hi = bounds
    mid = (lo + hi) // 2
    right = jnp.take_along_axis(inclusive, jnp.minimum(mid, num_blocks - 1), axis=1) <= slots
    return jnp.where((lo < hi) & right, mid + 1, lo), jnp.where((lo < hi) & ~right, mid, hi)

  # A loop, not unrolled: XLA would fuse the steps and recompute the chain per use.
  first, _ = lax.fori_loop(0, max(1, math.ceil(math.log2(num_blocks + 1))), search,
                           (jnp.zeros((q, buffer), jnp.int32),
                            jnp.full((q, buffer), num_blocks, jnp.int32)))
  used = first < num_blocks
  block = jnp.minimum(first, num_blocks - 1)
  mask = jnp.take_along_axis(masks, block, axis=1)
  # This slot is the entry of rank r among its block's entries >= T: the r-th set bit.
  rank = slots - jnp.take_along_axis(inclusive, block, axis=1) + lax.population_count(mask)
  offset = jnp.zeros_like(block)
  for i in range(BLOCK):
    set_i = (mask >> i) & 1
    offset = jnp.where((rank == 0) & (set_i == 1), i, offset)
    rank = rank - set_i
  position = jnp.where(used, block * BLOCK + offset, 0)
  value = jnp.take_along_axis(scores, position.T, axis=0).T
  value = jnp.where(used, value, _MASKED)
  return value, position, overflow


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

  def exact_chunk(q):
    values, local_ids = _shard_top_k(q, rows, num_real, local_k, bank_chunk, approx_recall)
    return merged(values, local_ids, sorted_top_k=True)

  def merged(values, local_ids, sorted_top_k=False):
    # Ids past the real rows come only with -inf, which never reaches the final k (the shards'
    # real candidates number at least k); clipping keeps their label look-up in range.
    cand_labels = labels[jnp.minimum(local_ids, layout.rows_per_shard - 1)]
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
  if by_threshold:
    width = _round_up(layout.rows_per_shard, BLOCK * SUPER_BLOCK)
    padded_rows = jnp.pad(rows, ((0, width - rows.shape[0]), (0, 0)))
    buffer = min(candidate_buffer(k, layout.num_shards), width)

  def one_chunk(q):
    q = q.astype(jnp.float32)
    if not by_threshold:
      return exact_chunk(q)
    values, local_ids, overflow = threshold_candidates(padded_rows @ q.T, num_real, k, buffer,
                                                       axis_name)
    overflow = _all(overflow.astype(jnp.int32), lax.pmax, axis_name) > 0
    # Rare (about 1.3 k candidates are expected over all shards, up to 2 k + 32 D fit): the
    # whole chunk is selected again by `lax.top_k`, on every shard alike.
    return lax.cond(overflow, lambda: exact_chunk(q),
                    lambda: merged(_canonical(values), local_ids))

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
