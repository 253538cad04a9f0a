"""The evaluators on 8 fake devices: known answers on synthetic features, and every evaluator on
one tiny trained workdir (four well-separated blob classes), checked against brute force and
against the training run's own kNN."""

import ast
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import reference_numpy
import tiny_run

from instdisc_jax import config_io
from instdisc_jax import data
from instdisc_jax import evaluate
from instdisc_jax import knn
from instdisc_jax import memory_bank
from instdisc_jax import parallel
from instdisc_jax import restore
from instdisc_jax import steps
from instdisc_jax import train
from instdisc_jax.errors import ConfigError
from instdisc_jax.errors import UserError
from instdisc_jax.evaluation import config as eval_config
from instdisc_jax.evaluation import export
from instdisc_jax.evaluation import features as features_lib
from instdisc_jax.evaluation import knn_sweep
from instdisc_jax.evaluation import linear_probe
from instdisc_jax.evaluation import pictures
from instdisc_jax.evaluation import semi_supervised
from instdisc_jax.plots import GridLayout
from instdisc_jax.sharding import ShardLayout

REPO = os.path.join(os.path.dirname(__file__), os.pardir)


# -- known answers on synthetic features ---------------------------------------------------------


def clusters(rng, num, num_classes=4, dim=16, spread=0.05):
  """Unit vectors near one of `num_classes` orthogonal directions, and their classes."""
  labels = rng.integers(0, num_classes, num)
  x = np.eye(dim, dtype=np.float32)[labels] + spread * rng.normal(size=(num, dim))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels.astype(
      np.int32)


def sweep(queries, targets, rows, labels, ks=(1, 5, 20), temperatures=(0.05, 0.1)):
  counts = knn_sweep.sweep_counts(queries, targets, np.ones(len(targets), bool), rows, labels,
                                  num_instances=len(rows), num_classes=4, ks=ks,
                                  temperatures=temperatures)
  return {name: 100.0 * int(c["top1"]) / len(targets) for name, c in counts.items()}


def test_knn_sweep_separable_clusters_are_classified_perfectly():
  rng = np.random.default_rng(0)
  rows, labels = clusters(rng, 200)
  queries, targets = clusters(rng, 100)
  accuracies = sweep(queries, targets, rows, labels)
  assert set(accuracies) == {knn_sweep.setting_name(k, t) for k in (1, 5, 20)
                             for t in (0.05, 0.1)}
  assert all(a == 100.0 for a in accuracies.values())


def test_knn_sweep_shuffled_labels_give_chance():
  rng = np.random.default_rng(1)
  rows, labels = clusters(rng, 400, spread=0.5)      # overlapping: every query votes afresh
  queries, targets = clusters(rng, 400, spread=0.5)
  assert min(sweep(queries, targets, rows, labels).values()) > 55   # structure is found ...
  accuracies = sweep(queries, targets, rows, rng.permutation(labels))   # ... and lost
  assert all(12 <= a <= 38 for a in accuracies.values()), accuracies   # chance is 25 %


def test_knn_sweep_matches_one_knn_classify_per_setting():
  rng = np.random.default_rng(2)
  rows, labels = clusters(rng, 300, spread=0.8)
  queries, targets = clusters(rng, 64, spread=0.8)
  accuracies = sweep(queries, targets, rows, labels, ks=(3, 30), temperatures=(0.07, 1.0))
  for k in (3, 30):
    for t in (0.07, 1.0):
      scores = knn.knn_classify(queries, rows, labels, num_instances=300, num_classes=4, k=k,
                                temperature=t)
      hits = int(knn.count_correct(scores, targets)["top1"])
      assert accuracies[knn_sweep.setting_name(k, t)] == 100.0 * hits / 64


PROBE = linear_probe.ProbeConfig(epochs=20, batch_size=64, learning_rate=0.01,
                                 weight_decay=0.0, seed=0)


def test_linear_probe_separable_clusters_and_shuffled_labels():
  rng = np.random.default_rng(3)
  x, y = clusters(rng, 400, dim=8)
  test_x, test_y = clusters(rng, 400, dim=8)
  assert linear_probe.probe(x, y, test_x, test_y, 4, PROBE)["top1"] == 100.0
  x, y = clusters(rng, 400, dim=32, spread=0.5)
  test_x, test_y = clusters(rng, 400, dim=32, spread=0.5)
  assert linear_probe.probe(x, y, test_x, test_y, 4, PROBE)["top1"] > 55
  shuffled = linear_probe.probe(x, rng.permutation(y), test_x, test_y, 4, PROBE)["top1"]
  assert 12 <= shuffled <= 38                                       # chance is 25 %


def test_standardisation_uses_the_labelled_training_rows():
  train_x = np.array([[0.0, 10.0], [2.0, 30.0], [100.0, 100.0]], np.float32)
  mean, std = linear_probe.moments(train_x, np.array([0, 1, -1]), axis_name=None)
  np.testing.assert_allclose(mean, [1, 20])          # the unlabelled row is left out
  np.testing.assert_allclose(std, [1, 10])


def test_balanced_subset_is_class_balanced_and_deterministic():
  labels = np.repeat(np.arange(5), 200)
  subset = semi_supervised.balanced_subset(labels, 0.1, seed=7)
  assert np.array_equal(np.bincount(labels[subset]), [20] * 5)
  assert np.array_equal(subset, np.unique(subset))
  assert np.array_equal(subset, semi_supervised.balanced_subset(labels, 0.1, seed=7))
  assert not np.array_equal(subset, semi_supervised.balanced_subset(labels, 0.1, seed=8))
  # At least one image of every class, however small the fraction.
  assert np.array_equal(np.bincount(labels[semi_supervised.balanced_subset(labels, 1e-4, 0)]),
                        [1] * 5)


def test_finetune_batches_cover_the_subset_every_epoch():
  batches = [semi_supervised.global_batch(10, 4, seed=0, step=s) for s in range(5)]
  order = np.concatenate(batches)
  assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))
  # Batches larger than the subset repeat it.
  assert sorted(semi_supervised.global_batch(3, 6, seed=0, step=0)) == [0, 0, 1, 1, 2, 2]


def test_queries_cover_the_classes_first():
  labels = np.repeat(np.arange(4), 25)
  picks = pictures.pick_queries(labels, 100, 6, seed=0)
  assert sorted(labels[picks[:4]]) == [0, 1, 2, 3] and len(set(picks)) == 6


def test_eval_config_rejects_bad_fields():
  config = eval_config.get_config()
  eval_config.validate(config, num_devices=8)
  config.eval.knn_k = ()
  with pytest.raises(ConfigError, match="eval.knn_k"):
    eval_config.validate(config, num_devices=8)
  config = eval_config.get_config()
  config.eval.finetune_batch_size = 12
  with pytest.raises(ConfigError, match="multiple of the number of devices"):
    eval_config.validate(config, num_devices=8)


# -- every evaluator on a tiny trained workdir ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
  return tiny_run.write_blobs_npz(tmp_path_factory.mktemp("data") / "blobs.npz")


# -- evaluators built from what they need: a stand-in network and synthetic data, no Trainer ---


def linear_embed(state, images):
  """A stand-in encoder: pooled = the pixels in [0, 1], embedding = their unit-norm projection."""
  pooled = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255
  return memory_bank.l2_normalize(pooled @ state.params["w"]), pooled


def sharded(rows, layout, fill):
  """Host (n, ...) rows as this process's shards of the bank's layout."""
  return parallel.shard_local_rows(layout.shard_array(rows, fill=fill)[
      parallel.local_device_indices()])


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  """Blob splits (96 train, 40 eval), a random projection as the network, a random bank."""
  npz = tiny_run.write_blobs_npz(tmp_path_factory.mktemp("blobs") / "blobs.npz")
  train_split, eval_split = data.load_splits(tiny_config(npz))
  rng = np.random.default_rng(3)
  w = rng.normal(size=(16 * 16, 8)).astype(np.float32)
  bank = rng.normal(size=(96, 8)).astype(np.float32)
  bank /= np.linalg.norm(bank, axis=1, keepdims=True)
  layout = ShardLayout(96, jax.device_count())
  state = steps.TrainState(
      step=parallel.replicate(np.int32(0)), params=parallel.replicate({"w": w}), batch_stats={},
      opt_state=None, partition=None, key=None,
      bank=memory_bank.MemoryBank(rows=sharded(bank, layout, 0), num_instances=96,
                                  num_shards=layout.num_shards))

  def host_features(split):
    pooled = split.images.reshape(split.num_examples, -1).astype(np.float32) / 255
    embedding = pooled @ w
    return embedding / np.linalg.norm(embedding, axis=1, keepdims=True), pooled

  cache = features_lib.FeatureCache(linear_embed, batch_size=16, image_size=16)
  return dict(train_split=train_split, eval_split=eval_split, state=state, bank=bank,
              bank_labels=sharded(train_split.labels.astype(np.int32), layout, -1), cache=cache,
              train=host_features(train_split), eval=host_features(eval_split))


def test_knn_sweep_without_a_trainer_matches_brute_force(synthetic):
  s = synthetic
  sweep = knn_sweep.KnnSweep(s["cache"], train_split=s["train_split"], eval_split=s["eval_split"],
                             bank_labels=s["bank_labels"], num_classes=4, ks=(5, 200),
                             temperatures=(0.07, 0.5), banks=("bank", "recomputed"))
  results = sweep.run(s["state"])
  queries, targets = s["eval"][0], s["eval_split"].labels
  for bank, rows in (("bank", s["bank"]), ("recomputed", s["train"][0])):
    assert set(results[bank]) == {knn_sweep.setting_name(k, t) for k in (5, 96)
                                  for t in (0.07, 0.5)}
    for k in (5, 96):
      for t in (0.07, 0.5):
        scores, _ = reference_numpy.knn(queries, rows, s["train_split"].labels, k, t, 4)
        top1 = 100.0 * np.mean(np.argmax(scores, axis=1) == targets)
        assert results[bank][knn_sweep.setting_name(k, t)]["top1"] == pytest.approx(top1)
  assert results["recomputed"]["k=5,tau=0.07"]["top1"] > 90      # blobs: the pixels separate


def test_linear_probe_without_a_trainer_is_the_probe_of_its_features(synthetic):
  s = synthetic
  config = linear_probe.ProbeConfig(epochs=5, batch_size=32, learning_rate=0.03,
                                    weight_decay=1e-4, seed=0)
  results = linear_probe.LinearProbe(
      s["cache"], train_split=s["train_split"], eval_split=s["eval_split"], num_classes=4,
      kinds=("pooled", "embedding"), config=config).run(s["state"])
  for kind, column in (("embedding", 0), ("pooled", 1)):
    expected = linear_probe.probe(s["train"][column], s["train_split"].labels,
                                  s["eval"][column], s["eval_split"].labels, 4, config)
    assert results[kind] == pytest.approx(expected, abs=1e-9)
  assert results["pooled"]["top1"] == 100.0


def project_imports(module: str) -> set[str]:
  """The instdisc_jax modules `module` imports, directly or not (at any depth of its code)."""
  seen, todo = set(), [module]
  while todo:
    name = todo.pop()
    path = os.path.join(REPO, *name.split("."))
    path = os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py"
    if name in seen or not os.path.exists(path):
      continue
    seen.add(name)
    with open(path) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        todo += [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("instdisc_jax"):
        todo += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
  return {name for name in seen if name.startswith("instdisc_jax")}


@pytest.mark.parametrize("program", ["instdisc_jax.evaluate", "instdisc_jax.search",
                                     "instdisc_jax.export_encoder", "instdisc_jax.restore"])
def test_programs_that_use_a_run_do_not_import_the_training_loop(program):
  assert "instdisc_jax.train" in project_imports("instdisc_jax.main")   # the walk finds it
  imported = project_imports(program)
  assert "instdisc_jax.restore" in imported
  assert "instdisc_jax.train" not in imported


def tiny_config(dataset):
  return tiny_run.config(dataset, num_epochs=1)


@pytest.fixture(scope="module")
def evaluated(tiny_npz, tmp_path_factory):
  """A tiny run (6 steps), then every evaluator with the runlocal config."""
  workdir = str(tmp_path_factory.mktemp("run"))
  train_results = train.train_and_evaluate(tiny_config(tiny_npz), workdir)
  config = eval_config.get_config(runlocal=True)
  config.eval.knn_k = (10, 200)                # 200 > n = 96: capped at 96
  config.eval.knn_temperatures = (0.07, 0.5)
  config.eval.finetune_augment = True          # the path with augmentation
  return workdir, train_results, evaluate.evaluate(workdir, config)


@pytest.mark.slow  # trains a tiny run, then evaluates it
def test_knn_sweep_reproduces_the_training_runs_knn(evaluated):
  workdir, train_results, results = evaluated
  assert results["step"] == train_results["step"] == 6
  for bank, name in (("bank", "knn_bank"), ("recomputed", "knn_recomputed")):
    assert set(results["knn"][bank]) == {"k=10,tau=0.07", "k=10,tau=0.5", "k=96,tau=0.07",
                                         "k=96,tau=0.5"}
    assert results["knn"][bank]["k=10,tau=0.07"] == train_results[name]
  assert results["knn"]["recomputed"]["k=10,tau=0.07"]["top1"] == 100.0


@pytest.mark.slow  # trains a tiny run, then evaluates it
def test_linear_probe_and_fine_tuning_on_separable_blobs(evaluated):
  _, _, results = evaluated
  assert set(results["linear_probe"]) == {"embedding", "pooled"}
  assert results["linear_probe"]["pooled"]["top1"] == 100.0
  fine_tuned = results["semi_supervised"]
  assert set(fine_tuned) == {"1%", "10%"}
  labels = export.read(evaluated[0], "train")["labels"]
  for fraction, name in ((0.01, "1%"), (0.1, "10%")):
    assert fine_tuned[name]["labelled"] == len(semi_supervised.balanced_subset(labels, fraction,
                                                                               0))
    assert 0 <= fine_tuned[name]["top1"] <= 100 and np.isfinite(fine_tuned[name]["final_loss"])


@pytest.mark.slow  # trains a tiny run, then evaluates it
def test_export_writes_each_process_rows_with_their_indices(evaluated, tiny_npz):
  workdir, _, results = evaluated
  assert results["export"]["train"] == os.path.join(workdir, "features_train.process*.npz")
  archive = np.load(os.path.join(workdir, "features_train.process0.npz"))   # one process
  assert set(archive.files) == {"features", "pooled", "labels", "indices"}
  assert np.array_equal(archive["indices"], np.arange(96))
  table = export.read(workdir, "train")
  assert table["features"].shape == (96, 16) and table["pooled"].shape[0] == 96
  np.testing.assert_allclose(np.linalg.norm(table["features"], axis=1), 1.0, rtol=1e-5)
  assert np.array_equal(table["indices"], np.arange(96))
  assert np.array_equal(table["labels"], np.load(tiny_npz)["labels"])
  assert np.array_equal(export.read(workdir, "eval")["labels"], np.load(tiny_npz)["test_labels"])


def test_export_read_joins_and_orders_the_processes_archives(tmp_path):
  rows = {"features": np.eye(4, 2, dtype=np.float32), "pooled": np.ones((4, 3), np.float32),
          "labels": np.arange(4, dtype=np.int32), "indices": np.arange(4, dtype=np.int32)}
  for process, part in ((1, slice(2, 4)), (0, slice(0, 2))):
    export.save(export.path(str(tmp_path), "train", process),
                {name: value[part][::-1] for name, value in rows.items()})
  table = export.read(str(tmp_path), "train")
  for name, value in rows.items():
    assert np.array_equal(table[name], value)


@pytest.mark.slow  # trains a tiny run, then evaluates it
def test_retrieval_grid_shows_the_true_top_k(evaluated):
  workdir, _, results = evaluated
  grid = results["retrieval_grid"]
  train_features = export.read(workdir, "train")["features"]
  eval_features = export.read(workdir, "eval")["features"]
  similarities = eval_features[grid["queries"]] @ train_features.T
  shown = np.take_along_axis(similarities, np.asarray(grid["neighbors"]), axis=1)
  top_k = -np.sort(-similarities, axis=1)[:, :10]
  np.testing.assert_allclose(shown, top_k, atol=1e-5)    # the true top 10, best first
  assert all(len(set(row)) == 10 for row in grid["neighbors"])
  with Image.open(grid["path"]) as image:
    assert image.size == GridLayout(8, 10).size
  assert 0 <= grid["same_class_fraction"] <= 1


@pytest.mark.slow  # trains a tiny run, then evaluates it
def test_curves_and_results_file(evaluated):
  workdir, _, results = evaluated
  assert os.path.exists(results["curves"]["path"]) and results["curves"]["loss_points"] == 3
  with open(os.path.join(workdir, evaluate.RESULTS_NAME)) as f:
    assert json.load(f) == json.loads(json.dumps(results))
  assert any(line.startswith("linear probe (pooled)") for line in evaluate.summary_lines(results))


@pytest.mark.slow  # trains a tiny run, then evaluates it
def test_a_workdir_without_a_checkpoint_is_refused(evaluated, tmp_path):
  shutil.copy(os.path.join(evaluated[0], config_io.CONFIG_NAME), tmp_path)
  with pytest.raises(UserError, match="has no checkpoint"):
    evaluate.evaluate(str(tmp_path), eval_config.get_config(runlocal=True))
  cli = subprocess.run([sys.executable, "-m", "instdisc_jax.evaluate", f"--workdir={tmp_path}"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
  assert cli.returncode == 2
  assert cli.stderr.strip().splitlines()[-1].startswith("error: ") and "no checkpoint" in \
      cli.stderr


def test_unlabelled_data_skips_the_labelled_evaluators(tmp_path):
  images, _ = tiny_run.blob_images(np.random.default_rng(1), 32)
  np.savez(tmp_path / "unlabelled.npz", images=images)
  config = tiny_config(str(tmp_path / "unlabelled.npz"))
  names = [name for name, _ in evaluate.build_evaluators(
      restore.RunSpec.from_config(config), eval_config.get_config(runlocal=True), str(tmp_path))]
  assert names == ["export", "retrieval_grid", "curves"]
