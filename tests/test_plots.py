"""The pictures: files written, pixel sizes, and the data each one draws."""

import json

import numpy as np
from PIL import Image
import pytest

from instdisc_jax import metric_writers
from instdisc_jax import plots


def write_metrics(workdir):
  """A metrics.jsonl as training writes it, with a resumed run's repeated step 40."""
  records = [{"step": s, "loss": 10.0 - s / 20, "learning_rate": 0.03} for s in (10, 20, 30, 40)]
  records += [{"step": 40, "knn_bank/top1": 50.0, "knn_bank/top5": 90.0, "epoch": 1},
              {"step": 40, "loss": 7.5},
              {"step": 50, "loss": 7.0},
              {"step": 60, "loss": 6.5},
              {"step": 60, "knn_bank/top1": 61.0, "knn_bank/top5": 95.0,
               "knn_recomputed/top1": 66.0, "knn_recomputed/top5": 97.0}]
  with open(workdir / "metrics.jsonl", "w") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")


def test_training_curves_from_metrics(tmp_path):
  write_metrics(tmp_path)
  path = str(tmp_path / "curves.png")
  curves = plots.training_curves(path, metric_writers.read_metrics(str(tmp_path)), "a run")
  steps, losses = curves.loss
  assert steps.tolist() == [10, 20, 30, 40, 50, 60]
  assert losses[3] == 7.5                                     # the resumed value wins
  assert curves.knn_bank[0].tolist() == [40, 60] and curves.knn_bank[1].tolist() == [50, 61]
  assert curves.knn_recomputed[0].tolist() == [60] and curves.knn_recomputed[1].tolist() == [66]
  with Image.open(path) as image:
    assert image.size == (800, 480)


def test_training_curves_need_a_loss(tmp_path):
  with pytest.raises(ValueError, match="no training loss"):
    plots.training_curves(str(tmp_path / "c.png"), [{"step": 1, "knn_bank/top1": 3.0}])


@pytest.mark.parametrize("channels", [1, 3])
def test_retrieval_grid_size_and_frames(tmp_path, channels):
  rng = np.random.default_rng(0)
  queries = rng.integers(0, 255, (3, 12, 12, channels), dtype=np.uint8)
  neighbors = rng.integers(0, 255, (3, 5, 12, 12, channels), dtype=np.uint8)
  labels = np.array([[0, 1, 0, 2, 0], [1, 1, 1, 1, 1], [2, 0, 0, 0, 0]])
  path = str(tmp_path / "grid.png")
  layout = plots.retrieval_grid(path, queries, np.array([0, 1, 2]), neighbors, labels,
                                np.linspace(1, 0, 15).reshape(3, 5), class_names=("a", "b", "c"))
  width, height = layout.size
  assert (width, height) == (6 * 72 + 16, 18 + 3 * (72 + 14))
  with Image.open(path) as image:
    assert image.size == layout.size
    pixels = np.asarray(image.convert("RGB"))
  # The frame of neighbour (row 0, column 1) is red: another class; (0, 0) is green.
  def frame_pixel(row, column):
    left, bottom, _, _ = layout.box(row, column + 1)
    x = int(round(left * width)) + 1
    y = int(round((1 - bottom) * height)) - 2
    return pixels[y, x]
  assert tuple(frame_pixel(0, 0)) == (0x1a, 0x96, 0x41)
  assert tuple(frame_pixel(0, 1)) == (0xd7, 0x19, 0x1c)


def test_retrieval_grid_without_labels_is_grey(tmp_path):
  images = np.zeros((1, 2, 8, 8, 1), np.uint8)
  layout = plots.retrieval_grid(str(tmp_path / "g.png"), images[:, 0], np.array([-1]), images,
                                np.array([[-1, -1]]), np.array([[0.9, 0.8]]))
  with Image.open(tmp_path / "g.png") as image:
    assert image.size == layout.size


def test_table1_bars(tmp_path):
  path = str(tmp_path / "t.png")
  plots.table1_bars(path, ["a", "b", "c"], [10.0, 20.0, 30.0], [15.0, float("nan"), 35.0], "t")
  with Image.open(path) as image:
    assert image.size == (640, 420)
