"""`transforms.RandomResizedCrop` on device, from a PRNG key: the geometry of the train transform.

torchvision draws the crop box on the host with rejection sampling (`get_params`: up to ten
tries, then a central fallback) and then crops and resizes the PIL image. Here the ten tries are
drawn at once and the first that fits is selected with array ops (`crop_box`), and the box, a
traced value, is resized in one `jax.image.scale_and_translate` (`resized_crop`), so the whole
crop runs inside the jitted, vmapped train step (`augment.train_augment`). Images are float
(H, W, C) in [0, 1].
"""

import math
from typing import Sequence

import jax
import jax.numpy as jnp


def crop_box(
    key: jax.Array,
    height: int,
    width: int,
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    attempts: int = 10,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """`RandomResizedCrop.get_params`: the crop box (top, left, h, w) as int32 scalars.

  Draws `attempts` boxes of area U(scale) * H * W and aspect ratio exp(U(log ratio)) at once and
  keeps the first one that fits in the image; if none fits, falls back to the largest central
  crop whose aspect ratio lies in `ratio`. The top-left corner is uniform over the positions
  that keep the box inside the image.
  """
  # One draw for everything: each `jax.random` call costs seconds of XLA compile on CPU.
  u = jax.random.uniform(key, (2 * attempts + 2,))
  area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:attempts])
  log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_low + (log_high - log_low) * u[attempts:2 * attempts])
  # Python's round() and jnp.round() both round half to even.
  crop_w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  crop_h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
  first = jnp.argmax(fits)
  found = jnp.any(fits)

  fallback_h, fallback_w = _central_crop_size(height, width, ratio)
  crop_h = jnp.where(found, crop_h[first], fallback_h)
  crop_w = jnp.where(found, crop_w[first], fallback_w)
  # floor(U[0, 1) * n) is uniform over 0 .. n - 1, as torch.randint(0, n).
  top = jnp.floor(u[-2] * (height - crop_h + 1)).astype(jnp.int32)
  left = jnp.floor(u[-1] * (width - crop_w + 1)).astype(jnp.int32)
  top = jnp.where(found, top, (height - fallback_h) // 2)
  left = jnp.where(found, left, (width - fallback_w) // 2)
  return top, left, crop_h, crop_w


def _central_crop_size(height: int, width: int, ratio: Sequence[float]) -> tuple[int, int]:
  """The fallback crop of `RandomResizedCrop.get_params`: the whole image, clamped to `ratio`."""
  in_ratio = width / height
  if in_ratio < min(ratio):
    return int(round(width / min(ratio))), width
  if in_ratio > max(ratio):
    return height, int(round(height * max(ratio)))
  return height, width


def resized_crop(
    image: jax.Array, box: Sequence[jax.Array], out_size: int
) -> jax.Array:
  """`F.resized_crop(..., BILINEAR, antialias=True)`: resizes `box` to out_size x out_size.

  `box` is (top, left, height, width), possibly traced. One `jax.image.scale_and_translate`
  maps it onto the static output shape, so the image is never cut at the box edge: unlike
  torchvision, which crops first, the bilinear taps of the outermost output pixels may reach a
  pixel or two beyond the box.
  """
  top, left, crop_h, crop_w = box
  scale = jnp.stack([out_size / crop_h, out_size / crop_w]).astype(jnp.float32)
  translation = -jnp.stack([top, left]).astype(jnp.float32) * scale
  return jax.image.scale_and_translate(
      image, (out_size, out_size, image.shape[-1]), spatial_dims=(0, 1), scale=scale,
      translation=translation, method="linear", antialias=True)


def random_resized_crop(
    key: jax.Array,
    image: jax.Array,
    out_size: int,
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
) -> jax.Array:
  """`transforms.RandomResizedCrop(out_size, scale, ratio)` of one float image (H, W, C)."""
  height, width = image.shape[:2]
  return resized_crop(image, crop_box(key, height, width, scale, ratio), out_size)
