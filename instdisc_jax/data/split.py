"""`DatasetSplit`: one split of a dataset, random access by instance index, and its fingerprint.

A split either holds all its images in host memory (a uint8 (N, H, W, C) array; small datasets
are decoded once) or decodes them one record at a time from a `RecordReader` (tfds ArrayRecord
files or image files). Either way `split[i]` is instance i: the record index in the training
split is the instance index, and the memory bank's row i belongs to it.
"""

from collections.abc import Callable, Sequence
import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import threading
from typing import NamedTuple, Protocol

from etils import epath
import numpy as np

from instdisc_jax.data import images as images_lib
from instdisc_jax.errors import DataError

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "dataset_fingerprint.json"
# Splits whose decoded images take at most this many bytes are decoded once and held in memory.
MAX_CACHE_BYTES = 2 << 30
_DECODE_CHUNK = 256
_LOGGED_FAILURES = 5
_SHOWN_PATHS = 3


class RecordReader(Protocol):
  """Encoded records with random access: what a split decodes when it is not held in memory."""

  def __len__(self) -> int:
    ...

  def read(self, indices: Sequence[int]) -> list[tuple[images_lib.ImageFile, int]]:
    """(encoded image, label) for each index; the label is -1 when the record has none."""

  def describe(self, index: int) -> str:
    """Names record `index` for a log line: its path, or its split and record number."""

  def labels(self) -> np.ndarray | None:
    """All labels, int32 (N,); None when the records have no labels."""


def decode_threads() -> int:
  """Threads for decoding on the host: Pillow releases the GIL while it decodes and resizes."""
  return min(16, os.cpu_count() or 1)


def decode_all(
    reader: RecordReader,
    decode_fn: Callable[[images_lib.ImageFile], np.ndarray],
    shape: tuple[int, int, int],
    num_threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
  """Decodes every record of `reader` with `decode_fn` into one array, in a thread pool.

  Returns the uint8 (N, *shape) images, the int32 labels, and the indices whose image could not be
  decoded (left black there; the caller decides whether to drop them or keep the black image).
  """
  n = len(reader)
  images = np.zeros((n, *shape), np.uint8)
  labels = np.full((n,), -1, np.int32)
  failed = []

  def decode_chunk(start: int) -> None:
    indices = range(start, min(start + _DECODE_CHUNK, n))
    for index, (file, label) in zip(indices, reader.read(indices)):
      labels[index] = label
      try:
        images[index] = decode_fn(file)
      except images_lib.DECODE_ERRORS as error:
        failed.append(index)
        if len(failed) <= _LOGGED_FAILURES:
          log.warning("Could not decode %s: %s", reader.describe(index), error)

  with concurrent.futures.ThreadPoolExecutor(num_threads or decode_threads()) as pool:
    list(pool.map(decode_chunk, range(0, n, _DECODE_CHUNK)))
  return images, labels, sorted(failed)


class _FailureLog:
  """Counts records that fail to decode in training; logs the first few, then every 100th."""

  def __init__(self, name: str):
    self._name = name
    self._lock = threading.Lock()
    self._count = 0

  def record(self, what: str, error: Exception) -> None:
    with self._lock:
      self._count += 1
      count = self._count
    if count <= _LOGGED_FAILURES or count % 100 == 0:
      log.warning(
          "%s: could not decode %s (%s); a black image stands in for it (%d such records so far)",
          self._name, what, error, count)


@dataclasses.dataclass(eq=False)
class DatasetSplit:
  """One split of a dataset; `split[i]` is instance i (a grain `RandomAccessDataSource`).

  Attributes:
    name: the dataset spec and split, e.g. `fashion_mnist:train` or `folder:/data/cats`.
    channels: 1 (grey) or 3 (RGB).
    fingerprint: identifies the split's records in index order (see `check_fingerprint`).
    images: uint8 (N, H, W, C) when held in host memory, else None.
    reader: the encoded records when decoded per record, else None.
    stored_shape: the (H, W, C) every record of a `reader` decodes to, or None when the sizes vary.
    label_array: int32 (N,) labels of held images (-1 where a record has none), else None.
    num_classes: the number of classes; None for unlabelled data.
    class_names: the class names in label order, when known.
    manifest: (relative path, size in bytes) of each record in index order, for image folders.
  """

  name: str
  channels: int
  fingerprint: str
  images: np.ndarray | None = dataclasses.field(default=None, repr=False)
  reader: RecordReader | None = dataclasses.field(default=None, repr=False)
  stored_shape: tuple[int, int, int] | None = None
  label_array: np.ndarray | None = dataclasses.field(default=None, repr=False)
  num_classes: int | None = None
  class_names: tuple[str, ...] | None = None
  manifest: tuple[tuple[str, int], ...] | None = dataclasses.field(default=None, repr=False)

  def __post_init__(self):
    if (self.images is None) == (self.reader is None):
      raise ValueError("a DatasetSplit holds either `images` or a `reader`")
    self._failures = _FailureLog(self.name)

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_failures"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._failures = _FailureLog(self.name)

  @property
  def num_examples(self) -> int:
    return len(self.images) if self.images is not None else len(self.reader)

  @property
  def image_shape(self) -> tuple[int | None, int | None, int]:
    """(H, W, C) of every image; (None, None, C) when the sizes vary."""
    if self.images is not None:
      return tuple(self.images.shape[1:])
    return self.stored_shape or (None, None, self.channels)

  @property
  def fixed_size(self) -> bool:
    """Whether all images share one shape (the device can then crop them)."""
    return self.images is not None or self.stored_shape is not None

  @property
  def in_memory(self) -> bool:
    return self.images is not None

  @property
  def labelled(self) -> bool:
    return self.num_classes is not None

  @functools.cached_property
  def labels(self) -> np.ndarray | None:
    """int32 (N,) labels, -1 where a record has none; None for unlabelled data.

    A split decoded per record asks its reader, which may read every record once (tfds).
    """
    if not self.labelled:
      return None
    return self.label_array if self.reader is None else self.reader.labels()

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, np.ndarray | int]:
    return self.load(index)

  def load(self, index: int, size: int | None = None,
           box_fn: images_lib.BoxFn | None = None) -> dict[str, np.ndarray | int]:
    """Record `index` as {"image": uint8 (H, W, C), "label": int (-1 if none), "index": index}.

    The image is as stored or, with `box_fn`, the box `box_fn(width, height)` resized to (size,
    size). A record of the reader that fails to decode is logged and counted, and a black image of
    the expected shape stands in for it, so training never stops on one bad file.
    """
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"{self.name} has {self.num_examples} records, asked for record {index}")
    if self.images is not None:
      image = self.images[index]
      if box_fn is not None:
        image = images_lib.crop_array(image, size, box_fn)
      label = -1 if self.label_array is None else int(self.label_array[index])
      return {"image": image, "label": label, "index": index}
    [(file, label)] = self.reader.read([index])
    return {"image": self._decode(index, file, size, box_fn), "label": label, "index": index}

  def _decode(self, index: int, file: images_lib.ImageFile, size: int | None,
              box_fn: images_lib.BoxFn | None) -> np.ndarray:
    try:
      if box_fn is None:
        return images_lib.decode(file, self.channels)
      return images_lib.decode_box(file, self.channels, size, box_fn)
    except images_lib.DECODE_ERRORS as error:
      shape = (size, size, self.channels) if box_fn is not None else self.stored_shape
      if shape is None:
        raise DataError(f"cannot decode {self.reader.describe(index)}: {error}") from error
      self._failures.record(self.reader.describe(index), error)
      return np.zeros(shape, np.uint8)


def _fingerprint_record(split: DatasetSplit) -> dict:
  record = {
      "dataset": split.name,
      "num_examples": split.num_examples,
      "fingerprint": split.fingerprint,
  }
  if split.manifest is not None:
    record["files"] = [list(entry) for entry in split.manifest]
  return record


def first_few(paths: Sequence[str]) -> str:
  """The first few paths, for a log line or an error message."""
  more = ", ..." if len(paths) > _SHOWN_PATHS else ""
  return ", ".join(paths[:_SHOWN_PATHS]) + more


def _describe_change(old: dict, new: dict) -> str:
  """What differs between two fingerprint records, as part of one line."""
  if "files" not in old or "files" not in new:
    if old["num_examples"] == new["num_examples"]:
      return f"the same number of records, {new['num_examples']}, with other contents"
    return f"{old['num_examples']} records before, {new['num_examples']} now"
  old_files, new_files = dict(map(tuple, old["files"])), dict(map(tuple, new["files"]))
  added = sorted(new_files.keys() - old_files.keys())
  removed = sorted(old_files.keys() - new_files.keys())
  resized = sorted(p for p in old_files.keys() & new_files.keys() if old_files[p] != new_files[p])
  parts = [f"{len(added)} added ({first_few(added)})" if added else "",
           f"{len(removed)} removed ({first_few(removed)})" if removed else "",
           f"{len(resized)} changed size ({first_few(resized)})" if resized else ""]
  return "; ".join(p for p in parts if p) or "the same files in another order"


def _read_fingerprints(path: epath.Path) -> dict:
  """The records of `path` ({} if it does not exist); a DataError if it cannot be read."""
  if not path.exists():
    return {}
  try:
    records = json.loads(path.read_text())
    if not isinstance(records, dict) or not all(
        isinstance(r, dict) and "fingerprint" in r for r in records.values()):
      raise ValueError("not a map of roles to fingerprint records")
  except (OSError, ValueError) as e:
    raise DataError(
        f"{path} is damaged ({type(e).__name__}: {' '.join(str(e).split())}); restore it from a "
        "copy, or delete it if the data have not changed since the run started (the next run "
        "records them again)") from e
  return records


def check_fingerprint(workdir: str, split: DatasetSplit, role: str = "train",
                      write: bool = True) -> None:
  """Checks that `split` is the data this workdir was started with; records it on first use.

  `workdir/dataset_fingerprint.json` maps a role ("train", "eval") to the split's name, size,
  fingerprint and, for image folders, its (path, size) manifest. A different fingerprint means the
  instance indices no longer match the memory bank: that raises a `DataError` saying what changed.
  Pass `write=False` on all processes but one.
  """
  path = epath.Path(workdir) / FINGERPRINT_FILE
  records = _read_fingerprints(path)
  current = _fingerprint_record(split)
  previous = records.get(role)
  if previous is None:
    if write:
      records[role] = current
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.parent / (FINGERPRINT_FILE + ".tmp")
      tmp.write_text(json.dumps(records))
      tmp.rename(path)
    return
  if previous["fingerprint"] != current["fingerprint"]:
    raise DataError(
        f"the {role} data {split.name} is not what {workdir} was started with "
        f"({_describe_change(previous, current)}), so instance indices would not match the memory "
        f"bank; restore the data as it was (see {path}) or start a new workdir")


class PixelStats(NamedTuple):
  """Per-channel mean and standard deviation of pixels scaled to [0, 1]."""
  mean: tuple[float, ...]
  std: tuple[float, ...]


def pixel_stats(split: DatasetSplit, max_images: int = 2000,
                image_size: int = 64) -> PixelStats:
  """Normalisation statistics measured on up to `max_images` evenly spaced images of `split`.

  Images of varying size are measured on their centre crop resized to `image_size`.
  """
  picks = np.unique(np.linspace(0, split.num_examples - 1, min(max_images, split.num_examples))
                    .astype(int))
  if split.fixed_size:
    pixels = np.stack([split.load(i)["image"] for i in picks])
  else:
    pixels = np.stack([split.load(i, size=image_size, box_fn=images_lib.eval_box)["image"]
                       for i in picks])
  pixels = pixels.reshape(-1, pixels.shape[-1]).astype(np.float64) / 255.0
  return PixelStats(mean=tuple(pixels.mean(axis=0)),
                    std=tuple(np.maximum(pixels.std(axis=0), 1e-3)))
