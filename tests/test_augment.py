"""Tests of the on-device augmentation against torchvision's semantics (re-derived in NumPy)."""

import colorsys
import gzip
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from instdisc_jax import augment
from instdisc_jax import crop
from instdisc_jax import dataset_stats
from instdisc_jax.errors import ConfigError

FASHION_MNIST_TRAIN = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
LUMA = np.array([0.2989, 0.587, 0.114])


def _cfg(channels: int, image_size: int, **overrides) -> augment.AugmentConfig:
  stats = dataset_stats.DATASET_STATS["cifar10" if channels == 3 else "fashion_mnist"]
  return augment.AugmentConfig(image_size=image_size, mean=stats.mean, std=stats.std, **overrides)


def _images(shape, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _unnormalize(x, cfg):
  return np.asarray(x) * np.asarray(cfg.std) + np.asarray(cfg.mean)


@pytest.fixture(scope="module")
def rgb():
  """CIFAR-style config on non-square 36x40 inputs cropped to 32x32, and its jitted transform."""
  cfg = _cfg(3, 32)
  return cfg, jax.jit(lambda key, images: augment.train_augment(key, images, cfg))


@pytest.fixture(scope="module")
def gray():
  """Fashion-MNIST-style config on 28x28x1 inputs, and its jitted transform."""
  cfg = _cfg(1, 28)
  return cfg, jax.jit(lambda key, images: augment.train_augment(key, images, cfg))


def test_train_augment_shapes_dtype_and_range(rgb, gray):
  for (cfg, fn), shape in ((rgb, (8, 36, 40, 3)), (gray, (8, 28, 28, 1))):
    out = fn(jax.random.key(0), _images(shape))
    assert out.shape == (8, cfg.image_size, cfg.image_size, shape[-1])
    assert out.dtype == jnp.float32
    pixels = _unnormalize(out, cfg)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_same_key_same_output_and_different_keys_differ(rgb):
  _, fn = rgb
  images = _images((8, 36, 40, 3))
  first = fn(jax.random.key(1), images)
  np.testing.assert_array_equal(first, fn(jax.random.key(1), images))
  assert not np.allclose(first, fn(jax.random.key(2), images))


def test_examples_are_augmented_independently(rgb):
  _, fn = rgb
  images = np.repeat(_images((1, 36, 40, 3)), 8, axis=0)
  out = np.asarray(fn(jax.random.key(3), images))
  # Identical inputs get different augmentations ...
  assert len({out[i].tobytes() for i in range(8)}) == 8
  # ... and changing the other examples leaves example 0 unchanged.
  images[1:] = _images((7, 36, 40, 3), seed=1)
  np.testing.assert_array_equal(out[0], fn(jax.random.key(3), images)[0])


def test_eval_transform_is_normalisation_only():
  for channels, dataset in ((3, "cifar10"), (1, "fashion_mnist")):
    cfg = _cfg(channels, 32)
    images = _images((4, 32, 32, channels))
    stats = dataset_stats.DATASET_STATS[dataset]
    expected = (images / 255.0 - np.asarray(stats.mean)) / np.asarray(stats.std)
    np.testing.assert_allclose(augment.eval_transform(images, cfg), expected, rtol=1e-5, atol=1e-5)


def test_host_cropped_images_must_have_the_output_size():
  cfg = _cfg(3, 32, crop_on_device=False)
  run = lambda images: jax.eval_shape(
      lambda key, x: augment.train_augment(key, x, cfg), jax.random.key(0), images)
  assert run(_images((2, 32, 32, 3))).shape == (2, 32, 32, 3)
  with pytest.raises(ValueError, match="host-cropped 32x32"):
    run(_images((2, 36, 36, 3)))


def test_normalisation_channel_count_must_match():
  with pytest.raises(ValueError, match="1 channel"):
    augment.eval_transform(_images((2, 8, 8, 3)), _cfg(1, 8))


# --- RandomResizedCrop -------------------------------------------------------------------------


def test_full_scale_square_crop_is_identity_resize():
  image = jnp.asarray(_images((32, 32, 3)) / 255.0, jnp.float32)
  out = jax.jit(lambda k: crop.random_resized_crop(k, image, 32, (1.0, 1.0), (1.0, 1.0)))(
      jax.random.key(0))
  np.testing.assert_allclose(out, image, atol=1e-6)


def test_crop_box_falls_back_to_central_crop():
  # A square box of the whole 20x40 area (28x28) never fits, so every attempt fails and the
  # box falls back to the central 20x20 square, as in torchvision's get_params.
  image = jnp.asarray(_images((20, 40, 1)) / 255.0, jnp.float32)
  box = jax.jit(lambda k: crop.crop_box(k, 20, 40, (1.0, 1.0), (1.0, 1.0)))(jax.random.key(0))
  assert tuple(int(v) for v in box) == (0, 10, 20, 20)
  out = jax.jit(lambda k: crop.random_resized_crop(k, image, 20, (1.0, 1.0), (1.0, 1.0)))(
      jax.random.key(0))
  np.testing.assert_allclose(out, image[:, 10:30], atol=1e-6)


def test_resized_crop_samples_the_box():
  image = jnp.asarray(_images((24, 24, 3)) / 255.0, jnp.float32)
  resized_crop = jax.jit(crop.resized_crop, static_argnums=2)
  np.testing.assert_allclose(
      resized_crop(image, jnp.array([5, 7, 12, 12]), 12), image[5:17, 7:19], atol=1e-6)
  whole = resized_crop(image, jnp.array([0, 0, 24, 24]), 16)
  expected = jax.image.resize(image, (16, 16, 3), "linear", antialias=True)
  np.testing.assert_allclose(whole, expected, atol=1e-5)


def _torchvision_crop_areas(rng, height, width, scale, ratio, samples):
  """NumPy re-derivation of `RandomResizedCrop.get_params`; returns crop area fractions."""
  areas = []
  for _ in range(samples):
    for _ in range(10):
      target = height * width * rng.uniform(*scale)
      aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
      w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
      if 0 < w <= width and 0 < h <= height:
        areas.append(h * w / (height * width))
        break
    else:
      areas.append(1.0)
  return np.array(areas)


def test_crop_box_statistics():
  height, width, n = 32, 32, 4000
  keys = jax.random.split(jax.random.key(0), n)
  top, left, h, w = (np.asarray(v) for v in jax.jit(jax.vmap(
      lambda k: crop.crop_box(k, height, width)))(keys))
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  assert (top == 0).any() and (top + h == height).any() and (left + w == width).any()
  fraction = h * w / (height * width)
  # Rounding the sides to whole pixels moves the area by a few percent around [0.2, 1].
  assert fraction.min() >= 0.18 and fraction.max() <= 1.0
  assert (np.abs(np.log(w / h)) <= math.log(4 / 3) + 0.1).all()
  reference = _torchvision_crop_areas(np.random.default_rng(0), height, width, (0.2, 1.0),
                                      (3 / 4, 4 / 3), n)
  assert abs(fraction.mean() - reference.mean()) < 0.015
  assert abs(np.median(fraction) - np.median(reference)) < 0.03


# --- Colour ------------------------------------------------------------------------------------


def _float_image(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def test_blend_ops_match_torchvision_formulas():
  image = _float_image((6, 5, 3))
  x = np.asarray(image, np.float64)
  gray = (x @ LUMA)[..., None]
  for factor in (0.0, 0.6, 1.0, 1.4, 2.5):
    np.testing.assert_allclose(
        augment.adjust_brightness(image, factor), np.clip(factor * x, 0, 1), atol=1e-6)
    np.testing.assert_allclose(
        augment.adjust_contrast(image, factor),
        np.clip(factor * x + (1 - factor) * gray.mean(), 0, 1), atol=1e-6)
    np.testing.assert_allclose(
        augment.adjust_saturation(image, factor),
        np.clip(factor * x + (1 - factor) * gray, 0, 1), atol=1e-6)


def test_hue_matches_colorsys():
  image = _float_image((4, 5, 3))
  for delta in (-0.4, 0.0, 0.25):
    expected = np.array([
        colorsys.hsv_to_rgb((h + delta) % 1.0, s, v)
        for h, s, v in (colorsys.rgb_to_hsv(*p) for p in np.asarray(image).reshape(-1, 3))
    ]).reshape(image.shape)
    np.testing.assert_allclose(augment.adjust_hue(image, delta), expected, atol=1e-5)


def test_brightness_jitter_factor_distribution():
  image = _float_image((8, 8, 3)) * 0.5 + 0.1  # 0.1 .. 0.6: never clipped at factor <= 1.4
  keys = jax.random.split(jax.random.key(0), 512)
  out = jax.jit(jax.vmap(lambda k: augment.color_jitter(k, image, 0.4, 0.0, 0.0, 0.0)))(keys)
  ratios = np.asarray(out) / np.asarray(image)
  factors = ratios.reshape(512, -1)
  np.testing.assert_allclose(factors, np.broadcast_to(factors[:, :1], factors.shape), rtol=1e-5)
  assert factors.min() >= 0.6 - 1e-6 and factors.max() <= 1.4 + 1e-6
  assert factors.min() < 0.65 and factors.max() > 1.35
  assert abs(factors.mean() - 1.0) < 0.05


def test_blend_in_order_applies_ops_in_sequence_and_skips():
  image = _float_image((4, 4, 3))
  partners = [augment._black, augment._grey_mean, augment.grayscale]
  factors = jnp.array([1.3, 0.7, 0.2])
  ops = jnp.array([2, -1, 0, 1])
  expected = augment.adjust_contrast(augment.adjust_brightness(
      augment.adjust_saturation(image, 0.2), 1.3), 0.7)
  np.testing.assert_allclose(
      augment._blend_in_order(image, ops, partners, factors), expected, atol=1e-6)


def test_jitter_applies_hue_at_its_place_in_the_order():
  # Blends commute with one another unless they clip; hue and saturation do not commute.
  image = _float_image((4, 4, 3))
  partners = [augment._black, augment._grey_mean, augment.grayscale]
  factors = jnp.array([0.8, 1.2, 0.3])
  delta = jnp.float32(0.3)
  b = lambda x: augment.adjust_brightness(x, factors[0])
  c = lambda x: augment.adjust_contrast(x, factors[1])
  s = lambda x: augment.adjust_saturation(x, factors[2])
  h = lambda x: augment.adjust_hue(x, delta)
  for order, expected in (([3, 2, 0, 1], c(b(s(h(image))))), ([2, 3, 0, 1], c(b(h(s(image))))),
                          ([0, 1, 2, 3], h(s(c(b(image)))))):
    out = augment._jitter_in_order(image, jnp.array(order), partners, factors, delta)
    np.testing.assert_allclose(out, expected, atol=1e-5)
  assert not np.allclose(c(b(s(h(image)))), c(b(h(s(image)))), atol=1e-3)


def test_one_channel_images_skip_saturation_and_hue():
  image = _float_image((6, 6, 1))
  out = augment.color_jitter(jax.random.key(0), image, 0.0, 0.0, 0.4, 0.4)
  np.testing.assert_array_equal(out, image)
  assert augment.random_grayscale(jax.random.key(0), image, 1.0) is image


def test_random_grayscale_equalises_channels():
  image = _float_image((5, 5, 3))
  out = np.asarray(augment.random_grayscale(jax.random.key(0), image, 1.0))
  np.testing.assert_allclose(out, np.repeat((np.asarray(image) @ LUMA)[..., None], 3, -1),
                             atol=1e-6)
  np.testing.assert_array_equal(augment.random_grayscale(jax.random.key(0), image, 0.0), image)


# --- Config and statistics ---------------------------------------------------------------------


def test_from_config():
  config = ml_collections.ConfigDict(
      dict(image_size=32, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], flip=False, hue=0))
  cfg = augment.AugmentConfig.from_config(config)
  assert cfg.mean == (0.5, 0.5, 0.5) and cfg.hue == 0.0 and not cfg.flip
  assert cfg.crop_scale == (0.2, 1.0)
  hash(cfg)  # usable as a static jit argument

  with pytest.raises(ConfigError, match=r"augment\.hue: got 0\.6"):
    augment.AugmentConfig.from_config(dict(config, hue=0.6))
  with pytest.raises(ConfigError, match=r"augment\.flips: .*did you mean 'augment\.flip'\?"):
    augment.AugmentConfig.from_config(dict(config, flips=True))
  with pytest.raises(ConfigError, match=r"augment\.image_size: required"):
    augment.AugmentConfig.from_config(dict(mean=[0.5], std=[0.5]))
  with pytest.raises(ConfigError, match=r"augment\.mean: "):
    augment.AugmentConfig.from_config(dict(config, std=[0.2]))


def test_dataset_stats_table():
  assert set(dataset_stats.DATASET_STATS) == {
      "fashion_mnist", "cifar10", "cifar100", "stl10", "imagenet2012"}
  for stats in dataset_stats.DATASET_STATS.values():
    assert len(stats.mean) == len(stats.std)


@pytest.mark.skipif(not os.path.exists(FASHION_MNIST_TRAIN), reason="Debian Fashion-MNIST absent")
def test_fashion_mnist_stats_match_the_training_images():
  with gzip.open(FASHION_MNIST_TRAIN) as f:
    counts = np.bincount(np.frombuffer(f.read(), np.uint8, offset=16), minlength=256)
  assert counts.sum() == 60000 * 28 * 28
  values = np.arange(256) / 255.0
  mean = counts @ values / counts.sum()
  std = math.sqrt(counts @ (values - mean) ** 2 / counts.sum())
  stats = dataset_stats.DATASET_STATS["fashion_mnist"]
  assert abs(mean - stats.mean[0]) < 1e-4 and abs(std - stats.std[0]) < 1e-4
