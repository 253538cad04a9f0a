"""The NCE partition Z cannot overflow in half precision: the loss math is float32, in log space.

With every score s = 1, Z = n exp(1 / tau): for n = 70,000 and tau = 0.07 that is about 1.1e11,
far beyond float16's largest value (65,504). Features and bank rows stored in float16 or
bfloat16 must still give a finite float32 Z and loss, equal to the float32 computation on the
same (rounded) values; at tau = 0.01, where Z itself exceeds float32 (e^100 n), log Z and the
loss stay finite.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
