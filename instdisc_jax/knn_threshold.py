"""Exact top-k candidates by a threshold, for the kNN on a CPU (`knn.nearest_neighbors`).

One chunk of Q queries against this shard's n bank rows: `scores` (n, Q), rows along axis 0 (n
a multiple of BLOCK * SUPER_BLOCK), positions >= num_valid padding. XLA:CPU's `lax.top_k` is a
single-threaded partial sort (about 4 ns per entry, and a cost per row that grows with k), as
costly as the matmul over a (Q, n) block; here every pass over the block is a vectorised
reduction instead:

1. `super_block_maxima`: maxima of blocks of BLOCK rows, then of super-blocks of SUPER_BLOCK
   blocks, (n / 64, Q): reductions over a major axis, vectorised over the queries.
2. The threshold T, one value per query shared by all shards, such that at least k super-block
   maxima over all shards reach it. Each such super-block holds a real entry >= T, so at least
   k entries are >= T: the k-th largest entry is >= T, and every entry of the top k, ties at the
   k-th place included, is >= T.
   * `local_bound`: each shard's t_s, which at least ceil(k / D) of its own super-block maxima
     reach (bisection, no collective). Every shard has that many maxima >= min_s t_s, so at
     least k reach it: T = min_s t_s is valid. And the k-th largest maximum over all shards is
     <= max_s t_s (were it larger, every shard would have fewer than k / D maxima reaching it):
     [min_s t_s, max_s t_s] brackets the tightest T. `threshold_from_bounds` takes min and max.
   * `refined` (on more than REFINE_ABOVE_SHARDS shards, where min_s t_s leaves more candidates):
     the largest of THRESHOLD_EDGES thresholds spaced over the bracket that k maxima over all
     shards reach (counts summed over the shards).
3. `candidates_above`: the entries >= T, compacted in position order into `buffer` slots: one
   pass over the scores for each block's bit mask of entries >= T, prefix sums of their counts,
   a binary search for each slot's block and a bit selection within it.

Selecting among all shards' candidates with `lax.top_k` (in global index order, so ties go to
the lower index; -0.0 made +0.0 first) gives the same result as one `lax.top_k` over all
entries. The values must not be NaN. For random unit vectors (n = 60,000, k = 200, 256 queries)
225 entries on average were >= T over 1, 4 or 8 shards, 236 over 2 (unrefined; measured).

`threshold_candidates` runs the three steps: one collective (the shards' bounds), two on more
than REFINE_ABOVE_SHARDS shards. (Carrying a chunk's bounds in the exchange of the previous
chunk's candidates, one collective in all, was measured no faster: 826 against 806 ms.)
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp

from instdisc_jax.knn_select import round_up
from instdisc_jax.sharding import AxisName
from instdisc_jax.sharding import num_shards

_MASKED = -jnp.inf

# Entries per block (a block's hits are the bits of a uint32 mask), blocks per super-block. The
# super-blocks (64 entries) set the threshold; blocks of 32 rather than 16 halve the per-block
# work of the compaction (a binary search step fewer) for the same candidates: the kNN took 718
# against 735 ms side by side (2 devices, 30,000-row shards, k = 200, 10,000 queries).
BLOCK = 32
SUPER_BLOCK = 2
# Bisection steps of a shard's bound (a bracket 2^-12 of its maxima's range wide).
LOCAL_BISECTION_STEPS = 12
THRESHOLD_EDGES = 16
# The bracket's low end as T, unrefined, up to this many shards: one collective fewer per chunk
# of queries. Measured (random unit vectors, n = 60,000, k = 200, 256 queries): candidates over
# all shards 225 refined and 236 unrefined on 2 shards, 227 and 258 on 4, 228 and 287 on 8; the
# 2-shard kNN took 5 % less time unrefined (side by side with faiss, 10,000 queries).
REFINE_ABOVE_SHARDS = 2
# Queries per chunk on a CPU. Measured side by side (2 devices, 30,000-row shards, k = 200,
# 10,000 queries): chunks of 64 took 1,033 ms, of 32 1,034 ms, of 128 1,129 ms (faiss 987 ms).
CPU_QUERY_CHUNK = 64


def candidate_buffer(k: int, num_shards: int) -> int:
  """Candidates each device keeps: 2 k / D + 32 slots (a multiple of 8).

  About 1.1-1.2 k candidates are >= T over all shards for random unit vectors (see the module
  doc), 1.2 k / D on a device on average; a chunk whose candidates overflow any device's buffer
  is selected again exactly (`knn.nearest_neighbors`).
  """
  return round_up(2 * k // num_shards + 32, 8)


def reduce_over_shards(x, reduce, axis_name):
  return x if axis_name is None else reduce(x, axis_name)


class _Blocks:
  """`scores` (n, Q) as (n / BLOCK, BLOCK, Q) blocks, and the block holding the last real row.

  Padding is masked in per-block results only: block `partial` holds the last real row and
  padding after it, later blocks only padding. (A mask inside the (n, Q) reductions costs
  XLA:CPU their vectorisation: 7x slower, measured.)
  """

  def __init__(self, scores: jax.Array, num_valid: jax.Array):
    n, q = scores.shape
    self.num_blocks = n // BLOCK
    assert self.num_blocks * BLOCK == n and self.num_blocks % SUPER_BLOCK == 0, (n, q)
    self.blocks = scores.reshape(self.num_blocks, BLOCK, q)
    self.partial = num_valid // BLOCK
    start = jnp.minimum(self.partial, self.num_blocks - 1) * BLOCK
    self.partial_scores = lax.dynamic_slice_in_dim(scores, start, BLOCK, axis=0)
    self.partial_valid = start + jnp.arange(BLOCK, dtype=jnp.int32)[:, None] < num_valid

  def per_block(self, full, masked_partial, fill):
    """(blocks, Q): `full` before the partial block, `masked_partial` at it, `fill` after."""
    ids = jnp.arange(self.num_blocks, dtype=jnp.int32)[:, None]
    return jnp.where(ids < self.partial, full,
                     jnp.where(ids == self.partial, masked_partial, fill))


def super_block_maxima(scores: jax.Array, num_valid: jax.Array) -> jax.Array:
  """(n / (BLOCK * SUPER_BLOCK), Q) maxima of the super-blocks' real entries (-inf: none)."""
  b = _Blocks(scores, num_valid)
  block_max = b.per_block(jnp.max(b.blocks, axis=1),
                          jnp.max(jnp.where(b.partial_valid, b.partial_scores, _MASKED), axis=0),
                          _MASKED)
  return jnp.max(block_max.reshape(-1, SUPER_BLOCK, scores.shape[1]), axis=1)


def local_bound(super_max: jax.Array, k: int, shards: int) -> jax.Array:
  """(Q,) t_s: a value that at least ceil(k / shards) of this shard's super-block maxima reach,
  by LOCAL_BISECTION_STEPS of bisection between their lowest and highest finite values; -inf
  where fewer than that many are finite. No collective."""
  quota = -(-k // shards)
  finite = super_max > _MASKED
  lo = -jnp.max(jnp.where(finite, -super_max, -jnp.inf), axis=0)
  hi = jnp.max(super_max, axis=0)
  enough = jnp.sum(finite, axis=0, dtype=jnp.int32) >= quota

  def bisect(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) / 2
    ok = jnp.sum(super_max >= mid, axis=0, dtype=jnp.int32) >= quota
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = lax.fori_loop(0, LOCAL_BISECTION_STEPS, bisect,
                        (jnp.where(enough, lo, 0.0), jnp.where(enough, hi, 0.0)))
  return jnp.where(enough, lo, _MASKED)


def refined(super_max: jax.Array, lo: jax.Array, hi: jax.Array, k: int,
            axis_name: AxisName) -> jax.Array:
  """The largest of THRESHOLD_EDGES thresholds evenly spaced from lo (inclusive, which k maxima
  over all shards reach) to hi that k maxima reach: counts summed over the shards in one
  collective; they do not grow with the threshold, so those reaching k are a prefix."""
  fractions = jnp.arange(THRESHOLD_EDGES, dtype=jnp.float32)[:, None] / THRESHOLD_EDGES
  edges = lo + (hi - lo) * fractions                                   # (E, Q); edges[0] = lo
  # One reduction per edge, over the super-blocks: what XLA:CPU vectorises (one over an
  # (E, n / 64, Q) comparison was 10x slower, measured).
  above = jnp.stack([jnp.sum(super_max >= edges[e], axis=0, dtype=jnp.int32)
                     for e in range(THRESHOLD_EDGES)])
  reached = jnp.sum(reduce_over_shards(above, lax.psum, axis_name) >= k, axis=0)
  return jnp.take_along_axis(edges, jnp.maximum(reached - 1, 0)[None], axis=0)[0]


def threshold_from_bounds(bounds: jax.Array, super_max: jax.Array, k: int,
                          axis_name: AxisName) -> jax.Array:
  """T (Q,) from every shard's `local_bound`, (D, Q): -inf when a shard has fewer than k / D
  real super-blocks (every real entry is then a candidate)."""
  found = jnp.all(bounds > _MASKED, axis=0)
  lo = jnp.where(found, jnp.min(bounds, axis=0), 0.0)
  hi = jnp.where(found, jnp.max(bounds, axis=0), 0.0)
  if num_shards(axis_name) > REFINE_ABOVE_SHARDS:
    lo = refined(super_max, lo, hi, k, axis_name)
  return jnp.where(found, lo, _MASKED)


def _bit_count(masks: jax.Array) -> jax.Array:
  return lax.population_count(masks).astype(jnp.int32)


def _at(x: jax.Array, rows: jax.Array) -> jax.Array:
  """x[rows[i, q], q]: look-ups whose rows are in range by construction (no clamping)."""
  return jnp.take_along_axis(x, rows, axis=0, mode="promise_in_bounds")


def candidates_above(scores: jax.Array, num_valid: jax.Array, threshold: jax.Array,
                     buffer: int):
  """Every real entry >= threshold (Q,), in position order.

  Returns:
    (values, positions): (Q, buffer) each; -inf and position 0 in unused slots.
    overflow: bool scalar, whether some query has more than `buffer` of them on this shard (its
      candidates are then incomplete).
  """
  b = _Blocks(scores, num_valid)
  num_blocks = b.num_blocks
  # Per block: the bit mask of its entries >= T (bit i: row i of the block), and their number.
  # A reduction over the block's rows (the bits are distinct, so their sum is their OR): XLA
  # materialises it once. Elementwise ops are fused into their consumers instead, and the masks
  # were then recomputed from the scores by each of them (the prefix sum's levels, the look-ups).
  none = jnp.uint32(0)
  bits = (jnp.uint32(1) << jnp.arange(BLOCK, dtype=jnp.uint32))[:, None]
  masks = jnp.sum(jnp.where(b.blocks >= threshold, bits, none), axis=1, dtype=jnp.uint32)
  partial_hits = b.partial_valid & (b.partial_scores >= threshold)
  partial_masks = jnp.sum(jnp.where(partial_hits, bits, none), axis=0, dtype=jnp.uint32)
  masks = b.per_block(masks, partial_masks, none)
  # A work-efficient scan: XLA:CPU's cumsum over 1,876 blocks of 16 cost 6x as much (a reduce
  # window).
  inclusive = lax.associative_scan(jnp.add, _bit_count(masks), axis=0)
  overflow = jnp.any(inclusive[-1] > buffer)
  # The look-ups below stay in the (blocks, Q) layout (slots are (buffer, Q)): the per-block
  # arrays are small enough to stay in cache, and transposing them cost more than it saved.
  # Block of slot s: the first block whose inclusive count exceeds s, i.e. the number of blocks
  # whose inclusive count is <= s (a branchless binary search: steps of 2^j, largest first).
  slots = jnp.arange(buffer, dtype=jnp.int32)[:, None]
  num_steps = max(1, num_blocks.bit_length())

  def search(i, first):
    probe = first + jnp.left_shift(1, num_steps - 1 - i)
    below = _at(inclusive, jnp.minimum(probe, num_blocks) - 1) <= slots
    return jnp.where((probe <= num_blocks) & below, probe, first)

  # A loop, not unrolled: XLA would fuse the steps and recompute the chain per use.
  first = lax.fori_loop(0, num_steps, search, jnp.zeros((buffer, scores.shape[1]), jnp.int32))
  used = first < num_blocks
  block = jnp.minimum(first, num_blocks - 1)
  mask = _at(masks, block)
  # This slot is the entry of rank r among its block's entries >= T: the r-th set bit.
  rank = slots - _at(inclusive, block) + _bit_count(mask)

  # Its offset by halving: with c set bits in the lower half, the entry lies in the upper half
  # (offset + half, rank - c) if rank >= c; log2(BLOCK) steps. A loop, whose results XLA
  # materialises: fused, the steps were recomputed by each of the position's consumers below.
  def halve(step, carry):
    offset, rank, mask = carry
    half = (BLOCK // 2) >> step
    lower = _bit_count(mask & jnp.uint32((1 << half) - 1))
    upper = rank >= lower
    return (jnp.where(upper, offset + half, offset), jnp.where(upper, rank - lower, rank),
            jnp.where(upper, mask >> half, mask))

  offset, _, _ = lax.fori_loop(0, BLOCK.bit_length() - 1, halve,
                               (jnp.zeros_like(block), rank, mask))
  position = jnp.where(used, block * BLOCK + offset, 0)
  value = jnp.where(used, _at(scores, position), _MASKED)
  return value.T, position.T, overflow


def threshold_candidates(scores: jax.Array, num_valid: jax.Array, k: int, buffer: int,
                         axis_name: AxisName = None):
  """Every real entry >= T of this shard, T <= the k-th largest over all shards (the module
  doc's steps 1-3; the shards' bounds in one collective). See `candidates_above` for what it
  returns."""
  super_max = super_block_maxima(scores, num_valid)
  bound = local_bound(super_max, k, num_shards(axis_name))
  bounds = bound[None] if axis_name is None else lax.all_gather(bound, axis_name)
  threshold = threshold_from_bounds(bounds, super_max, k, axis_name)
  return candidates_above(scores, num_valid, threshold, buffer)
