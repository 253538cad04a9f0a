"""One entry point for every dataset: tfds names, `folder:/path` and `npz:/path/file.npz`.

tfds datasets are read with `tfds.data_source` (ArrayRecord files, random access, no
TensorFlow); record i of the training split is instance i. A split whose decoded images take at
most `max_cache_bytes` (2 GiB) is decoded once, in a thread pool, and held in host memory; a
larger one is decoded per record by the input pipeline.

Documented tfds datasets and the split each evaluates on: fashion_mnist, cifar10, cifar100 and
stl10 (test), imagenet2012 (validation). stl10's `train` split is its 5,000 labelled images; the
100,000 unlabelled ones are the split `unlabelled` (or `train+unlabelled` for both).
"""

from collections.abc import Sequence
import contextlib
import dataclasses
import functools
import hashlib
import io
import logging

import numpy as np
import tensorflow_datasets as tfds

from instdisc_jax.data import fashion_mnist
from instdisc_jax.data import folder as folder_lib
from instdisc_jax.data import images as images_lib
from instdisc_jax.data import npz as npz_lib
from instdisc_jax.data import split as split_lib
from instdisc_jax.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_DATASET = "fashion_mnist"
FOLDER_PREFIX = "folder:"
NPZ_PREFIX = "npz:"
# The tfds datasets this project documents, with the split each evaluates on.
EVAL_SPLITS = {
    "fashion_mnist": "test",
    "cifar10": "test",
    "cifar100": "test",
    "stl10": "test",
    "imagenet2012": "validation",
}
PREPARE_COMMAND = "python -m instdisc_jax.data.prepare --dataset={name} --data_dir={data_dir}"
_LABEL_CHUNK = 1024


class TfdsReader:
  """The records of a tfds split, images left encoded."""

  def __init__(self, builder: tfds.core.DatasetBuilder, split: str):
    self._name = f"{builder.name}:{split}"
    self._has_label = "label" in builder.info.features
    try:
      self._source = builder.as_data_source(
          split, decoders={"image": tfds.decode.SkipDecoding()})
    except ValueError as error:  # An unknown split.
      raise DataError(f"{builder.name}: {error}") from error

  def __len__(self) -> int:
    return len(self._source)

  def read(self, indices: Sequence[int]) -> list[tuple[io.BytesIO, int]]:
    return [(io.BytesIO(example["image"]), int(example["label"]) if self._has_label else -1)
            for example in self._source.__getitems__(list(indices))]

  def describe(self, index: int) -> str:
    return f"{self._name} record {index}"

  def labels(self) -> np.ndarray | None:
    """Reads every record once (the labels sit next to the images in the ArrayRecord files)."""
    if not self._has_label:
      return None
    log.info("Reading the labels of %s (one pass over its %d records)", self._name, len(self))
    labels = np.empty((len(self),), np.int32)
    for start in range(0, len(self), _LABEL_CHUNK):
      chunk = range(start, min(start + _LABEL_CHUNK, len(self)))
      labels[start:chunk.stop] = [label for _, label in self.read(chunk)]
    return labels


def prepare_hint(name: str, data_dir: str) -> str:
  """How to prepare tfds dataset `name` in `data_dir`, as part of one line."""
  command = PREPARE_COMMAND.format(name=name, data_dir=data_dir)
  if name == "fashion_mnist":
    return (f"run `{command}` (it reads the Debian package: "
            f"sudo apt-get install -y {fashion_mnist.APT_PACKAGE})")
  if name == "imagenet2012":
    return ("download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from image-net.org "
            f"into a directory DIR, then run `{command} --manual_dir=DIR` "
            "(needs pip install 'instdisc_jax[prepare]')")
  return f"run `{command}`"


class _DropMessages(logging.Filter):
  """Drops log records whose message holds `text`."""

  def __init__(self, text: str):
    super().__init__()
    self.text = text

  def filter(self, record: logging.LogRecord) -> bool:
    return self.text not in record.getMessage()


@contextlib.contextmanager
def _unprepared_quietly():
  """Looking for an unprepared dataset, tfds warns about each version folder without
  dataset_info.json; the DataError that follows says it better, and alone."""
  drop = _DropMessages("has no dataset_info.json")
  logger = logging.getLogger("absl")
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


def _tfds_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The prepared builder of `name`, or a DataError saying how to prepare it."""
  try:
    with _unprepared_quietly():
      builder = tfds.builder(name, data_dir=data_dir)
      prepared = builder.is_prepared()
  except tfds.core.registered.DatasetNotFoundError as error:
    raise DataError(
        f"unknown dataset {name!r}: use a tfds name ({', '.join(EVAL_SPLITS)}, ...), "
        f"{FOLDER_PREFIX}/path/to/images or {NPZ_PREFIX}/path/file.npz") from error
  root = str(builder.data_dir_root)
  if not prepared:
    raise DataError(f"dataset {name} is not prepared in {root}: {prepare_hint(name, root)}")
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise DataError(
        f"dataset {name} in {root} is stored as {builder.info.file_format.value}, but random "
        f"access needs ArrayRecord: delete {builder.data_dir} and {prepare_hint(name, root)}")
  return builder


def _image_feature(name: str, builder: tfds.core.DatasetBuilder) -> tuple[int | None, ...]:
  """The shape of the dataset's `image` feature, checked to be (H, W, 1) or (H, W, 3)."""
  features = builder.info.features
  feature = features["image"] if "image" in features else None
  if not isinstance(feature, tfds.features.Image):
    raise DataError(f"dataset {name} has no `image` feature; instdisc_jax trains on images")
  shape = tuple(feature.shape)
  if len(shape) != 3 or shape[-1] not in (1, 3):
    raise DataError(f"dataset {name} has images of shape {shape}; expected (H, W, 1) or (H, W, 3)")
  return shape


def load_tfds(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    image_size: int | None = None,
    max_cache_bytes: int = split_lib.MAX_CACHE_BYTES,
    num_threads: int | None = None,
) -> split_lib.DatasetSplit:
  """Loads a prepared tfds split; see `load_dataset`."""
  builder = _tfds_builder(name, data_dir)
  shape = _image_feature(name, builder)
  reader = TfdsReader(builder, split)
  channels = shape[-1]
  fixed = None not in shape
  if not fixed and image_size is None:
    raise ValueError(f"{name} has images of varying size: pass image_size")
  stored = shape if fixed else (image_size, image_size, channels)
  label_feature = builder.info.features["label"] if "label" in builder.info.features else None
  labelled = isinstance(label_feature, tfds.features.ClassLabel) and split != "unlabelled"
  fingerprint = hashlib.sha256(
      f"tfds:{builder.info.full_name}:{split}:{len(reader)}".encode()).hexdigest()
  common = dict(
      name=f"{name}:{split}",
      channels=channels,
      fingerprint=fingerprint,
      num_classes=label_feature.num_classes if labelled else None,
      class_names=tuple(label_feature.names) if labelled else None,
  )
  if len(reader) * int(np.prod(stored)) > max_cache_bytes:
    return split_lib.DatasetSplit(reader=reader, stored_shape=shape if fixed else None, **common)

  if fixed:
    decode_fn = functools.partial(images_lib.decode, channels=channels)
  else:
    decode_fn = functools.partial(images_lib.center_square, channels=channels, size=image_size)
  images, labels, failed = split_lib.decode_all(reader, decode_fn, stored, num_threads)
  if failed:
    log.warning("%s:%s: %d records could not be decoded and are black images (first: %s)",
                    name, split, len(failed), failed[:3])
  return split_lib.DatasetSplit(images=images, label_array=labels if labelled else None, **common)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """A parsed `--config.dataset` value."""

  kind: str  # "tfds", "folder" or "npz".
  location: str  # The tfds name, the folder or the .npz file.

  @classmethod
  def parse(cls, spec: str) -> "DatasetSpec":
    for kind, prefix in (("folder", FOLDER_PREFIX), ("npz", NPZ_PREFIX)):
      if spec.startswith(prefix):
        location = spec[len(prefix):]
        if not location:
          raise DataError(f"dataset {spec!r} names no path: write {prefix}/path")
        return cls(kind, location)
    if not spec:
      raise DataError(f"dataset is empty: use a tfds name such as {DEFAULT_DATASET}")
    return cls("tfds", spec)


def load_dataset(
    spec: str = DEFAULT_DATASET,
    split: str = "train",
    *,
    data_dir: str | None = None,
    image_size: int | None = None,
    class_names: Sequence[str] | None = None,
    max_cache_bytes: int = split_lib.MAX_CACHE_BYTES,
    num_threads: int | None = None,
) -> split_lib.DatasetSplit:
  """Loads one split of a dataset, ready for random access by instance index.

  Args:
    spec: a tfds name (`fashion_mnist`, `cifar10`, `cifar100`, `stl10`, `imagenet2012`, ...),
      `folder:/path/to/images` or `npz:/path/file.npz`.
    split: the split: a tfds split (`train`, `test`, `validation`, `unlabelled`, `train[:10%]`,
      ...), `train` or `test` of an .npz; a folder is one split and ignores it.
    data_dir: the tfds data directory (local or `gs://`); None means `$TFDS_DATA_DIR`, else
      `~/tensorflow_datasets`.
    image_size: the side that variable-size images held in memory are resized to; needed for
      folders and variable-size tfds datasets.
    class_names: a labelled folder's classes in label order, to label an eval folder the same way.
    max_cache_bytes: hold the decoded split in host memory when it takes at most this many bytes.
    num_threads: threads for decoding (default: one per core, at most 16).

  Raises:
    DataError: the dataset is missing, unprepared, empty or has images of the wrong shape.
  """
  parsed = DatasetSpec.parse(spec)
  if parsed.kind == "npz":
    return npz_lib.load_npz(parsed.location, split)
  if parsed.kind == "folder":
    if image_size is None:
      raise ValueError("image folders need image_size")
    return folder_lib.load_folder(
        parsed.location, image_size, class_names=class_names,
        max_cache_bytes=max_cache_bytes, num_threads=num_threads)
  return load_tfds(parsed.location, split, data_dir=data_dir, image_size=image_size,
                   max_cache_bytes=max_cache_bytes, num_threads=num_threads)


def load_train_and_eval(
    dataset: str = DEFAULT_DATASET,
    eval_dataset: str | None = None,
    *,
    train_split: str = "train",
    eval_split: str | None = None,
    data_dir: str | None = None,
    image_size: int | None = None,
    max_cache_bytes: int = split_lib.MAX_CACHE_BYTES,
) -> tuple[split_lib.DatasetSplit, split_lib.DatasetSplit | None, str | None]:
  """Loads the training split and the split kNN evaluates on.

  The eval split comes from `eval_dataset` when given, else from `dataset`: its split
  `eval_split` (default: `EVAL_SPLITS`, else `test`) for tfds; `test_images` of an .npz (an
  `eval_dataset` .npz without them gives its `images`); the whole folder of an `eval_dataset`
  folder, labelled in the training folder's class order. A training folder has none of its own.

  Returns:
    (train, eval or None, why kNN evaluation is skipped or None): evaluation needs labelled
    training and eval splits; without them training goes on and the reason is for a notice.
  """
  load = functools.partial(
      load_dataset, data_dir=data_dir, image_size=image_size, max_cache_bytes=max_cache_bytes)
  train = load(dataset, train_split)
  parsed = DatasetSpec.parse(eval_dataset or dataset)
  evaluation = None
  if parsed.kind == "tfds":
    evaluation = load(parsed.location, eval_split or EVAL_SPLITS.get(parsed.location, "test"))
  elif parsed.kind == "npz":
    has_test = npz_lib.has_test_split(parsed.location)
    if eval_dataset or has_test:  # Another .npz is evaluated on its test arrays, if any.
      evaluation = load(eval_dataset or dataset, "test" if has_test else "train")
  elif eval_dataset:
    evaluation = load(eval_dataset, class_names=train.class_names)

  if not train.labelled:
    return train, evaluation, f"{train.name} has no labels, so kNN evaluation is skipped"
  if evaluation is None:
    return train, None, (
        f"{train.name} has no eval split (set eval_dataset), so kNN evaluation is skipped")
  if not evaluation.labelled:
    return train, evaluation, f"{evaluation.name} has no labels, so kNN evaluation is skipped"
  return train, evaluation, None


def check_sizes(train: split_lib.DatasetSplit, evaluation: split_lib.DatasetSplit | None,
                image_size: int) -> None:
  """Refuses data the network would see at another size, or another kind, than it trains on.

  Images held at one fixed size (npz files, tfds datasets such as CIFAR) are cropped on the
  device when training but fed whole when evaluating, so they must already be `image_size`
  square: otherwise training sees crops of one size and evaluation images of another. (Folders
  and variable-size datasets are resized to `image_size` on purpose.) The eval split must have
  the training images' channels and no classes the training labels lack: kNN predicts the labels
  of training images, so either mismatch gives accuracies near chance and no error.
  """
  for role, split in (("dataset", train), ("eval_dataset", evaluation)):
    if split is None or not split.fixed_size:
      continue
    height, width, _ = split.image_shape
    if (height, width) != (image_size, image_size):
      other = "" if split is train else (
          f" (the training images are {train.image_shape[0]}x{train.image_shape[1]})"
          if train.fixed_size else "")
      fix = (f"set --config.image_size={height}" if height == width and split is train else
             f"give {role} images of {image_size}x{image_size}")
      raise DataError(
          f"config.image_size={image_size}, but {split.name} holds {height}x{width} images"
          f"{other}: {fix} (images stored at a fixed size are not resized; resize them to "
          f"image_size x image_size)")
  if evaluation is None:
    return
  if evaluation.channels != train.channels:
    raise DataError(
        f"the eval data {evaluation.name} has {evaluation.channels} channel(s), the training "
        f"data {train.name} {train.channels}: give an eval_dataset of {train.channels}-channel "
        "images")
  if train.labelled and evaluation.labelled:
    if evaluation.num_classes > train.num_classes:
      raise DataError(
          f"the eval data {evaluation.name} has labels of {evaluation.num_classes} classes, the "
          f"training data {train.name} of {train.num_classes}: kNN predicts only training "
          "labels; give an eval_dataset labelled like the training data")
    if (train.class_names and evaluation.class_names
        and tuple(train.class_names) != tuple(evaluation.class_names)):
      raise DataError(
          f"the eval data {evaluation.name} names its classes "
          f"{first_names(evaluation.class_names)}, the training data {train.name} "
          f"{first_names(train.class_names)}: give an eval_dataset labelled like the training "
          "data")


def first_names(names: Sequence[str], shown: int = 4) -> str:
  return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
