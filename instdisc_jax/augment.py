"""On-device image augmentation from a PRNG key: the reference's train and eval transforms.

The reference (lemniscate.pytorch) trains with, in this order::

  RandomResizedCrop(size, scale=(0.2, 1.))  # 224 for ImageNet, 32 for CIFAR
  RandomGrayscale(p=0.2)
  ColorJitter(0.4, 0.4, 0.4, 0.4)
  RandomHorizontalFlip()                    # ImageNet only; commented out in its cifar.py
  ToTensor(), Normalize(mean, std)

and evaluates with `ToTensor(), Normalize(mean, std)` (after `Resize(256), CenterCrop(224)` on
ImageNet, which the host pipeline does). Here every op works on one float image (H, W, C) in
[0, 1] and draws its randomness from a key, so `train_augment` is a `vmap` over the batch and runs
inside the jitted train step. `AugmentConfig.flip` chooses the flip; it is on by default (use it
for ImageNet and Fashion-MNIST, turn it off to follow the reference's CIFAR recipe).

Photometric ops follow torchvision's float-tensor kernels, which clip to [0, 1] after every op.
For one-channel images grayscale, saturation and hue are no-ops (as for PIL "L" images);
brightness and contrast apply. RandomResizedCrop's geometry is in crop.py; the mean and std of
the known datasets are in dataset_stats.py.
"""

import dataclasses
import functools
from typing import Any, Callable, Mapping, NoReturn, Sequence

import dm_pix
import jax
import jax.numpy as jnp

from instdisc_jax import crop
from instdisc_jax.config_fields import suggest
from instdisc_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Parameters of the train and eval transforms.

  Attributes:
    image_size: side of the square output images.
    mean: per-channel mean subtracted after scaling pixels to [0, 1] (known datasets' values:
      `dataset_stats.DATASET_STATS`).
    std: per-channel standard deviation divided by after subtracting `mean`.
    crop_scale: RandomResizedCrop's range of crop area as a fraction of the image area.
    crop_ratio: RandomResizedCrop's range of crop aspect ratio (width / height).
    crop_on_device: run RandomResizedCrop here; False when the host pipeline already cropped
      and resized (datasets of variable image size), so only colour and flip run here.
    grayscale_prob: probability of RandomGrayscale.
    brightness: ColorJitter brightness; the factor is drawn from [max(0, 1 - b), 1 + b].
    contrast: ColorJitter contrast, drawn like brightness.
    saturation: ColorJitter saturation, drawn like brightness.
    hue: ColorJitter hue; the shift is drawn from [-hue, hue], hue <= 0.5.
    flip: apply RandomHorizontalFlip (p = 0.5).
  """

  image_size: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  crop_scale: tuple[float, float] = (0.2, 1.0)
  crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  crop_on_device: bool = True
  grayscale_prob: float = 0.2
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.4
  hue: float = 0.4
  flip: bool = True

  def __post_init__(self):
    for name in ("mean", "std", "crop_scale", "crop_ratio"):
      object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
    for name in ("grayscale_prob", "brightness", "contrast", "saturation", "hue"):
      object.__setattr__(self, name, float(getattr(self, name)))
    self._validate()

  def _validate(self):
    if self.image_size < 1:
      _bad("image_size", self.image_size, "a positive integer")
    if not self.mean or len(self.mean) != len(self.std):
      _bad("mean", self.mean, f"one value per channel, as many as std {self.std}")
    if min(self.std) <= 0:
      _bad("std", self.std, "positive values")
    low, high = self.crop_scale
    if not 0 < low <= high <= 1:
      _bad("crop_scale", self.crop_scale, "(low, high) with 0 < low <= high <= 1")
    low, high = self.crop_ratio
    if not 0 < low <= high:
      _bad("crop_ratio", self.crop_ratio, "(low, high) with 0 < low <= high")
    if not 0 <= self.grayscale_prob <= 1:
      _bad("grayscale_prob", self.grayscale_prob, "a probability in [0, 1]")
    for name in ("brightness", "contrast", "saturation"):
      if getattr(self, name) < 0:
        _bad(name, getattr(self, name), "a non-negative jitter strength")
    if not 0 <= self.hue <= 0.5:
      _bad("hue", self.hue, "a hue jitter in [0, 0.5]")

  @classmethod
  def from_config(cls, config: Mapping[str, Any], prefix: str = "augment") -> "AugmentConfig":
    """Builds the config from a mapping (e.g. an `ml_collections.ConfigDict`) of its fields.

    `prefix` names the config section in error messages, e.g. "augment.hue".
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = dict(config.items())
    for key in values:
      if key not in fields:
        raise ConfigError(f"{prefix}.{key}: unknown augmentation field"
                          f"{suggest(key, fields, prefix=prefix + '.')}")
    for name, field in fields.items():
      if field.default is dataclasses.MISSING and name not in values:
        raise ConfigError(f"{prefix}.{name}: required augmentation field is not set")
    try:
      return cls(**values)
    except ConfigError as error:
      raise ConfigError(f"{prefix}.{error}") from None


def _bad(field: str, value: Any, expected: str) -> NoReturn:
  raise ConfigError(f"{field}: got {value!r}, expected {expected}")


# --- Colour ------------------------------------------------------------------------------------


def _blend(image: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
  """torchvision's `_blend`: `factor * image + (1 - factor) * other`, clipped to [0, 1]."""
  return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def grayscale(image: jax.Array) -> jax.Array:
  """`F.rgb_to_grayscale(image, num_output_channels=3)`; one-channel images pass through.

  ITU-R 601-2 luma with torchvision's tensor-kernel weights (0.2989, 0.587, 0.114), replicated
  to the three channels.
  """
  if image.shape[-1] == 1:
    return image
  return dm_pix.rgb_to_grayscale(image, keep_dims=True)


def _black(image: jax.Array) -> jax.Array:
  return jnp.zeros_like(image)


def _grey_mean(image: jax.Array) -> jax.Array:
  return jnp.mean(grayscale(image))


def adjust_brightness(image: jax.Array, factor: jax.Array) -> jax.Array:
  """`F.adjust_brightness`: blends with black, i.e. multiplies by `factor`.

  (`dm_pix.adjust_brightness` adds a delta instead.)
  """
  return _blend(image, _black(image), factor)


def adjust_contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
  """`F.adjust_contrast`: blends with the mean grey level of the whole image.

  (`dm_pix.adjust_contrast` uses per-channel means instead.)
  """
  return _blend(image, _grey_mean(image), factor)


def adjust_saturation(image: jax.Array, factor: jax.Array) -> jax.Array:
  """`F.adjust_saturation`: blends with the grayscale image (a no-op for one channel).

  (`dm_pix.adjust_saturation` scales HSV saturation instead.)
  """
  return _blend(image, grayscale(image), factor)


def adjust_hue(image: jax.Array, delta: jax.Array) -> jax.Array:
  """`F.adjust_hue`: shifts HSV hue by `delta` turns; a no-op for one-channel images.

  (`dm_pix.adjust_hue` has torchvision's semantics.)
  """
  if image.shape[-1] == 1:
    return image
  return jnp.clip(dm_pix.adjust_hue(image, delta), 0.0, 1.0)


def _jitter_factor(u: jax.Array, strength: float) -> jax.Array:
  """ColorJitter's brightness, contrast or saturation factor, U[max(0, 1 - s), 1 + s], from
  `u` ~ U[0, 1)."""
  low = max(0.0, 1.0 - strength)
  return low + (1.0 + strength - low) * u


def _blend_in_order(
    image: jax.Array,
    ops: jax.Array,
    partners: Sequence[Callable[[jax.Array], jax.Array]],
    factors: jax.Array,
) -> jax.Array:
  """Applies `_blend(image, partners[op](image), factors[op])` for op in `ops`, in order.

  `ops` is a traced int vector; entries outside [0, len(partners)) are skipped (factor 1).
  """
  for position in range(ops.shape[0]):
    op = ops[position]
    partner = jnp.select([op == i for i in range(len(partners))], [p(image) for p in partners])
    valid = (op >= 0) & (op < len(partners))
    factor = jnp.where(valid, factors[jnp.clip(op, 0, len(partners) - 1)], 1.0)
    image = _blend(image, partner, factor)
  return image


def _jitter_in_order(
    image: jax.Array,
    order: jax.Array,
    partners: Sequence[Callable[[jax.Array], jax.Array]],
    factors: jax.Array,
    delta: jax.Array | None = None,
) -> jax.Array:
  """Applies the ops of ColorJitter in `order`, a traced permutation.

  Index i < len(partners) is the blend with `partners[i]` by `factors[i]`; index len(partners)
  is the hue shift by `delta` (absent when `delta` is None). Hue, the costly op, runs once,
  between the blends before and after it in the order.
  """
  if delta is None:
    return _blend_in_order(image, order, partners, factors)
  hue_position = jnp.argmax(order == len(partners))
  positions = jnp.arange(order.shape[0])
  image = _blend_in_order(image, jnp.where(positions < hue_position, order, -1), partners, factors)
  image = adjust_hue(image, delta)
  return _blend_in_order(image, jnp.where(positions > hue_position, order, -1), partners, factors)


def color_jitter(
    key: jax.Array,
    image: jax.Array,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.4,
) -> jax.Array:
  """`transforms.ColorJitter(brightness, contrast, saturation, hue)` of one image in [0, 1].

  Draws the factors, then applies the ops in a random order, as torchvision does. Ops of
  strength 0 are left out, as are saturation and hue for one-channel images.

  Brightness, contrast and saturation are all `_blend`s (with black, the grey mean and the
  grayscale image), so each position of the order is one blend whose partner and factor are
  selected per example, which stays cheap under `vmap` (a `lax.switch` over the four ops would
  compute all of them at every position).
  """
  rgb = image.shape[-1] == 3
  strengths = [(_black, brightness), (_grey_mean, contrast), (grayscale, saturation if rgb else 0.)]
  blends = [(partner, strength) for partner, strength in strengths if strength > 0]
  use_hue = rgb and hue > 0
  num_ops = len(blends) + int(use_hue)
  if num_ops == 0:
    return image

  # One draw: a value per op for its factor, and one per op whose argsort is the random order.
  u = jax.random.uniform(key, (2 * num_ops,))
  delta = hue * (2.0 * u[len(blends)] - 1.0) if use_hue else None
  if not blends:
    return adjust_hue(image, delta)
  factors = jnp.stack([_jitter_factor(u[i], strength) for i, (_, strength) in enumerate(blends)])
  order = jnp.argsort(u[num_ops:])
  return _jitter_in_order(image, order, [partner for partner, _ in blends], factors, delta)


def random_grayscale(key: jax.Array, image: jax.Array, p: float = 0.2) -> jax.Array:
  """`transforms.RandomGrayscale(p)`; a no-op for one-channel images."""
  if image.shape[-1] == 1:
    return image
  return jnp.where(jax.random.bernoulli(key, p), grayscale(image), image)


def normalize(image: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """`transforms.Normalize(mean, std)` over the last (channel) axis."""
  if len(mean) != image.shape[-1]:
    raise ValueError(
        f"normalisation has {len(mean)} channel(s), images have {image.shape[-1]}")
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (image - mean) / std


# --- Transforms --------------------------------------------------------------------------------


def to_float(images: jax.Array) -> jax.Array:
  """`transforms.ToTensor`'s scaling: uint8 [0, 255] to float32 [0, 1] (channels stay last)."""
  return jnp.asarray(images, jnp.float32) / 255.0


def augment_image(key: jax.Array, image: jax.Array, cfg: AugmentConfig) -> jax.Array:
  """The train transform of one float image (H, W, C) in [0, 1], before normalisation."""
  crop_key, gray_key, jitter_key, flip_key = jax.random.split(key, 4)
  if cfg.crop_on_device:
    image = crop.random_resized_crop(
        crop_key, image, cfg.image_size, cfg.crop_scale, cfg.crop_ratio)
  image = random_grayscale(gray_key, image, cfg.grayscale_prob)
  image = color_jitter(
      jitter_key, image, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
  if cfg.flip:
    image = dm_pix.random_flip_left_right(flip_key, image)  # RandomHorizontalFlip(0.5)
  return image


def train_augment(key: jax.Array, images: jax.Array, cfg: AugmentConfig) -> jax.Array:
  """The reference train transform of a uint8 batch (B, H, W, C) -> float32 normalised.

  Each example gets its own key from `jax.random.split(key, B)`; under `pmap` give every
  device its own `key` (e.g. `jax.random.fold_in(key, lax.axis_index(axis_name))`). The output
  is (B, image_size, image_size, C); without `cfg.crop_on_device` the host has already cropped
  and resized, and the input must be image_size x image_size already.
  """
  if not cfg.crop_on_device and images.shape[1:3] != (cfg.image_size, cfg.image_size):
    raise ValueError(
        f"crop_on_device=False expects host-cropped {cfg.image_size}x{cfg.image_size} images, "
        f"got {images.shape[1]}x{images.shape[2]}")
  keys = jax.random.split(key, images.shape[0])
  augmented = jax.vmap(functools.partial(augment_image, cfg=cfg))(keys, to_float(images))
  return normalize(augmented, cfg.mean, cfg.std)


def eval_transform(images: jax.Array, cfg: AugmentConfig) -> jax.Array:
  """The reference eval transform (`ToTensor`, `Normalize`) of a uint8 batch (B, H, W, C)."""
  return normalize(to_float(images), cfg.mean, cfg.std)
