r"""Table 1 of the paper: the training objectives compared with everything else identical.

  python -m instdisc_jax.experiments.table1 --dataset=fashion_mnist --epochs=2 \
      --workdir=/tmp/table1 [--rows=softmax,nce_4096] [--seeds=3] \
      [--config=configs/fashion_mnist.py] [--config.batch_size=256 ...]

Rows: the parametric softmax (Eq. 1), the full non-parametric softmax (Eq. 2) and NCE (Eqs.
4-7) with m in {1, 10, 512, 4096} noise samples; NCE rows with m >= n (the number of training
images) cannot run and are listed as not run. Each row trains `train.train_and_evaluate` in
this process, from the same base config (`--config` and its `--config.*` overrides, then
`--dataset` and `--epochs`) with only `objective` and `num_negatives` changed, in its own
sub-workdir `<workdir>/<row>`. With `--seeds=N` (N > 1) each row trains N times, with the
config's seed plus 0, ..., N - 1, in `<workdir>/<row>/seed_<s>`, and the table shows the mean
+- standard deviation over seeds (the chart has std error bars). The run is resumable: rows whose `results.json` exists are
skipped, an interrupted row resumes from its checkpoint. At the end `<workdir>/table1.md`
(the exact command, date, epochs, wall time and kNN top-1 per row) and `<workdir>/table1.png`
(a bar chart) are written. docs/table1.md is such a table, with the command that made it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import shlex
import sys
import time
from typing import Optional, Sequence

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from instdisc_jax import cli
from instdisc_jax.errors import UserError
from instdisc_jax.experiments import seeds_table

log = logging.getLogger(__name__)

FLAGS = flags.FLAGS
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "fashion_mnist.py")


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of the table: a name for flags and sub-workdirs, and what it trains."""

  name: str
  title: str
  objective: str
  num_negatives: Optional[int] = None


ROWS = (
    Row("parametric_softmax", "parametric softmax", "parametric_softmax"),
    Row("softmax", "non-parametric softmax", "softmax"),
    Row("nce_1", "NCE m=1", "nce", 1),
    Row("nce_10", "NCE m=10", "nce", 10),
    Row("nce_512", "NCE m=512", "nce", 512),
    Row("nce_4096", "NCE m=4096", "nce", 4096),
)
ROW_RECORD = "table1_row.json"


def select_rows(names: Sequence[str]) -> list[Row]:
  """The rows named, in table order; UserError for an unknown name."""
  known = {row.name: row for row in ROWS}
  unknown = [name for name in names if name not in known]
  if unknown:
    raise UserError(f"--rows: unknown row {', '.join(unknown)}; choose from "
                    f"{', '.join(known)}")
  return [row for row in ROWS if row.name in names]


def base_config(config: ml_collections.ConfigDict, dataset: str,
                epochs: int) -> ml_collections.ConfigDict:
  """The config every row shares: `config` with the --dataset and --epochs flags applied."""
  config = ml_collections.ConfigDict(config.to_dict())
  if dataset:
    config.dataset = dataset
  if epochs:
    config.num_epochs = epochs
  return config


def row_config(base: ml_collections.ConfigDict, row: Row) -> ml_collections.ConfigDict:
  """`base` with the row's objective (and m for NCE); nothing else differs between rows."""
  config = ml_collections.ConfigDict(base.to_dict())
  config.objective = row.objective
  if row.num_negatives is not None:
    config.num_negatives = row.num_negatives
  return config


def fits(row: Row, num_instances: int) -> bool:
  """Whether the row can run on n instances (NCE needs m < n)."""
  return row.num_negatives is None or row.num_negatives < num_instances


def run_row(row: Row, config: ml_collections.ConfigDict, workdir: str, stop) -> dict:
  """Trains one row in `workdir` unless it already finished; returns its record.

  The record (also `<workdir>/table1_row.json`) holds the results, the wall time of the call
  that finished the row (training from where it resumed, plus evaluation) and that step.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from instdisc_jax import train  # pylint: disable=g-import-not-at-top
  record_path = os.path.join(workdir, ROW_RECORD)
  if os.path.exists(os.path.join(workdir, "results.json")) and os.path.exists(record_path):
    log.info("row %s already finished in %s; skipped", row.name, workdir)
    with open(record_path) as f:
      return json.load(f)
  start = time.perf_counter()
  results = train.train_and_evaluate(config, workdir, stop=stop)
  record = {"row": row.name, "results": results, "wall_s": time.perf_counter() - start,
            "finished": datetime.datetime.now().isoformat(timespec="seconds")}
  if jax.process_index() == 0:
    with open(record_path, "w") as f:
      json.dump(record, f, indent=2)
  return record


def _records(value) -> list[dict]:
  """A row's records: one per seed (a single record is one seed)."""
  return [value] if isinstance(value, dict) else list(value)


def _summary(value, name: str) -> Optional[dict]:
  """Mean and std over seeds (`seeds_table.summarize`) of the row's kNN top-1 on `name`
  ("knn_bank", "knn_recomputed"); None if no seed has it."""
  values = [float(r["results"][name]["top1"]) for r in _records(value) if name in r["results"]]
  return seeds_table.summarize(values) if values else None


def _top1(value, name: str) -> float:
  """Mean kNN top-1 over the row's seeds on `name`; NaN if none."""
  summary = _summary(value, name)
  return math.nan if summary is None else summary["mean"]


def _std(value, name: str) -> float:
  summary = _summary(value, name)
  return math.nan if summary is None else summary["std"]


def _duration(seconds: float) -> str:
  minutes, seconds = divmod(int(round(seconds)), 60)
  return f"{minutes} min {seconds:02d} s"


def _length(config: ml_collections.ConfigDict, steps: int) -> str:
  """How long each row trains: epochs (and steps), or steps when they are set directly."""
  if config.num_train_steps > 0:
    return f"{steps} steps"
  return f"{config.num_epochs} epochs ({steps} steps)"


def markdown(rows: Sequence[Row], records: dict, *, command: str, config: ml_collections.ConfigDict,
             num_instances: int, steps: int, date: str, devices: str) -> str:
  """The table as markdown: a header naming the setting, one line per row, skipped rows listed."""
  lines = [
      *seeds_table.command_header(
          f"Table 1 on {config.dataset}: kNN top-1 of each training objective", command, date,
          devices),
      f"Every row trains {config.model} for {_length(config, steps)} of batch "
      f"{config.batch_size} on n={num_instances} training images from the same config; only "
      "the objective and m differ. kNN: weighted vote of the "
      f"k={config.knn_k} nearest training images, tau={config.knn_temperature}, on the test "
      "split, with the training features taken from the memory bank or recomputed with the "
      "final network under the eval transform. Wall time: training, plus the final evaluation, "
      "of the call that finished the row (summed over seeds). With several seeds a cell is the "
      "mean ± standard deviation (ddof = 1) over them.",
      "",
      "| objective | m | kNN top-1, bank (%) | kNN top-1, recomputed (%) | wall time |",
      "| --- | ---: | ---: | ---: | ---: |",
  ]
  skipped = []
  for row in rows:
    record = records.get(row.name)
    if record is None:
      skipped.append(row)
      continue
    m = "-" if row.num_negatives is None else str(row.num_negatives)
    wall = sum(r["wall_s"] for r in _records(record))
    lines.append(f"| {row.title} | {m} | {seeds_table.cell(_summary(record, 'knn_bank'))} | "
                 f"{seeds_table.cell(_summary(record, 'knn_recomputed'))} | {_duration(wall)} |")
  if skipped:
    lines += ["", "Not run: " + ", ".join(
        f"{row.title} (m={row.num_negatives} is not below n={num_instances})" for row in skipped)
        + "."]
  return "\n".join(lines) + "\n"


def write_outputs(workdir: str, rows: Sequence[Row], records: dict, **context) -> str:
  """Writes table1.md and table1.png into `workdir`; returns the markdown."""
  from instdisc_jax import plots  # pylint: disable=g-import-not-at-top
  text = markdown(rows, records, **context)
  with open(os.path.join(workdir, "table1.md"), "w") as f:
    f.write(text)
  shown = [row for row in rows if row.name in records]
  config = context["config"]
  # Error bars (std over seeds) only when some row has several seeds.
  stds = {}
  if any(len(_records(records[row.name])) > 1 for row in shown):
    stds = {"bank_std": [_std(records[row.name], "knn_bank") for row in shown],
            "recomputed_std": [_std(records[row.name], "knn_recomputed") for row in shown]}
  plots.table1_bars(
      os.path.join(workdir, "table1.png"), [row.title for row in shown],
      [_top1(records[row.name], "knn_bank") for row in shown],
      [_top1(records[row.name], "knn_recomputed") for row in shown],
      f"kNN top-1 on {config.dataset}, {_length(config, context['steps'])} per row",
      **stds)
  return text


def run_table(config: ml_collections.ConfigDict, workdir: str, rows: Sequence[Row], *,
              command: str, stop=None, seeds: int = 1) -> str:
  """Runs (or resumes) every row that fits n, `seeds` times each, then writes the outputs;
  returns the markdown."""
  import jax  # pylint: disable=g-import-not-at-top

  from instdisc_jax import config_validation  # pylint: disable=g-import-not-at-top
  from instdisc_jax import data  # pylint: disable=g-import-not-at-top
  config_validation.validate(config, num_devices=jax.device_count(),
                             num_processes=jax.process_count())
  os.makedirs(workdir, exist_ok=True)
  train_split, _ = data.load_splits(config)
  n = train_split.num_examples
  steps = (config.num_train_steps if config.num_train_steps > 0
           else config.num_epochs * (n // config.batch_size))
  records = {}
  for row in rows:
    if not fits(row, n):
      log.warning("row %s skipped: m=%d is not below n=%d", row.name, row.num_negatives, n)
      continue
    log.info("Table 1 row %s (%s)", row.name, row.title)
    if seeds == 1:
      records[row.name] = run_row(row, row_config(config, row), os.path.join(workdir, row.name),
                                  stop)
      continue
    records[row.name] = []
    for seed in range(config.seed, config.seed + seeds):
      seeded = row_config(config, row)
      seeded.seed = seed
      records[row.name].append(run_row(row, seeded, os.path.join(workdir, row.name,
                                                                 f"seed_{seed}"), stop))
  if jax.process_index() != 0:
    return ""
  devices = f"{jax.device_count()} {jax.devices()[0].platform.upper()} device(s)"
  return write_outputs(workdir, rows, records, command=command, config=config, num_instances=n,
                       steps=steps, devices=devices,
                       date=datetime.date.today().isoformat())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  with cli.user_errors_exit():
    cli.require(FLAGS.workdir, "--workdir", "give a directory for the rows and the table")
    rows = select_rows(FLAGS.rows)
    if FLAGS.seeds < 1:
      raise UserError(f"--seeds={FLAGS.seeds}: give at least 1")
    config = base_config(FLAGS.config, FLAGS.dataset, FLAGS.epochs)
    cli.split_cpu_into_devices((config.batch_size, config.eval_batch_size), FLAGS.host_devices)
    cli.initialize_runtime()
    command = "python -m instdisc_jax.experiments.table1 " + " ".join(
        shlex.quote(arg) for arg in sys.argv[1:])
    with cli.stop_signal() as stop:
      text = run_table(config, FLAGS.workdir, rows, command=command, stop=stop,
                       seeds=FLAGS.seeds)
    if text:
      print(text, end="", flush=True)


def define_flags() -> None:
  """The program's flags; defined only when it runs, so that importing the module (tests, other
  programs) defines none."""
  flags.DEFINE_string("workdir", None, "Directory holding one sub-workdir per row, table1.md "
                      "and table1.png.")
  flags.DEFINE_string("dataset", "", "Dataset spec (e.g. fashion_mnist or npz:/path.npz); "
                      "empty: the config's.")
  flags.DEFINE_integer("epochs", 0, "Training epochs of every row; 0: the config's.")
  flags.DEFINE_integer("seeds", 1, "Runs per row (seeds: the config's, plus 1, 2, ...); the "
                       "table shows mean +- std over them.")
  flags.DEFINE_list("rows", [r.name for r in ROWS],
                    f"Rows to run, a subset of {','.join(r.name for r in ROWS)}.")
  config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG,
                                  "Base training config of every row.", lock_config=True)
  cli.define_runtime_flags()


if __name__ == "__main__":
  define_flags()
  sys.exit(cli.run(main))
