"""The offline Fashion-MNIST builder, the prepare CLI and reading tfds datasets back."""

import gzip
import os
import pickle
import struct

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from instdisc_jax import data
from instdisc_jax.data import fashion_mnist
from instdisc_jax.data import prepare
from instdisc_jax.data import sources
from instdisc_jax.errors import DataError

NUM_TRAIN, NUM_TEST = 12, 5


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes a uint8 array in the gzipped idx format of (Fashion-)MNIST."""
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def make_source(directory: str, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Writes tiny idx files for both splits; returns {split: (images, labels)}."""
  rng = np.random.default_rng(seed)
  data = {}
  for split, n in (("train", NUM_TRAIN), ("test", NUM_TEST)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (n,), dtype=np.uint8)
    images_file, labels_file = fashion_mnist.SOURCE_FILES[split]
    write_idx(os.path.join(directory, images_file), images)
    write_idx(os.path.join(directory, labels_file), labels)
    data[split] = images, labels
  return data


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """A tiny Fashion-MNIST prepared with the CLI: (data_dir, source arrays)."""
  source_dir = str(tmp_path_factory.mktemp("source"))
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  data = make_source(source_dir)
  tfds.disable_progress_bar()
  argv = ["--dataset=fashion_mnist", f"--data_dir={data_dir}", f"--source_dir={source_dir}"]
  assert prepare.main(argv) == 0
  return data_dir, data


def test_read_idx_round_trips(tmp_path):
  array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  write_idx(str(tmp_path / "a.gz"), array)
  np.testing.assert_array_equal(fashion_mnist.read_idx(str(tmp_path / "a.gz")), array)


def test_read_idx_rejects_other_files(tmp_path):
  with gzip.open(tmp_path / "bad.gz", "wb") as f:
    f.write(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd")  # Type 0x0d: float32, not unsigned bytes.
  with pytest.raises(ValueError, match="not an idx file"):
    fashion_mnist.read_idx(str(tmp_path / "bad.gz"))


def test_standard_reader_reads_records_in_file_order(prepared):
  data_dir, data = prepared
  source = tfds.data_source("fashion_mnist", data_dir=data_dir, download=False)
  for split, (images, labels) in data.items():
    assert len(source[split]) == len(images)
    for i in range(len(images)):
      np.testing.assert_array_equal(source[split][i]["image"], images[i][..., None])
      assert source[split][i]["label"] == labels[i]
  info = tfds.builder("fashion_mnist", data_dir=data_dir).info
  assert info.features["label"].names == list(fashion_mnist.CLASS_NAMES)
  assert info.disable_shuffling


def test_prepare_again_says_already_prepared(prepared, capsys):
  data_dir, _ = prepared
  assert prepare.main(["--dataset=fashion_mnist", f"--data_dir={data_dir}"]) == 0
  assert "already prepared" in capsys.readouterr().out


def test_prepare_without_the_debian_files_says_how_to_install_them(tmp_path, capsys):
  argv = ["--dataset=fashion_mnist", f"--data_dir={tmp_path}", f"--source_dir={tmp_path / 'none'}"]
  assert prepare.main(argv) == 2
  err = capsys.readouterr().err
  assert "sudo apt-get install -y dataset-fashion-mnist" in err
  assert len(err.strip().splitlines()) == 1


def test_prepare_imagenet_without_manual_dir_explains_the_manual_step(tmp_path, capsys):
  assert prepare.main(["--dataset=imagenet2012", f"--data_dir={tmp_path}"]) == 2
  assert "--manual_dir" in capsys.readouterr().err


def test_prepare_unknown_dataset_is_a_user_error(tmp_path, capsys):
  assert prepare.main(["--dataset=no_such_dataset_xyz", f"--data_dir={tmp_path}"]) == 2
  assert "no_such_dataset_xyz" in capsys.readouterr().err


@pytest.mark.parametrize("max_cache_bytes", [None, 0], ids=["in_memory", "per_record"])
def test_load_dataset_instance_index_is_record_index(prepared, max_cache_bytes):
  data_dir, data = prepared
  kwargs = {} if max_cache_bytes is None else {"max_cache_bytes": max_cache_bytes}
  split = sources.load_dataset("fashion_mnist", "train", data_dir=data_dir, **kwargs)
  images, labels = data["train"]
  assert split.in_memory == (max_cache_bytes is None)
  assert (split.num_examples, split.image_shape, split.num_classes) == (NUM_TRAIN, (28, 28, 1), 10)
  assert split.fixed_size and split.labelled
  np.testing.assert_array_equal(split.labels, labels)
  assert split.labels.dtype == np.int32
  for i in (0, 7, NUM_TRAIN - 1):
    example = split[i]
    np.testing.assert_array_equal(example["image"], images[i][..., None])
    assert (example["label"], example["index"]) == (labels[i], i)


def test_per_record_split_pickles_for_worker_processes(prepared):
  data_dir, data = prepared
  split = sources.load_dataset("fashion_mnist", "test", data_dir=data_dir, max_cache_bytes=0)
  copy = pickle.loads(pickle.dumps(split))
  np.testing.assert_array_equal(copy[4]["image"], data["test"][0][4][..., None])


def test_load_train_and_eval_uses_the_test_split(prepared):
  data_dir, data = prepared
  train, test, notice = sources.load_train_and_eval("fashion_mnist", data_dir=data_dir)
  assert notice is None
  assert (train.num_examples, test.num_examples) == (NUM_TRAIN, NUM_TEST)
  np.testing.assert_array_equal(test.labels, data["test"][1])


def test_load_splits_reads_the_config(prepared):
  data_dir, _ = prepared
  config = ml_collections.ConfigDict(dict(
      dataset="fashion_mnist", train_split="train[:10]", eval_dataset="", eval_split="",
      data_dir=data_dir, image_size=28))
  train, test = data.load_splits(config)
  assert (train.num_examples, test.num_examples) == (10, NUM_TEST)


def test_unprepared_dataset_error_gives_the_prepare_command(tmp_path):
  with pytest.raises(DataError) as error:
    sources.load_dataset("fashion_mnist", data_dir=str(tmp_path))
  message = str(error.value)
  command = f"python -m instdisc_jax.data.prepare --dataset=fashion_mnist --data_dir={tmp_path}"
  assert command in message
  assert "apt-get install -y dataset-fashion-mnist" in message


def test_unprepared_cifar_and_imagenet_errors_say_how(tmp_path):
  with pytest.raises(DataError, match="--dataset=cifar10"):
    sources.load_dataset("cifar10", data_dir=str(tmp_path))
  with pytest.raises(DataError, match="manual_dir"):
    sources.load_dataset("imagenet2012", data_dir=str(tmp_path))


def test_unknown_dataset_and_split_are_data_errors(prepared):
  data_dir, _ = prepared
  with pytest.raises(DataError, match="unknown dataset"):
    sources.load_dataset("no_such_dataset_xyz", data_dir=data_dir)
  with pytest.raises(DataError, match="validation"):
    sources.load_dataset("fashion_mnist", "validation", data_dir=data_dir)


@pytest.mark.skipif(
    bool(fashion_mnist.missing_source_files(fashion_mnist.DEFAULT_SOURCE_DIR)),
    reason="the Debian package dataset-fashion-mnist is not installed")
def test_debian_files_have_the_expected_shapes():
  for split, n in (("train", 60000), ("test", 10000)):
    images_file, labels_file = (os.path.join(fashion_mnist.DEFAULT_SOURCE_DIR, name)
                                for name in fashion_mnist.SOURCE_FILES[split])
    assert fashion_mnist.read_idx(images_file).shape == (n, 28, 28)
    labels = fashion_mnist.read_idx(labels_file)
    assert labels.shape == (n,) and labels.max() == 9
