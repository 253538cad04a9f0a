"""Directories of images as datasets: `folder:/path/to/images`.

* Files are found recursively (hidden files and folders are skipped) and sorted by relative path;
  instance i is the i-th readable image in that order.
* Class sub-folders become labels (sorted names, as torchvision's `ImageFolder`); an image in a
  nested folder takes the name of its top-level folder. A flat folder is unlabelled. A folder with
  both loose images and class folders is an error.
* Every file is opened and verified (Pillow's `verify()`: the header, and the CRCs of PNGs)
  before indices are given out; unreadable files are left out with a warning that counts them and
  names the first few. A folder whose images fit in `max_cache_bytes` as `image_size` squares is
  decoded once into host memory, each image's centre square resized to `image_size` (files that
  fail to decode fully are left out the same way); larger folders are decoded per record by the
  input pipeline.
* The fingerprint is a SHA-256 over the sorted relative paths and file sizes of the indexed
  images. It ignores modification times, so a copied folder still matches; an in-place edit that
  keeps a file's size is not detected.
"""

from collections.abc import Sequence
import concurrent.futures
import functools
import hashlib
import logging
import os

import numpy as np
from PIL import Image

from instdisc_jax.data import images as images_lib
from instdisc_jax.data import split as split_lib
from instdisc_jax.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")


class FolderReader:
  """The image files of a folder in index order, with their labels (-1 when unlabelled)."""

  def __init__(self, root: str, paths: Sequence[str], labels: np.ndarray | None):
    self._root = root
    self._paths = tuple(paths)
    self._labels = labels

  def __len__(self) -> int:
    return len(self._paths)

  def read(self, indices: Sequence[int]) -> list[tuple[str, int]]:
    return [(os.path.join(self._root, self._paths[i]),
             -1 if self._labels is None else int(self._labels[i])) for i in indices]

  def describe(self, index: int) -> str:
    return os.path.join(self._root, self._paths[index])

  def labels(self) -> np.ndarray | None:
    return self._labels


def scan(root: str) -> tuple[list[str], list[str]]:
  """Returns the sorted relative paths of the image files under `root`, and of the other files."""
  found, others = [], []
  for directory, subdirs, files in os.walk(root, followlinks=True):
    subdirs[:] = [d for d in subdirs if not d.startswith(".")]
    for name in files:
      if name.startswith("."):
        continue
      path = os.path.relpath(os.path.join(directory, name), root).replace(os.sep, "/")
      (found if name.lower().endswith(IMAGE_EXTENSIONS) else others).append(path)
  return sorted(found), sorted(others)


def _probe(path: str) -> tuple[int, str] | None:
  """(file size, Pillow mode) of a readable image file; None when it cannot be read."""
  try:
    with Image.open(path) as image:
      mode = image.mode
      image.verify()
    return os.path.getsize(path), mode
  except images_lib.DECODE_ERRORS:
    return None


def _warn_left_out(spec: str, reason: str, paths: Sequence[str]) -> None:
  if paths:
    log.warning("%s: left out %d %s images (%s); instance indices count only the rest",
                    spec, len(paths), reason, split_lib.first_few(paths))


def _readable(spec: str, root: str, paths: Sequence[str],
              num_threads: int) -> list[tuple[str, int, str]]:
  """(path, size, mode) of the files Pillow can open and verify; logs the others."""
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    probes = list(pool.map(_probe, [os.path.join(root, p) for p in paths]))
  _warn_left_out(spec, "unreadable", [p for p, probe in zip(paths, probes) if probe is None])
  return [(p, *probe) for p, probe in zip(paths, probes) if probe is not None]


def folder_labels(
    spec: str, paths: Sequence[str], class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray | None, tuple[str, ...] | None]:
  """Labels from class sub-folders: (int32 labels, class names), or (None, None) when flat.

  With `class_names` (those of a training folder), labels follow that order, so a labelled eval
  folder agrees with the training folder.
  """
  loose = [p for p in paths if "/" not in p]
  if len(loose) == len(paths):
    return None, None
  if loose:
    raise DataError(
        f"{spec} has images both at its top level ({split_lib.first_few(loose)}) and in class "
        "sub-folders; move the loose images into a class folder, or use a folder without any")
  folders = [p.split("/", 1)[0] for p in paths]
  names = tuple(class_names) if class_names is not None else tuple(sorted(set(folders)))
  label_of = {name: label for label, name in enumerate(names)}
  unknown = sorted(set(folders) - label_of.keys())
  if unknown:
    raise DataError(
        f"{spec} has class folders the training data lacks ({split_lib.first_few(unknown)}); "
        f"the training classes are {split_lib.first_few(list(names))}")
  return np.array([label_of[f] for f in folders], np.int32), names


def _fingerprint(manifest: Sequence[tuple[str, int]]) -> str:
  digest = hashlib.sha256()
  for path, size in manifest:
    digest.update(f"{path}\t{size}\n".encode())
  return digest.hexdigest()


def _split(spec: str, channels: int, paths: Sequence[str], sizes: Sequence[int],
           labels: np.ndarray | None, names: tuple[str, ...] | None,
           **storage) -> split_lib.DatasetSplit:
  """The split of the indexed files; `storage` is `images=...` or `reader=...`."""
  manifest = tuple(zip(paths, sizes))
  return split_lib.DatasetSplit(
      name=spec,
      channels=channels,
      fingerprint=_fingerprint(manifest),
      label_array=labels if "images" in storage else None,
      num_classes=None if names is None else len(names),
      class_names=names,
      manifest=manifest,
      **storage,
  )


def load_folder(
    root: str,
    image_size: int,
    *,
    class_names: Sequence[str] | None = None,
    max_cache_bytes: int = split_lib.MAX_CACHE_BYTES,
    num_threads: int | None = None,
) -> split_lib.DatasetSplit:
  """Loads a directory tree of images as a `DatasetSplit` (see the module docstring).

  Args:
    root: the directory.
    image_size: images held in memory are the centre square of each image resized to this side.
    class_names: the training split's classes, when loading a labelled eval folder.
    max_cache_bytes: hold the decoded images in memory when they take at most this many bytes.
    num_threads: threads for probing and decoding files (default: one per core, at most 16).

  Raises:
    DataError: `root` is missing, holds no readable image, or mixes loose images with classes.
  """
  spec = f"folder:{root}"
  if not os.path.isdir(root):
    raise DataError(f"{spec}: no such directory")
  paths, others = scan(root)
  ignored = (f"ignored {len(others)} files that are not images ({split_lib.first_few(others)})"
             if others else "")
  num_threads = num_threads or split_lib.decode_threads()
  readable = _readable(spec, root, paths, num_threads)
  if not readable:                         # One line: what was ignored is part of the error.
    raise DataError(f"{spec} holds no readable images (looked for {', '.join(IMAGE_EXTENSIONS)})"
                    f"{'; ' + ignored if ignored else ''}")
  if ignored:
    log.info("%s: %s", spec, ignored)
  paths, sizes, modes = (list(column) for column in zip(*readable))
  channels = max(images_lib.channels_of_mode(mode) for mode in modes)
  labels, names = folder_labels(spec, paths, class_names)
  reader = FolderReader(root, paths, labels)
  if len(paths) * image_size * image_size * channels > max_cache_bytes:
    return _split(spec, channels, paths, sizes, labels, names, reader=reader)

  center_square = functools.partial(images_lib.center_square, channels=channels, size=image_size)
  images, _, failed = split_lib.decode_all(
      reader, center_square, (image_size, image_size, channels), num_threads)
  _warn_left_out(spec, "undecodable", [paths[i] for i in failed])
  if len(failed) == len(paths):
    raise DataError(f"{spec}: none of its {len(paths)} images could be decoded")
  if failed:
    keep = np.setdiff1d(np.arange(len(paths)), failed)
    images, paths, sizes = images[keep], [paths[i] for i in keep], [sizes[i] for i in keep]
    labels = None if labels is None else labels[keep]
  return _split(spec, channels, paths, sizes, labels, names, images=images)
