"""Exact top-k selection for the kNN (`knn.nearest_neighbors`): per shard and chunk of queries.

Two ways to pick each query's k largest similarities of a (Q, n) block, both exact and both
breaking ties towards the lower global instance index:

* by a threshold (CPU, a shard in one bank chunk): knn_threshold.py. A chunk whose candidates
  overflow a device's buffer falls back to the other way.
* `top_k_of_prefix`: `lax.top_k` per shard (two stages through group maxima once rows are long
  against k, `MIN_GROUP`), then a merge (`merge_top_k`).

The threshold selection's candidates from all shards are then sorted by `network_top_k`, a
sorting network vectorised over the queries, in place of XLA:CPU's scalar `lax.top_k`.

See `knn`'s docstring for why (XLA:CPU's TopK is single-threaded and costs as much as the
matmul) and docs/benchmarks.md for the measurements.
"""

from __future__ import annotations

import math

import jax
from jax import lax
import jax.numpy as jnp

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


# Queries sorted together by `network_top_k`: the (padded candidates, queries) block of each
# compare-exchange stage stays in cache. Measured on a 2-core CPU (5,120 queries per device, 464
# candidates, k = 200, 2 devices): 46 ms with 64 queries, 57 ms with 128, 63 ms with 256;
# `lax.top_k` 78-82 ms.
NETWORK_BATCH = 64


def network_top_k(values: jax.Array, k: int, batch: int = NETWORK_BATCH):
  """`lax.top_k` of each row of `values` (Q, C), by a bitonic sorting network.

  The same result as `lax.top_k` (larger values first, equal values by lower position) for
  values without NaN and without -0.0 (see `canonical`). XLA:CPU's `lax.top_k` is a scalar
  partial sort per row (a heap: about 15 us per row of 464 with k = 200); the network's
  compare-exchange stages are elementwise ops over `batch` queries at a time (log2(P) (log2(P) +
  1) / 2 stages over the rows padded to P, a power of two; the last ones over fewer rows).

  Returns:
    (values, positions), each (Q, k), best first.
  """
  num_rows, width = values.shape
  assert k <= width, (k, width)
  batch = max(1, min(batch, num_rows))
  num_batches = -(-num_rows // batch)
  padded = jnp.pad(values, ((0, num_batches * batch - num_rows), (0, 0)))

  def sort_batch(block):                                        # (batch, C) -> (batch, k) each
    best, positions = _bitonic_sort(block.T, k)
    return best.T, positions.T

  best, positions = lax.map(sort_batch, padded.reshape(num_batches, batch, width))
  return best.reshape(-1, k)[:num_rows], positions.reshape(-1, k)[:num_rows]


def _bitonic_sort(values: jax.Array, keep: int):
  """The `keep` best of each column of `values` (C, B), sorted best first (larger value, then
  lower position): (values, positions), (keep, B) each.

  The columns are padded to P, a power of two, with -inf after the last position. Stage (s, j)
  of the network compares the entries j apart within blocks of 2 j, keeping the better first in
  blocks of s entries whose index is even (descending runs) and the worse first in the others;
  after the stages of s = P the column is descending. There each stage splits a bitonic run in
  two, every entry of the first half at least as good as every entry of the second, so the
  second half is dropped once `keep` entries fit in the first. Each stage is one elementwise
  pass over the (P, B) block (as (P / 2j, 2, j, B): the a and b halves), vectorised over the B
  queries; (value, position) pairs compare lexicographically, so ties keep the lower position
  first, as `lax.top_k`'s.
  """
  width, columns = values.shape
  size = 1 << max(0, (width - 1).bit_length())
  values = jnp.pad(values, ((0, size - width), (0, 0)), constant_values=_MASKED)
  positions = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32)[:, None], (size, columns))
  span = 2
  while span <= size:
    distance = span // 2
    while distance >= 1:
      rows = values.shape[0]
      shape = (rows // (2 * distance), 2, distance, columns)
      (a, b), (pa, pb) = ((x[:, 0], x[:, 1]) for x in (values.reshape(shape),
                                                       positions.reshape(shape)))
      block = lax.broadcasted_iota(jnp.int32, a.shape, 0)
      descending = ((block * (2 * distance)) & span) == 0
      # Values need no tie-break: the larger goes first in a descending block (the same value
      # whichever of two equal entries it came from); positions follow the pair order.
      swap = ((a > b) | ((a == b) & (pa < pb))) != descending
      larger, smaller = jnp.maximum(a, b), jnp.minimum(a, b)
      values = _interleaved(jnp.where(descending, larger, smaller),
                            jnp.where(descending, smaller, larger))
      positions = _interleaved(jnp.where(swap, pb, pa), jnp.where(swap, pa, pb))
      if span == size and keep <= distance:
        values, positions = values[:distance], positions[:distance]
      distance //= 2
    span *= 2
  return values[:keep], positions[:keep]


def _interleaved(first: jax.Array, second: jax.Array) -> jax.Array:
  """(G, j, B) halves -> (2 G j, B): each block of 2 j rows the j of `first`, then of `second`."""
  groups, distance, columns = first.shape
  return jnp.stack([first, second], axis=1).reshape(2 * groups * distance, columns)
