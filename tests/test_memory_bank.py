"""Memory bank: reference initialisation, momentum update from the step's rows, sharded ==
unsharded. (tests/test_examples.py checks a compiled step's temporaries do not grow with n.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_numpy as ref

from instdisc_jax import memory_bank
from instdisc_jax import sharding
from instdisc_jax.memory_bank import MemoryBank
from instdisc_jax.sharding import ShardLayout

AXIS = "devices"


def test_reference_uniform_init():
  bank = memory_bank.init_bank(jax.random.key(0), 1000, 128)
  rows = np.asarray(bank.rows[0])
  bound = 1 / np.sqrt(128 / 3)
  assert rows.shape == (1000, 128)
  assert rows.min() >= -bound and rows.max() <= bound
  assert abs(rows.min() + bound) < 1e-3 and abs(rows.max() - bound) < 1e-3
  # Not normalised, but of unit norm in expectation (variance bound^2 / 3 = 1/d per entry).
  norms = np.linalg.norm(rows, axis=1)
  assert norms.std() > 1e-3 and abs(np.mean(norms ** 2) - 1) < 0.02


def test_unit_init_is_normalised():
  rows = np.asarray(memory_bank.init_bank(jax.random.key(0), 50, 16, init="unit").rows[0])
  np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1, rtol=1e-5)
  with pytest.raises(ValueError, match="bank init"):
    memory_bank.init_bank(jax.random.key(0), 50, 16, init="zeros")


def test_init_does_not_depend_on_the_number_of_shards():
  key = jax.random.key(7)
  one = memory_bank.init_bank(key, 61, 16)
  eight = memory_bank.init_bank(key, 61, 16, num_shards=8)
  layout = ShardLayout(61, 8)
  np.testing.assert_array_equal(layout.unshard_array(eight.rows), one.rows[0])
  assert (np.asarray(eight.rows)[7, 5:] == 0).all()          # padding rows
  # A host builds only its own shards; they match the full build.
  part = memory_bank.init_rows(key, layout, 16, shards=[2, 3])
  np.testing.assert_array_equal(part, eight.rows[2:4])


def _update(bank, idx, feats, momentum, valid=None):
  rows = memory_bank.gather_step_rows(bank, jnp.asarray(idx), None)
  return memory_bank.update(bank, rows, jnp.asarray(feats, jnp.float32), momentum=momentum,
                            valid=valid)


def test_update_matches_formula_and_momentum_weights_the_old_value():
  rng = np.random.default_rng(0)
  rows = ref.normalize(rng.normal(size=(20, 4)))
  bank = MemoryBank(rows=jnp.asarray(rows, jnp.float32), num_instances=20)
  idx = np.array([3, 7, 11])
  feats = ref.normalize(rng.normal(size=(3, 4)))
  new = _update(bank, idx, feats, 0.5)
  np.testing.assert_allclose(new.rows, ref.bank_update(rows, idx, feats, 0.5), rtol=1e-5,
                             atol=1e-6)
  # momentum -> 1 keeps the old value; momentum 0 writes the feature (`write`).
  kept = _update(bank, idx, feats, 0.999999)
  np.testing.assert_allclose(kept.rows, rows, atol=1e-5)
  written = memory_bank.write(bank, jnp.asarray(idx), jnp.asarray(feats, jnp.float32),
                              axis_name=None)
  np.testing.assert_allclose(written.rows[idx], feats, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(written.rows, _update(bank, idx, feats, 0.0).rows)
  masked = _update(bank, idx, feats, 0.5, valid=jnp.array([True, False, True]))
  np.testing.assert_allclose(masked.rows[7], rows[7], rtol=1e-6)


def test_l2_normalize_is_safe_at_zero():
  np.testing.assert_array_equal(memory_bank.l2_normalize(jnp.zeros((2, 4))), 0.0)
  grad = jax.grad(lambda v: memory_bank.l2_normalize(v).sum())(jnp.zeros(4))
  assert np.isfinite(grad).all()


def _sharded_update(rows, idx, feats, n, d, dtype=jnp.float32):
  """The bank after one sharded update, and the positives' pre-step rows seen by every device
  (`psum` of each shard's `StepRows.positives`)."""
  layout = ShardLayout(n, d)

  def body(rows_shard, idx_local, feat_local):
    bank = MemoryBank(rows=rows_shard, num_instances=n, num_shards=d)
    idx_all = sharding.gather_batch(idx_local, AXIS)
    feat_all = sharding.gather_batch(feat_local, AXIS)
    step_rows = memory_bank.gather_step_rows(bank, idx_all, AXIS)
    new_bank = memory_bank.update(bank, step_rows, feat_all, momentum=0.5)
    return new_bank.rows, sharding.psum(step_rows.positives, AXIS)

  split = lambda x: jnp.asarray(x).reshape((d, -1) + x.shape[1:])
  new_rows, positives = jax.pmap(body, axis_name=AXIS)(
      jnp.asarray(layout.shard_array(rows), dtype), split(idx), split(feats))
  return layout.unshard_array(new_rows), positives


@pytest.mark.parametrize("n", [61, 64])
def test_sharded_update_equals_unsharded(n):
  rng = np.random.default_rng(1)
  rows = ref.normalize(rng.normal(size=(n, 8))).astype(np.float32)
  idx = rng.permutation(n)[:16]
  feats = ref.normalize(rng.normal(size=(16, 8))).astype(np.float32)
  new_rows, positives = _sharded_update(rows, idx, feats, n, 8)
  np.testing.assert_allclose(new_rows, ref.bank_update(rows, idx, feats, 0.5), rtol=1e-5,
                             atol=1e-6)
  for device_view in np.asarray(positives):                  # replicated on every device
    np.testing.assert_array_equal(device_view, rows[idx])


def test_bf16_storage_keeps_float32_arithmetic():
  rng = np.random.default_rng(2)
  rows = ref.normalize(rng.normal(size=(64, 8))).astype(np.float32)
  idx = rng.permutation(64)[:16]
  feats = ref.normalize(rng.normal(size=(16, 8))).astype(np.float32)
  new_rows, positives = _sharded_update(rows, idx, feats, 64, 8, jnp.bfloat16)
  assert new_rows.dtype == jnp.bfloat16 and positives.dtype == jnp.float32
  expected = ref.bank_update(rows.astype(jnp.bfloat16).astype(np.float32), idx, feats, 0.5)
  np.testing.assert_allclose(new_rows.astype(np.float32), expected, atol=1e-2)
  # The bf16 rows are the float32 update rounded once (whatever path _scatter_rows takes).
  f32_rows, _ = _sharded_update(rows.astype(jnp.bfloat16).astype(np.float32), idx, feats, 64, 8)
  np.testing.assert_array_equal(new_rows, f32_rows.astype(jnp.bfloat16))
