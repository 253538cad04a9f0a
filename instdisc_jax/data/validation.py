"""A validation set held out of the training split, so that nothing is tuned on the test set.

`holdout` picks `validation_size` records of a labelled training split, stratified by class: each
class gets its proportional share of the size (largest remainder), and within a class the
records with the smallest keys drawn from `Generator(PCG64(validation_seed))` are held out. The
choice depends on (labels, size, seed) only, never on the devices, processes, `seed` or a
resume, so runs of several seeds and every process of one run hold out the same images.

`carve` turns a split into two views with their own fingerprints: the training instances (the
other records, in ascending record order; bank row i is the i-th of them) and the validation
images. Everything downstream (the trainer, the evaluator, search, the checkpoint identity) sees
the training view as the split. `<workdir>/validation.json` records the carve-out, and a resume
with another one is refused (`check_record`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Sequence

from etils import epath
import numpy as np

from instdisc_jax.data import split as split_lib
from instdisc_jax.errors import DataError
from instdisc_jax.errors import WorkdirError

VALIDATION_FILE = "validation.json"


def allocate(class_counts: Sequence[int], size: int) -> np.ndarray:
  """Per-class shares of `size` proportional to `class_counts`, by the largest remainder.

  Class c's quota is size * count_c / N: every class gets its floor, and the remaining units go
  to the largest fractional parts (ties to the lower class). Integer arithmetic throughout, so
  the shares never depend on floating-point rounding.
  """
  counts = np.asarray(class_counts, np.int64)
  total = int(counts.sum())
  if not 0 <= size <= total:
    raise ValueError(f"cannot hold out {size} of {total} records")
  if total == 0:
    return np.zeros_like(counts)
  shares, remainders = np.divmod(counts * size, total)
  left = size - int(shares.sum())
  # Largest remainder first; np.lexsort sorts by its last key, then the earlier ones.
  order = np.lexsort((np.arange(len(counts)), -remainders))
  shares[order[:left]] += 1
  return shares


def holdout(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
  """The sorted record indices of a stratified validation set of `size` labelled records.

  Records labelled -1 (none) are never held out. One 64-bit key per record comes from the raw
  PCG64 stream of `seed` (`random_raw` is stable across NumPy versions, unlike the Generator's
  sampling methods); each class holds out its `allocate` share of the records with the smallest
  keys (ties, which have probability 2^-64, to the lower index).
  """
  labels = np.asarray(labels)
  rng = np.random.Generator(np.random.PCG64(seed))
  keys = rng.bit_generator.random_raw(len(labels))
  classes, counts = np.unique(labels[labels >= 0], return_counts=True)
  chosen = []
  for label, share in zip(classes, allocate(counts, size)):
    members = np.flatnonzero(labels == label)
    chosen.append(members[np.argsort(keys[members], kind="stable")[:share]])
  return np.sort(np.concatenate(chosen or [np.zeros(0, np.int64)])).astype(np.int64)


def indices_sha256(indices: np.ndarray) -> str:
  """SHA-256 of the held-out record indices, as little-endian int64."""
  return hashlib.sha256(np.asarray(indices, "<i8").tobytes()).hexdigest()


class _SubsetReader:
  """The records `indices` of a `RecordReader`, renumbered 0..len-1 (a `RecordReader`)."""

  def __init__(self, reader: split_lib.RecordReader, indices: np.ndarray,
               labels: np.ndarray | None):
    self._reader = reader
    self._indices = indices
    self._labels = labels

  def __len__(self) -> int:
    return len(self._indices)

  def read(self, indices: Sequence[int]):
    return self._reader.read([int(self._indices[i]) for i in indices])

  def describe(self, index: int) -> str:
    return self._reader.describe(int(self._indices[index]))

  def labels(self) -> np.ndarray | None:
    return self._labels


def subset(split: split_lib.DatasetSplit, indices: np.ndarray, name: str,
           fingerprint: str) -> split_lib.DatasetSplit:
  """The records `indices` (ascending) of `split` as a split of its own: record j of the view
  is record indices[j] of `split`. Images held in memory are copied; a reader is wrapped."""
  labels = None if split.labels is None else split.labels[indices]
  common = dict(name=name, channels=split.channels, fingerprint=fingerprint,
                num_classes=split.num_classes, class_names=split.class_names,
                manifest=(None if split.manifest is None
                          else tuple(split.manifest[i] for i in indices)))
  if split.in_memory:
    return split_lib.DatasetSplit(images=split.images[indices], label_array=labels, **common)
  return split_lib.DatasetSplit(reader=_SubsetReader(split.reader, indices, labels),
                                stored_shape=split.stored_shape, **common)


@dataclasses.dataclass(frozen=True)
class Carved:
  """A training split without its validation images."""

  train: split_lib.DatasetSplit        # The training instances, in ascending record order.
  validation: split_lib.DatasetSplit   # The held-out images, in ascending record order.
  record: dict                         # What validation.json holds.


def carve(split: split_lib.DatasetSplit, size: int, seed: int) -> Carved:
  """Holds `size` stratified records of `split` out (`holdout`); see the module docstring.

  Raises:
    DataError: `split` has no labels, or fewer labelled records than `size` leaves room for.
  """
  if split.labels is None:
    raise DataError(
        f"config.validation_size={size}, but {split.name} has no labels, and the validation set "
        "is drawn per class: set --config.validation_size=0")
  labelled = int(np.sum(split.labels >= 0))
  if size >= labelled:
    raise DataError(
        f"config.validation_size={size}, but {split.name} has {labelled} labelled images: hold "
        f"out fewer, e.g. --config.validation_size={labelled // 10}")
  held = holdout(split.labels, size, seed)
  digest = indices_sha256(held)
  kept = np.setdiff1d(np.arange(split.num_examples), held, assume_unique=True)
  tag = f"validation_size={size},validation_seed={seed}"

  def view_fingerprint(role: str) -> str:
    text = f"{split.fingerprint}|{role} of {tag}|{digest}"
    return hashlib.sha256(text.encode()).hexdigest()

  per_class = np.bincount(split.labels[held], minlength=split.num_classes or 0)
  record = {
      "validation_size": size,
      "validation_seed": seed,
      "dataset": split.name,
      "dataset_fingerprint": split.fingerprint,
      "count": len(held),
      "indices_sha256": digest,
      "per_class": per_class.tolist(),
      "indices": held.tolist(),
  }
  return Carved(
      train=subset(split, kept, f"{split.name} without validation ({tag})",
                   view_fingerprint("training")),
      validation=subset(split, held, f"{split.name} validation ({tag})",
                        view_fingerprint("validation")),
      record=record)


# -- the workdir's record -------------------------------------------------------------------------


def _read(path: epath.Path) -> dict | None:
  if not path.exists():
    return None
  try:
    record = json.loads(path.read_text())
    if not isinstance(record, dict) or not {"validation_size", "validation_seed",
                                            "indices_sha256"} <= record.keys():
      raise ValueError("not a validation record")
  except (OSError, ValueError) as e:
    raise DataError(
        f"{path} is damaged ({type(e).__name__}: {' '.join(str(e).split())}); restore it from a "
        "copy, or start a new workdir") from e
  return record


def _started(workdir: epath.Path) -> bool:
  """Whether a run has recorded its training data in `workdir` (it has started there)."""
  path = workdir / split_lib.FINGERPRINT_FILE
  try:
    return path.exists() and "train" in json.loads(path.read_text())
  except (OSError, ValueError):
    return True                   # Damaged: `check_fingerprint` says so.


def check_record(workdir: str, record: dict | None) -> None:
  """Refuses a resume whose carve-out differs from the one `workdir` was started with.

  `record` is `Carved.record`, or None when validation is off. Reads only.

  Raises:
    WorkdirError: naming validation_size or validation_seed and the fix.
  """
  root = epath.Path(workdir)
  path = root / VALIDATION_FILE
  saved = _read(path)
  if saved is None:
    if record is not None and _started(root):
      raise WorkdirError(
          f"config.validation_size={record['validation_size']}, but {workdir} was started "
          f"without a validation set (it has no {VALIDATION_FILE}): set "
          "--config.validation_size=0 to resume it, or start a new workdir")
    return
  size, seed = saved["validation_size"], saved["validation_seed"]
  fix = (f"set --config.validation_size={size} --config.validation_seed={seed} to resume it, "
         "or start a new workdir")
  if record is None:
    raise WorkdirError(f"config.validation_size=0, but {workdir} holds out {size} training "
                       f"images for validation (see {path}): {fix}")
  for field in ("validation_size", "validation_seed"):
    if record[field] != saved[field]:
      raise WorkdirError(f"config.{field}={record[field]}, but {workdir} was started with "
                         f"{field}={saved[field]} (see {path}): {fix}")
  if (record["dataset_fingerprint"] == saved.get("dataset_fingerprint")
      and record["indices_sha256"] != saved["indices_sha256"]):
    raise WorkdirError(
        f"the validation images chosen now differ from those in {path} for the same data, "
        f"validation_size and validation_seed: restore {path} from a copy, or start a new "
        "workdir")


def write_record(workdir: str, record: dict | None) -> None:
  """Writes `record` to `<workdir>/validation.json` unless it is there (call on one process)."""
  path = epath.Path(workdir) / VALIDATION_FILE
  if record is None or path.exists():
    return
  tmp = path.parent / (VALIDATION_FILE + ".tmp")
  tmp.write_text(json.dumps(record))
  tmp.rename(path)
