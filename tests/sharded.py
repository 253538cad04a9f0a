"""Runs an objective the way the train step does: on D devices under `jax.pmap`, the batch split
over devices and all-gathered, the bank sharded over the instance axis, the noise partitioned by
owner. Also runs it unsharded (axis_name=None), so the two can be compared."""

import jax
import jax.numpy as jnp
import numpy as np

from instdisc_jax import noise as noise_lib
from instdisc_jax import sharding
from instdisc_jax.memory_bank import MemoryBank
from instdisc_jax.sharding import ShardLayout

AXIS = "devices"


def shard_noise(global_noise, layout):
  """(B, m) or (m,) global noise indices -> NoiseSample stacked over shards (leading D axis)."""
  counts = [np.sum(layout.owner(np.asarray(global_noise)) == k, axis=-1)
            for k in range(layout.num_shards)]
  slots = max(1, int(max(np.max(c) for c in counts)))
  per_shard = [noise_lib.from_global_indices(global_noise, layout, k, slots)
               for k in range(layout.num_shards)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *per_shard)


def value_and_grads(objective, features, indices, bank_rows, noise=None, num_shards=8,
                    sharded_param=None):
  """Loss and gradients of `objective(features, indices, bank, noise, param, axis_name)`.

  `objective` returns (share, aux). Gradients are taken with respect to the features (global
  (B, d)) and, if given, `sharded_param` (an (n, d) array sharded like the bank). With
  num_shards=None it runs unsharded.
  """
  n = bank_rows.shape[0]
  features = jnp.asarray(features, jnp.float32)
  if num_shards is None:
    bank = MemoryBank(rows=jnp.asarray(bank_rows), num_instances=n)
    noise_sample = None
    if noise is not None:
      noise_sample = noise_lib.from_global_indices(noise, ShardLayout(n), 0,
                                                   max(1, noise.shape[-1]))

    def loss(f, p):
      share, aux = objective(f, jnp.asarray(indices), bank, noise_sample, p, None)
      return share, aux

    param = None if sharded_param is None else jnp.asarray(sharded_param)
    (value, aux), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(features, param)
    return value, grads[0], grads[1], aux

  layout = ShardLayout(n, num_shards)
  batch = features.shape[0]
  assert batch % num_shards == 0
  local = lambda x: jnp.asarray(x).reshape((num_shards, batch // num_shards) + x.shape[1:])
  rows = jnp.asarray(layout.shard_array(bank_rows))
  noise_stacked = None if noise is None else shard_noise(noise, layout)
  param = None if sharded_param is None else jnp.asarray(layout.shard_array(sharded_param))

  def body(f_local, idx_local, rows, noise_sample, p):
    def loss(f_local, p):
      f = sharding.gather_batch(f_local, AXIS)
      idx = sharding.gather_batch(idx_local, AXIS)
      bank = MemoryBank(rows=rows, num_instances=n, num_shards=num_shards)
      return objective(f, idx, bank, noise_sample, p, AXIS)
    (share, aux), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(f_local, p)
    return share, grads, aux

  shares, grads, aux = jax.pmap(body, axis_name=AXIS)(
      local(features), local(np.asarray(indices)), rows, noise_stacked, param)
  feature_grads = grads[0].reshape(batch, -1)
  param_grads = None if grads[1] is None else layout.unshard_array(grads[1])
  aux = jax.tree.map(lambda x: x[0], aux)   # metrics are replicated
  return shares.sum(), feature_grads, param_grads, aux
