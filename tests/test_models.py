"""Tests of the encoders: shapes, unit norms, parameter counts, BatchNorm modes, dtypes, init."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instdisc_jax import models
from instdisc_jax.errors import ConfigError


def _count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _abstract_variables(model, x):
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)


def _numpy_variables(model, x, seed=0):
  """He-scaled NumPy weights in the model's variable layout (fast: no jitted initialisers)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      scale = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
      return (rng.standard_normal(leaf.shape) * scale).astype(np.float32)
    return (np.ones if name in ("scale", "var") else np.zeros)(leaf.shape, np.float32)

  return jax.tree_util.tree_map_with_path(fill, _abstract_variables(model, x))


def _rbg_key(seed: int) -> jax.Array:
  """An "rbg" key: XLA on CPU compiles threefry sampling of some kernel shapes for ~10 s."""
  return jax.random.key(seed, impl="rbg")


@functools.cache
def _tiny():
  """A two-stage SmallResNet, its real initial variables and a batch of 16 8x8x1 images."""
  model = models.get_model("small_resnet", width=8, stage_sizes=[1, 1], low_dim=16)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((16, 8, 8, 1)), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(_rbg_key(0), x)
  return model, variables, x


def _basic_block_params(cin: int, c: int, stride: int) -> int:
  proj = cin * c + 2 * c if stride != 1 or cin != c else 0
  return 9 * cin * c + 2 * c + 9 * c * c + 2 * c + proj


def _bottleneck_params(cin: int, c: int, stride: int) -> int:
  proj = cin * 4 * c + 8 * c if stride != 1 or cin != 4 * c else 0
  return cin * c + 2 * c + 9 * c * c + 2 * c + c * 4 * c + 8 * c + proj


def _backbone_params(stem_kernel: int, block, stage_sizes, expansion: int) -> int:
  total, cin = stem_kernel**2 * 3 * 64 + 2 * 64, 64
  for i, num_blocks in enumerate(stage_sizes):
    c = 64 * 2**i
    for j in range(num_blocks):
      total += block(cin, c, 2 if i > 0 and j == 0 else 1)
      cin = c * expansion
  return total


@pytest.mark.parametrize("name, stem_kernel, block, stage_sizes, expansion, torchvision", [
    ("resnet18", 7, _basic_block_params, (2, 2, 2, 2), 1, 11_176_512),
    ("resnet50", 7, _bottleneck_params, (3, 4, 6, 3), 4, 23_508_032),
    ("cifar_resnet18", 3, _basic_block_params, (2, 2, 2, 2), 1, None),
])
def test_parameter_counts(name, stem_kernel, block, stage_sizes, expansion, torchvision):
  expected = _backbone_params(stem_kernel, block, stage_sizes, expansion)
  if torchvision is not None:  # torchvision's count without `fc` (BN affine params included)
    assert expected == torchvision
  params = _abstract_variables(models.get_model(name), jnp.zeros((1, 32, 32, 3)))["params"]
  head = params.pop("head")
  assert _count(params) == expected
  assert _count(head) == 512 * expansion * 128 + 128


@pytest.mark.parametrize("name, shape, pooled_dim", [
    ("cifar_resnet18", (2, 32, 32, 3), 512),
    ("resnet18", (2, 32, 32, 3), 512),
    ("resnet50", (2, 32, 32, 3), 2048),
    ("small_resnet", (2, 28, 28, 1), 64),
])
def test_embeddings_are_unit_norm(name, shape, pooled_dim):
  model = models.get_model(name, low_dim=32)
  x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
  variables = _numpy_variables(model, x)
  apply = jax.jit(functools.partial(model.apply, train=False, return_pooled=True))
  embedding, pooled = apply(variables, x)
  assert embedding.shape == (2, 32) and embedding.dtype == jnp.float32
  assert pooled.shape == (2, pooled_dim) and pooled.dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(embedding, axis=-1), 1.0, rtol=1e-5)
  assert not np.allclose(embedding[0], embedding[1])


def test_default_output_train_mode_and_running_stats():
  model, variables, x = _tiny()
  embedding = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  assert embedding.shape == (16, 16)
  train_embedding, updates = jax.jit(functools.partial(
      model.apply, train=True, mutable=["batch_stats"]))(variables, x)
  np.testing.assert_allclose(jnp.linalg.norm(train_embedding, axis=-1), 1.0, rtol=1e-5)
  old, new = variables["batch_stats"]["bn_init"], updates["batch_stats"]["bn_init"]
  assert not np.allclose(old["mean"], new["mean"])  # momentum update from the batch


def _mapped_batch_stats(model, variables, x):
  """Applies `model` in train mode on 8 devices, 2 examples each; returns (embeddings, stats)."""
  n = jax.local_device_count()
  replicated = jax.tree.map(lambda v: jnp.broadcast_to(v, (n, *v.shape)), variables)
  shards = x.reshape(n, -1, *x.shape[1:])
  step = jax.pmap(
      lambda v, xs: model.apply(v, xs, train=True, mutable=["batch_stats"]), axis_name="batch")
  embedding, updates = step(replicated, shards)
  return embedding.reshape(-1, embedding.shape[-1]), updates["batch_stats"]


def test_per_device_and_cross_device_batch_norm():
  assert jax.local_device_count() == 8
  model, variables, x = _tiny()
  x = x + jnp.arange(16.0)[:, None, None, None]  # every device sees a different distribution

  _, per_device = _mapped_batch_stats(model, variables, x)
  means = per_device["bn_init"]["mean"]
  assert not np.allclose(means[0], means[1])

  synced = model.clone(bn_axis_name="batch")
  embedding, cross_device = _mapped_batch_stats(synced, variables, x)
  for leaf in jax.tree.leaves(cross_device):
    np.testing.assert_allclose(leaf, np.broadcast_to(leaf[0], leaf.shape), rtol=1e-5, atol=1e-6)
  # Cross-device statistics are those of the whole batch on one device.
  full_embedding, full = jax.jit(functools.partial(
      model.apply, train=True, mutable=["batch_stats"]))(variables, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-4, atol=1e-5),
               cross_device, full["batch_stats"])
  np.testing.assert_allclose(embedding, full_embedding, rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  model, variables, x = _tiny()
  half = model.clone(dtype=jnp.bfloat16)
  params = _abstract_variables(half, x)["params"]
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  embedding, pooled = jax.jit(functools.partial(half.apply, train=False, return_pooled=True))(
      variables, x)
  assert embedding.dtype == jnp.float32 and pooled.dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(embedding, axis=-1), 1.0, rtol=1e-5)
  reference = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  np.testing.assert_allclose(embedding, reference, atol=0.05)


def test_initialisation():
  _, variables, _ = _tiny()
  params = variables["params"]
  kernel = params["BasicBlock_1"]["Conv_1"]["kernel"]  # 3x3, 16 -> 16
  assert kernel.shape == (3, 3, 16, 16)
  np.testing.assert_allclose(np.std(kernel), np.sqrt(2.0 / (9 * 16)), rtol=0.1)
  head = params["head"]["kernel"]
  assert np.abs(head).max() <= 1 / np.sqrt(16) and np.std(head) > 0.5 / np.sqrt(3 * 16)
  for block in ("BasicBlock_0", "BasicBlock_1"):
    np.testing.assert_array_equal(params[block]["BatchNorm_1"]["scale"], 1.0)


def test_zero_init_residual():
  model, _, x = _tiny()
  zeroed = model.clone(zero_init_residual=True)
  params = jax.jit(functools.partial(zeroed.init, train=False))(_rbg_key(0), x)["params"]
  for block in ("BasicBlock_0", "BasicBlock_1"):
    np.testing.assert_array_equal(params[block]["BatchNorm_1"]["scale"], 0.0)
    np.testing.assert_array_equal(params[block]["BatchNorm_0"]["scale"], 1.0)


def test_unknown_model_is_a_config_error():
  with pytest.raises(ConfigError) as error:
    models.get_model("resnet_18")
  message = str(error.value)
  assert message.startswith("model: ") and "'resnet_18'" in message
  assert "cifar_resnet18, resnet18, resnet50, small_resnet" in message
  assert "did you mean 'resnet18'?" in message
  assert "\n" not in message
