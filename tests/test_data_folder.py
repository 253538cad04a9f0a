"""Image folders as datasets: labels, index stability, bad files, fingerprints (issue 8)."""

import json
import logging
import os

import numpy as np
from PIL import Image
import pytest

from instdisc_jax.data import folder as folder_lib
from instdisc_jax.data import pipeline
from instdisc_jax.data import sources
from instdisc_jax.data import split as split_lib
from instdisc_jax.errors import DataError

SIZE = 16


def save_image(path, width: int, height: int, mode: str = "RGB", seed: int = 0) -> None:
  """Writes a random image; the format follows the extension."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  shape = (height, width) if mode == "L" else (height, width, 3)
  Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def write_corrupt(path) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(b"this is not an image")


def truncate(path) -> None:
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])


@pytest.fixture
def nested(tmp_path):
  """Class folders (one nested deeper), mixed formats, sizes and modes, and bad files."""
  root = tmp_path / "nested"
  save_image(root / "cat" / "a.png", 40, 30, seed=1)
  save_image(root / "cat" / "b.jpg", 50, 64, seed=2)
  save_image(root / "dog" / "deep" / "c.webp", 20, 20, seed=3)
  save_image(root / "dog" / "d.bmp", 33, 17, "L", seed=4)
  save_image(root / "dog" / "e.gif", 25, 25, "L", seed=5)
  save_image(root / "cat" / ".hidden.png", 10, 10, seed=6)
  write_corrupt(root / "cat" / "broken.jpg")
  (root / "dog" / "notes.txt").write_text("not an image")
  return root


def load(root, **kwargs) -> split_lib.DatasetSplit:
  return sources.load_dataset(f"folder:{root}", image_size=SIZE, **kwargs)


def test_class_folders_become_labels_in_sorted_path_order(nested, caplog):
  with caplog.at_level(logging.WARNING):
    split = load(nested)
  paths = [path for path, _ in split.manifest]
  assert paths == ["cat/a.png", "cat/b.jpg", "dog/d.bmp", "dog/deep/c.webp", "dog/e.gif"]
  assert split.class_names == ("cat", "dog") and split.num_classes == 2
  np.testing.assert_array_equal(split.labels, [0, 0, 1, 1, 1])
  assert split.in_memory and split.fixed_size
  assert split.image_shape == (SIZE, SIZE, 3)  # Colour wins over grey.
  assert [split[i]["label"] for i in range(5)] == [0, 0, 1, 1, 1]
  assert [split[i]["index"] for i in range(5)] == list(range(5))
  assert "left out 1 unreadable images (cat/broken.jpg)" in caplog.text


def test_held_images_are_the_centre_square_resized(nested):
  split = load(nested)
  with Image.open(nested / "cat" / "a.png") as image:
    expected = np.asarray(image.crop((5, 0, 35, 30)).resize((SIZE, SIZE), Image.BILINEAR))
  # Resizing inside the whole image lets the filter see past the square's edge: compare inside.
  np.testing.assert_array_equal(split[0]["image"][1:-1, 1:-1], expected[1:-1, 1:-1])


def test_flat_grey_folder_is_unlabelled(tmp_path):
  for i, ext in enumerate(["png", "jpg", "tiff"]):
    save_image(tmp_path / f"img{i}.{ext}", 20 + i, 30, "L", seed=i)
  split = load(tmp_path)
  assert split.labels is None and not split.labelled and split.num_classes is None
  assert split.image_shape == (SIZE, SIZE, 1)
  assert split[2]["label"] == -1


def test_indices_are_stable_across_loads_and_storage(nested):
  first, second = load(nested), load(nested)
  per_record = load(nested, max_cache_bytes=0)
  assert first.fingerprint == second.fingerprint == per_record.fingerprint
  assert first.manifest == per_record.manifest
  np.testing.assert_array_equal(first.images, second.images)
  for i, (path, _) in enumerate(first.manifest):
    assert per_record.reader.describe(i) == os.path.join(str(nested), path)
  np.testing.assert_array_equal(per_record.labels, first.labels)


def test_file_that_fails_to_decode_is_left_out_before_indexing(nested, caplog):
  truncate(nested / "cat" / "b.jpg")  # The header still reads; decoding fails.
  with caplog.at_level(logging.WARNING):
    split = load(nested)
  assert [path for path, _ in split.manifest] == [
      "cat/a.png", "dog/d.bmp", "dog/deep/c.webp", "dog/e.gif"]
  np.testing.assert_array_equal(split.labels, [0, 1, 1, 1])
  assert "left out 1 undecodable images (cat/b.jpg)" in caplog.text


def test_large_folder_is_decoded_per_record(nested):
  split = load(nested, max_cache_bytes=0)
  assert not split.in_memory and not split.fixed_size
  assert split.image_shape == (None, None, 3)
  assert split[1]["image"].shape == (64, 50, 3)
  assert split[2]["image"].shape == (17, 33, 3)


def test_bad_record_mid_epoch_is_a_logged_black_image(nested, caplog):
  split = load(nested, max_cache_bytes=0)
  truncate(nested / "cat" / "b.jpg")
  iterator = pipeline.TrainIterator(split, global_batch_size=5, seed=0, image_size=SIZE,
                                    num_threads=1)
  with caplog.at_level(logging.WARNING):
    batch = next(iterator)
  iterator.close()
  row = list(batch["index"]).index(1)
  assert batch["image"].shape == (5, SIZE, SIZE, 3)
  assert not batch["image"][row].any()
  assert "b.jpg" in caplog.text and "black image" in caplog.text


def test_loose_images_next_to_class_folders_is_an_error(nested):
  save_image(nested / "loose.png", 8, 8)
  with pytest.raises(DataError, match="loose.png"):
    load(nested)


@pytest.mark.parametrize("make", ["missing", "empty", "only_bad"])
def test_unusable_folder_is_one_clear_error(tmp_path, make):
  root = tmp_path / "data"
  if make != "missing":
    root.mkdir()
  if make == "only_bad":
    write_corrupt(root / "x.png")
  with pytest.raises(DataError) as error:
    load(root)
  assert str(root) in str(error.value) and "\n" not in str(error.value)


def test_eval_folder_takes_the_training_class_order(nested, tmp_path):
  save_image(tmp_path / "eval" / "dog" / "x.png", 12, 12)
  train, evaluation, notice = sources.load_train_and_eval(
      f"folder:{nested}", f"folder:{tmp_path / 'eval'}", image_size=SIZE)
  assert notice is None
  np.testing.assert_array_equal(evaluation.labels, [1])
  save_image(tmp_path / "eval" / "fish" / "y.png", 12, 12)
  with pytest.raises(DataError, match="fish"):
    sources.load_dataset(f"folder:{tmp_path / 'eval'}", image_size=SIZE,
                         class_names=train.class_names)


def test_evaluation_is_skipped_with_a_notice(nested, tmp_path):
  _, evaluation, notice = sources.load_train_and_eval(f"folder:{nested}", image_size=SIZE)
  assert evaluation is None and "kNN evaluation is skipped" in notice
  save_image(tmp_path / "flat" / "a.png", 12, 12)
  _, _, notice = sources.load_train_and_eval(f"folder:{tmp_path / 'flat'}", image_size=SIZE)
  assert "no labels" in notice


def test_fingerprint_is_recorded_and_changes_are_reported(nested, tmp_path):
  workdir = tmp_path / "workdir"
  split_lib.check_fingerprint(str(workdir), load(nested))
  record = json.loads((workdir / split_lib.FINGERPRINT_FILE).read_text())["train"]
  assert record["num_examples"] == 5 and record["files"][0][0] == "cat/a.png"
  split_lib.check_fingerprint(str(workdir), load(nested))  # Unchanged: passes.

  save_image(nested / "cat" / "new.png", 9, 9)
  os.remove(nested / "dog" / "d.bmp")
  save_image(nested / "dog" / "e.gif", 26, 25, "L", seed=9)  # Another size on disk.
  with pytest.raises(DataError) as error:
    split_lib.check_fingerprint(str(workdir), load(nested))
  message = str(error.value)
  assert "1 added (cat/new.png)" in message
  assert "1 removed (dog/d.bmp)" in message
  assert "1 changed size (dog/e.gif)" in message
  assert "\n" not in message


def test_fingerprint_is_written_by_one_process_only(nested, tmp_path):
  split_lib.check_fingerprint(str(tmp_path), load(nested), write=False)
  assert not (tmp_path / split_lib.FINGERPRINT_FILE).exists()


def test_fingerprint_ignores_modification_times(nested):
  before = load(nested).fingerprint
  os.utime(nested / "cat" / "a.png", (1, 1))
  assert load(nested).fingerprint == before


def test_exif_orientation_is_applied(tmp_path):
  image = Image.fromarray(np.zeros((10, 30, 3), np.uint8))
  exif = Image.Exif()
  exif[0x0112] = 6  # Rotated: display turned 90 degrees clockwise.
  image.save(tmp_path / "rotated.jpg", exif=exif)
  split = load(tmp_path, max_cache_bytes=0)
  assert split[0]["image"].shape == (30, 10, 3)


def test_scan_skips_hidden_and_sorts(nested):
  images, others = folder_lib.scan(str(nested))
  assert images == sorted(images) and "cat/.hidden.png" not in images
  assert others == ["dog/notes.txt"]
