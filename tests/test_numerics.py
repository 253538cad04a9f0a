"""The NCE partition Z cannot overflow in half precision: the loss math is float32, in log space.

With every score s = 1, Z = n exp(1 / tau): for n = 70,000 and tau = 0.07 that is about 1.1e11,
far beyond float16's largest value (65,504). Features and bank rows stored in float16 or
bfloat16 must still give a finite float32 Z and loss, equal to the float32 computation on the
same (rounded) values; at tau = 0.01, where Z itself exceeds float32 (e^100 n), log Z and the
loss stay finite. The float32 loss equals the float64 evaluation of the same formula to 1e-6.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_numpy as ref
import sharded

from instdisc_jax import noise as noise_lib
from instdisc_jax import objectives
from instdisc_jax.memory_bank import MemoryBank
from instdisc_jax.sharding import ShardLayout

N, D, B, M = 70_000, 16, 4, 32


def nce(dtype, temperature):
  """(loss, aux) of NCE with every feature and bank row the same unit vector, in `dtype`."""
  row = jnp.full((D,), 1 / np.sqrt(D), dtype)
  bank = MemoryBank(rows=jnp.broadcast_to(row, (N, D)), num_instances=N)
  features = jnp.broadcast_to(row, (B, D))
  indices = jnp.arange(B, dtype=jnp.int32)
  noise = noise_lib.sample(jax.random.key(0), ShardLayout(N, 1), M, B)
  return objectives.nce_loss(features, indices, bank, noise, objectives.Partition.create(),
                             temperature=temperature)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_inputs_give_the_float32_z_and_loss(dtype):
  loss, aux = nce(dtype, 0.07)
  reference_loss, reference_aux = nce(jnp.float32, 0.07)
  metrics = aux["metrics"]
  score = float(jnp.sum(jnp.full((D,), 1 / np.sqrt(D), dtype).astype(jnp.float32) ** 2))
  assert loss.dtype == metrics["z"].dtype == aux["partition"].log_z.dtype == jnp.float32
  assert float(metrics["z"]) > 1e11 > float(jnp.finfo(jnp.float16).max)
  np.testing.assert_allclose(float(metrics["log_z"]), np.log(N) + score / 0.07, rtol=1e-6)
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(float(loss), float(reference_loss), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["log_z"]), float(reference_aux["metrics"]["log_z"]),
                             rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_z_beyond_float32_still_gives_a_finite_loss(dtype):
  loss, aux = nce(dtype, 0.01)
  log_z = float(aux["metrics"]["log_z"])
  assert log_z > np.log(float(jnp.finfo(jnp.float32).max))     # Z itself is not representable
  assert np.isfinite(log_z) and np.isfinite(float(loss))


# ------------------------------------------------------------------------------------------------
# The loss value to the last digit: float32 against float64 (issue 14).
# ------------------------------------------------------------------------------------------------

TAU, BATCH, DIM = 0.07, 16, 2


def _nce_against_float64(num_instances: int, num_noise: int, num_shards):
  """(float32 loss, float64 loss of the same formula at the same Z) for random data.

  The bank tiles 4,096 random unit rows (d = 2 keeps n = 10^7 at 80 MB); features lie near
  their bank rows, as after training, so both the positive and the noise terms matter.
  """
  rng = np.random.default_rng(num_instances + num_noise)
  base = ref.normalize(rng.normal(size=(4096, DIM))).astype(np.float32)
  bank = np.resize(base, (num_instances, DIM))
  indices = rng.choice(num_instances, BATCH, replace=False)
  features = ref.normalize(bank[indices] + 0.3 * rng.normal(size=(BATCH, DIM))).astype(np.float32)
  noise = rng.integers(0, num_instances, size=(BATCH, num_noise))

  def objective(f, idx, bank, noise_sample, _, axis_name):
    return objectives.nce_loss(f, idx, bank, noise_sample, objectives.Partition.create(),
                               temperature=TAU, z_mode="batch", axis_name=axis_name)

  loss, _, _, aux = sharded.value_and_grads(objective, features, indices, bank, noise,
                                            num_shards=num_shards)
  z = np.exp(np.float64(aux["metrics"]["log_z"]))         # the same Z for both
  expected = ref.nce_loss(features.astype(np.float64), indices, bank.astype(np.float64), noise,
                          TAU, z)
  return float(loss), expected


@pytest.mark.parametrize("num_noise", [4096, 65536])
@pytest.mark.parametrize("num_instances", [10**3, 10**5, 10**7])
def test_nce_loss_value_is_float64_to_1e6(num_instances, num_noise):
  """Regression: log(m/n) - log(m/n + eps) in float32, m times, offset the loss by ~1.2e-5."""
  for num_shards in (None, 8):
    loss, expected = _nce_against_float64(num_instances, num_noise, num_shards)
    assert abs(loss - expected) <= 1e-6, (num_shards, loss, expected)


def test_compensated_sum_is_within_an_ulp_and_overflows_like_a_plain_sum():
  rng = np.random.default_rng(0)
  x = (rng.normal(size=4097) * 10.0 ** rng.integers(-3, 4, 4097)).astype(np.float32)
  exact = np.sum(x.astype(np.float64))
  total = float(jax.jit(objectives.compensated_sum)(jnp.asarray(x)))
  assert abs(total - exact) <= np.spacing(np.float32(exact))
  huge = jnp.full((5,), -3e38, jnp.float32)        # a diverged loss: the sum overflows
  assert float(objectives.compensated_sum(huge)) == -np.inf
  assert float(jax.grad(objectives.compensated_sum)(jnp.arange(3.0)).sum()) == 3.0
