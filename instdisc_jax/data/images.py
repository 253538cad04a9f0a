"""Host-side image decoding and the geometric part of the reference transforms, with Pillow.

Every transform here is "decode, cut a box out of the image, resize the box to a square": the
box is a centre square, the reference eval crop, or a random resized crop (torchvision's
`RandomResizedCrop`). Cutting and resizing is one `Image.resize(box=...)` call, and JPEGs are
decoded at the smallest DCT scale that still covers the box at the output size (`Image.draft`).

Boxes are drawn in stored pixel coordinates and the EXIF orientation is applied to the small
output. For the square outputs used here that is the same as drawing on the upright image: the
box distributions are invariant under the flips and quarter turns EXIF can ask for.
"""

from collections.abc import Callable
import math
import struct
from typing import BinaryIO

import numpy as np
from PIL import ExifTags
from PIL import Image

# Where Pillow can open it: a path or a binary file object.
ImageFile = str | BinaryIO
# (left, top, right, bottom) in pixels of the stored image, as `Image.resize(box=...)` takes it.
Box = tuple[float, float, float, float]
# Draws a box for an image of the given (width, height).
BoxFn = Callable[[int, int], Box]

# What Pillow raises for a file it cannot open or decode (truncated, corrupt, too large).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, struct.error, Image.DecompressionBombError)
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"})
TRAIN_SCALE = (0.2, 1.0)
TRAIN_RATIO = (3 / 4, 4 / 3)
EVAL_RESIZE_RATIO = 256 / 224

_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def center_box(width: int, height: int, fraction: float = 1.0) -> Box:
  """The centred square whose side is `fraction` of the image's shorter side."""
  side = fraction * min(width, height)
  left, top = (width - side) / 2, (height - side) / 2
  return left, top, left + side, top + side


def eval_box(width: int, height: int) -> Box:
  """The reference eval transform's box: `Resize(size * 256 / 224)`, then `CenterCrop(size)`."""
  return center_box(width, height, 1 / EVAL_RESIZE_RATIO)


def random_resized_box(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float] = TRAIN_SCALE,
    ratio: tuple[float, float] = TRAIN_RATIO,
) -> Box:
  """torchvision's `RandomResizedCrop` box: area fraction in `scale`, log-uniform aspect in `ratio`.

  Ten tries at a box that fits, then the largest centred box with an aspect ratio in `ratio`.
  """
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = round(math.sqrt(target_area * aspect))
    h = round(math.sqrt(target_area / aspect))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return float(left), float(top), float(left + w), float(top + h)
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, round(width / ratio[0])
  elif aspect > ratio[1]:
    w, h = round(height * ratio[1]), height
  else:
    w, h = width, height
  left, top = (width - w) // 2, (height - h) // 2
  return float(left), float(top), float(left + w), float(top + h)


def channels_of_mode(mode: str) -> int:
  """1 for Pillow's greyscale modes, 3 for everything else (colour, palette, CMYK, ...)."""
  return 1 if mode in GREY_MODES else 3


def _converted(image: Image.Image, channels: int) -> Image.Image:
  mode = "L" if channels == 1 else "RGB"
  return image if image.mode == mode else image.convert(mode)


def _to_array(image: Image.Image, channels: int) -> np.ndarray:
  array = np.asarray(_converted(image, channels), dtype=np.uint8)
  return array.reshape(array.shape[:2] + (channels,))


def _resize_box(image: Image.Image, size: int, box: Box) -> Image.Image:
  return image.resize((size, size), Image.Resampling.BILINEAR, box=box)


def _upright(image: Image.Image, orientation: int | None) -> Image.Image:
  transpose = _ORIENTATION_TRANSPOSE.get(orientation)
  return image if transpose is None else image.transpose(transpose)


def decode(file: ImageFile, channels: int) -> np.ndarray:
  """Decodes an image at its stored size to uint8 (H, W, channels), upright."""
  with Image.open(file) as image:
    orientation = image.getexif().get(ExifTags.Base.Orientation)
    image.load()
    return _to_array(_upright(image, orientation), channels)


def decode_box(file: ImageFile, channels: int, size: int, box_fn: BoxFn) -> np.ndarray:
  """Decodes an image and resizes its box `box_fn(width, height)`: uint8 (size, size, channels)."""
  with Image.open(file) as image:
    orientation = image.getexif().get(ExifTags.Base.Orientation)
    width, height = image.size
    left, top, right, bottom = box_fn(width, height)
    # JPEG only: decode at 1/2, 1/4 or 1/8 scale when the box still gets at least `size` pixels.
    image.draft(
        "L" if channels == 1 else "RGB",
        (math.ceil(size * width / (right - left)), math.ceil(size * height / (bottom - top))))
    sx, sy = image.size[0] / width, image.size[1] / height
    resized = _resize_box(
        _converted(image, channels), size, (left * sx, top * sy, right * sx, bottom * sy))
  return _to_array(_upright(resized, orientation), channels)


def crop_array(array: np.ndarray, size: int, box_fn: BoxFn) -> np.ndarray:
  """`decode_box` for an image already decoded: uint8 (H, W, C) to (size, size, C)."""
  height, width, channels = array.shape
  image = Image.fromarray(array[..., 0] if channels == 1 else array)
  return _to_array(_resize_box(image, size, box_fn(width, height)), channels)


def center_square(file: ImageFile, channels: int, size: int) -> np.ndarray:
  """The image's centred square (its whole shorter side), resized to (size, size)."""
  return decode_box(file, channels, size, center_box)
