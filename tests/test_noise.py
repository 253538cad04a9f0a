"""Noise sampling: uniform over the real rows, stratified exactly, padding never drawn."""

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from instdisc_jax import noise as noise_lib
from instdisc_jax.sharding import ShardLayout

AXIS = "shards"


def sample_all_shards(key, layout, m, batch, shared):
  """Every shard's NoiseSample, stacked, using vmap as the named axis (any D, no devices)."""
  fn = lambda _: noise_lib.sample(key, layout, m, batch, shared=shared, axis_name=AXIS)
  return jax.vmap(fn, axis_name=AXIS)(jnp.arange(layout.num_shards))


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 300), d=st.integers(1, 9), m=st.integers(1, 700), shared=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_padding_never_drawn_and_exactly_m_per_example(n, d, m, shared, seed):
  layout = ShardLayout(n, d)
  sample = sample_all_shards(jax.random.key(seed), layout, m, 4, shared)
  rows, valid = np.asarray(sample.rows), np.asarray(sample.valid)
  real = layout.real_rows()
  for k in range(d):
    assert (rows[k][valid[k]] < real[k]).all()               # only real rows of shard k
    assert (rows[k] >= 0).all()
  global_index = layout.to_global(np.arange(d).reshape((d,) + (1,) * (rows.ndim - 1)), rows)
  assert (global_index[valid] < n).all()
  np.testing.assert_array_equal(valid.sum(axis=(0, -1)), m)    # m draws per example, in total


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 5000), d=st.integers(1, 16), m=st.integers(1, 10000))
def test_stratification_is_exact_in_expectation(n, d, m):
  """Averaged over the shared r (uniform on 0..n-1), shard k draws exactly m * n_k / n times,
  so every real row is drawn m / n times in expectation, as under i.i.d. uniform sampling."""
  layout = ShardLayout(n, d)
  r = jnp.arange(n, dtype=jnp.int32)
  draws = jax.vmap(lambda _: noise_lib.draws_on_shard(layout, m, r, AXIS), axis_name=AXIS)(
      jnp.arange(d))
  draws = np.asarray(draws, np.int64)                          # (d, n): m_k for every r
  np.testing.assert_array_equal(draws.sum(axis=1), m * layout.real_rows().astype(np.int64))
  np.testing.assert_array_equal(draws.sum(axis=0), m)
  assert draws.max() <= noise_lib.slots_per_shard(layout, m)
  assert (draws >= 0).all()


def test_even_split_when_everything_divides():
  layout = ShardLayout(64, 8)
  sample = sample_all_shards(jax.random.key(0), layout, 16, 8, shared=False)
  assert sample.rows.shape == (8, 8, 2)
  assert np.asarray(sample.valid).all()


def test_draws_are_uniform_over_real_rows():
  layout = ShardLayout(10, 4)                                  # real rows per shard: 3 3 3 1
  sample = sample_all_shards(jax.random.key(1), layout, 5, 20000, shared=False)
  rows, valid = np.asarray(sample.rows), np.asarray(sample.valid)
  global_index = layout.to_global(np.arange(4)[:, None, None], rows)[valid]
  counts = np.bincount(global_index, minlength=10)
  expected = 20000 * 5 / 10
  assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)


def test_same_key_same_noise_different_key_different_noise():
  layout = ShardLayout(100, 4)
  a = sample_all_shards(jax.random.key(3), layout, 32, 8, shared=True)
  b = sample_all_shards(jax.random.key(3), layout, 32, 8, shared=True)
  c = sample_all_shards(jax.random.key(4), layout, 32, 8, shared=True)
  np.testing.assert_array_equal(a.rows, b.rows)
  assert (np.asarray(a.rows) != np.asarray(c.rows)).any()
  assert a.rows.shape == (4, 8)                                # shared: one set, no batch axis


def test_from_global_indices_partitions_by_owner():
  layout = ShardLayout(10, 4)
  noise = np.array([[0, 9, 4, 5], [3, 3, 8, 1]])
  parts = [noise_lib.from_global_indices(noise, layout, k, 4) for k in range(4)]
  for b in range(2):
    held = [layout.to_global(k, np.asarray(p.rows)[b][np.asarray(p.valid)[b]])
            for k, p in enumerate(parts)]
    assert sorted(np.concatenate(held).tolist()) == sorted(noise[b].tolist())
