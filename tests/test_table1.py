"""Table 1: the rows differ only in the objective and m, rows that do not fit n are listed as not
run, finished rows are not trained again, and the table and chart are written.

Training itself is replaced by a stand-in with `train_and_evaluate`'s signature (the real
training is what test_train.py and test_evaluate.py exercise); it records the config of each
row and writes results.json as training does.
"""

import inspect
import json
import os

import numpy as np
from PIL import Image
import pytest

from instdisc_jax import default_config
from instdisc_jax import train
from instdisc_jax.errors import UserError
from instdisc_jax.experiments import table1

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


@pytest.fixture
def tiny_npz(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / "tiny.npz"
  np.savez(path, images=rng.integers(0, 255, (600, 16, 16), dtype=np.uint8),
           labels=rng.integers(0, 3, 600), test_images=np.zeros((10, 16, 16), np.uint8),
           test_labels=np.zeros(10, np.int64))
  return str(path)


@pytest.fixture
def fake_training(monkeypatch):
  """Replaces training; returns the list of (row sub-workdir, config) it was called with."""
  calls = []
  signature = inspect.signature(train.train_and_evaluate)

  def fake(config, workdir, stop=None):
    signature.bind(config, workdir, stop=stop)          # the real function accepts this call
    calls.append((os.path.basename(workdir), config))
    os.makedirs(workdir, exist_ok=True)
    results = {"step": 2, "knn_bank": {"top1": 10.0 + len(calls), "top5": 50.0},
               "knn_recomputed": {"top1": 20.0 + len(calls), "top5": 60.0}}
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f)
    return results

  monkeypatch.setattr(train, "train_and_evaluate", fake)
  return calls


def base(tiny_npz):
  config = default_config.load_config_file(os.path.join(CONFIGS, "tiny.py"))
  return table1.base_config(config, f"npz:{tiny_npz}", epochs=3)


def test_rows_differ_only_in_objective_and_m(tiny_npz, tmp_path, fake_training):
  config = base(tiny_npz)
  config.num_train_steps = 2
  text = table1.run_table(config, str(tmp_path / "t1"), table1.ROWS, command="table1 --x")
  assert [name for name, _ in fake_training] == [
      "parametric_softmax", "softmax", "nce_1", "nce_10", "nce_512"]      # m=4096 >= n=600
  reference = config.to_dict()
  for name, row_config in fake_training:
    row = next(r for r in table1.ROWS if r.name == name)
    differing = {k for k, v in row_config.to_dict().items() if reference[k] != v}
    assert differing <= {"objective", "num_negatives"}
    assert row_config.objective == row.objective
    if row.num_negatives is not None:
      assert row_config.num_negatives == row.num_negatives
  assert config.num_epochs == 3 and config.dataset == f"npz:{tiny_npz}"
  # All six rows appear: five measured, m=4096 listed as not run.
  lines = text.splitlines()
  assert "table1 --x" in lines
  table = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
  assert [line.split(" | ")[0][2:] for line in table] == [
      "parametric softmax", "non-parametric softmax", "NCE m=1", "NCE m=10", "NCE m=512"]
  assert table[0].split(" | ")[2:4] == ["11.00", "21.00"]
  assert "NCE m=4096 (m=4096 is not below n=600)" in text
  assert "2 steps of batch 16" in text
  with open(tmp_path / "t1" / "table1.md") as f:
    assert f.read() == text
  with Image.open(tmp_path / "t1" / "table1.png") as image:
    assert image.size[0] >= 640


def test_finished_rows_are_not_trained_again(tiny_npz, tmp_path, fake_training):
  workdir = str(tmp_path / "t1")
  rows = table1.select_rows(["softmax", "nce_10"])
  table1.run_table(base(tiny_npz), workdir, rows, command="c")
  assert len(fake_training) == 2
  os.remove(os.path.join(workdir, "nce_10", "results.json"))     # as if interrupted
  text = table1.run_table(base(tiny_npz), workdir, rows, command="c")
  assert [name for name, _ in fake_training] == ["softmax", "nce_10", "nce_10"]
  assert "| non-parametric softmax | - | 11.00 | 21.00 |" in text          # kept from run 1
  with open(os.path.join(workdir, "softmax", table1.ROW_RECORD)) as f:
    assert json.load(f)["wall_s"] >= 0


def test_unknown_rows_are_refused():
  with pytest.raises(UserError, match="unknown row nce_7"):
    table1.select_rows(["softmax", "nce_7"])
  assert [r.name for r in table1.select_rows(["nce_4096", "softmax"])] == ["softmax", "nce_4096"]


def test_markdown_durations_and_missing_values():
  config = default_config.get_config()
  record = {"results": {"knn_bank": {"top1": 12.345}}, "wall_s": 125.4}
  text = table1.markdown(table1.ROWS[:1], {"parametric_softmax": record}, command="c",
                         config=config, num_instances=50000, steps=10, date="d", devices="1 CPU")
  assert "| parametric softmax | - | 12.35 | - | 2 min 05 s |" in text
  assert "200 epochs (10 steps) of batch 128" in text
