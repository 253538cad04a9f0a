"""Search and near-duplicates (issue 16): `search.similar_pairs` against brute force on 8 fake
devices, and `python -m instdisc_jax.search` on a tiny trained folder dataset."""

import functools

import jax
import numpy as np
import pytest

from instdisc_jax import search
from instdisc_jax.sharding import ShardLayout

AXIS = "devices"


# -- similar_pairs: a pure function over the sharded features -------------------------------------


def planted(n: int = 203, dim: int = 16, seed: int = 0):
  """Random unit vectors with planted near-duplicates: an exact copy, light perturbations, and a
  group of four; returns the features and the planted pairs (i < j)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, dim))
  x[150] = x[7]                                           # exact
  x[199] = x[30] + 0.02 * rng.normal(size=dim)           # lightly perturbed, across shards
  x[31] = x[30] + 0.02 * rng.normal(size=dim)            # and within a shard
  for j in (60, 61, 130, 202):                            # a group: 6 pairs
    x[j] = x[100] + 0.02 * rng.normal(size=dim)
  x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  return x, x @ x.T


def brute_force(x, threshold):
  sims = x @ x.T
  first, second = np.nonzero(np.triu(sims >= threshold, k=1))
  return {(int(i), int(j)) for i, j in zip(first, second)}, sims


def run_similar_pairs(x, threshold, k, num_shards, **blocks):
  """`similar_pairs` under pmap over `num_shards` devices (None: unsharded), as host Partners
  with a leading shard axis."""
  n = len(x)
  if num_shards is None:
    out = jax.jit(functools.partial(search.similar_pairs, num_instances=n, k=k, **blocks))(
        x, threshold)
    return jax.tree.map(lambda a: np.asarray(a)[None], out), ShardLayout(n)
  layout = ShardLayout(n, num_shards)
  step = jax.pmap(functools.partial(search.similar_pairs, num_instances=n, k=k, axis_name=AXIS,
                                    **blocks), axis_name=AXIS, in_axes=(0, None))
  return jax.tree.map(np.asarray, step(layout.shard_array(x), threshold)), layout


@pytest.mark.parametrize("num_shards,blocks", [
    (None, {}),
    (8, {}),
    (8, {"query_block": 4, "bank_chunk": 5}),   # blocks and chunks that do not divide the shard
    (3, {"query_block": 7, "bank_chunk": 64}),
])
def test_similar_pairs_finds_the_planted_pairs_and_no_others(num_shards, blocks):
  x, _ = planted()
  threshold = 0.99
  expected, sims = brute_force(x, threshold)
  assert expected == {(7, 150), (30, 31), (30, 199), (31, 199)} | {
      (i, j) for i in (60, 61, 100, 130, 202) for j in (60, 61, 100, 130, 202) if i < j}
  assert np.sort(sims[np.triu_indices(len(x), 1)])[-len(expected) - 1] < 0.9  # a clear gap
  partners, layout = run_similar_pairs(x, threshold, 8, num_shards, **blocks)
  pairs = search.pair_list(partners, layout)
  assert set(zip(pairs.first.tolist(), pairs.second.tolist())) == expected
  assert len(pairs) == len(expected)
  np.testing.assert_allclose(pairs.similarity, sims[pairs.first, pairs.second], atol=1e-6)
  assert np.all(np.diff(pairs.similarity) <= 0)                  # most similar first
  counts = layout.unshard_array(partners.counts)
  assert counts.sum() == len(expected) and counts[60] == 4 and counts[202] == 0 and counts[7] == 1


def test_similar_pairs_keeps_the_k_most_similar_and_counts_all():
  x, _ = planted()
  expected, sims = brute_force(x, 0.99)
  partners, layout = run_similar_pairs(x, 0.99, 1, 8, query_block=16, bank_chunk=8)
  counts = layout.unshard_array(partners.counts)
  indices = layout.unshard_array(partners.indices)[:, 0]
  for i in range(len(x)):
    mine = [j for a, j in expected if a == i]
    assert counts[i] == len(mine)
    assert indices[i] == (max(mine, key=lambda j: (sims[i, j], -j)) if mine else -1)


def test_similar_pairs_whole_range_and_ties_go_to_the_lower_index():
  # Threshold -1 admits every pair; identical rows tie, and the lower indices are kept.
  x = np.tile(np.eye(4, dtype=np.float32)[:1], (10, 1))
  partners, layout = run_similar_pairs(x, -1.0, 3, 4, query_block=2, bank_chunk=2)
  counts = layout.unshard_array(partners.counts)
  np.testing.assert_array_equal(counts, 9 - np.arange(10))
  indices = layout.unshard_array(partners.indices)
  np.testing.assert_array_equal(indices[0], [1, 2, 3])
  np.testing.assert_array_equal(indices[7], [8, 9, -1])
  np.testing.assert_array_equal(indices[9], [-1, -1, -1])
