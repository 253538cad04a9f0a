"""Host-side decoding and the geometric transforms."""

import io
import math

from hypothesis import given
from hypothesis import strategies as st
import numpy as np
from PIL import Image

from instdisc_jax.data import images as images_lib


@given(width=st.integers(1, 2000), height=st.integers(1, 2000), seed=st.integers(0, 2**32 - 1))
def test_random_resized_box_fits_and_keeps_the_reference_ranges(width, height, seed):
  left, top, right, bottom = images_lib.random_resized_box(
      np.random.default_rng(seed), width, height)
  w, h = right - left, bottom - top
  assert 0 <= left < right <= width and 0 <= top < bottom <= height
  assert all(float(v).is_integer() for v in (left, top, right, bottom))
  # A drawn box: area fraction in [0.2, 1] and aspect ratio in [3/4, 4/3], up to rounding w and h.
  drawn = ((w + 0.5) * (h + 0.5) >= 0.2 * width * height
           and (w + 0.5) / (h - 0.5 + 1e-9) >= 3 / 4 and (w - 0.5) / (h + 0.5) <= 4 / 3)
  # The fallback: the largest centred box with the aspect ratio clamped into the range.
  fallback = (left, top) == ((width - w) // 2, (height - h) // 2) and (w == width or h == height)
  assert drawn or fallback


def test_random_resized_box_is_a_function_of_the_generator_state():
  def draw(seed):
    return images_lib.random_resized_box(np.random.default_rng(seed), 640, 480)
  assert draw(7) == draw(7) and draw(7) != draw(8)


def test_center_and_eval_boxes():
  assert images_lib.center_box(40, 30) == (5.0, 0.0, 35.0, 30.0)
  left, top, right, bottom = images_lib.eval_box(256, 512)
  assert math.isclose(right - left, 224) and math.isclose(bottom - top, 224)
  assert math.isclose(left, 16) and math.isclose(top, 144)


def encode(array: np.ndarray, fmt: str) -> io.BytesIO:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt, quality=95)
  buffer.seek(0)
  return buffer


def smooth_image(height: int, width: int) -> np.ndarray:
  y, x = np.mgrid[0:height, 0:width]
  channels = [128 + 100 * np.sin(x / 40), 128 + 100 * np.cos(y / 30), (x + y) % 256]
  return np.stack(channels, -1).astype(np.uint8)


def test_reduced_jpeg_decoding_matches_full_decoding():
  array = smooth_image(600, 800)
  via_jpeg = images_lib.decode_box(encode(array, "JPEG"), 3, 64, images_lib.eval_box)  # At 1/8.
  via_png = images_lib.decode_box(encode(array, "PNG"), 3, 64, images_lib.eval_box)
  assert via_jpeg.shape == via_png.shape == (64, 64, 3)
  assert np.abs(via_jpeg.astype(int) - via_png).mean() < 3


def test_crop_array_matches_decode_box():
  array = smooth_image(30, 50)
  def box_fn(width, height):
    del width, height
    return 3.0, 4.0, 33.0, 24.0
  np.testing.assert_array_equal(images_lib.crop_array(array, 10, box_fn),
                                images_lib.decode_box(encode(array, "PNG"), 3, 10, box_fn))


def test_decode_converts_to_the_requested_channels():
  rgba = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
  assert images_lib.decode(encode(rgba, "PNG"), 3).shape == (5, 7, 3)
  assert images_lib.decode(encode(rgba, "PNG"), 1).shape == (5, 7, 1)
  assert images_lib.channels_of_mode("L") == 1 and images_lib.channels_of_mode("P") == 3
