r"""Evaluates a trained workdir: kNN sweep, linear probe, semi-supervised fine-tuning, feature
export, retrieval grid and training curves. Flags only; the work is in `instdisc_jax.evaluation`.

  python -m instdisc_jax.evaluate --workdir=/tmp/fmnist
  python -m instdisc_jax.evaluate --workdir=/tmp/fmnist --config.eval.knn_k="(10,50,200)" \
      --config.eval.linear_probe=False --config.eval.semi_supervised_fractions="()"

The run's config is read from `<workdir>/config.json` and the newest checkpoint is restored (a
workdir without one is refused, exit 2). Results go to `<workdir>/eval_results.json` and stdout;
pictures and exported features to the workdir. Without a labelled eval split, kNN, the probe and
fine-tuning are skipped with a notice. Fields of `--config.eval.*`: instdisc_jax/evaluation/
config.py. The runtime flags are training's: on a CPU the host is split into as many devices as
training split it (checkpoints hold one bank shard per device; --host_devices overrides), and
multi-process runs take --coordinator_address/--num_processes/--process_id.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import flags
import ml_collections
from ml_collections import config_flags

from instdisc_jax import cli
from instdisc_jax import flag_errors
from instdisc_jax.evaluation import config as eval_config_lib

log = logging.getLogger(__name__)

FLAGS = flags.FLAGS
RESULTS_NAME = "eval_results.json"


def build_evaluators(spec, config: ml_collections.ConfigDict, workdir: str) -> list:
  """(name, evaluator) pairs for what `config.eval` asks for and the data allow.

  spec: the run's `restore.RunSpec`; the evaluators get only the pieces of it they use.
  """
  from instdisc_jax.evaluation import export  # pylint: disable=g-import-not-at-top
  from instdisc_jax.evaluation import features  # pylint: disable=g-import-not-at-top
  from instdisc_jax.evaluation import knn_sweep  # pylint: disable=g-import-not-at-top
  from instdisc_jax.evaluation import linear_probe  # pylint: disable=g-import-not-at-top
  from instdisc_jax.evaluation import pictures  # pylint: disable=g-import-not-at-top
  from instdisc_jax.evaluation import semi_supervised  # pylint: disable=g-import-not-at-top
  e = config.eval
  cache = features.FeatureCache(features.embed_fn(spec.model, spec.hp),
                                batch_size=e.batch_size or spec.config.eval_batch_size,
                                image_size=spec.config.image_size)
  splits = dict(train_split=spec.train_split, eval_split=spec.eval_split)
  evaluators = []
  labelled = spec.eval_split is not None
  if not labelled and (e.knn or e.linear_probe or e.semi_supervised_fractions):
    log.warning("no labelled eval split: kNN, linear probe and semi-supervised evaluation "
                "skipped")
  if labelled and e.knn:
    evaluators.append(("knn", knn_sweep.KnnSweep(
        cache, **splits, bank_labels=spec.bank_labels, num_classes=spec.num_classes,
        ks=e.knn_k, temperatures=e.knn_temperatures, banks=e.knn_banks)))
  if labelled and e.linear_probe:
    evaluators.append(("linear_probe", linear_probe.LinearProbe(
        cache, **splits, num_classes=spec.num_classes, kinds=e.probe_features,
        config=linear_probe.ProbeConfig(
            epochs=e.probe_epochs, batch_size=e.probe_batch_size,
            learning_rate=e.probe_learning_rate, weight_decay=e.probe_weight_decay,
            seed=e.seed))))
  if labelled and e.semi_supervised_fractions:
    evaluators.append(("semi_supervised", semi_supervised.SemiSupervised(
        cache, model=spec.model, transform=spec.augment_config, **splits,
        num_classes=spec.num_classes, fractions=e.semi_supervised_fractions,
        config=semi_supervised.FinetuneConfig(
            steps=e.finetune_steps, batch_size=e.finetune_batch_size,
            learning_rate=e.finetune_learning_rate, momentum=e.finetune_momentum,
            weight_decay=e.finetune_weight_decay, augment=e.finetune_augment,
            crop_scale_min=e.finetune_crop_scale_min, seed=e.seed))))
  if e.export:
    evaluators.append(("export", export.Export(
        cache, {"train": spec.train_split, "eval": spec.eval_split}, workdir)))
  if e.retrieval_grid:
    evaluators.append(("retrieval_grid", pictures.RetrievalGrid(
        cache, workdir, **splits, bank_labels=spec.bank_labels,
        num_queries=e.retrieval_queries, num_neighbors=e.retrieval_neighbors,
        bank=e.retrieval_bank, seed=e.seed)))
  if e.curves:
    evaluators.append(("curves", pictures.TrainingCurves(workdir,
                                                         pictures.curves_title(spec.config))))
  return evaluators


def evaluate(workdir: str, config: ml_collections.ConfigDict) -> dict:
  """Restores the newest checkpoint of `workdir`, runs the evaluators, writes the results."""
  import jax  # pylint: disable=g-import-not-at-top

  from instdisc_jax import restore  # pylint: disable=g-import-not-at-top
  eval_config_lib.validate(config, num_devices=jax.device_count())
  run = restore.open_run(workdir)
  results = {"step": run.step}
  for name, evaluator in build_evaluators(run.spec, config, workdir):
    log.info("evaluating: %s", name)
    results[name] = evaluator.run(run.state)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, RESULTS_NAME), "w") as f:
      json.dump(results, f, indent=2)
  return results


def summary_lines(results: dict) -> list[str]:
  """One line per result, for the console."""
  lines = [f"checkpoint of step {results['step']}"]
  for bank, settings in results.get("knn", {}).items():
    for setting, r in settings.items():
      lines.append(f"kNN ({bank} features) {setting}: top-1 {r['top1']:.2f}%  "
                   f"top-5 {r['top5']:.2f}%")
  for kind, r in results.get("linear_probe", {}).items():
    lines.append(f"linear probe ({kind}): top-1 {r['top1']:.2f}%  "
                 f"(train {r['train_top1']:.2f}%)")
  for fraction, r in results.get("semi_supervised", {}).items():
    lines.append(f"fine-tuned on {fraction} of the labels ({r['labelled']} images): "
                 f"top-1 {r['top1']:.2f}%")
  for role, path in results.get("export", {}).items():
    lines.append(f"{role} features: {path}")
  for name in ("retrieval_grid", "curves"):
    if "path" in results.get(name, {}):
      lines.append(f"{name.replace('_', ' ')}: {results[name]['path']}")
  return lines


def main(argv):
  del argv  # cli.run refuses positional arguments.
  with cli.user_errors_exit():
    cli.require(FLAGS.workdir, "--workdir", "give the directory of a training run")
    cli.start_runtime_of_run(FLAGS.workdir)
    import jax  # pylint: disable=g-import-not-at-top
    results = evaluate(FLAGS.workdir, FLAGS.config)
    if jax.process_index() == 0:
      print("\n".join(summary_lines(results)), flush=True)


def define_flags(argv: list[str]) -> None:
  """The program's flags; defined only when it runs, so that importing the module (tests, other
  programs) defines none.

  The config flag reads its `--config.eval.<field>` overrides from `argv` as it is defined, so
  an unknown field is refused here, as one line, before that.
  """
  flags.DEFINE_string("workdir", None, "A workdir written by instdisc_jax.main.")
  defaults = eval_config_lib.get_config()
  flag_errors.check_overrides(argv, "config", defaults)
  config_flags.DEFINE_config_dict("config", defaults,
                                  "Evaluation settings (--config.eval.<field>=...).",
                                  lock_config=True, sys_argv=argv)
  cli.define_runtime_flags()


if __name__ == "__main__":
  sys.exit(cli.run(main, define_flags=define_flags))
