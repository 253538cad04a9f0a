"""Memory bank: reference initialisation, momentum update from the step's rows, sharded ==
unsharded, a bfloat16 bank stored as bits: the same numbers as stored as values, no temporaries
that grow with n, checkpoints in the format they always had. (tests/test_examples.py checks the
README example's compiled step too.)"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_numpy as ref

from instdisc_jax import checkpoint_leaves
from instdisc_jax import checkpointing
from instdisc_jax import memory_bank
from instdisc_jax import noise as noise_lib
from instdisc_jax import objectives
from instdisc_jax import parallel
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
  """The bank's values after one sharded update, and the positives' pre-step rows seen by every
  device (`psum` of each shard's `StepRows.positives`)."""
  layout = ShardLayout(n, d)

  def body(bank, idx_local, feat_local):
    idx_all = sharding.gather_batch(idx_local, AXIS)
    feat_all = sharding.gather_batch(feat_local, AXIS)
    step_rows = memory_bank.gather_step_rows(bank, idx_all, AXIS)
    new_bank = memory_bank.update(bank, step_rows, feat_all, momentum=0.5)
    return new_bank, sharding.psum(step_rows.positives, AXIS)

  split = lambda x: jnp.asarray(x).reshape((d, -1) + x.shape[1:])
  bank = MemoryBank.from_values(jnp.asarray(layout.shard_array(rows), dtype), num_instances=n,
                                num_shards=d)
  new_bank, positives = jax.pmap(body, axis_name=AXIS)(bank, split(idx), split(feats))
  return layout.unshard_array(new_bank.values()), positives


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


# -- a bfloat16 bank stored as bits ---------------------------------------------------------------


def test_bf16_bank_is_stored_as_bits_and_read_as_values():
  bank = memory_bank.init_bank(jax.random.key(3), 61, 16, num_shards=8, dtype=jnp.bfloat16)
  values = memory_bank.init_rows(jax.random.key(3), bank.layout, 16, dtype=jnp.bfloat16)
  assert bank.rows.dtype == jnp.uint16 and bank.dtype == jnp.bfloat16
  assert bank.values().dtype == jnp.bfloat16 and bank.values().shape == (8, 8, 16)
  np.testing.assert_array_equal(bank.values(), values)
  np.testing.assert_array_equal(bank.rows, jax.lax.bitcast_convert_type(values, jnp.uint16))
  plain = bank.as_values()
  assert plain.value_dtype is None and plain.rows.dtype == jnp.bfloat16
  again = MemoryBank.from_values(plain.rows, num_instances=61, num_shards=8)
  assert again.value_dtype == jnp.bfloat16
  np.testing.assert_array_equal(again.rows, bank.rows)
  f32 = memory_bank.init_bank(jax.random.key(3), 61, 16, num_shards=8)
  assert f32.value_dtype is None and f32.as_values() is f32 and f32.values() is f32.rows


def _nce_steps(bank, steps: int, batch: int = 32, num_noise: int = 16):
  """The bank after `steps` train steps' NCE + update (as `steps.train_step`) on 8 devices, with
  random unit features."""
  layout = bank.layout

  def step(bank, local_features, local_indices, key_data):
    indices = sharding.gather_batch(local_indices, AXIS)
    features = sharding.gather_batch(local_features, AXIS)
    sample = noise_lib.sample(jax.random.wrap_key_data(key_data), layout, num_noise, batch,
                              axis_name=AXIS)
    _, aux = objectives.nce_loss(features, indices, bank, sample, objectives.Partition.create(),
                                 temperature=0.07, z_mode="batch", axis_name=AXIS)
    return memory_bank.update(bank, aux["rows"], features, momentum=0.5)

  p_step = jax.pmap(step, axis_name=AXIS)
  rng = np.random.default_rng(4)
  for i in range(steps):
    features = ref.normalize(rng.normal(size=(batch, bank.dim))).astype(np.float32)
    indices = rng.permutation(layout.num_instances)[:batch].astype(np.int32)
    key = jax.random.key_data(jax.random.fold_in(jax.random.key(5), i))
    bank = p_step(bank, features.reshape(8, -1, bank.dim), indices.reshape(8, -1),
                  parallel.replicate(np.asarray(key)))
  return bank


def test_bf16_bank_as_bits_equals_the_bank_stored_as_values_bitwise():
  """Side by side with the previous implementation: a bank whose rows hold the bfloat16 values
  (a `MemoryBank` built directly; gathered whole-row and scattered through the bank-sized uint16
  view on CPU, as every bfloat16 bank was before) ends bitwise equal after several steps."""
  values = memory_bank.init_rows(jax.random.key(6), ShardLayout(300, 8), 16,
                                 dtype=jnp.bfloat16)
  before = MemoryBank(rows=values, num_instances=300, num_shards=8)
  after = MemoryBank.from_values(values, num_instances=300, num_shards=8)
  assert before.value_dtype is None and after.rows.dtype == jnp.uint16
  old, new = _nce_steps(before, 6), _nce_steps(after, 6)
  assert old.rows.dtype == jnp.bfloat16 and new.rows.dtype == jnp.uint16
  assert (np.asarray(new.values()) != np.asarray(values)).any()           # it did train
  np.testing.assert_array_equal(jax.lax.bitcast_convert_type(old.rows, jnp.uint16), new.rows)


def _step_temporaries(num_instances: int, dtype, writer: str) -> dict:
  """`memory_analysis()` of a donated pmapped step (8 devices, B = 64, m = 256, d = 32) that
  scores NCE and updates the bank (`update`) or writes features into it (`write`), compiled
  for a bank of `num_instances` rows in `dtype`."""
  devices, batch, dim = 8, 64, 32
  layout = ShardLayout(num_instances, devices)

  def step(bank, local_features, local_indices, key_data):
    indices = sharding.gather_batch(local_indices, AXIS)
    features = sharding.gather_batch(local_features, AXIS)
    if writer == "write":
      return memory_bank.write(bank, indices, features, axis_name=AXIS)
    sample = noise_lib.sample(jax.random.wrap_key_data(key_data), layout, 256, batch,
                              axis_name=AXIS)
    _, aux = objectives.nce_loss(features, indices, bank, sample, objectives.Partition.create(),
                                 temperature=0.07, z_mode="batch", axis_name=AXIS)
    return memory_bank.update(bank, aux["rows"], features, momentum=0.5)

  bank = jax.eval_shape(functools.partial(memory_bank.init_bank, num_instances=num_instances,
                                          dim=dim, num_shards=devices, dtype=dtype),
                        jax.random.key(0))
  struct = lambda shape, dtype: jax.ShapeDtypeStruct((devices,) + shape, dtype)
  compiled = jax.pmap(step, axis_name=AXIS, donate_argnums=(0,)).lower(
      bank, struct((batch // devices, dim), jnp.float32),
      struct((batch // devices,), jnp.int32), struct((2,), jnp.uint32)).compile()
  stats = compiled.memory_analysis()
  return {"temp": stats.temp_size_in_bytes, "alias": stats.alias_size_in_bytes}


@pytest.mark.parametrize("writer", ["update", "write"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_step_temporaries_do_not_grow_with_n(dtype, writer):
  """Regression: a bfloat16 bank's step had temporaries of 2x, then 1x the bank shard on CPU
  (XLA:CPU's float32 round trip of the shard for a bfloat16 scatter, then its materialised
  uint16 view of the shard). Stored as bits, the bank is only gathered and scattered."""
  small = _step_temporaries(2 * 10**4, dtype, writer)
  large = _step_temporaries(2 * 10**5, dtype, writer)
  bank_growth = large["alias"] - small["alias"]            # the donated bank shard grew 10x
  assert bank_growth > 0.9 * (25_000 - 2_500) * 32 * jnp.dtype(dtype).itemsize
  assert large["temp"] - small["temp"] < bank_growth / 100, (small, large)


def test_checkpoints_hold_bf16_values_and_old_ones_restore_bitwise(tmp_path):
  """A checkpoint holds a bfloat16 bank's values, as before banks were stored as bits: one
  written from a bank stored as values (the format of every earlier checkpoint) restores into a
  bank stored as bits, bitwise, and a bank stored as bits writes the same file contents."""
  values = parallel.shard_local_rows(np.asarray(memory_bank.init_rows(
      jax.random.key(8), ShardLayout(61, 8), 16, dtype=jnp.bfloat16)))     # one shard a device
  old = {"bank": MemoryBank(rows=values, num_instances=61, num_shards=8),
         "step": parallel.replicate(np.int32(3))}
  new = {"bank": MemoryBank.from_values(values, num_instances=61, num_shards=8),
         "step": parallel.replicate(np.int32(4))}
  target = {"bank": MemoryBank.from_values(jnp.zeros_like(values), num_instances=61,
                                          num_shards=8),
            "step": parallel.replicate(np.int32(0))}
  meta = {"num_instances": 61}
  for name, state in (("old", old), ("new", new)):
    checkpointer = checkpointing.Checkpointer(tmp_path / name, keep=1, sharded_keys=("rows",))
    checkpointer.save(int(state["step"][0]), state, {}, meta)
    checkpointer.wait_until_finished()
    restored, _, _ = checkpointer.restore(target, meta)
    checkpointer.close()
    assert restored["bank"].value_dtype == jnp.bfloat16, name
    np.testing.assert_array_equal(restored["bank"].rows, new["bank"].rows, err_msg=name)
  # What is handed to orbax: the bank's bfloat16 values in both cases.
  saved = [checkpoint_leaves.for_saving(state, ("rows",))["bank"].rows for state in (old, new)]
  assert saved[0].dtype == saved[1].dtype == jnp.bfloat16
  np.testing.assert_array_equal(jax.lax.bitcast_convert_type(saved[0], jnp.uint16),
                                jax.lax.bitcast_convert_type(saved[1], jnp.uint16))
