"""The validation protocol: a stratified carve-out of the training split, recorded in the workdir,
on which the final kNN chooses (k, tau) before the test split is read."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tiny_run

from instdisc_jax import data
from instdisc_jax import train
from instdisc_jax.data import validation
from instdisc_jax.errors import DataError
from instdisc_jax.errors import WorkdirError
from instdisc_jax.evaluation import selection

Setting = selection.Setting


# -- the carve-out ---------------------------------------------------------------------------------


def test_allocate_is_proportional_with_largest_remainders():
  assert validation.allocate([6000] * 10, 5000).tolist() == [500] * 10
  # Quotas 1.5, 1.5, 2: floors 1, 1, 2; the one unit left goes to the lower of the tied classes.
  assert validation.allocate([3, 3, 4], 5).tolist() == [2, 1, 2]
  # Quotas 0.3, 2.7: the larger remainder wins.
  assert validation.allocate([1, 9], 3).tolist() == [0, 3]
  rng = np.random.default_rng(0)
  for _ in range(50):
    counts = rng.integers(0, 50, rng.integers(1, 8))
    size = int(rng.integers(0, counts.sum() + 1))
    shares = validation.allocate(counts, size)
    quotas = counts * size / max(counts.sum(), 1)
    assert shares.sum() == size and np.all(np.abs(shares - quotas) < 1)


def test_holdout_is_stratified_disjoint_and_covers_the_split():
  labels = np.random.default_rng(1).integers(0, 10, 6000)
  labels[:7] = -1                                    # records without a label are never held out
  held = validation.holdout(labels, 500, seed=3)
  assert np.all(np.diff(held) > 0) and np.all(labels[held] >= 0)
  counts = np.bincount(labels[labels >= 0], minlength=10)
  assert np.bincount(labels[held], minlength=10).tolist() == \
      validation.allocate(counts, 500).tolist()
  assert validation.holdout(labels, 500, seed=3).tolist() == held.tolist()
  assert validation.holdout(labels, 500, seed=4).tolist() != held.tolist()


@pytest.fixture
def npz(tmp_path):
  return tiny_run.write_blobs_npz(tmp_path / "blobs.npz")


def test_carve_gives_disjoint_views_with_their_own_fingerprints(npz):
  split = data.load_dataset(f"npz:{npz}", "train")
  carved = validation.carve(split, 20, seed=0)
  held = np.asarray(carved.record["indices"])
  kept = np.setdiff1d(np.arange(96), held)
  assert len(carved.train) == 76 and len(carved.validation) == 20
  # Training instance j is the j-th remaining record, in ascending record order.
  np.testing.assert_array_equal(carved.train.images, split.images[kept])
  np.testing.assert_array_equal(carved.train.labels, split.labels[kept])
  np.testing.assert_array_equal(carved.validation.images, split.images[held])
  assert carved.train[5]["label"] == split.labels[kept[5]]
  assert len({split.fingerprint, carved.train.fingerprint, carved.validation.fingerprint}) == 3
  assert carved.record["count"] == 20
  assert carved.record["indices_sha256"] == validation.indices_sha256(held)
  assert sum(carved.record["per_class"]) == 20
  other = validation.carve(split, 20, seed=1)
  assert other.train.fingerprint != carved.train.fingerprint


def test_unlabelled_training_split_is_refused(tmp_path):
  path = tmp_path / "unlabelled.npz"
  np.savez(path, images=np.zeros((40, 16, 16, 1), np.uint8))
  split = data.load_dataset(f"npz:{path}", "train")
  with pytest.raises(DataError, match=r"config.validation_size=8.*no labels.*validation_size=0"):
    validation.carve(split, 8, seed=0)


def test_load_run_splits_without_validation_is_unchanged(npz):
  splits = data.load_run_splits(tiny_run.config(npz))
  assert splits.validation is None and splits.validation_record is None
  assert len(splits.train) == 96
  assert splits.train.fingerprint == data.load_dataset(f"npz:{npz}", "train").fingerprint


_CARVE_IN_A_PROCESS = """
import json, sys
import jax
from instdisc_jax import data
import tiny_run
splits = data.load_run_splits(tiny_run.config(sys.argv[1], validation_size=20, validation_seed=5))
print(json.dumps([jax.device_count(), splits.validation_record, splits.train.fingerprint]))
"""


@pytest.mark.slow
def test_carve_is_the_same_on_every_topology(npz):
  """The carve-out each process computes from the config: 1 or 8 devices, any process index."""
  outputs = []
  for devices, process in ((1, 0), (8, 0), (4, 1)):
    env = tiny_run.environment(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                               JAX_PROCESS_ID=str(process),
                               PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", _CARVE_IN_A_PROCESS, npz], env=env,
                            capture_output=True, text=True, check=True,
                            cwd=os.path.dirname(__file__))
    outputs.append(json.loads(result.stdout.splitlines()[-1]))
  assert [o[0] for o in outputs] == [1, 8, 4]
  assert all(o[1:] == outputs[0][1:] for o in outputs)
  here = data.load_run_splits(tiny_run.config(npz, validation_size=20, validation_seed=5))
  assert outputs[0][1] == here.validation_record


# -- the workdir's record --------------------------------------------------------------------------


def _record(npz, size, seed=0):
  return data.load_run_splits(tiny_run.config(npz, validation_size=size,
                                              validation_seed=seed)).validation_record


def test_record_is_checked_on_resume(npz, tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  record = _record(npz, 20)
  validation.check_record(workdir, record)                # a fresh workdir takes any
  validation.write_record(workdir, record)
  before = sorted(os.listdir(workdir))
  validation.check_record(workdir, _record(npz, 20))
  with pytest.raises(WorkdirError, match=r"^config.validation_size=30, .*validation_size=20 "
                     r"--config.validation_seed=0 to resume"):
    validation.check_record(workdir, _record(npz, 30))
  with pytest.raises(WorkdirError, match=r"^config.validation_seed=1, "):
    validation.check_record(workdir, _record(npz, 20, seed=1))
  with pytest.raises(WorkdirError, match=r"^config.validation_size=0, .*holds out 20"):
    validation.check_record(workdir, None)
  assert sorted(os.listdir(workdir)) == before            # checks write nothing


def test_started_without_validation_is_refused(npz, tmp_path):
  split = data.load_dataset(f"npz:{npz}", "train")
  data.check_fingerprint(str(tmp_path), split)            # a run started here without validation
  validation.check_record(str(tmp_path), None)
  with pytest.raises(WorkdirError, match=r"^config.validation_size=20, .*without a validation "
                     r"set.*--config.validation_size=0"):
    validation.check_record(str(tmp_path), _record(npz, 20))


# -- choosing (k, tau) ---------------------------------------------------------------------------


def test_choose_takes_the_most_hits():
  hits = {Setting(10, 0.05): 7, Setting(20, 0.05): 9, Setting(20, 0.1): 8}
  assert selection.choose(hits, Setting(10, 0.05)) == Setting(20, 0.05)


def test_choose_breaks_ties_to_the_config_then_larger_k_then_larger_tau():
  hits = {Setting(10, 0.1): 9, Setting(50, 0.02): 9, Setting(50, 0.07): 9, Setting(20, 0.05): 9}
  assert selection.choose(hits, Setting(20, 0.05)) == Setting(20, 0.05)
  assert selection.choose(hits, Setting(200, 0.07)) == Setting(50, 0.07)
  hits[Setting(50, 0.07)] = 8
  assert selection.choose(hits, Setting(200, 0.07)) == Setting(50, 0.02)


def test_grid_caps_k_at_n():
  assert selection.grid((10, 200, 50), (0.1, 0.02), 96) == ((10, 50, 96), (0.02, 0.1))


# -- the trainer ---------------------------------------------------------------------------------


class _Spy(np.ndarray):
  """Images whose every read is logged as `what`."""

  def __getitem__(self, item):
    self.events.append(self.what)
    return np.asarray(super().__getitem__(item))


def _spy(images, events, what):
  spy = images.view(_Spy)
  spy.events, spy.what = events, what
  return spy


VALIDATION_CONFIG = dict(validation_size=24, knn_select_k=(3, 10, 50),
                         knn_select_temperatures=(0.05, 0.1), num_epochs=1, eval_every_epochs=1)


@pytest.mark.slow
def test_choice_is_made_on_validation_before_the_test_split_is_read(npz, tmp_path, monkeypatch):
  config = tiny_run.config(npz, **VALIDATION_CONFIG)
  trainer = train.Trainer(config, str(tmp_path))
  trainer.state = trainer.fresh_state()
  events = []
  trainer.eval_split.images = _spy(trainer.eval_split.images, events, "test")
  trainer.validation_split.images = _spy(trainer.validation_split.images, events, "validation")
  choose = selection.choose
  monkeypatch.setattr(selection, "choose",
                      lambda *args: events.append("choice") or choose(*args))
  results = trainer.select_and_test()
  # Two choices (bank, recomputed) on validation, and only then the test images.
  assert events.index("choice") > events.index("validation")
  last_choice = len(events) - 1 - events[::-1].index("choice")
  assert "test" not in events[:last_choice] and "test" in events[last_choice:]
  assert set(results) == {"validation", "knn_choice", "test", "knn_bank", "knn_recomputed"}
  assert len(results["validation"]["bank"]) == 6
  for kind in ("bank", "recomputed"):
    choice, test = results["knn_choice"][kind], results["test"][kind]
    assert (choice["k"], choice["temperature"]) == (test["k"], test["temperature"])
    assert results[f"knn_{kind}"] == {"top1": test["top1"], "top5": test["top5"]}
    assert results["validation"][kind][f"k={choice['k']},tau={choice['temperature']:g}"][
        "top1"] == choice["top1"]
  # Permuting the test labels changes no choice.
  trainer.eval_split.label_array = np.random.default_rng(0).permutation(
      trainer.eval_split.label_array)
  trainer.eval_split.__dict__.pop("labels", None)          # the cached copy of the labels
  assert trainer.select_and_test()["knn_choice"] == results["knn_choice"]


@pytest.mark.slow
def test_resume_keeps_the_carve_out_and_refuses_another(npz, tmp_path):
  workdir = str(tmp_path / "run")
  # The bank's kNN only, no periodic one: the test is the carve-out, not the evaluation.
  config = tiny_run.config(npz, num_train_steps=2, checkpoint_every_steps=2,
                           **VALIDATION_CONFIG | dict(eval_every_epochs=0,
                                                      recompute_features=False))
  first = train.train_and_evaluate(config, workdir)
  assert first["step"] == 2 and set(first["knn_choice"]) == {"bank"}
  record = json.load(open(os.path.join(workdir, validation.VALIDATION_FILE)))
  assert record["validation_size"] == 24 and record["count"] == 24
  assert record["dataset"].startswith("npz:")
  config.num_train_steps = 4
  second = train.train_and_evaluate(config, workdir)
  assert second["step"] == 4
  assert json.load(open(os.path.join(workdir, validation.VALIDATION_FILE))) == record
  before = {name: os.path.getmtime(os.path.join(workdir, name)) for name in os.listdir(workdir)}
  config.validation_size = 30
  with pytest.raises(WorkdirError, match=r"^config.validation_size=30, "):
    train.train_and_evaluate(config, workdir)
  assert {name: os.path.getmtime(os.path.join(workdir, name))
          for name in os.listdir(workdir)} == before


@pytest.mark.slow
def test_main_refuses_another_carve_out_in_one_line(npz, tmp_path):
  """What a user sees: one line naming the field and the fix, exit 2, nothing written."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  splits = data.load_run_splits(tiny_run.config(npz, validation_size=20))
  data.check_fingerprint(str(workdir), splits.train)        # as a run started with 20 leaves it
  validation.write_record(str(workdir), splits.validation_record)
  before = {p.name: p.read_bytes() for p in workdir.iterdir()}
  result = tiny_run.run_main(workdir, f"--config.dataset=npz:{npz}",
                             "--config.validation_size=10")
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: config.validation_size=10, ")
  assert "--config.validation_size=20 --config.validation_seed=0" in lines[0]
  assert {p.name: p.read_bytes() for p in workdir.iterdir()} == before
