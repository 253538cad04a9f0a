"""Objectives against the plain-NumPy formulas, their gradients, and sharded == unsharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_numpy as ref
import sharded

from instdisc_jax import objectives
from instdisc_jax.memory_bank import MemoryBank
from instdisc_jax.noise import from_global_indices
from instdisc_jax.sharding import ShardLayout

TAU = 0.1
N = 61            # not divisible by 8: shard 7 holds 5 real rows and 3 padding rows
BATCH = 16
DIM = 8
M = 12


def _unit(rng, *shape):
  return ref.normalize(rng.normal(size=shape))


@pytest.fixture
def data():
  rng = np.random.default_rng(0)
  bank = _unit(rng, N, DIM)
  indices = rng.permutation(N)[:BATCH]
  # Features near their bank rows, so positives score high, like a trained model.
  features = ref.normalize(bank[indices] + 0.5 * rng.normal(size=(BATCH, DIM)))
  noise = rng.integers(0, N, size=(BATCH, M))
  return dict(bank=bank, indices=indices, features=features, noise=noise)


def nce(z_mode="batch", partition=None):
  def objective(f, idx, bank, noise, _, axis_name):
    part = objectives.Partition.create() if partition is None else partition
    return objectives.nce_loss(f, idx, bank, noise, part, temperature=TAU, z_mode=z_mode,
                               axis_name=axis_name)
  return objective


def softmax(f, idx, bank, noise, _, axis_name):
  return objectives.softmax_loss(f, idx, bank, temperature=TAU, axis_name=axis_name)


def infonce(f, idx, bank, noise, _, axis_name):
  return objectives.infonce_loss(f, idx, bank, noise, temperature=TAU, axis_name=axis_name)


def parametric(f, idx, bank, noise, weights, axis_name):
  return objectives.parametric_softmax_loss(f, idx, weights, num_instances=N, temperature=TAU,
                                            axis_name=axis_name)


def proximal(f, idx, bank, noise, _, axis_name):
  share = objectives.proximal_term(f, idx, bank, weight=0.3, axis_name=axis_name)
  return share, {}


# ------------------------------------------------------------------------------------------------
# Values and gradients against the formulas (unsharded).
# ------------------------------------------------------------------------------------------------


def test_nce_matches_reference_criterion(data):
  value, grad, _, aux = sharded.value_and_grads(nce(), data["features"], data["indices"],
                                                data["bank"], data["noise"], num_shards=None)
  log_z = ref.log_partition_estimate(data["features"], data["indices"], data["bank"],
                                     data["noise"], TAU)
  np.testing.assert_allclose(aux["metrics"]["log_z"], log_z, rtol=1e-5)
  args = (data["indices"], data["bank"], data["noise"], TAU, np.exp(log_z))
  expected = ref.nce_loss(data["features"], *args)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  # Z carries no gradient: compare with the formula at fixed Z, by finite differences (float64)
  # and by jax.grad of the plain formula.
  numeric = ref.numerical_grad(lambda f: ref.nce_loss(f, *args), data["features"])
  np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-5)
  autodiff = jax.grad(lambda f: ref.nce_loss(f, *args, xp=jnp))(jnp.asarray(data["features"]))
  np.testing.assert_allclose(grad, autodiff, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,objective,formula", [
    ("softmax", softmax, lambda d, xp=np: ref.softmax_loss(
        d["features"], d["indices"], d["bank"], TAU, xp=xp)),
    ("infonce", infonce, lambda d, xp=np: ref.infonce_loss(
        d["features"], d["indices"], d["bank"], d["noise"], TAU, xp=xp)),
    ("proximal", proximal, lambda d, xp=np: ref.proximal_term(
        d["features"], d["indices"], d["bank"], 0.3, xp=xp)),
])
def test_objective_matches_formula(data, name, objective, formula):
  value, grad, _, _ = sharded.value_and_grads(objective, data["features"], data["indices"],
                                              data["bank"], data["noise"], num_shards=None)
  np.testing.assert_allclose(value, formula(data), rtol=1e-5, err_msg=name)
  numeric = ref.numerical_grad(lambda f: formula({**data, "features": f}), data["features"])
  np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-5, err_msg=name)
  autodiff = jax.grad(lambda f: formula({**data, "features": f}, xp=jnp))(
      jnp.asarray(data["features"]))
  np.testing.assert_allclose(grad, autodiff, rtol=1e-4, atol=1e-6, err_msg=name)


def test_parametric_softmax_matches_formula_and_grads_reach_weights(data):
  rng = np.random.default_rng(1)
  weights = rng.normal(size=(N, DIM))
  value, f_grad, w_grad, _ = sharded.value_and_grads(
      parametric, data["features"], data["indices"], data["bank"], num_shards=None,
      sharded_param=weights)
  formula = lambda f, w, xp=np: ref.parametric_softmax_loss(f, data["indices"], w, TAU, xp=xp)
  np.testing.assert_allclose(value, formula(data["features"], weights), rtol=1e-5)
  f_auto, w_auto = jax.grad(lambda f, w: formula(f, w, xp=jnp), argnums=(0, 1))(
      jnp.asarray(data["features"]), jnp.asarray(weights))
  np.testing.assert_allclose(f_grad, f_auto, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(w_grad, w_auto, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Sharded (8 fake devices, n % 8 != 0) equals unsharded, given the same noise.
# ------------------------------------------------------------------------------------------------

SHARDED_TOLERANCE = dict(rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name,objective", [
    ("nce", nce()), ("softmax", softmax), ("infonce", infonce), ("proximal", proximal)])
def test_sharded_equals_unsharded(data, name, objective):
  single = sharded.value_and_grads(objective, data["features"], data["indices"], data["bank"],
                                   data["noise"], num_shards=None)
  multi = sharded.value_and_grads(objective, data["features"], data["indices"], data["bank"],
                                  data["noise"], num_shards=8)
  np.testing.assert_allclose(multi[0], single[0], **SHARDED_TOLERANCE, err_msg=name)
  np.testing.assert_allclose(multi[1], single[1], **SHARDED_TOLERANCE, err_msg=name)
  for key, val in single[3].get("metrics", {}).items():
    np.testing.assert_allclose(multi[3]["metrics"][key], val, rtol=1e-5, atol=1e-6, err_msg=key)


def test_sharded_nce_with_shared_noise(data):
  shared_noise = data["noise"][0]
  objective = nce()
  single = sharded.value_and_grads(objective, data["features"], data["indices"], data["bank"],
                                   shared_noise, num_shards=None)
  multi = sharded.value_and_grads(objective, data["features"], data["indices"], data["bank"],
                                  shared_noise, num_shards=8)
  expected = ref.nce_loss(data["features"], data["indices"], data["bank"],
                          np.broadcast_to(shared_noise, data["noise"].shape), TAU,
                          np.exp(single[3]["metrics"]["log_z"]))
  np.testing.assert_allclose(single[0], expected, rtol=1e-5)
  np.testing.assert_allclose(multi[0], single[0], **SHARDED_TOLERANCE)
  np.testing.assert_allclose(multi[1], single[1], **SHARDED_TOLERANCE)


def test_sharded_parametric_softmax(data):
  weights = np.random.default_rng(2).normal(size=(N, DIM))
  single = sharded.value_and_grads(parametric, data["features"], data["indices"], data["bank"],
                                   num_shards=None, sharded_param=weights)
  multi = sharded.value_and_grads(parametric, data["features"], data["indices"], data["bank"],
                                  num_shards=8, sharded_param=weights)
  for got, want in zip(multi[:3], single[:3]):
    np.testing.assert_allclose(got, want, **SHARDED_TOLERANCE)


def test_sharded_softmax_with_empty_shards():
  """n = 9 over 8 shards: rows_per_shard = 2, so shards 5, 6 and 7 hold no real row."""
  rng = np.random.default_rng(3)
  bank = _unit(rng, 9, DIM)
  indices = rng.permutation(9)[:8]
  features = _unit(rng, 8, DIM)
  single = sharded.value_and_grads(softmax, features, indices, bank, num_shards=None)
  multi = sharded.value_and_grads(softmax, features, indices, bank, num_shards=8)
  assert np.isfinite(multi[1]).all()
  np.testing.assert_allclose(multi[0], single[0], **SHARDED_TOLERANCE)
  np.testing.assert_allclose(multi[1], single[1], **SHARDED_TOLERANCE)


def test_shard_map_runs_the_same_body(data):
  """The objective body uses named-axis collectives only, so it runs under shard_map too."""
  from jax.sharding import AxisType
  from jax.sharding import PartitionSpec as P
  layout = ShardLayout(N, 8)
  mesh = jax.make_mesh((8,), (sharded.AXIS,), axis_types=(AxisType.Auto,))
  noise = sharded.shard_noise(data["noise"], layout)

  def body(f_local, idx_local, rows, noise_rows, noise_valid):
    def loss(f_local):
      f = jax.lax.all_gather(f_local, sharded.AXIS, tiled=True)
      idx = jax.lax.all_gather(idx_local, sharded.AXIS, tiled=True)
      bank = MemoryBank(rows=rows[0], num_instances=N, num_shards=8)
      sample = type(noise)(rows=noise_rows[0], valid=noise_valid[0], num_noise=M)
      return objectives.nce_loss(f, idx, bank, sample, objectives.Partition.create(),
                                 temperature=TAU, z_mode="batch", axis_name=sharded.AXIS)[0]
    share, grad = jax.value_and_grad(loss)(f_local)
    return share[None], grad

  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(sharded.AXIS),
                             out_specs=(P(sharded.AXIS), P(sharded.AXIS))))
  shares, grads = fn(jnp.asarray(data["features"], jnp.float32), jnp.asarray(data["indices"]),
                     jnp.asarray(layout.shard_array(data["bank"])), noise.rows, noise.valid)
  single = sharded.value_and_grads(nce(), data["features"], data["indices"], data["bank"],
                                   data["noise"], num_shards=None)
  np.testing.assert_allclose(shares.sum(), single[0], **SHARDED_TOLERANCE)
  np.testing.assert_allclose(grads, single[1], **SHARDED_TOLERANCE)


# ------------------------------------------------------------------------------------------------
# The partition function Z.
# ------------------------------------------------------------------------------------------------


def test_partition_modes():
  fresh = objectives.Partition.create()
  first = objectives.update_partition(fresh, jnp.float32(5.0), "frozen")
  assert first.log_z == 5.0 and first.initialized
  assert objectives.update_partition(first, jnp.float32(9.0), "frozen").log_z == 5.0
  assert objectives.update_partition(first, jnp.float32(9.0), "batch").log_z == 9.0
  ema = objectives.update_partition(first, jnp.float32(9.0), "ema", ema_momentum=0.99)
  np.testing.assert_allclose(np.exp(ema.log_z), 0.99 * np.exp(5.0) + 0.01 * np.exp(9.0),
                             rtol=1e-5)
  assert objectives.update_partition(fresh, jnp.float32(9.0), "ema").log_z == 9.0
  with pytest.raises(ValueError, match="Z mode"):
    objectives.update_partition(fresh, jnp.float32(1.0), "sometimes")


def test_frozen_z_is_set_from_the_first_batch_then_held(data):
  features, indices = jnp.asarray(data["features"], jnp.float32), jnp.asarray(data["indices"])
  bank = MemoryBank(rows=jnp.asarray(data["bank"], jnp.float32), num_instances=N)
  noise = from_global_indices(data["noise"], ShardLayout(N), 0, M)
  partition = objectives.Partition.create()
  _, aux = objectives.nce_loss(features, indices, bank, noise, partition, temperature=TAU)
  first = aux["partition"]
  np.testing.assert_allclose(first.log_z, ref.log_partition_estimate(
      data["features"], data["indices"], data["bank"], data["noise"], TAU), rtol=1e-5)
  _, aux = objectives.nce_loss(-features, indices, bank, noise, first, temperature=TAU)
  assert aux["partition"].log_z == first.log_z
  assert aux["metrics"]["batch_log_z"] != first.log_z


def test_loss_is_finite_at_extreme_temperature_with_bf16_bank(data):
  """Z would overflow float32 at tau = 0.005 (exp(200)); the log-space loss does not."""
  features = jnp.asarray(data["features"], jnp.float32)
  bank = MemoryBank(rows=jnp.asarray(data["bank"], jnp.bfloat16), num_instances=N)
  noise = from_global_indices(data["noise"], ShardLayout(N), 0, M)
  for z_mode in objectives.Z_MODES:
    (loss, aux), grad = jax.value_and_grad(
        lambda f: objectives.nce_loss(f, jnp.asarray(data["indices"]), bank, noise,
                                      objectives.Partition.create(), temperature=0.005,
                                      z_mode=z_mode), has_aux=True)(features)
    assert np.isfinite(loss) and np.isfinite(grad).all(), z_mode
    assert np.isfinite(aux["metrics"]["log_z"]) and aux["metrics"]["log_z"] > 88
  idx = jnp.asarray(data["indices"])
  for fn in (lambda f: objectives.softmax_loss(f, idx, bank, temperature=0.005),
             lambda f: objectives.infonce_loss(f, idx, bank, noise, temperature=0.005)):
    (share, _), grad = jax.value_and_grad(fn, has_aux=True)(features)
    assert np.isfinite(share) and np.isfinite(grad).all()
