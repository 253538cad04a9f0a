"""Weighted kNN against brute force: sharded, chunked, with ties and k larger than a shard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_numpy as ref

from instdisc_jax import knn
from instdisc_jax import knn_select
from instdisc_jax import knn_threshold
from instdisc_jax.sharding import ShardLayout

AXIS = "devices"
TAU = 0.07


def run_knn(queries, bank, labels, *, k, num_classes, num_shards=None, **chunking):
  n = bank.shape[0]
  queries = jnp.asarray(queries, jnp.float32)

  def body(rows, shard_labels):
    neighbors = knn.nearest_neighbors(queries, rows, shard_labels, num_instances=n, k=k,
                                      axis_name=None if num_shards is None else AXIS,
                                      **chunking)
    return neighbors, knn.weighted_vote(neighbors, num_classes=num_classes, temperature=TAU)

  if num_shards is None:
    return jax.jit(body)(jnp.asarray(bank, jnp.float32), jnp.asarray(labels, jnp.int32))
  layout = ShardLayout(n, num_shards)
  out = jax.pmap(body, axis_name=AXIS)(jnp.asarray(layout.shard_array(bank), jnp.float32),
                                       jnp.asarray(layout.shard_array(labels, fill=-1)))
  for leaf in jax.tree.leaves(out):                            # replicated over devices
    np.testing.assert_array_equal(leaf[0], leaf[-1])
  return jax.tree.map(lambda x: x[0], out)


@pytest.fixture
def data():
  rng = np.random.default_rng(0)
  bank = ref.normalize(rng.normal(size=(203, 16)))
  labels = rng.integers(0, 7, size=203)
  queries = ref.normalize(rng.normal(size=(37, 16)))
  return bank, labels, queries


@pytest.mark.parametrize("num_shards,chunking", [
    (None, {}),
    (None, dict(query_chunk=8, bank_chunk=32)),
    (2, {}),
    (2, dict(query_chunk=6)),
    (8, {}),
    (8, dict(query_chunk=16, bank_chunk=8)),
])
def test_matches_brute_force(data, num_shards, chunking):
  bank, labels, queries = data
  neighbors, scores = run_knn(queries, bank, labels, k=20, num_classes=7,
                              num_shards=num_shards, **chunking)
  expected_scores, expected_order = ref.knn(queries, bank, labels, 20, TAU, 7)
  np.testing.assert_array_equal(neighbors.indices, expected_order)
  np.testing.assert_array_equal(neighbors.labels, labels[expected_order])
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-4)


def test_k_larger_than_a_shard_and_than_n():
  """n = 30 over 8 shards of 4 rows: k = 12 needs rows from several shards; k = 50 > n."""
  rng = np.random.default_rng(1)
  bank = ref.normalize(rng.normal(size=(30, 8)))
  labels = rng.integers(0, 3, size=30)
  queries = ref.normalize(rng.normal(size=(5, 8)))
  for k in (12, 50):
    neighbors, scores = run_knn(queries, bank, labels, k=k, num_classes=3, num_shards=8)
    expected_scores, expected_order = ref.knn(queries, bank, labels, k, TAU, 3)
    np.testing.assert_array_equal(neighbors.indices, expected_order)
    assert neighbors.indices.shape == (5, min(k, 30))
    assert (neighbors.indices < 30).all()                       # never a padding row
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-4)


def test_ties_go_to_the_lower_index_on_any_sharding():
  """Duplicated bank rows with different labels: which duplicate is kept decides the vote."""
  rng = np.random.default_rng(2)
  base = ref.normalize(rng.normal(size=(4, 8)))
  bank = np.concatenate([base] * 6)                             # rows i, i+4, i+8, ... are equal
  labels = np.arange(24) % 5
  queries = base[:2]
  expected_scores, expected_order = ref.knn(queries, bank, labels, 3, TAU, 5)
  for num_shards, chunking in [(None, {}), (8, {}), (8, dict(bank_chunk=2)),
                               (None, dict(bank_chunk=5))]:
    neighbors, scores = run_knn(queries, bank, labels, k=3, num_classes=5,
                                num_shards=num_shards, **chunking)
    np.testing.assert_array_equal(neighbors.indices, expected_order)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5)
  np.testing.assert_array_equal(expected_order[0], [0, 4, 8])


def test_predict_and_count_correct():
  scores = jnp.array([[0.1, 0.5, 0.2, 0.0, 0.0, 0.0],
                      [0.3, 0.3, 0.0, 0.0, 0.0, 0.9]])
  np.testing.assert_array_equal(knn.predict(scores, 3), [[1, 2, 0], [5, 0, 1]])
  counts = knn.count_correct(scores, jnp.array([2, 5]))
  assert int(counts["top1"]) == 1 and int(counts["top5"]) == 2
  masked = knn.count_correct(scores, jnp.array([2, 5]), valid=jnp.array([True, False]))
  assert int(masked["top1"]) == 0 and int(masked["top5"]) == 1


def test_unlabelled_rows_do_not_vote():
  neighbors = knn.Neighbors(scores=jnp.ones((1, 2)), indices=jnp.array([[0, 1]]),
                            labels=jnp.array([[-1, 2]]))
  scores = knn.weighted_vote(neighbors, num_classes=3, temperature=1.0)
  np.testing.assert_allclose(scores, [[0, 0, np.e]], rtol=1e-6)


def quantised(rng, shape):
  """Multiples of 1/4 in [-3/4, 3/4]: their dot products are exact in float32, so equal rows tie
  exactly whatever order a matmul sums in, and float64 brute force ranks them alike."""
  return rng.integers(-3, 4, size=shape).astype(np.float32) / 4


@pytest.mark.parametrize("group", [4, 7])
@pytest.mark.parametrize("num_valid", [700, 643, 30, 3])
def test_two_stage_selection_is_top_k_of_the_prefix(group, num_valid):
  """Few distinct values (many ties), mixed -0.0 / +0.0, padding past num_valid that would win."""
  rng = np.random.default_rng(3)
  values = rng.integers(-3, 4, size=(5, 700)).astype(np.float32)
  values[0] = np.where(rng.random(700) < 0.5, -0.0, 0.0)
  values[1, 500:] = 9.0                                       # the best entries are padding
  values[2] = rng.permutation(700)                             # distinct: k groups needed,
  values[2, num_valid:] = 1e3                                  # and larger padding after them
  k = 20
  assert 700 // group >= k
  select = jax.jit(knn_select.top_k_of_prefix, static_argnames=("k", "group"))
  best, pos = select(jnp.asarray(values), jnp.int32(num_valid), k=k, group=group)
  one_stage = select(jnp.asarray(values), jnp.int32(num_valid), k=k, group=1)
  np.testing.assert_array_equal(best, one_stage[0])
  np.testing.assert_array_equal(pos, one_stage[1])
  # Brute force: -0.0 == +0.0, ties to the lower position, -inf past num_valid.
  masked = np.where(np.arange(700) < num_valid, values.astype(np.float64), -np.inf)
  order = np.stack([np.lexsort((np.arange(700), -row))[:k] for row in masked])
  np.testing.assert_array_equal(pos, order)
  np.testing.assert_array_equal(best, np.take_along_axis(masked, order, axis=1))


@pytest.mark.parametrize("num_shards,k,chunking", [
    (None, 12, {}),
    (None, 5, dict(query_chunk=4, bank_chunk=100)),
    (2, 5, {}),
    (8, 5, {}),
    (8, 5, dict(bank_chunk=80)),
])
def test_two_stage_selection_matches_brute_force_with_ties(num_shards, k, chunking, monkeypatch):
  """Two-stage selection (groups of >= 4 rows allowed, checked to run) with exact ties between
  equal rows, on one shard and on 8 (the last one with padding rows)."""
  monkeypatch.setattr(knn_select, "MIN_GROUP", 4)
  rng = np.random.default_rng(4)
  n = 1203
  base = quantised(rng, (300, 8))
  bank = base[rng.integers(0, 300, size=n)]                    # every row has equal twins
  labels = rng.integers(0, 7, size=n)
  queries = quantised(rng, (9, 8))
  rows = n if num_shards is None else ShardLayout(n, num_shards).rows_per_shard
  assert knn.group_size(min(rows, chunking.get("bank_chunk", rows)), k) > 1
  neighbors, scores = run_knn(queries, bank, labels, k=k, num_classes=7,
                              num_shards=num_shards, **chunking)
  expected_scores, expected_order = ref.knn(queries, bank, labels, k, TAU, 7)
  np.testing.assert_array_equal(neighbors.indices, expected_order)
  np.testing.assert_array_equal(neighbors.labels, labels[expected_order])
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-5)


@pytest.mark.parametrize("num_valid", [8192, 8000, 60])
def test_threshold_candidates_are_every_entry_above_a_bound_on_the_kth(num_valid):
  """All entries >= T in position order, T <= the k-th largest real entry, no overflow. With 60
  real rows (fewer real super-blocks than k), every real row is a candidate."""
  rng = np.random.default_rng(5)
  n, q, k, buffer = 8192, 6, 10, 64
  scores = rng.normal(size=(n, q)).astype(np.float32)
  scores[num_valid:] = 9.0                                     # padding that would win
  values, positions, overflow = jax.jit(knn.threshold_candidates, static_argnums=(2, 3))(
      jnp.asarray(scores), jnp.int32(num_valid), k, buffer)
  assert not bool(overflow)
  real = scores[:num_valid]
  for j in range(q):
    kth = np.sort(real[:, j])[::-1][k - 1]
    used = np.isfinite(values[j])
    expected = np.flatnonzero(real[:, j] >= values[j][used].min())
    np.testing.assert_array_equal(positions[j][used], expected)
    np.testing.assert_array_equal(values[j][used], real[expected, j])
    assert values[j][used].min() <= kth and used.sum() >= k


@pytest.mark.parametrize("num_shards", [2, 3, 8])
def test_sharded_threshold_is_shared_and_at_most_the_kth(num_shards):
  """On D shards (unrefined on 2, refined on 3 and 8; the last shard part padding): every shard
  uses the same T, T <= the k-th largest real entry over all shards, and each shard's
  candidates are exactly its real entries >= T, in position order."""
  rng = np.random.default_rng(7)
  n, q, k, buffer = 5000, 5, 40, 128
  layout = ShardLayout(n, num_shards)
  width = -(-layout.rows_per_shard // 64) * 64
  scores = rng.normal(size=(n, q)).astype(np.float32)
  shards = np.full((num_shards, width, q), 9.0, np.float32)     # padding that would win
  shards[:, :layout.rows_per_shard] = layout.shard_array(scores)
  select = jax.pmap(lambda s, valid: knn_threshold.threshold_candidates(s, valid, k, buffer,
                                                                         AXIS), axis_name=AXIS)
  values, positions, overflow = select(jnp.asarray(shards), jnp.asarray(layout.real_rows()))
  assert not np.any(overflow)
  kth = np.sort(scores, axis=0)[::-1][k - 1]
  used = np.isfinite(values)
  thresholds = [[values[d, j][used[d, j]].min() for d in range(num_shards)] for j in range(q)]
  for j in range(q):
    threshold = min(thresholds[j])
    assert threshold <= kth[j] and used[:, j].sum() >= k
    for d in range(num_shards):
      real = shards[d, :layout.real_rows()[d], j]
      expected = np.flatnonzero(real >= threshold)
      np.testing.assert_array_equal(positions[d, j][used[d, j]], expected)
      np.testing.assert_array_equal(values[d, j][used[d, j]], real[expected])


def test_overflowing_candidates_fall_back_to_the_exact_selection(monkeypatch):
  """A buffer too small for the candidates: the chunk is selected by `lax.top_k`, same result."""
  rng = np.random.default_rng(6)
  n = 1203
  bank = quantised(rng, (n, 8))
  labels = rng.integers(0, 7, size=n)
  queries = quantised(rng, (9, 8))
  expected_scores, expected_order = ref.knn(queries, bank, labels, 5, TAU, 7)
  for buffer in (knn.candidate_buffer, lambda k, num_shards: 8):
    monkeypatch.setattr(knn, "candidate_buffer", buffer)
    for num_shards in (None, 8):
      neighbors, scores = run_knn(queries, bank, labels, k=5, num_classes=7,
                                  num_shards=num_shards)
      np.testing.assert_array_equal(neighbors.indices, expected_order)
      np.testing.assert_allclose(scores, expected_scores, rtol=1e-5)


@pytest.mark.parametrize("num_shards", [None, 2, 8])
def test_fewer_queries_than_shards_and_none(data, num_shards):
  """0 queries give (0, k) results; 1 query on 8 shards (padded to a chunk of 8) its own."""
  bank, labels, queries = data
  for count in (0, 1):
    neighbors, _ = run_knn(queries[:count], bank, labels, k=20, num_classes=7,
                           num_shards=num_shards)
    assert neighbors.indices.shape == (count, 20)
    if count:
      np.testing.assert_array_equal(neighbors.indices,
                                    ref.knn(queries[:count], bank, labels, 20, TAU, 7)[1])


@pytest.mark.parametrize("rows,width,k,batch", [
    (37, 464, 200, 16), (130, 513, 7, 64), (5, 1, 1, 64), (64, 96, 96, 64), (0, 40, 20, 64)])
def test_sorting_network_is_lax_top_k(rows, width, k, batch):
  """Values, positions and tie order of `lax.top_k`: many ties, -inf entries, any width."""
  rng = np.random.default_rng(7)
  values = rng.integers(-4, 5, size=(rows, width)).astype(np.float32) / 4
  values[rng.random(values.shape) < 0.3] = -np.inf
  select = jax.jit(knn_select.network_top_k, static_argnames=("k", "batch"))
  best, positions = select(jnp.asarray(values), k=k, batch=batch)
  expected_best, expected_positions = jax.jit(jax.lax.top_k, static_argnums=1)(values, k)
  np.testing.assert_array_equal(best, expected_best)
  np.testing.assert_array_equal(positions, expected_positions)


def test_vote_is_the_one_hot_product_bit_for_bit():
  """The CPU's scatter-add sums each class in neighbour order, as the one-hot product does."""
  rng = np.random.default_rng(8)
  scores = np.sort(rng.uniform(-1, 1, size=(50, 30)).astype(np.float32), axis=1)[:, ::-1]
  scores[:, -3:] = -np.inf                                      # missing rows
  labels = rng.integers(-1, 12, size=scores.shape).astype(np.int32)   # -1 and >= 10: no vote
  neighbors = knn.Neighbors(scores=jnp.asarray(scores), indices=jnp.zeros(scores.shape, int),
                            labels=jnp.asarray(labels))
  vote = jax.jit(knn.weighted_vote, static_argnames=("num_classes", "temperature"))
  got = vote(neighbors, num_classes=10, temperature=TAU)
  one_hot = jax.nn.one_hot(labels, 10, dtype=jnp.float32)
  expected = jax.jit(lambda w, h: jnp.einsum("qk,qkc->qc", jnp.exp(w / TAU), h))(scores, one_hot)
  np.testing.assert_array_equal(got, expected)
