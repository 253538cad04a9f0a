"""NumPy archives as datasets: `npz:/path/file.npz`.

The archive holds `images`, uint8 (N, H, W) or (N, H, W, C) with C = 1 or 3, and optionally
`labels` (N,) of non-negative integers, `test_images` (M, H, W[, C]) and `test_labels` (M,).
Instance i is row i of `images`. The fingerprint is a SHA-256 of the split's arrays.
"""

import hashlib
import os
import zipfile
import zlib

import numpy as np

from instdisc_jax.data import split as split_lib
from instdisc_jax.errors import DataError

# Split name -> (images array, labels array).
SPLIT_ARRAYS = {"train": ("images", "labels"), "test": ("test_images", "test_labels")}


def _array_header(archive: np.lib.npyio.NpzFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
  """The shape and dtype of `key` in the archive, read from its header without loading it."""
  with archive.zip.open(f"{key}.npy") as f:
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read_header(f)
  return shape, dtype


def _array_shape(archive: np.lib.npyio.NpzFile, key: str) -> tuple[int, ...]:
  return _array_header(archive, key)[0]


def _check_images(spec: str, key: str, images: np.ndarray) -> np.ndarray:
  """Validates an images array; returns it as (N, H, W, C)."""
  if images.dtype != np.uint8:
    raise DataError(f"{spec}: `{key}` is {images.dtype}, expected uint8 (values 0..255)")
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise DataError(
        f"{spec}: `{key}` has shape {images.shape}, expected (N, H, W) or (N, H, W, C) "
        "with C 1 or 3")
  if not len(images):
    raise DataError(f"{spec}: `{key}` holds no images")
  return images


def _check_labels(spec: str, key: str, labels: np.ndarray, num_images: int) -> np.ndarray:
  if labels.shape != (num_images,) or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(
        f"{spec}: `{key}` is {labels.dtype} {labels.shape}, expected {num_images} integer labels")
  if labels.size and labels.min() < 0:
    raise DataError(f"{spec}: `{key}` has negative labels; labels are 0..num_classes-1")
  return labels.astype(np.int32)


def _fingerprint(images: np.ndarray, labels: np.ndarray | None) -> str:
  digest = hashlib.sha256(repr(images.shape).encode())
  digest.update(np.ascontiguousarray(images).data)
  if labels is not None:
    digest.update(labels.data)
  return digest.hexdigest()


# What reading a damaged archive member raises (a bad zip entry, a truncated or bad .npy).
_READ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)


def _open(path: str) -> np.lib.npyio.NpzFile:
  """The archive at `path`, or a DataError naming it and what is wrong."""
  spec = f"npz:{path}"
  if not os.path.isfile(path):
    raise DataError(f"{spec}: no such file")
  try:
    archive = np.load(path, allow_pickle=False)
  except (OSError, ValueError, zipfile.BadZipFile) as error:
    raise DataError(f"{spec} is not a readable .npz file: {error}") from error
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise DataError(f"{spec} is a single .npy array; save an .npz with np.savez(path, images=...)")
  return archive


def _read(spec: str, archive: np.lib.npyio.NpzFile, key: str) -> np.ndarray:
  """Array `key`; a DataError for object arrays (they would need pickle) or a damaged member."""
  try:
    _, dtype = _array_header(archive, key)
    if dtype.hasobject:
      raise DataError(
          f"{spec}: `{key}` holds Python objects (dtype=object), which are never unpickled; "
          f"save plain arrays, e.g. np.savez(path, {key}=np.stack(...).astype(np.uint8))")
    return archive[key]
  except _READ_ERRORS as error:
    raise DataError(f"{spec}: `{key}` cannot be read ({error}); the file is damaged") from error


def has_test_split(path: str) -> bool:
  """Whether the archive holds `test_images`."""
  with _open(path) as archive:
    return SPLIT_ARRAYS["test"][0] in archive.files


def load_npz(path: str, split: str = "train") -> split_lib.DatasetSplit:
  """Loads split "train" (`images`, `labels`) or "test" (`test_images`, `test_labels`)."""
  spec = f"npz:{path}"
  if split not in SPLIT_ARRAYS:
    raise DataError(f"{spec}: no split {split!r}; an .npz has splits {', '.join(SPLIT_ARRAYS)}")
  with _open(path) as archive:
    image_key, label_key = SPLIT_ARRAYS[split]
    for key in sorted({"images", image_key}):
      if key not in archive.files:
        raise DataError(f"{spec} has no `{key}` array (it has: {', '.join(archive.files)})")
    images = _check_images(spec, image_key, _read(spec, archive, image_key))
    train_shape = _array_shape(archive, "images")[1:]
    if images.shape[1:] != (train_shape if len(train_shape) == 3 else train_shape + (1,)):
      raise DataError(
          f"{spec}: `{image_key}` images are {images.shape[1:]}, `images` are {train_shape}")
    all_labels = {}
    for images_key, labels_key in SPLIT_ARRAYS.values():
      if labels_key in archive.files:
        if images_key not in archive.files:
          raise DataError(f"{spec} has `{labels_key}` but no `{images_key}`")
        num_images = _array_shape(archive, images_key)[0]
        all_labels[labels_key] = _check_labels(spec, labels_key,
                                               _read(spec, archive, labels_key), num_images)
  labels = all_labels.get(label_key)
  num_classes = None
  if labels is not None:
    num_classes = 1 + max(int(l.max()) for l in all_labels.values() if l.size)
  return split_lib.DatasetSplit(
      name=f"{spec}:{split}",
      channels=images.shape[-1],
      fingerprint=_fingerprint(images, labels),
      images=images,
      label_array=labels,
      num_classes=num_classes,
  )
