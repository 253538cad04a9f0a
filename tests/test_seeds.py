"""The seeds table: per-seed numbers from the runs' results, their mean and std, the markdown,
resumption from records, bad input; one slow end-to-end run of two tiny seeds."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tiny_run

from instdisc_jax.evaluation import config as eval_config_lib
from instdisc_jax.experiments import seed_parts
from instdisc_jax.experiments import seeds
from instdisc_jax.experiments import seeds_table

RESULTS = {"step": 6, "knn_bank": {"top1": 80.0, "top5": 99.0},
           "knn_recomputed": {"top1": 81.0, "top5": 99.5}}
EVAL_RESULTS = {"step": 6,
                "linear_probe": {"embedding": {"top1": 70.0, "train_top1": 72.0},
                                 "pooled": {"top1": 75.0, "train_top1": 77.0}},
                "semi_supervised": {"1%": {"labelled": 4, "top1": 60.0, "final_loss": 1.0},
                                    "10%": {"labelled": 40, "top1": 65.0, "final_loss": 0.5}}}


def eval_config():
  config = eval_config_lib.get_config().eval
  for field in seeds.EVAL_OFF:
    config[field] = False
  return config


def test_columns_follow_the_evaluator_config():
  config = eval_config()
  assert [key for key, _ in seeds_table.columns_for(config)] == [
      "knn_bank", "knn_recomputed", "probe_embedding", "probe_pooled", "finetune_1%",
      "finetune_10%"]
  config.linear_probe = False
  config.semi_supervised_fractions = (0.5,)
  assert [key for key, _ in seeds_table.columns_for(config)] == [
      "knn_bank", "knn_recomputed", "finetune_50%"]


def test_values_of_a_trained_row_and_of_the_baselines():
  assert seeds_table.trained_values(RESULTS, EVAL_RESULTS) == {
      "knn_bank": 80.0, "knn_recomputed": 81.0, "probe_embedding": 70.0, "probe_pooled": 75.0,
      "finetune_1%": 60.0, "finetune_10%": 65.0}
  assert seeds_table.baseline_values("raw_pixels", {
      "knn": {"top1": 79.0}, "linear_probe": {"top1": 84.0, "train_top1": 90.0}}) == {
          "knn_recomputed": 79.0, "probe_pooled": 84.0}
  assert seeds_table.baseline_values("random_init", {
      "knn": {"top1": 50.0}, "linear_probe": {"embedding": {"top1": 40.0},
                                              "pooled": {"top1": 45.0}}}) == {
          "knn_recomputed": 50.0, "probe_embedding": 40.0, "probe_pooled": 45.0}


def test_results_with_a_validation_choice_give_its_test_numbers_and_knn_setting():
  """With validation on, results.json keeps knn_bank / knn_recomputed as test numbers at the
  chosen (k, tau) and adds validation / test / knn_choice: the table reads the same keys."""
  config = ml_collections.ConfigDict({"knn_k": 200, "knn_temperature": 0.05})
  assert seed_parts.knn_setting(RESULTS, config) == (200, 0.05)
  chosen = dict(RESULTS, knn_choice={"k": 50, "tau": 0.1}, validation={}, test={})
  assert seed_parts.knn_setting(chosen, config) == (50, 0.1)
  assert seed_parts.knn_setting(dict(RESULTS, knn_choice={"k": 20, "temperature": 0.07}),
                           config) == (20, 0.07)
  assert seeds_table.trained_values(chosen, {})["knn_bank"] == 80.0


def test_summary_is_mean_and_sample_std():
  summary = seeds_table.summarize([80.0, 82.0, 84.0])
  assert summary["mean"] == pytest.approx(82.0)
  assert summary["std"] == pytest.approx(np.std([80.0, 82.0, 84.0], ddof=1))
  assert summary["values"] == [80.0, 82.0, 84.0]
  assert seeds_table.summarize([80.0])["std"] == 0.0
  assert seeds_table.cell(summary) == "82.00 ± 2.00"
  assert seeds_table.cell(seeds_table.summarize([80.0])) == "80.00"
  assert seeds_table.cell(None) == "-"


def test_aggregate_leaves_out_what_a_row_does_not_have():
  per_seed = {"instdisc": {0: {"knn_bank": 80.0, "knn_recomputed": 81.0},
                           1: {"knn_bank": 82.0, "knn_recomputed": 83.0}},
              "raw_pixels": {0: {"knn_recomputed": 79.0}, 1: {"knn_recomputed": 79.0}}}
  table = seeds_table.aggregate(per_seed, ["knn_bank", "knn_recomputed", "probe_pooled"])
  assert table["instdisc"]["knn_bank"]["mean"] == pytest.approx(81.0)
  assert set(table["raw_pixels"]) == {"knn_recomputed"}
  assert table["raw_pixels"]["knn_recomputed"]["std"] == 0.0


def test_markdown_has_one_line_per_row_and_dashes_where_nothing_applies():
  rows = seeds_table.rows_for("nce", ["raw_pixels", "supervised"])
  assert [row.name for row in rows] == ["instdisc", "supervised", "raw_pixels"]
  columns = seeds_table.columns_for(eval_config())
  per_seed = {"instdisc": {0: seeds_table.trained_values(RESULTS, EVAL_RESULTS),
                           1: seeds_table.trained_values(RESULTS, EVAL_RESULTS)},
              "supervised": {0: {"knn_bank": 90.0}, 1: {"knn_bank": 92.0}},
              "raw_pixels": {0: {"knn_recomputed": 79.0}, 1: {"knn_recomputed": 79.0}}}
  config = ml_collections.ConfigDict({"dataset": "fashion_mnist", "model": "small_resnet",
                                      "num_epochs": 20, "num_train_steps": -1})
  text = seeds_table.markdown(rows, columns, seeds_table.aggregate(per_seed, [k for k, _ in columns]),
                        seeds=[0, 1], command="seeds --x", date="2026-12-03", devices="2 CPU",
                        config=config, knn_setting="k=200, tau=0.05",
                        wall_s={"instdisc": 61.0})
  lines = [line for line in text.splitlines() if line.startswith("| ")]
  assert lines[0].split(" | ")[1:3] == ["kNN bank", "kNN recomputed"]
  body = lines[2:]
  assert [line.split(" | ")[0][2:] for line in body] == [row.title for row in rows]
  assert body[0].split(" | ")[1] == "80.00 ± 0.00"
  assert body[0].endswith("| 1 min 01 s |")
  assert body[1].split(" | ")[1:3] == ["91.00 ± 1.41", "-"]
  assert body[2].split(" | ")[1:4] == ["-", "79.00 ± 0.00", "-"]
  assert "seeds --x" in text


def test_evaluator_flags_name_only_the_changed_fields_and_the_seed():
  config = eval_config()
  config.probe_epochs = 3
  config.semi_supervised_fractions = (0.5,)
  config.probe_features = ("embedding",)
  got = seed_parts.evaluator_flags(config, 7)
  assert got[-1] == "--config.eval.seed=7"
  assert sorted(got[:-1]) == sorted([
      "--config.eval.knn=False", "--config.eval.probe_epochs=3",
      "--config.eval.semi_supervised_fractions=(0.5,)", "--config.eval.export=False",
      "--config.eval.retrieval_grid=False", "--config.eval.curves=False",
      "--config.eval.probe_features=('embedding',)"])


def test_config_overrides_are_passed_on_as_typed():
  argv = ["--workdir=/w", "--config=c.py", "--config.batch_size=16", "--seeds=2",
          "--config.augment.flip=False"]
  assert seeds.config_overrides(argv) == ["--config.batch_size=16",
                                          "--config.augment.flip=False"]


def test_a_finished_part_is_not_run_again(tmp_path, monkeypatch):
  parts = seed_parts.Parts(str(tmp_path), "configs/tiny.py", [], 0)
  row = seeds_table.rows_for("nce", [])[0]
  workdir = parts.run_workdir(row.name, 3)
  os.makedirs(workdir)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(RESULTS, f)
  parts.write_record(row.name, 3, "train", {"results": RESULTS, "wall_s": 5.0})
  monkeypatch.setattr(seed_parts.Parts, "_child", lambda *a: pytest.fail("ran a finished part"))
  assert parts.train(row, 3)["wall_s"] == 5.0


def _seeds_command(workdir, *flags):
  return [sys.executable, "-m", "instdisc_jax.experiments.seeds", f"--config={tiny_run.TINY_CONFIG}",
          f"--workdir={workdir}", *flags]


@pytest.mark.slow
@pytest.mark.parametrize("flag,words", [
    ("--seeds=0", "--seeds=0"),
    ("--baselines=raw_pixels,pixels", "unknown baseline pixels"),
    ("--eval.probe_epoch=2", "probe_epoch"),
    ("--out=/nonexistent/dir/table", "/nonexistent/dir"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, flag, words):
  npz = tiny_run.write_npz(tmp_path / "d.npz")
  workdir = tmp_path / "w"
  result = subprocess.run(_seeds_command(workdir, f"--config.dataset=npz:{npz}", flag),
                          capture_output=True, text=True, env=tiny_run.environment(),
                          cwd=tiny_run.REPO, timeout=120)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], lines
  assert not workdir.exists()


@pytest.mark.slow
def test_two_tiny_seeds_end_to_end(tmp_path):
  """Two seeds of a 1-epoch tiny run with the raw-pixel baseline; then a rerun trains nothing.

  The evaluator child is off (nothing for it to do: no probe, no fine-tuning) to keep the test
  to two training processes; its flags are `evaluator_flags`'s, tested above.
  """
  npz = tiny_run.write_blobs_npz(tmp_path / "blobs.npz")
  workdir = tmp_path / "w"
  out = tmp_path / "table"
  command = _seeds_command(workdir, "--seeds=2", "--baselines=raw_pixels", f"--out={out}",
                           f"--config.dataset=npz:{npz}", "--config.num_epochs=1",
                           "--eval.semi_supervised_fractions=()", "--eval.linear_probe=False",
                           "--host_devices=2")
  env = tiny_run.cached_environment(tmp_path / "cache")
  env.pop("XLA_FLAGS")
  result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tiny_run.REPO,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((workdir / "seeds.json").read_text())
  assert summary["seeds"] == [0, 1]
  assert set(summary["rows"]) == {"instdisc", "raw_pixels"}
  knn = summary["rows"]["instdisc"]["columns"]["knn_bank"]
  assert len(knn["values"]) == 2 and knn["mean"] == pytest.approx(np.mean(knn["values"]))
  assert set(summary["columns"]) == {"knn_bank", "knn_recomputed"}
  assert summary["per_seed"]["instdisc"]["0"]["wall_s"]["evaluate"] == 0.0
  assert (out.with_suffix(".md")).read_text() == (workdir / "seeds.md").read_text()
  assert (out.with_suffix(".png")).exists() and (workdir / "seeds.png").exists()
  assert "| raw pixels | - |" in result.stdout
  records = sorted(os.listdir(workdir / "records"))
  mtimes = {name: os.path.getmtime(workdir / "records" / name) for name in records}
  rerun = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tiny_run.REPO,
                         timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert {name: os.path.getmtime(workdir / "records" / name) for name in records} == mtimes


# ------------------------------------------------------------------------------------------------
# Table 1 with --seeds.
# ------------------------------------------------------------------------------------------------


def test_table1_rows_over_seeds_show_mean_and_std(tmp_path, monkeypatch):
  """Each row trains once per seed in <row>/seed_<s> with only the seed changed; the cells are
  mean ± std over the seeds. Training is a stand-in writing results.json, as in test_table1."""
  from instdisc_jax import default_config
  from instdisc_jax import train
  from instdisc_jax.experiments import table1

  calls = []

  def fake(config, workdir, stop=None):
    del stop
    calls.append((os.path.relpath(workdir, tmp_path / "t1"), config.seed, config.objective))
    os.makedirs(workdir, exist_ok=True)
    top1 = 10.0 + 2.0 * config.seed
    results = {"step": 2, "knn_bank": {"top1": top1, "top5": 50.0},
               "knn_recomputed": {"top1": top1 + 1.0, "top5": 60.0}}
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f)
    return results

  monkeypatch.setattr(train, "train_and_evaluate", fake)
  npz = tiny_run.write_npz(tmp_path / "d.npz", n=64)
  config = table1.base_config(default_config.load_config_file(tiny_run.TINY_CONFIG),
                              f"npz:{npz}", epochs=1)
  config.num_train_steps = 2
  rows = table1.select_rows(["softmax", "nce_10"])
  text = table1.run_table(config, str(tmp_path / "t1"), rows, command="c", seeds=3)
  assert calls == [(os.path.join(name, f"seed_{seed}"), seed, objective)
                   for name, objective in (("softmax", "softmax"), ("nce_10", "nce"))
                   for seed in (0, 1, 2)]
  assert "| non-parametric softmax | - | 12.00 ± 2.00 | 13.00 ± 2.00 |" in text
  assert (tmp_path / "t1" / "table1.png").exists()
  table1.run_table(config, str(tmp_path / "t1"), rows, command="c", seeds=3)
  assert len(calls) == 6                                      # finished seeds are kept


def test_a_run_trained_further_is_evaluated_again(tmp_path, monkeypatch):
  parts = seed_parts.Parts(str(tmp_path), "configs/tiny.py", [], 0)
  row = seeds_table.rows_for("nce", [])[0]
  parts.write_record(row.name, 0, "evaluate", {"results": EVAL_RESULTS, "wall_s": 3.0})
  children = []

  def child(self, module, args, *rest):
    children.append(module)
    workdir = self.run_workdir(row.name, 0)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "eval_results.json"), "w") as f:
      json.dump(dict(EVAL_RESULTS, step=9), f)
    return 4.0

  monkeypatch.setattr(seed_parts.Parts, "_child", child)
  assert parts.evaluate(row, 0, eval_config(), step=6)["wall_s"] == 3.0     # step 6: evaluated
  assert children == []
  assert parts.evaluate(row, 0, eval_config(), step=9)["results"]["step"] == 9
  assert children == ["instdisc_jax.evaluate"]


def test_chart_draws_the_cells_that_have_values(tmp_path):
  from PIL import Image

  from instdisc_jax import plots
  means = np.array([[80.0, 81.0, np.nan], [np.nan, 79.0, 84.0]])
  stds = np.array([[1.0, 0.5, np.nan], [np.nan, 0.0, 2.0]])
  path = tmp_path / "seeds.png"
  plots.seeds_bars(str(path), ["nce", "raw pixels"], ["kNN bank", "kNN recomputed", "probe"],
                   means, stds, "t")
  with Image.open(path) as image:
    assert image.size[0] >= 720
