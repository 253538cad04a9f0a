"""The input pipeline follows the data contract: batches, per-process slices, exact resume."""

import functools
import json

from absl import flags
import grain
import numpy as np
from PIL import Image
import pytest

from instdisc_jax.data import images as images_lib
from instdisc_jax.data import pipeline
from instdisc_jax.data import sources
from instdisc_jax.data import split as split_lib
from instdisc_jax.errors import ConfigError

N, BATCH, SEED, SIZE = 37, 8, 3, 12
STEPS_PER_EPOCH = N // BATCH  # 4: each epoch leaves 5 instances out.


def memory_split(n: int = N, labelled: bool = True) -> split_lib.DatasetSplit:
  rng = np.random.default_rng(0)
  return split_lib.DatasetSplit(
      name="memory", channels=1, fingerprint="f",
      images=rng.integers(0, 256, (n, 6, 6, 1), dtype=np.uint8),
      label_array=(np.arange(n, dtype=np.int32) % 5) if labelled else None,
      num_classes=5 if labelled else None)


@pytest.fixture(scope="module")
def folder_split(tmp_path_factory) -> split_lib.DatasetSplit:
  """A variable-size folder decoded per record (host crops)."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(1)
  for i in range(11):
    shape = (20 + 3 * i, 40 - 2 * i, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / f"{i:02d}.png")
  return sources.load_dataset(f"folder:{root}", image_size=SIZE, max_cache_bytes=0)


def take(iterator, steps: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(steps)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_global_batches_are_slices_of_epoch_permutations():
  plan = pipeline.BatchPlan(N, BATCH, SEED)
  assert plan.steps_per_epoch == STEPS_PER_EPOCH
  for step in range(3 * STEPS_PER_EPOCH):
    epoch, k = divmod(step, STEPS_PER_EPOCH)
    expected = pipeline.epoch_permutation(SEED, epoch, N)[k * BATCH:(k + 1) * BATCH]
    np.testing.assert_array_equal(plan.global_indices(step), expected)
  for epoch in range(3):
    steps = range(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH)
    seen = np.concatenate([plan.global_indices(s) for s in steps])
    assert len(set(seen.tolist())) == STEPS_PER_EPOCH * BATCH  # No repeats within an epoch.
  assert not np.array_equal(plan.global_indices(0), plan.global_indices(STEPS_PER_EPOCH))


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_process_slices_make_up_the_global_batch(process_count):
  split = memory_split()
  plan = pipeline.BatchPlan(N, BATCH, SEED)
  per_process = []
  for p in range(process_count):
    with pipeline.TrainIterator(split, global_batch_size=BATCH, seed=SEED, process_index=p,
                                process_count=process_count) as iterator:
      per_process.append(take(iterator, 6))
  for step in range(6):
    batches = [per_process[p][step] for p in range(process_count)]
    assert all(b["index"].shape == (BATCH // process_count,) for b in batches)
    index = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(index, plan.global_indices(step))
    images = np.concatenate([b["image"] for b in batches])
    np.testing.assert_array_equal(images, split.images[index])
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), index % 5)


def test_a_split_is_a_grain_data_source():
  dataset = grain.MapDataset.source(memory_split())
  assert len(dataset) == N and dataset[5]["index"] == 5 and dataset[5]["label"] == 0


def test_batch_dtypes_and_unlabelled_data():
  with pipeline.TrainIterator(memory_split(labelled=False), global_batch_size=BATCH, seed=0) as it:
    batch = next(it)
  assert batch["image"].dtype == np.uint8 and batch["image"].shape == (BATCH, 6, 6, 1)
  assert batch["index"].dtype == batch["label"].dtype == np.int32
  assert (batch["label"] == -1).all()


@pytest.mark.parametrize("stop", [2, STEPS_PER_EPOCH - 1, STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH + 1])
def test_resume_from_state_continues_identically(stop):
  split = memory_split()
  total = 3 * STEPS_PER_EPOCH
  with pipeline.TrainIterator(split, global_batch_size=BATCH, seed=SEED) as iterator:
    uninterrupted = take(iterator, total)
  with pipeline.TrainIterator(split, global_batch_size=BATCH, seed=SEED) as iterator:
    head = take(iterator, stop)
    state = json.loads(json.dumps(iterator.get_state()))
  assert state["step"] == stop
  with pipeline.TrainIterator(split, global_batch_size=BATCH, seed=SEED) as resumed:
    resumed.set_state(state)
    tail = take(resumed, total - stop)
  with pipeline.TrainIterator(split, global_batch_size=BATCH, seed=SEED,
                              start_step=stop) as started:
    assert_same_batches(take(started, total - stop), tail)
  assert_same_batches(head + tail, uninterrupted)


def test_set_state_refuses_another_configuration():
  with pipeline.TrainIterator(memory_split(), global_batch_size=BATCH, seed=SEED) as iterator:
    state = iterator.get_state()
  with pipeline.TrainIterator(memory_split(), global_batch_size=BATCH, seed=SEED + 1) as iterator:
    with pytest.raises(ConfigError, match="seed"):
      iterator.set_state(state)


def test_num_steps_ends_the_iterator():
  with pipeline.TrainIterator(memory_split(), global_batch_size=BATCH, seed=0, start_step=3,
                              num_steps=5) as iterator:
    assert len(list(iterator)) == 2


def test_host_crops_are_seeded_by_seed_epoch_and_index(folder_split):
  kwargs = dict(global_batch_size=4, seed=SEED, image_size=SIZE, num_threads=2)
  with pipeline.TrainIterator(folder_split, **kwargs) as iterator:
    assert iterator.host_crop
    batches = take(iterator, 6)  # steps_per_epoch is 2: three epochs.
  plan = pipeline.BatchPlan(folder_split.num_examples, 4, SEED)
  for step, batch in enumerate(batches):
    np.testing.assert_array_equal(batch["index"], plan.global_indices(step))
    assert batch["image"].shape == (4, SIZE, SIZE, 3)
    for image, index in zip(batch["image"], batch["index"]):
      rng = np.random.default_rng((SEED, plan.epoch(step), int(index)))
      expected = images_lib.decode_box(folder_split.reader.describe(int(index)), 3, SIZE,
                                       functools.partial(images_lib.random_resized_box, rng))
      np.testing.assert_array_equal(image, expected)
  with pipeline.TrainIterator(folder_split, start_step=3, **kwargs) as resumed:
    assert_same_batches(take(resumed, 3), batches[3:])


def test_host_crop_of_held_images():
  with pipeline.TrainIterator(memory_split(), global_batch_size=BATCH, seed=0, host_crop=True,
                              image_size=4) as iterator:
    batch = next(iterator)
  assert batch["image"].shape == (BATCH, 4, 4, 1)


@pytest.fixture
def absl_flags_parsed():
  """grain's multiprocessing reads absl flags, which `absl.app.run` parses in a real run."""
  if flags.FLAGS.is_parsed():
    yield
    return
  flags.FLAGS.mark_as_parsed()
  yield
  flags.FLAGS.unparse_flags()


@pytest.mark.slow  # starts grain worker processes
@pytest.mark.usefixtures("absl_flags_parsed")
def test_worker_processes_read_the_same_batches(folder_split):
  kwargs = dict(global_batch_size=4, seed=SEED, image_size=SIZE)
  with pipeline.TrainIterator(folder_split, num_threads=1, **kwargs) as iterator:
    threads = take(iterator, 3)
  with pipeline.TrainIterator(folder_split, num_workers=2, **kwargs) as iterator:
    workers = take(iterator, 3)
  assert_same_batches(workers, threads)


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_batches_cover_every_record_once_padded(process_count):
  split = memory_split()
  global_batch_size = 16
  per_process = [list(pipeline.eval_batches(split, global_batch_size, p, process_count))
                 for p in range(process_count)]
  count = pipeline.num_eval_batches(N, global_batch_size)
  assert [len(batches) for batches in per_process] == [count] * process_count
  rows = [batches[k] for k in range(count) for batches in per_process]
  index = np.concatenate([b["index"] for b in rows])
  mask = np.concatenate([b["mask"] for b in rows])
  np.testing.assert_array_equal(index[mask], np.arange(N))
  assert mask.sum() == N and (index[~mask] == -1).all()
  images = np.concatenate([b["image"] for b in rows])
  labels = np.concatenate([b["label"] for b in rows])
  np.testing.assert_array_equal(images[mask], split.images)
  assert not images[~mask].any() and (labels[~mask] == -1).all()
  np.testing.assert_array_equal(labels[mask], split.label_array)


def test_eval_of_variable_size_images_uses_the_eval_transform(folder_split):
  batches = list(pipeline.eval_batches(folder_split, 4, image_size=SIZE, num_threads=2))
  assert len(batches) == 3
  last = batches[-1]
  np.testing.assert_array_equal(last["mask"], [True, True, True, False])
  assert last["image"].shape == (4, SIZE, SIZE, 3)
  expected = images_lib.decode_box(folder_split.reader.describe(9), 3, SIZE, images_lib.eval_box)
  np.testing.assert_array_equal(last["image"][1], expected)


def test_bad_batch_configurations_are_config_errors():
  with pytest.raises(ConfigError, match="multiple"):
    pipeline.TrainIterator(memory_split(), global_batch_size=6, seed=0, process_count=4)
  with pytest.raises(ConfigError, match="larger than"):
    pipeline.TrainIterator(memory_split(), global_batch_size=64, seed=0)


def test_variable_size_images_need_host_crop(folder_split):
  with pytest.raises(ValueError, match="host_crop"):
    pipeline.TrainIterator(folder_split, global_batch_size=4, seed=0, host_crop=False)


def test_source_record_of_each_index_is_the_batch_image():
  with pipeline.TrainIterator(memory_split(), global_batch_size=BATCH, seed=SEED) as iterator:
    split = iterator.split
    for batch in take(iterator, STEPS_PER_EPOCH + 1):
      for j, index in enumerate(batch["index"]):
        np.testing.assert_array_equal(batch["image"][j], split[int(index)]["image"])
