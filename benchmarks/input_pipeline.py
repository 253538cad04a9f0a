"""Input pipeline throughput: host batches from `data.TrainIterator` plus the on-device
`augment.train_augment`, for Fashion-MNIST-sized data held in memory.

The split is n synthetic uint8 28 x 28 x 1 images (the real Fashion-MNIST split is held in host
memory the same way), read by the real `TrainIterator` (one fancy-index per step, a background
prefetch thread). Two rates are measured over `steps` consecutive steps after a warm-up:

* host: `next(iterator)` alone;
* host + augmentation: `next(iterator)`, `parallel.shard_local_batch` and the pmapped
  `train_augment` of the batch, dispatched asynchronously as the training loop does and waited
  for once at the end.

The runner divides the second rate by the Fashion-MNIST train step's images/s (goal >= 3x).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from benchmarks import common
from benchmarks import train_step
from instdisc_jax import augment
from instdisc_jax import data
from instdisc_jax import parallel
from instdisc_jax.parallel import AXIS

CONFIG = "fashion_mnist"


@dataclasses.dataclass(frozen=True)
class Size:
  num_images: int
  batch: int
  steps: int
  repeats: int


SIZES = {
    "quick": Size(num_images=2_048, batch=64, steps=8, repeats=2),
    "full": Size(num_images=60_000, batch=128, steps=100, repeats=3),
}


def host_rate(iterator: data.TrainIterator, steps: int, batch: int) -> float:
  """Images/s of `next(iterator)` alone, after one untimed batch."""
  next(iterator)
  start = time.perf_counter()
  for _ in range(steps):
    next(iterator)
  return steps * batch / (time.perf_counter() - start)


def augmented_rate(iterator: data.TrainIterator, p_augment, keys, steps: int,
                   batch: int) -> float:
  """Images/s of host batches through the on-device augmentation (compiled before)."""
  jax.block_until_ready(p_augment(keys[0], parallel.shard_local_batch(next(iterator)["image"])))
  start = time.perf_counter()
  out = None
  for step in range(steps):
    out = p_augment(keys[step], parallel.shard_local_batch(next(iterator)["image"]))
  jax.block_until_ready(out)
  return steps * batch / (time.perf_counter() - start)


def run(size_name: str) -> dict:
  size = SIZES[size_name]
  config = train_step.load_config(train_step.Case(CONFIG, batch=size.batch))
  _, image_shape, num_classes = train_step.DATASETS[config.dataset]
  images = np.random.default_rng(0).integers(0, 256, (size.num_images,) + image_shape,
                                             dtype=np.uint8)
  split = train_step.synthetic_split(config.dataset, images, num_classes)
  cfg = train_step.augment_config(config, image_shape, num_classes)
  p_augment = jax.pmap(
      lambda key, images: augment.train_augment(jax.random.wrap_key_data(key), images, cfg),
      axis_name=AXIS)
  keys = [parallel.replicate(np.asarray(jax.random.key_data(jax.random.key(s))))
          for s in range(size.steps)]
  host, augmented = [], []
  common.log(f"input_pipeline: {size.num_images} images, batch {size.batch}")
  with data.TrainIterator(split, global_batch_size=size.batch, seed=0) as iterator:
    for _ in range(size.repeats):
      host.append(host_rate(iterator, size.steps, size.batch))
      augmented.append(augmented_rate(iterator, p_augment, keys, size.steps, size.batch))
  return {"iterator": "instdisc_jax.data.TrainIterator (in-memory split)",
          "num_images": size.num_images, "image_shape": list(image_shape),
          "global_batch": size.batch, "steps": size.steps, "devices": jax.device_count(),
          "host_images_per_s": float(np.median(host)),
          "host_and_augment_images_per_s": float(np.median(augmented)),
          "host_runs": host, "host_and_augment_runs": augmented}


def markdown(result: dict, train_images_per_s: float | None = None) -> str:
  rows = [["host: next(TrainIterator)", f"{result['host_images_per_s']:.0f}"],
          ["host + on-device train_augment", f"{result['host_and_augment_images_per_s']:.0f}"]]
  text = (f"{result['iterator']}: {result['num_images']} synthetic "
          f"{'x'.join(map(str, result['image_shape']))} uint8 images, global batch "
          f"{result['global_batch']}, median of {len(result['host_runs'])} runs of "
          f"{result['steps']} steps.\n\n" + common.table(["path", "images/s"], rows))
  if train_images_per_s:
    ratio = result["host_and_augment_images_per_s"] / train_images_per_s
    text += (f"\n\nFashion-MNIST train step: {train_images_per_s:.0f} images/s; input path / "
             f"train step = {ratio:.1f}x (goal >= 3x).")
  return text


if __name__ == "__main__":
  common.module_main(run, markdown, __doc__.splitlines()[0], SIZES)
