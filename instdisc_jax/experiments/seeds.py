r"""The default job over several seeds, next to its baselines: mean +- std of every evaluation.

  python -m instdisc_jax.experiments.seeds --config=configs/fashion_mnist.py --workdir=DIR \
      --seeds=3 [--baselines=raw_pixels,random_init,supervised] [--out=docs/fashion_mnist_seeds] \
      [--config.<field>=<value> ...] [--eval.<field>=<value> ...]

For each seed s (the config's seed, plus 0, 1, ..., --seeds - 1):

* instance discrimination: `python -m instdisc_jax.main` trains the config with seed s in
  `DIR/instdisc/seed_<s>` (a process of its own: a fresh JAX runtime and the trainer's device
  split), then `python -m instdisc_jax.evaluate` runs the linear probes (embedding and pooled
  features) and fine-tuning on 1 % and 10 % of the labels there, with the kNN sweep, pictures and
  export off (`--eval.<field>` sets any evaluator field, instdisc_jax/evaluation/config.py; the
  evaluator's seed is s);
* supervised: the same, with `objective=supervised` (the same encoder trained with labels for
  the same budget: the upper bound), in `DIR/supervised/seed_<s>`;
* random init: the encoder at the run's initial state (seed s, never trained): kNN on its
  features and linear probes (`evaluation.baselines.FeatureBaseline`), in this process;
* raw pixels: kNN on L2-normalised pixels and a logistic regression on standardised pixels
  (`evaluation.baselines.raw_pixels`, the probe seeded with s), in this process.

The kNN of every row uses the run's k and tau; when the run chose them on a validation split
(its results.json has "knn_choice"), its knn_bank / knn_recomputed are test numbers at that
choice, and the baselines of that seed use the same (k, tau).

Resumable: each part of each seed leaves a record in `DIR/records/` when it finishes, and a
finished part is not run again (an interrupted training resumes from its checkpoint). The
children's output goes to `DIR/logs/`. At the end `DIR/seeds.md` (and `--out`.md) hold the table
of mean +- std over seeds, `DIR/seeds.png` (and `--out`.png) a bar chart with std error bars,
and `DIR/seeds.json` every number: the summaries, the per-seed values and the wall time of each
part. Bad input is one line on stderr and exit 2, before anything runs; a child's exit status
1, 2 or 75 (diverged, refused, stopped) ends this program with the same status and its line.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import shlex
import sys
import time
from typing import Mapping, Sequence

from absl import flags
import ml_collections
from ml_collections import config_flags
import numpy as np

from instdisc_jax import cli
from instdisc_jax.errors import UserError
from instdisc_jax.errors import one_line
from instdisc_jax.experiments.seed_parts import Baselines
from instdisc_jax.experiments.seed_parts import ChildFailed
from instdisc_jax.experiments.seed_parts import Parts
from instdisc_jax.experiments.seed_parts import knn_setting
from instdisc_jax.experiments.seeds_table import Row
from instdisc_jax.experiments.seeds_table import aggregate
from instdisc_jax.experiments.seeds_table import baseline_values
from instdisc_jax.experiments.seeds_table import columns_for
from instdisc_jax.experiments.seeds_table import markdown
from instdisc_jax.experiments.seeds_table import rows_for
from instdisc_jax.experiments.seeds_table import trained_values

log = logging.getLogger(__name__)

FLAGS = flags.FLAGS
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_DEFAULT_CONFIG = os.path.join(_REPO, "configs", "fashion_mnist.py")

BASELINES = ("raw_pixels", "random_init", "supervised")
# The evaluator's outputs the table does not use: off unless --eval.<field> turns them on.
EVAL_OFF = ("knn", "export", "retrieval_grid", "curves")


def check_inputs(config: ml_collections.ConfigDict, eval_config: ml_collections.ConfigDict,
                 num_seeds: int, baselines: Sequence[str], out: str) -> None:
  """Everything that can be refused before anything runs (UserError, one line)."""
  from instdisc_jax import config_validation  # pylint: disable=g-import-not-at-top
  from instdisc_jax import data  # pylint: disable=g-import-not-at-top
  from instdisc_jax.evaluation import config as eval_config_lib  # pylint: disable=g-import-not-at-top
  if num_seeds < 1:
    raise UserError(f"--seeds={num_seeds}: give at least 1")
  unknown = [name for name in baselines if name not in BASELINES]
  if unknown:
    raise UserError(f"--baselines: unknown baseline {', '.join(unknown)}; choose from "
                    f"{', '.join(BASELINES)} (or none: --baselines=)")
  if out and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
    raise UserError(f"--out={out}: directory {os.path.dirname(os.path.abspath(out))} does not "
                    "exist; create it or choose another path")
  config_validation.validate(config)
  eval_config_lib.validate(ml_collections.ConfigDict({"eval": eval_config.to_dict()}),
                           num_devices=1)
  train_split, eval_split = data.load_splits(config)
  if eval_split is None or eval_split.labels is None:
    raise UserError(f"config.dataset={config.dataset} has no labelled test split: every "
                    "column of the table scores one; use a dataset with test labels")
  if "supervised" in baselines and (train_split.labels is None
                                    or not np.any(train_split.labels >= 0)):
    raise UserError(f"--baselines=supervised, but {train_split.name} has no labels: leave "
                    "supervised out of --baselines")


def run_seeds(config: ml_collections.ConfigDict, eval_config: ml_collections.ConfigDict, *,
              workdir: str, seeds: Sequence[int], baselines: Sequence[str], parts: Parts,
              command: str, out: str = "") -> dict:
  """Runs (or resumes) every part of every seed, then writes the table; returns seeds.json."""
  import jax  # pylint: disable=g-import-not-at-top
  rows = rows_for(config.objective, baselines)
  columns = columns_for(eval_config)
  per_seed: dict = {row.name: {} for row in rows}
  walls: dict = {row.name: {} for row in rows}
  extra: dict = {row.name: {} for row in rows}
  in_process = None
  for seed in seeds:
    k, tau = int(config.knn_k), float(config.knn_temperature)
    for row in rows:
      if row.trained:
        trained = parts.train(row, seed)
        evaluated = parts.evaluate(row, seed, eval_config, trained["results"]["step"])
        if row.name == "instdisc":
          k, tau = knn_setting(trained["results"], config)
        per_seed[row.name][seed] = trained_values(trained["results"], evaluated["results"])
        walls[row.name][seed] = {"train": trained["wall_s"], "evaluate": evaluated["wall_s"]}
        extra[row.name][seed] = {key: trained["results"][key]
                                 for key in ("knn_choice", "validation", "test")
                                 if key in trained["results"]}
        continue
      record = parts.record(row.name, seed, "baseline")
      if record is None:
        in_process = in_process or Baselines(config, eval_config)
        log.info("seed %d: %s baseline (k=%d, tau=%g)", seed, row.name, k, tau)
        start = time.perf_counter()
        result = in_process.run(row.name, seed, k, tau)
        record = parts.write_record(row.name, seed, "baseline", {
            "results": result, "k": k, "tau": tau, "wall_s": time.perf_counter() - start})
      per_seed[row.name][seed] = baseline_values(row.name, record["results"])
      walls[row.name][seed] = {"baseline": record["wall_s"]}
      extra[row.name][seed] = {"knn_k": record["k"], "knn_tau": record["tau"]}
  table = aggregate(per_seed, [key for key, _ in columns])
  wall_by_row = {row: sum(sum(w.values()) for w in seeds_wall.values())
                 for row, seeds_wall in walls.items()}
  knn_text = (f"weighted vote of the k={config.knn_k} nearest training images, "
              f"tau={config.knn_temperature}")
  if any("knn_choice" in e for row_extra in extra.values() for e in row_extra.values()):
    knn_text = ("k and tau chosen on the validation split per run (seeds.json, knn_choice); the "
                "baselines of each seed use the instance discrimination run's choice")
  summary = {
      "command": command, "date": datetime.date.today().isoformat(),
      "devices": f"{jax.device_count()} {jax.devices()[0].platform.upper()} device(s)",
      "seeds": list(seeds), "columns": dict(columns),
      "rows": {row.name: {"title": row.title, "columns": table.get(row.name, {})}
               for row in rows},
      "per_seed": {row.name: {str(seed): {"top1": per_seed[row.name][seed],
                                          "wall_s": walls[row.name][seed],
                                          **extra[row.name].get(seed, {})}
                              for seed in seeds} for row in rows},
      "wall_s": wall_by_row,
      "config": config.to_dict(), "eval_config": eval_config.to_dict(),
  }
  if jax.process_index() == 0:
    write_outputs(workdir, out, rows, columns, table, summary, config, knn_text)
  return summary


def write_outputs(workdir: str, out: str, rows: Sequence[Row], columns, table: Mapping,
                  summary: Mapping, config: ml_collections.ConfigDict, knn_text: str) -> str:
  """seeds.md, seeds.png and seeds.json in `workdir`, and `out`.md / `out`.png if given."""
  from instdisc_jax import plots  # pylint: disable=g-import-not-at-top
  text = markdown(rows, columns, table, seeds=summary["seeds"], command=summary["command"],
                  date=summary["date"], devices=summary["devices"], config=config,
                  knn_setting=knn_text, wall_s=summary["wall_s"])
  means = np.array([[table.get(row.name, {}).get(key, {}).get("mean", math.nan)
                     for key, _ in columns] for row in rows])
  stds = np.array([[table.get(row.name, {}).get(key, {}).get("std", math.nan)
                    for key, _ in columns] for row in rows])
  title = f"{config.dataset}: top-1 over {len(summary['seeds'])} seed(s)"
  for prefix in [os.path.join(workdir, "seeds")] + ([out] if out else []):
    with open(prefix + ".md", "w") as f:
      f.write(text)
    plots.seeds_bars(prefix + ".png", [row.title for row in rows],
                     [title for _, title in columns], means, stds, title)
  with open(os.path.join(workdir, "seeds.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return text


def config_overrides(argv: Sequence[str]) -> list[str]:
  """The `--config.<field>=<value>` arguments of the command line, as typed (for the children)."""
  return [arg for arg in argv if arg.startswith("--config.")]


def main(argv):
  del argv  # cli.run refuses positional arguments.
  with cli.user_errors_exit():
    cli.require(FLAGS.workdir, "--workdir", "give a directory for the runs and the table")
    config = FLAGS.config
    baselines = [name for name in FLAGS.baselines if name]
    check_inputs(config, FLAGS.eval, FLAGS.seeds, baselines, FLAGS.out)
    cli.split_cpu_into_devices((config.batch_size, config.eval_batch_size), FLAGS.host_devices)
    cli.initialize_runtime()
    os.makedirs(FLAGS.workdir, exist_ok=True)
    parts = Parts(FLAGS.workdir, config_flags.get_config_filename(FLAGS["config"]),
                  config_overrides(sys.argv[1:]), FLAGS.host_devices)
    command = "python -m instdisc_jax.experiments.seeds " + shlex.join(sys.argv[1:])
    seeds = [config.seed + i for i in range(FLAGS.seeds)]
    run_seeds(config, FLAGS.eval, workdir=FLAGS.workdir, seeds=seeds, baselines=baselines,
              parts=parts, command=command, out=FLAGS.out)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    with open(os.path.join(FLAGS.workdir, "seeds.md")) as f:
      print(f.read(), end="", flush=True)


def _exit_with_child_status(main_fn):
  """`main`, with a failed child's exit status (1, 2 or 75) passed on, its line on stderr."""
  def wrapped(argv):
    try:
      return main_fn(argv)
    except ChildFailed as e:
      print(f"error: {one_line(str(e))}", file=sys.stderr, flush=True)
      sys.exit(e.status)
  return wrapped


def define_flags(argv: list[str]) -> None:
  """The program's flags; defined only when it runs, so that importing the module (tests, other
  programs) defines none."""
  from instdisc_jax import flag_errors  # pylint: disable=g-import-not-at-top
  from instdisc_jax.evaluation import config as eval_config_lib  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Directory holding the runs, records, logs and the "
                      "table (seeds.md, seeds.png, seeds.json).")
  flags.DEFINE_integer("seeds", 3, "Seeds per row: the config's seed, plus 1, 2, ...")
  flags.DEFINE_list("baselines", list(BASELINES),
                    f"Rows besides instance discrimination, a subset of {','.join(BASELINES)}.")
  flags.DEFINE_string("out", "", "Also write the table to <out>.md and the chart to <out>.png "
                      "(e.g. docs/fashion_mnist_seeds).")
  config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG,
                                  "Training config of every run (--config.<field>=<value>).",
                                  lock_config=True)
  defaults = eval_config_lib.get_config()
  for field in EVAL_OFF:
    defaults.eval[field] = False
  flag_errors.check_overrides(argv, "eval", defaults.eval)
  config_flags.DEFINE_config_dict("eval", defaults.eval,
                                  "Evaluator fields (--eval.<field>=<value>), see "
                                  "instdisc_jax/evaluation/config.py.", lock_config=True,
                                  sys_argv=argv)
  cli.define_runtime_flags()


if __name__ == "__main__":
  sys.exit(cli.run(_exit_with_child_status(main), define_flags=define_flags))
