"""Near-duplicate pairs of training instances, blockwise over the instance-sharded features.

Every pair of training instances i < j with cosine similarity s_ij = v_i^T v_j >= threshold is
found by `similar_pairs`, a pure function over the sharded features: each device takes a block
of its own rows, the block is all-gathered (blocks, not shards), every device scores it against
its shard in chunks, and per row only the k most similar partners above the threshold and their
count are kept; memory is O(block * chunk + n * k / D) per device, never n x n. The counts are
exact, so the caller knows when k was too small and runs again with a larger one
(`find_pairs`). `python -m instdisc_jax.search --duplicates` is the program.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from typing import Optional, Sequence

import flax.struct
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from instdisc_jax import parallel
from instdisc_jax import sharding
from instdisc_jax import steps
from instdisc_jax.errors import UserError
from instdisc_jax.parallel import AXIS
from instdisc_jax.sharding import AxisName
from instdisc_jax.sharding import ShardLayout

log = logging.getLogger(__name__)

_NONE = -jnp.inf


@flax.struct.dataclass
class Partners:
  """For each row i of this shard: rows j > i with s_ij >= threshold, most similar first.

  Outside a mapped step each field has a leading device axis, like the bank.
  """

  scores: jax.Array    # float32 (rows_per_shard, k); -inf past the partners
  indices: jax.Array   # int32 (rows_per_shard, k), global instance index; -1 past the partners
  counts: jax.Array    # int32 (rows_per_shard,): how many partners row i has (may exceed k)


def _top_k(values, ids, k):
  """The k largest values of each row (padded with -inf when fewer), with their ids."""
  if values.shape[1] < k:
    pad = ((0, 0), (0, k - values.shape[1]))
    values = jnp.pad(values, pad, constant_values=_NONE)
    ids = jnp.pad(ids, pad, constant_values=-1)
  best, pos = lax.top_k(values, k)
  return best, jnp.take_along_axis(ids, pos, axis=1)


def _shard_partners(queries, query_ids, rows, row_ids, real, threshold, k, bank_chunk):
  """This shard's partners of the queries: (values, ids) (Q, k) and the counts (Q,).

  A partner of query i is a real row j > i with s_ij >= threshold. Chunks of `bank_chunk` rows
  are scored in index order and merged into a running top k, whose ties keep the earlier (lower)
  index, as in `knn`.
  """
  num_rows = rows.shape[0]
  num_chunks = -(-num_rows // bank_chunk)
  chunk = -(-num_rows // num_chunks)
  pad = num_chunks * chunk - num_rows
  rows = jnp.pad(rows, ((0, pad), (0, 0))).reshape(num_chunks, chunk, -1)
  row_ids = jnp.pad(row_ids, (0, pad), constant_values=-1).reshape(num_chunks, chunk)
  real = jnp.pad(real, (0, pad)).reshape(num_chunks, chunk)

  def step(carry, chunk_data):
    best, best_ids, counts = carry
    chunk_rows, chunk_ids, chunk_real = chunk_data
    sims = queries @ chunk_rows.T
    partner = (chunk_real & (chunk_ids[None, :] > query_ids[:, None])) & (sims >= threshold)
    counts = counts + jnp.sum(partner, axis=1, dtype=jnp.int32)
    values, ids = _top_k(jnp.where(partner, sims, _NONE),
                         jnp.broadcast_to(chunk_ids, sims.shape), k)
    best, best_ids = _top_k(jnp.concatenate([best, values], axis=1),
                            jnp.concatenate([best_ids, ids], axis=1), k)
    return (best, best_ids, counts), None

  num_queries = queries.shape[0]
  init = (jnp.full((num_queries, k), _NONE, jnp.float32),
          jnp.full((num_queries, k), -1, jnp.int32), jnp.zeros((num_queries,), jnp.int32))
  (best, best_ids, counts), _ = lax.scan(step, init, (rows, row_ids, real))
  return best, best_ids, counts


def similar_pairs(rows: jax.Array, threshold, *, num_instances: int, k: int,
                  axis_name: AxisName = None, query_block: int = 128,
                  bank_chunk: int = 16384) -> Partners:
  """Near-duplicate partners of this shard's rows over all shards (see the module docstring).

  Row i's partners are the real rows j > i (so each pair is reported once, by its lower index)
  whose cosine similarity s_ij = v_i^T v_j is at least `threshold`; the k most similar are kept,
  ties to the lower index, and `counts` says how many there are in all.

  Args:
    rows: this shard's (rows_per_shard, d) L2-normalised features (any float dtype).
    threshold: the similarity a pair needs (a traced scalar: changing it does not recompile).
    num_instances: n, the number of real rows over all shards.
    k: partners kept per row.
    axis_name: mapped axis the rows are sharded over, or None.
    query_block: rows of each shard scored at once; a step all-gathers D * query_block rows.
    bank_chunk: rows of the shard each block is scored against at once.
  """
  layout = ShardLayout(num_instances, sharding.num_shards(axis_name))
  per_shard = layout.rows_per_shard
  rows = rows.astype(jnp.float32)
  real = sharding.real_row_mask(layout, axis_name)
  shard = sharding.shard_index(axis_name)
  ids = shard * per_shard + jnp.arange(per_shard, dtype=jnp.int32)
  threshold = jnp.asarray(threshold, jnp.float32)

  query_block = min(query_block, per_shard)
  num_blocks = -(-per_shard // query_block)
  pad = num_blocks * query_block - per_shard
  blocks = jnp.pad(rows, ((0, pad), (0, 0))).reshape(num_blocks, query_block, -1)
  block_ids = jnp.pad(ids, (0, pad), constant_values=num_instances).reshape(num_blocks, -1)

  def one_block(block):
    queries, query_ids = block
    if axis_name is not None:
      # Every device's block, in shard order: (D * query_block, d).
      queries, query_ids = (lax.all_gather(x, axis_name, tiled=True) for x in block)
    values, partner_ids, counts = _shard_partners(queries, query_ids, rows, ids, real, threshold,
                                                  k, bank_chunk)
    if axis_name is not None:
      # Candidates of all shards in shard order, i.e. in global index order, then this
      # device's own block.
      counts = lax.psum(counts, axis_name)
      values, partner_ids = (lax.all_gather(x, axis_name, axis=1, tiled=True)
                             for x in (values, partner_ids))
      values, partner_ids = _top_k(values, partner_ids, k)
      mine = lambda x: lax.dynamic_slice_in_dim(x, shard * query_block, query_block)
      values, partner_ids, counts = mine(values), mine(partner_ids), mine(counts)
    return values, partner_ids, counts

  values, partner_ids, counts = lax.map(one_block, (blocks, block_ids))
  values, partner_ids, counts = (x.reshape((-1,) + x.shape[2:])[:per_shard]
                                 for x in (values, partner_ids, counts))
  return Partners(scores=values,
                  indices=jnp.where(values > _NONE, partner_ids, -1),
                  counts=jnp.where(real, counts, 0))


@dataclasses.dataclass(frozen=True)
class Pairs:
  """Pairs of training instances, most similar first (ties: by first, then second index)."""

  first: np.ndarray        # int (P,), the lower instance index
  second: np.ndarray       # int (P,), the higher one
  similarity: np.ndarray   # float32 (P,)

  def __len__(self) -> int:
    return len(self.first)


def pair_list(partners: Partners, layout: ShardLayout) -> Pairs:
  """The pairs held by host `Partners` of every shard ((D, rows_per_shard, ...) arrays)."""
  indices = layout.unshard_array(partners.indices)
  scores = layout.unshard_array(partners.scores)
  first, column = np.nonzero(indices >= 0)
  second = indices[first, column]
  similarity = scores[first, column]
  order = np.lexsort((second, first, -similarity))
  return Pairs(first=first[order], second=second[order], similarity=similarity[order])


def _pairs_step(rows, threshold, *, num_instances: int, k: int):
  return similar_pairs(rows, threshold, num_instances=num_instances, k=k, axis_name=AXIS)


class PairFinder:
  """`find(rows, threshold, max_pairs)`: every pair of the sharded `rows` (the bank's layout,
  `layout`) with s_ij >= threshold, its steps compiled once per k."""

  def __init__(self, layout: ShardLayout):
    self.layout = layout
    self._pairs = {}

  def find(self, rows: jax.Array, threshold: float, max_pairs: int, k: int = 16) -> Pairs:
    """Every pair i < j with s_ij >= threshold. Starts with k partners per row and, should a
    row have more, runs again with room for all of them.

    Raises UserError when there are more than `max_pairs` pairs (a threshold too low).
    """
    layout = self.layout
    threshold_array = parallel.replicate(np.float32(threshold))
    while True:
      if k not in self._pairs:
        self._pairs[k] = steps.pmapped(_pairs_step, num_instances=layout.num_instances, k=k)
      partners = self._pairs[k](rows, threshold_array)
      counts = _all_shards(partners.counts, layout)
      total = int(counts.sum())
      if total > max_pairs:
        raise UserError(f"--threshold={threshold} makes {total} pairs, more than "
                        f"--max_pairs={max_pairs}; raise --threshold (or --max_pairs)")
      most = int(counts.max(initial=0))
      if most <= k:
        return pair_list(jax.tree.map(lambda x: _all_shards(x, layout, flat=False), partners),
                         layout)
      log.info("an instance has %d partners above the threshold; searching again with room "
               "for all", most)
      k = 1 << (most - 1).bit_length()


def _all_shards(x: jax.Array, layout: ShardLayout, flat: bool = True) -> np.ndarray:
  """Host copy of an instance-sharded (D, rows_per_shard, ...) value, from every process."""
  x = parallel.to_global(x)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  x = np.asarray(x)
  return layout.unshard_array(x) if flat else x


def write_pairs_csv(path: str, pairs: Pairs, paths: Optional[Sequence[str]]) -> None:
  """first, second (instance indices), similarity, and their files for folder datasets."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["first", "second", "similarity", "first_path", "second_path"])
    for i, j, s in zip(pairs.first, pairs.second, pairs.similarity):
      writer.writerow([int(i), int(j), f"{s:.6f}", paths[i] if paths else "",
                       paths[j] if paths else ""])


def pair_lines(pairs: Pairs, paths: Optional[Sequence[str]], threshold: float,
               shown: int) -> list[str]:
  """The console report: how many pairs, then the `shown` most similar, one per line."""
  lines = [f"{len(pairs)} pairs with cosine similarity >= {threshold}"]
  for i, j, s in zip(pairs.first[:shown], pairs.second[:shown], pairs.similarity[:shown]):
    where = f"  {paths[i]}  {paths[j]}" if paths else ""
    lines.append(f"  {s:.4f}  #{int(i)} #{int(j)}{where}")
  if len(pairs) > shown:
    lines.append(f"  ... and {len(pairs) - shown} more")
  return lines


