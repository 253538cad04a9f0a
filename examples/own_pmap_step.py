"""The memory bank, NCE and kNN inside your own `jax.pmap` step (README: "Use from your own JAX
code"). Runs on any number of devices; try XLA_FLAGS=--xla_force_host_platform_device_count=8."""

import jax
import jax.numpy as jnp
import numpy as np

from instdisc_jax import knn
from instdisc_jax import memory_bank
from instdisc_jax import noise
from instdisc_jax import objectives
from instdisc_jax import sharding

AXIS = "batch"
dim, num_noise, temperature, bank_momentum = 32, 64, 0.07, 0.5


def encoder(params, x):
  return memory_bank.l2_normalize(x @ params)        # stands in for your network


def train_step(params, bank, partition, x, indices, key_data):
  """x, indices: this device's examples. bank: this device's `MemoryBank` shard (donated).
  key_data: the same on every device (each device then draws the noise from its own shard)."""
  layout = bank.layout
  all_indices = sharding.gather_batch(indices, AXIS)              # (B,) global batch
  sample = noise.sample(jax.random.wrap_key_data(key_data), layout, num_noise,
                        all_indices.shape[0], axis_name=AXIS)

  def loss_share(params):
    features = sharding.gather_batch(encoder(params, x), AXIS)   # (B, dim), all-gathered
    share, aux = objectives.nce_loss(features, all_indices, bank, sample, partition,
                                     temperature=temperature, z_mode="batch", axis_name=AXIS)
    return share, (aux, features)

  # Differentiate this device's share; the loss is the psum of the shares.
  (share, (aux, features)), grads = jax.value_and_grad(loss_share, has_aux=True)(params)
  params = params - 0.1 * jax.lax.psum(grads, AXIS)
  # The update writes the rows the objective read (aux["rows"]): the step reads the bank once
  # and updates it in place, so its cost does not grow with n.
  bank = memory_bank.update(bank, aux["rows"], features, momentum=bank_momentum)
  return params, bank, aux["partition"], objectives.global_loss(share, AXIS)


def knn_step(bank, labels, queries):
  scores = knn.knn_classify(queries, bank.values(), labels, num_instances=bank.num_instances,
                            num_classes=10, k=20, temperature=temperature, axis_name=AXIS)
  return knn.predict(scores, top=1)[:, 0]


def main(n=1000, per_device_batch=8, bank_dtype=jnp.float32):
  devices = jax.local_device_count()
  # The bank is sharded over devices along the instance axis: rows (devices, ceil(n / devices),
  # dim). A bfloat16 bank's rows are its bit pattern (uint16); bank.values() reads the values.
  bank = memory_bank.init_bank(jax.random.key(0), n, dim, num_shards=devices, dtype=bank_dtype)
  layout = bank.layout
  p_train = jax.pmap(train_step, axis_name=AXIS, donate_argnums=(1,))
  p_knn = jax.pmap(knn_step, axis_name=AXIS)

  rng = np.random.default_rng(0)
  data = rng.normal(size=(n, 16)).astype(np.float32)
  labels = rng.integers(0, 10, n).astype(np.int32)
  replicate = lambda tree: jax.tree.map(lambda x: np.stack([x] * devices), tree)
  params = replicate(jnp.asarray(rng.normal(size=(16, dim)), jnp.float32))
  partition = replicate(objectives.Partition.create())
  for step in range(3):
    indices = rng.choice(n, devices * per_device_batch, replace=False).astype(np.int32)
    x = data[indices].reshape(devices, per_device_batch, 16)
    key_data = replicate(jax.random.key_data(jax.random.fold_in(jax.random.key(1), step)))
    params, bank, partition, loss = p_train(params, bank, partition, x,
                                            indices.reshape(devices, -1), key_data)
    print(f"step {step}: loss {float(loss[0]):.3f}")

  sharded_labels = jnp.asarray(layout.shard_array(labels, fill=-1))
  queries = np.stack([encoder(jax.device_get(params)[0], data[:5])] * devices)
  print("kNN predictions:", np.asarray(p_knn(bank, sharded_labels, queries)[0]))


if __name__ == "__main__":
  main()
