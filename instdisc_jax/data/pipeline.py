"""The grain input pipeline: host batches that follow the data contract of docs/design.md.

Training: with B the global batch size, the global batch at step s is slice `s % steps_per_epoch`
of a permutation of range(n) seeded by (seed, s // steps_per_epoch), the last n % B instances of
each permutation left out; process p of P takes rows [p * B / P, (p + 1) * B / P) of it. A batch
therefore depends only on (seed, step), never on the topology, and a run resumes exactly.

Where the work happens:
* Images held in memory at a fixed size: the host only gathers uint8 arrays (one fancy-index per
  step); the device applies the whole augmentation.
* With `host_crop` (the default for variable-size images: ImageNet, large folders): each record is
  decoded and cut with the reference `RandomResizedCrop((0.2, 1), (3/4, 4/3))` to `image_size`,
  drawn from a generator seeded by (seed, epoch, index); the device applies the photometric rest.
  Records are read by grain: `num_threads` threads, or `num_workers` processes (grain's
  multiprocessing needs absl flags parsed, as `absl.app.run` does).
Either way a background thread keeps `prefetch` batches ready, so the host overlaps the device.
"""

from collections.abc import Iterator
import dataclasses
import functools

import grain
import numpy as np

from instdisc_jax.data import images as images_lib
from instdisc_jax.data import split as split_lib
from instdisc_jax.errors import ConfigError

Batch = dict[str, np.ndarray]
_UNBOUNDED_STEPS = 1 << 40


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order of the instances in `epoch`: a permutation of range(n) seeded by (seed, epoch)."""
  permutation = np.random.default_rng((seed, epoch)).permutation(num_examples)
  permutation.flags.writeable = False
  return permutation


def _local_batch(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ConfigError(
        f"the global batch size {global_batch_size} must be a positive multiple of the "
        f"{process_count} processes")
  return global_batch_size // process_count


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """Which instances each process reads at each training step (the data contract)."""

  num_examples: int
  global_batch_size: int
  seed: int
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    _local_batch(self.global_batch_size, self.process_count)
    if self.num_examples < self.global_batch_size:
      raise ConfigError(
          f"the global batch size {self.global_batch_size} is larger than the "
          f"{self.num_examples} training examples; lower the batch size")

  @property
  def local_batch(self) -> int:
    return self.global_batch_size // self.process_count

  @property
  def steps_per_epoch(self) -> int:
    """Whole global batches in one pass over the data (the remainder is left out)."""
    return self.num_examples // self.global_batch_size

  def epoch(self, step: int) -> int:
    return step // self.steps_per_epoch

  def global_indices(self, step: int) -> np.ndarray:
    """The instance indices of the global batch at `step`, int32 (B,)."""
    start = (step % self.steps_per_epoch) * self.global_batch_size
    permutation = epoch_permutation(self.seed, self.epoch(step), self.num_examples)
    return permutation[start:start + self.global_batch_size].astype(np.int32)

  def local_indices(self, step: int) -> np.ndarray:
    """This process's rows of the global batch at `step`, int32 (b,)."""
    start = self.process_index * self.local_batch
    return self.global_indices(step)[start:start + self.local_batch]


@dataclasses.dataclass(frozen=True)
class _GatherStep:
  """A training step's batch from images held in memory (one fancy-index)."""

  split: split_lib.DatasetSplit
  plan: BatchPlan

  def __call__(self, step: int) -> Batch:
    indices = self.plan.local_indices(step)
    labels = self.split.label_array
    return {
        "image": self.split.images[indices],
        "label": np.full(indices.shape, -1, np.int32) if labels is None else labels[indices],
        "index": indices,
    }


@dataclasses.dataclass(frozen=True)
class _LoadTrainRecord:
  """Row `position % b` of training step `position // b`, decoded and maybe cropped on the host."""

  split: split_lib.DatasetSplit
  plan: BatchPlan
  host_crop: bool
  image_size: int | None

  def __call__(self, position: int) -> Batch:
    step, row = divmod(position, self.plan.local_batch)
    index = int(self.plan.local_indices(step)[row])
    if self.host_crop:
      rng = np.random.default_rng((self.plan.seed, self.plan.epoch(step), index))
      box_fn = functools.partial(images_lib.random_resized_box, rng)
      example = self.split.load(index, self.image_size, box_fn)
    else:
      example = self.split.load(index)
    return {"image": example["image"], "label": np.int32(example["label"]),
            "index": np.int32(index)}


def _read(batches: grain.MapDataset, num_threads: int, num_workers: int,
          prefetch: int) -> grain.DatasetIterator:
  """Iterates over `batches` with `num_threads` threads or `num_workers` processes.

  A background thread keeps `prefetch` batches ready.
  """
  if num_workers:
    dataset = batches.to_iter_dataset().mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers))
  else:
    dataset = batches.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=num_threads))
  return iter(grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=prefetch))


class TrainIterator:
  """This process's training batches, step after step; checkpointable.

  `next(it)` is {"image": uint8 (b, H, W, C), "label": int32 (b,), "index": int32 (b,)} with
  b = global_batch_size / process_count. `get_state()` is a JSON-serialisable dict holding the
  next step; `set_state` (or `start_step`) resumes there exactly.
  """

  def __init__(
      self,
      split: split_lib.DatasetSplit,
      *,
      global_batch_size: int,
      seed: int,
      process_index: int = 0,
      process_count: int = 1,
      image_size: int | None = None,
      host_crop: bool | None = None,
      start_step: int = 0,
      num_steps: int | None = None,
      num_threads: int | None = None,
      num_workers: int = 0,
      prefetch: int = 2,
  ):
    """Builds the iterator.

    Args:
      split: the training split.
      global_batch_size: examples per step over all processes.
      seed: seeds the epoch permutations and the host crops.
      process_index: this process, in [0, process_count).
      process_count: the number of processes reading batches.
      image_size: the side of host-cropped images.
      host_crop: decode and random-resized-crop each image on the host; default: when the
        split's images vary in size (they must then be cropped on the host).
      start_step: the first step to yield.
      num_steps: stop before this step; None runs on.
      num_threads: threads reading records when images are decoded per record.
      num_workers: grain worker processes reading records instead of threads (0: none).
      prefetch: batches kept ready by the background thread.
    """
    self.split = split
    self.plan = BatchPlan(
        split.num_examples, global_batch_size, seed, process_index, process_count)
    self.host_crop = not split.fixed_size if host_crop is None else host_crop
    if not self.host_crop and not split.fixed_size:
      raise ValueError(f"{split.name} has images of varying size: they need host_crop")
    if self.host_crop and not image_size:
      raise ValueError("host_crop needs image_size")
    self.image_size = image_size
    self.num_steps = _UNBOUNDED_STEPS if num_steps is None else num_steps
    self._num_threads = num_threads or split_lib.decode_threads()
    self._num_workers = num_workers
    self._prefetch = prefetch
    self._step = start_step
    self._iterator = self._start(start_step)

  def _start(self, step: int) -> grain.DatasetIterator:
    if self.split.in_memory and not self.host_crop:
      batches = grain.MapDataset.range(step, self.num_steps).map(_GatherStep(self.split, self.plan))
      return _read(batches, num_threads=0, num_workers=0, prefetch=self._prefetch)
    b = self.plan.local_batch
    load = _LoadTrainRecord(self.split, self.plan, self.host_crop, self.image_size)
    records = grain.MapDataset.range(step * b, self.num_steps * b).map(load)
    return _read(records.batch(b), self._num_threads, self._num_workers, self._prefetch)

  @property
  def step(self) -> int:
    """The step the next batch belongs to."""
    return self._step

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> Batch:
    if self._iterator is None:
      raise ValueError("the TrainIterator is closed")
    if self._step >= self.num_steps:
      raise StopIteration
    batch = next(self._iterator)
    self._step += 1
    return batch

  def get_state(self) -> dict[str, int]:
    plan = self.plan
    return {"step": self._step, "seed": plan.seed, "global_batch_size": plan.global_batch_size,
            "num_examples": plan.num_examples}

  def set_state(self, state: dict[str, int]) -> None:
    """Continues from `state` (from `get_state`), which must be of the same data and batching."""
    for key in ("seed", "global_batch_size", "num_examples"):
      if key in state and state[key] != getattr(self.plan, key):
        raise ConfigError(
            f"the input pipeline state was saved with {key}={state[key]}, this run has "
            f"{getattr(self.plan, key)}; resume with the data and config the run started with")
    self.close()
    self._step = int(state["step"])
    self._iterator = self._start(self._step)

  def close(self) -> None:
    """Stops the background thread and any worker processes."""
    if self._iterator is not None:
      self._iterator.close()
      # Dropped now, not at interpreter exit, where grain's clean-up fails on torn-down modules.
      self._iterator = None

  def __enter__(self) -> "TrainIterator":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
  """Batches that cover every example once; every process runs this many."""
  return -(-num_examples // global_batch_size)


@dataclasses.dataclass(frozen=True)
class _EvalLayout:
  """Which records a process reads in each eval batch, and the shape of its images."""

  split: split_lib.DatasetSplit
  global_batch_size: int
  local_batch: int
  process_index: int
  image_size: int | None  # Host eval transform to this side; None: images as they are.

  @property
  def image_shape(self) -> tuple[int, ...]:
    if self.image_size is None:
      return self.split.image_shape
    return (self.image_size, self.image_size, self.split.channels)

  def first_record(self, batch: int) -> int:
    return batch * self.global_batch_size + self.process_index * self.local_batch


@dataclasses.dataclass(frozen=True)
class _GatherEvalBatch:
  """An eval batch from images held in memory, padded with masked rows."""

  layout: _EvalLayout

  def __call__(self, batch: int) -> Batch:
    split = self.layout.split
    indices = self.layout.first_record(batch) + np.arange(self.layout.local_batch)
    mask = indices < split.num_examples
    images = np.zeros((self.layout.local_batch, *self.layout.image_shape), np.uint8)
    images[mask] = split.images[indices[mask]]
    labels = np.full(indices.shape, -1, np.int32)
    if split.label_array is not None:
      labels[mask] = split.label_array[indices[mask]]
    return {"image": images, "label": labels,
            "index": np.where(mask, indices, -1).astype(np.int32), "mask": mask}


@dataclasses.dataclass(frozen=True)
class _LoadEvalRecord:
  """Row `position % b` of eval batch `position // b`: a decoded record or a masked pad."""

  layout: _EvalLayout

  def __call__(self, position: int) -> Batch:
    batch, row = divmod(position, self.layout.local_batch)
    index = self.layout.first_record(batch) + row
    if index >= self.layout.split.num_examples:
      return {"image": np.zeros(self.layout.image_shape, np.uint8), "label": np.int32(-1),
              "index": np.int32(-1), "mask": np.bool_(False)}
    box_fn = None if self.layout.image_size is None else images_lib.eval_box
    example = self.layout.split.load(index, self.layout.image_size, box_fn)
    return {"image": example["image"], "label": np.int32(example["label"]),
            "index": np.int32(index), "mask": np.bool_(True)}


def eval_batches(
    split: split_lib.DatasetSplit,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    image_size: int | None = None,
    *,
    num_threads: int | None = None,
    num_workers: int = 0,
    prefetch: int = 2,
) -> Iterator[Batch]:
  """This process's eval batches: every record once, in record order, padded to whole batches.

  Global batch k holds records [k * B, (k + 1) * B), process p its rows [p * b, (p + 1) * b);
  each process yields `num_eval_batches(n, B)` batches. Rows past the last record are padding:
  `mask` False, a black image, label -1 and index -1. Variable-size images get the reference
  eval transform on the host (shorter side to image_size * 256 / 224, centre crop image_size);
  fixed-size images come as they are.
  """
  if not split.fixed_size and not image_size:
    raise ValueError(f"{split.name} has images of varying size: eval needs image_size")
  layout = _EvalLayout(split, global_batch_size, _local_batch(global_batch_size, process_count),
                       process_index, None if split.fixed_size else image_size)
  count = num_eval_batches(split.num_examples, global_batch_size)
  if split.in_memory:
    batches = grain.MapDataset.range(count).map(_GatherEvalBatch(layout))
    iterator = _read(batches, num_threads=0, num_workers=0, prefetch=prefetch)
  else:
    records = grain.MapDataset.range(count * layout.local_batch).map(_LoadEvalRecord(layout))
    iterator = _read(records.batch(layout.local_batch),
                     num_threads or split_lib.decode_threads(), num_workers, prefetch)
  return _closing(iterator)


def _closing(iterator: grain.DatasetIterator) -> Iterator[Batch]:
  """Yields from `iterator`, then closes it (also when the consumer stops early)."""
  try:
    yield from iterator
  finally:
    iterator.close()
    del iterator  # Dropped now, not at interpreter exit (see TrainIterator.close).
