"""NumPy archives as datasets: arrays, labels, test split and the error paths (issue 8)."""

import numpy as np
import pytest

from instdisc_jax.data import sources
from instdisc_jax.errors import DataError


def write_npz(path, **arrays) -> str:
  np.savez(path, **arrays)
  return f"npz:{path}"


def images(n: int, shape=(8, 8, 3), seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def test_rows_are_instances_with_labels(tmp_path):
  train, labels = images(6), np.array([0, 1, 2, 0, 1, 4])
  spec = write_npz(tmp_path / "d.npz", images=train, labels=labels)
  split = sources.load_dataset(spec)
  assert (split.num_examples, split.image_shape, split.num_classes) == (6, (8, 8, 3), 5)
  assert split.in_memory and split.fixed_size and split.labelled
  np.testing.assert_array_equal(split.labels, labels)
  assert split.labels.dtype == np.int32
  np.testing.assert_array_equal(split[3]["image"], train[3])
  assert (split[3]["label"], split[3]["index"]) == (0, 3)


def test_grey_images_without_channel_axis_and_without_labels(tmp_path):
  spec = write_npz(tmp_path / "d.npz", images=images(4, (5, 7)))
  split = sources.load_dataset(spec)
  assert split.image_shape == (5, 7, 1)
  assert split.labels is None and not split.labelled and split[0]["label"] == -1


def test_test_split_and_train_and_eval(tmp_path):
  spec = write_npz(tmp_path / "d.npz", images=images(6), labels=np.arange(6) % 3,
                   test_images=images(2, seed=1), test_labels=np.array([2, 5]))
  train, test, notice = sources.load_train_and_eval(spec)
  assert notice is None
  assert test.num_examples == 2 and test.name.endswith(":test")
  assert train.num_classes == test.num_classes == 6  # Over both label arrays.
  np.testing.assert_array_equal(test.images, images(2, seed=1))


def test_without_test_images_evaluation_is_skipped(tmp_path):
  spec = write_npz(tmp_path / "d.npz", images=images(3), labels=np.arange(3))
  _, test, notice = sources.load_train_and_eval(spec)
  assert test is None and "kNN evaluation is skipped" in notice
  with pytest.raises(DataError, match="test_images"):
    sources.load_dataset(spec, "test")


def test_another_npz_as_eval_dataset(tmp_path):
  spec = write_npz(tmp_path / "d.npz", images=images(4), labels=np.arange(4))
  other = write_npz(tmp_path / "e.npz", images=images(3, seed=2), labels=np.arange(3))
  _, evaluation, notice = sources.load_train_and_eval(spec, other)
  assert notice is None
  np.testing.assert_array_equal(evaluation.images, images(3, seed=2))


def test_fingerprint_follows_the_content(tmp_path):
  first = sources.load_dataset(write_npz(tmp_path / "a.npz", images=images(3)))
  same = sources.load_dataset(write_npz(tmp_path / "b.npz", images=images(3)))
  other = sources.load_dataset(write_npz(tmp_path / "c.npz", images=images(3, seed=5)))
  assert first.fingerprint == same.fingerprint != other.fingerprint


@pytest.mark.parametrize("arrays, match", [
    ({"labels": np.arange(3)}, "no `images`"),
    ({"images": images(3).astype(np.float32)}, "uint8"),
    ({"images": images(3, (8, 8, 4))}, "C 1 or 3"),
    ({"images": np.zeros((3, 8), np.uint8)}, r"\(N, H, W\)"),
    ({"images": images(0)}, "no images"),
    ({"images": images(3), "labels": np.arange(4)}, "3 integer labels"),
    ({"images": images(3), "labels": np.array([0.5, 1, 2])}, "integer labels"),
    ({"images": images(3), "labels": np.array([0, -1, 2])}, "negative"),
    ({"images": images(3), "test_labels": np.arange(2)}, "no `test_images`"),
], ids=["no_images", "float", "four_channels", "rank2", "empty", "label_count", "float_labels",
        "negative_labels", "test_labels_alone"])
def test_bad_arrays_are_one_clear_error(tmp_path, arrays, match):
  spec = write_npz(tmp_path / "d.npz", **arrays)
  with pytest.raises(DataError, match=match) as error:
    sources.load_dataset(spec)
  assert "\n" not in str(error.value)


def test_test_images_of_another_shape_are_an_error(tmp_path):
  spec = write_npz(tmp_path / "d.npz", images=images(3), test_images=images(2, (9, 8, 3)))
  with pytest.raises(DataError, match="test_images"):
    sources.load_dataset(spec, "test")


def test_missing_and_unreadable_files(tmp_path):
  with pytest.raises(DataError, match="no such file"):
    sources.load_dataset(f"npz:{tmp_path / 'none.npz'}")
  (tmp_path / "bad.npz").write_bytes(b"garbage")
  with pytest.raises(DataError, match="not a readable"):
    sources.load_dataset(f"npz:{tmp_path / 'bad.npz'}")
  with pytest.raises(DataError, match="names no path"):
    sources.load_dataset("npz:")
