"""Exact top-k selection for the kNN (`knn.nearest_neighbors`): per shard and chunk of queries.

Two ways to pick each query's k largest similarities of a (Q, n) block, both exact and both
breaking ties towards the lower global instance index:

* `threshold_candidates` (CPU, a shard in one bank chunk): block maxima give a value T that at
  least k entries over all shards reach (bisection, counts summed over shards); the entries >= T
  are compacted in index order on each device, all-gathered, and one `lax.top_k` picks the k
  best. A chunk whose candidates overflow a device's buffer falls back to the other way.
* `top_k_of_prefix`: `lax.top_k` per shard (two stages through group maxima once rows are long
  against k, `MIN_GROUP`), then a merge (`merge_top_k`).

See `knn`'s docstring for why (XLA:CPU's TopK is single-threaded and costs as much as the
matmul) and docs/benchmarks.md for the measurements.
"""

from __future__ import annotations

import math

import jax
from jax import lax
import jax.numpy as jnp

from instdisc_jax.sharding import AxisName
from instdisc_jax.sharding import num_shards

_MASKED = -jnp.inf


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


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


def canonical(x: jax.Array) -> jax.Array:
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
    return lax.top_k(jnp.where(positions < num_valid, canonical(values), _MASKED), k)
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
  _, kept = lax.top_k(canonical(maxima), k)
  kept = jnp.sort(kept, axis=-1)                               # position order, for the ties
  candidates = jnp.take_along_axis(grouped, kept[:, :, None], axis=1).reshape(num_rows, -1)
  candidate_pos = (kept[:, :, None] * group + positions[:group]).reshape(num_rows, -1)
  best, pos = lax.top_k(jnp.where(candidate_pos < num_valid, canonical(candidates), _MASKED), k)
  return best, jnp.take_along_axis(candidate_pos, pos, axis=1)


# Threshold selection (`threshold_candidates`): entries per block, blocks per super-block, and
# bisection steps for the threshold.
BLOCK = 16
SUPER_BLOCK = 4
LOCAL_BISECTION_STEPS = 12
THRESHOLD_EDGES = 16
# The bracket's low end as T, unrefined, up to this many shards: one collective fewer per chunk
# of queries. Measured (random unit vectors, n = 60,000, k = 200, 256 queries): candidates over
# all shards 225 refined and 236 unrefined on 2 shards, 227 and 258 on 4, 228 and 287 on 8; the
# 2-shard kNN took 5 % less time unrefined (side by side with faiss, 10,000 queries).
REFINE_ABOVE_SHARDS = 2
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
  return round_up(2 * k // num_shards + 32, 8)


def reduce_over_shards(x, reduce, axis_name):
  return x if axis_name is None else reduce(x, axis_name)


def _value_reached_by(maxima: jax.Array, quota: int) -> jax.Array:
  """Per column of `maxima` (m, Q): a value that at least `quota` of its entries reach, by
  LOCAL_BISECTION_STEPS of bisection between its lowest and highest finite entries (no
  collective); -inf where fewer than `quota` entries are finite."""
  finite = maxima > _MASKED
  lo = -jnp.max(jnp.where(finite, -maxima, -jnp.inf), axis=0)
  hi = jnp.max(maxima, axis=0)
  enough = jnp.sum(finite, axis=0, dtype=jnp.int32) >= quota

  def bisect(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) / 2
    ok = jnp.sum(maxima >= mid, axis=0, dtype=jnp.int32) >= quota
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = lax.fori_loop(0, LOCAL_BISECTION_STEPS, bisect,
                        (jnp.where(enough, lo, 0.0), jnp.where(enough, hi, 0.0)))
  return jnp.where(enough, lo, _MASKED)


def _refined(super_max: jax.Array, lo: jax.Array, hi: jax.Array, k: int, axis_name: AxisName):
  """The largest of THRESHOLD_EDGES thresholds evenly spaced from lo (inclusive) to hi that at
  least k super-block maxima over all shards reach (lo does): counts summed over the shards in
  one collective; they do not grow with the threshold, so those reaching k are a prefix."""
  fractions = jnp.arange(THRESHOLD_EDGES, dtype=jnp.float32)[:, None] / THRESHOLD_EDGES
  edges = lo + (hi - lo) * fractions                                   # (E, Q); edges[0] = lo
  # One reduction per edge, over the super-blocks: what XLA:CPU vectorises (one over an
  # (E, n / 64, Q) comparison was 10x slower, measured).
  above = jnp.stack([jnp.sum(super_max >= edges[e], axis=0, dtype=jnp.int32)
                     for e in range(THRESHOLD_EDGES)])
  reached = jnp.sum(reduce_over_shards(above, lax.psum, axis_name) >= k, axis=0)
  return jnp.take_along_axis(edges, jnp.maximum(reached - 1, 0)[None], axis=0)[0]


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

  # A bracket of T: each shard's value t_s that at least ceil(k / D) of its own super-block
  # maxima reach (a local bisection). Every shard has that many >= min_s t_s, so at least k
  # reach it; and the k-th largest over all shards is <= max_s t_s (were it larger, every shard
  # would have fewer than k / D maxima reaching it). Both in one collective.
  quota = -(-k // num_shards(axis_name))
  local = _value_reached_by(super_max, quota)
  neg_lo, hi = reduce_over_shards(jnp.stack([-local, local]), lax.pmax, axis_name)
  found = neg_lo < -_MASKED                       # every shard has quota real super-blocks
  lo, hi = jnp.where(found, -neg_lo, 0.0), jnp.where(found, hi, 0.0)
  if num_shards(axis_name) > REFINE_ABOVE_SHARDS:
    lo = _refined(super_max, lo, hi, k, axis_name)
  # A shard with fewer than k / D real super-blocks: every real entry is a candidate.
  threshold = jnp.where(found, lo, _MASKED)
  # Per block: the bit mask of its entries >= T (bit i: row i of the block), and their number.
  # A reduction over the block's rows (the bits are distinct, so their sum is their OR): XLA
  # materialises it once. Elementwise ops are fused into their consumers instead, and the masks
  # were then recomputed from the scores by each of them (the prefix sum's levels, the look-ups).
  bits = (1 << jnp.arange(BLOCK, dtype=jnp.int32))[:, None]
  masks = jnp.sum(jnp.where(blocks >= threshold, bits, 0), axis=1)
  partial_masks = jnp.sum(jnp.where(partial_valid & (partial_scores >= threshold), bits, 0), axis=0)
  masks = per_block(masks, partial_masks, 0)
  counts = lax.population_count(masks)
  # A work-efficient scan: XLA:CPU's cumsum over 1,876 blocks cost 6x as much (a reduce window).
  inclusive = lax.associative_scan(jnp.add, counts, axis=0)
  overflow = jnp.any(inclusive[-1] > buffer)
  # The look-ups below stay in the (blocks, Q) layout (slots are (buffer, Q)): the per-block
  # arrays are small enough to stay in cache, and transposing them cost more than it saved.
  # Block of slot s: the first block whose inclusive count exceeds s, i.e. the number of blocks
  # whose inclusive count is <= s (a branchless binary search: steps of 2^j, largest first).
  slots = jnp.arange(buffer, dtype=jnp.int32)[:, None]
  num_steps = max(1, num_blocks.bit_length())

  def search(i, first):
    step = jnp.left_shift(1, num_steps - 1 - i)
    probe = first + step
    below = jnp.take_along_axis(inclusive, jnp.minimum(probe, num_blocks) - 1, axis=0) <= slots
    return jnp.where((probe <= num_blocks) & below, probe, first)

  # A loop, not unrolled: XLA would fuse the steps and recompute the chain per use.
  first = lax.fori_loop(0, num_steps, search, jnp.zeros((buffer, q), jnp.int32))
  used = first < num_blocks
  block = jnp.minimum(first, num_blocks - 1)
  mask = jnp.take_along_axis(masks, block, axis=0)
  # This slot is the entry of rank r among its block's entries >= T: the r-th set bit.
  rank = slots - jnp.take_along_axis(inclusive, block, axis=0) + lax.population_count(mask)
  # Its offset by halving: with c set bits in the lower half, the entry lies in the upper half
  # (offset + half, rank - c) if rank >= c; log2(BLOCK) steps. A loop, whose results XLA
  # materialises: fused, the steps were recomputed by each of the position's consumers below.
  def halve(step, carry):
    offset, rank, mask = carry
    half = (BLOCK // 2) >> step
    lower = lax.population_count(mask & ((1 << half) - 1))
    upper = rank >= lower
    return (jnp.where(upper, offset + half, offset), jnp.where(upper, rank - lower, rank),
            jnp.where(upper, mask >> half, mask))

  offset, _, _ = lax.fori_loop(0, BLOCK.bit_length() - 1, halve,
                               (jnp.zeros_like(block), rank, mask))
  position = jnp.where(used, block * BLOCK + offset, 0)
  value = jnp.where(used, jnp.take_along_axis(scores, position, axis=0), _MASKED)
  return value.T, position.T, overflow


def select(values, num_valid, k, group, approx_recall):
  if approx_recall is None:
    return top_k_of_prefix(values, num_valid, k, group)
  masked = jnp.where(jnp.arange(values.shape[-1]) < num_valid, values, _MASKED)
  return lax.approx_max_k(masked, k, recall_target=approx_recall)


def merge_top_k(values_a, ids_a, values_b, ids_b, k):
  """Top k of two candidate lists; a's candidates win ties (they have the lower indices)."""
  values = jnp.concatenate([values_a, values_b], axis=-1)
  ids = jnp.concatenate([ids_a, ids_b], axis=-1)
  best, pos = lax.top_k(values, k)
  return best, jnp.take_along_axis(ids, pos, axis=-1)
