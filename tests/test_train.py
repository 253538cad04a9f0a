"""End to end on 8 fake devices: train a tiny config, checkpoint, resume, kNN; and the instance
index the train step sees is the record index (bank row i is written from image i)."""

import json
import os

import jax
import numpy as np
import pytest
import tiny_run

from instdisc_jax import augment
from instdisc_jax import config_io
from instdisc_jax import parallel
from instdisc_jax import steps
from instdisc_jax import train
from instdisc_jax.parallel import AXIS

# Every test here trains or compiles the whole train step of a tiny run.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
  return tiny_run.write_blobs_npz(tmp_path_factory.mktemp("data") / "blobs.npz")


tiny_config = tiny_run.config


@pytest.fixture(scope="module")
def trained(tiny_npz, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  results = train.train_and_evaluate(tiny_config(tiny_npz), workdir)
  return workdir, results


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_trains_evaluates_and_checkpoints(trained, tiny_npz):
  workdir, results = trained
  # 96 images / batch 16 = 6 steps per epoch, 2 epochs; checkpoints every 4 steps, keep 2.
  assert results["step"] == 12
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "8"]
  for name in ("knn_bank", "knn_recomputed"):
    assert 0 <= results[name]["top1"] <= results[name]["top5"] <= 100
  # Four well-separated blobs: the recomputed features classify them.
  assert results["knn_recomputed"]["top1"] >= 90
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 6 and np.isfinite(losses).all()       # logged every 2 steps
  assert any("knn_bank/top1" in r for r in records)             # the epoch-1 evaluation
  assert json.load(open(os.path.join(workdir, "results.json"))) == results
  assert config_io.load_config(workdir) == tiny_config(tiny_npz)


def test_resumes_from_the_last_checkpoint(trained, tiny_npz, tmp_path):
  workdir, _ = trained
  resumed = str(tmp_path / "resumed")
  os.system(f"cp -r {workdir} {resumed}")
  results = train.train_and_evaluate(tiny_config(tiny_npz, num_epochs=3), resumed)
  assert results["step"] == 18
  steps = [r["step"] for r in read_jsonl(os.path.join(resumed, "metrics.jsonl")) if "loss" in r]
  assert steps[-3:] == [14, 16, 18]                             # continued from step 12


def test_bank_row_i_is_written_from_image_i(tiny_npz, tmp_path):
  """One step with bank momentum 0: each row of the batch's instances becomes the train-mode
  feature of the augmented image carrying that index, and no other row changes."""
  config = tiny_config(tiny_npz, bank_momentum=0.0, bank_init="unit")
  trainer = train.Trainer(config, str(tmp_path))
  trainer.initialize()
  before = np.asarray(trainer.layout.unshard_array(trainer.state.bank.rows))
  batch = next(trainer.iterator)
  images = trainer.train_split.images
  np.testing.assert_array_equal(batch["image"], images[batch["index"]])  # record i is image i
  device_batch = parallel.shard_local_batch({"image": batch["image"], "index": batch["index"]})

  def features_of_step(state, device_batch):
    augment_key, _ = steps.step_keys(state)
    augmented = augment.train_augment(augment_key, device_batch["image"], trainer.hp.augment)
    features, _ = trainer.model.apply(
        {"params": state.params["encoder"], "batch_stats": state.batch_stats}, augmented,
        train=True, mutable=["batch_stats"])
    return features

  expected = jax.pmap(features_of_step, axis_name=AXIS)(trainer.state, device_batch)
  expected = np.asarray(expected).reshape(len(batch["index"]), -1)
  state, _ = trainer.p_train_step(trainer.state, device_batch)
  after = np.asarray(trainer.layout.unshard_array(state.bank.rows))
  np.testing.assert_allclose(after[batch["index"]], expected, rtol=1e-5, atol=1e-6)
  untouched = np.setdiff1d(np.arange(len(before)), batch["index"])
  np.testing.assert_array_equal(after[untouched], before[untouched])
  trainer.close()


@pytest.mark.parametrize("objective,shared", [("nce", False), ("infonce", True)])
def test_step_reads_the_bank_once_and_never_copies_it(tiny_npz, tmp_path, objective, shared):
  """Regression: a second read of the donated bank made XLA copy all of it twice per step."""
  config = tiny_config(tiny_npz, objective=objective, shared_noise=shared, proximal_weight=0.1)
  trainer = train.Trainer(config, str(tmp_path))
  trainer.initialize()
  batch = next(trainer.iterator)
  hlo = trainer.p_train_step.lower(
      trainer.state, parallel.shard_local_batch({"image": batch["image"],
                                                 "index": batch["index"]})).compile().as_text()
  bank_shape = f"{trainer.layout.rows_per_shard},{config.low_dim}]"
  assert not [line for line in hlo.splitlines() if " copy(" in line and bank_shape in line]
  trainer.close()
