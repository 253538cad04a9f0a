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

import dataclasses
import datetime
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import time
from typing import Mapping, Optional, Sequence

from absl import flags
import ml_collections
from ml_collections import config_flags
import numpy as np

from instdisc_jax import cli
from instdisc_jax.errors import UserError
from instdisc_jax.errors import one_line

log = logging.getLogger(__name__)

FLAGS = flags.FLAGS
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_DEFAULT_CONFIG = os.path.join(_REPO, "configs", "fashion_mnist.py")

BASELINES = ("raw_pixels", "random_init", "supervised")
RECORDS_DIR = "records"
LOGS_DIR = "logs"
# The evaluator's outputs the table does not use: off unless --eval.<field> turns them on.
EVAL_OFF = ("knn", "export", "retrieval_grid", "curves")
# Exit statuses of a child that end this program with the same status (see main.py).
CHILD_STATUSES = {1: "diverged", 2: "refused", 75: "stopped"}


@dataclasses.dataclass(frozen=True)
class Row:
  """One method of the table: a key for directories and records, and its title."""

  name: str
  title: str
  trained: bool          # trained and evaluated by subprocesses, else computed here


def rows_for(objective: str, baselines: Sequence[str]) -> list[Row]:
  """The table's rows, in the table's order: the run's objective, then the baselines asked."""
  rows = [Row("instdisc", f"instance discrimination ({objective})", True)]
  for row in (Row("supervised", "supervised (same encoder, labels)", True),
              Row("random_init", "random init (untrained encoder)", False),
              Row("raw_pixels", "raw pixels", False)):
    if row.name in baselines:
      rows.append(row)
  return rows


def columns_for(eval_config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
  """(key, title) of the table's columns: both kNN, each probed feature kind, each fraction."""
  columns = [("knn_bank", "kNN bank"), ("knn_recomputed", "kNN recomputed")]
  if eval_config.linear_probe:
    columns += [(f"probe_{kind}", f"linear probe {kind}") for kind in eval_config.probe_features]
  columns += [(f"finetune_{fraction_key(f)}", f"fine-tune {fraction_key(f)}")
              for f in eval_config.semi_supervised_fractions]
  return columns


def fraction_key(fraction: float) -> str:
  """The evaluator's key of a labelled fraction, e.g. 0.01 -> "1%"."""
  return f"{100 * fraction:g}%"


# ------------------------------------------------------------------------------------------------
# Numbers of one seed, and their summary over seeds.
# ------------------------------------------------------------------------------------------------


def trained_values(results: Mapping, eval_results: Mapping) -> dict[str, float]:
  """Top-1 (%) per column of a trained row, from its results.json and eval_results.json."""
  values = {}
  for name in ("knn_bank", "knn_recomputed"):
    if name in results:
      values[name] = float(results[name]["top1"])
  for kind, result in eval_results.get("linear_probe", {}).items():
    values[f"probe_{kind}"] = float(result["top1"])
  for fraction, result in eval_results.get("semi_supervised", {}).items():
    values[f"finetune_{fraction}"] = float(result["top1"])
  return values


def baseline_values(name: str, result: Mapping) -> dict[str, float]:
  """Top-1 (%) per column of a baseline. Baselines have no memory bank: their kNN (on the pixels
  or on the untrained network's eval-transform features) is the "recomputed" column, and the
  raw-pixel logistic regression is the "pooled" probe column (the pixels are its features)."""
  values = {"knn_recomputed": float(result["knn"]["top1"])}
  probe = result.get("linear_probe")
  if probe is None:
    return values
  if name == "raw_pixels":
    values["probe_pooled"] = float(probe["top1"])
  else:
    values.update({f"probe_{kind}": float(r["top1"]) for kind, r in probe.items()})
  return values


def summarize(values: Sequence[float]) -> dict:
  """{"mean", "std", "n", "values"}: std is the sample standard deviation (ddof = 1) over
  seeds, 0 for a single seed."""
  values = [float(v) for v in values]
  std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return {"mean": float(np.mean(values)), "std": std, "n": len(values), "values": values}


def aggregate(per_seed: Mapping[str, Mapping[int, Mapping[str, float]]],
              columns: Sequence[str]) -> dict[str, dict[str, dict]]:
  """{row: {column: summary}} over the seeds that have the column; rows and columns without
  any value are left out (printed "-")."""
  table = {}
  for row, seeds in per_seed.items():
    table[row] = {}
    for column in columns:
      values = [values[column] for values in seeds.values() if column in values]
      if values:
        table[row][column] = summarize(values)
  return table


def cell(summary: Optional[Mapping]) -> str:
  """"87.48 ± 0.21" (mean ± std over seeds), the mean alone for one seed, "-" for none."""
  if summary is None:
    return "-"
  if summary["n"] == 1:
    return f"{summary['mean']:.2f}"
  return f"{summary['mean']:.2f} ± {summary['std']:.2f}"


def _length(config: ml_collections.ConfigDict) -> str:
  if config.num_train_steps > 0:
    return f"{config.num_train_steps} steps"
  return f"{config.num_epochs} epoch{'s' if config.num_epochs != 1 else ''}"


def duration(seconds: float) -> str:
  minutes, seconds = divmod(int(round(seconds)), 60)
  return f"{minutes} min {seconds:02d} s"


def markdown(rows: Sequence[Row], columns: Sequence[tuple[str, str]], table: Mapping, *,
             seeds: Sequence[int], command: str, date: str, devices: str,
             config: ml_collections.ConfigDict, knn_setting: str, wall_s: Mapping[str, float]
             ) -> str:
  """The table as markdown: the command and setting, one line per row, what each column is."""
  lines = [
      f"# {config.dataset}: instance discrimination and baselines over {len(seeds)} seed(s)",
      "",
      f"Command (run {date} on {devices}):",
      "",
      "```",
      command,
      "```",
      "",
      f"Top-1 on the test split (%), mean ± standard deviation (ddof = 1) over seeds "
      f"{', '.join(str(s) for s in seeds)}. The trained rows train {config.model} for "
      f"{_length(config)} from the same "
      "config; the supervised row changes only the objective (cross-entropy of a linear "
      f"classifier on the embedding). kNN: {knn_setting}. Baselines have no memory bank: their "
      "kNN is in the 'recomputed' column; the raw-pixel row's logistic regression on "
      "standardised pixels is in the 'pooled' probe column. '-': not applicable.",
      "",
      "| method | " + " | ".join(title for _, title in columns) + " | wall time |",
      "| --- | " + " | ".join("---:" for _ in columns) + " | ---: |",
  ]
  for row in rows:
    values = table.get(row.name, {})
    lines.append(f"| {row.title} | " + " | ".join(cell(values.get(key)) for key, _ in columns)
                 + f" | {duration(wall_s.get(row.name, 0.0))} |")
  lines += ["", "Wall time: all seeds of the row, summed over the parts run by the calls that "
            "finished them (training, evaluation, baselines)."]
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Running the parts.
# ------------------------------------------------------------------------------------------------


def format_override(value) -> str:
  """A config value as a command-line override understands it."""
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, (tuple, list)):
    items = ",".join(repr(v) if isinstance(v, str) else format_override(v) for v in value)
    return f"({items},)" if len(value) == 1 else f"({items})"
  return str(value)


def evaluator_flags(eval_config: ml_collections.ConfigDict, seed: int) -> list[str]:
  """`--config.eval.<field>=<value>` for every field that differs from the evaluator's
  default, and its seed."""
  from instdisc_jax.evaluation import config as eval_config_lib  # pylint: disable=g-import-not-at-top
  defaults = eval_config_lib.get_config().eval
  fields = {name: value for name, value in eval_config.items() if value != defaults[name]}
  fields["seed"] = seed
  return [f"--config.eval.{name}={format_override(value)}" for name, value in fields.items()]


class Parts:
  """Runs the parts of the seeds and keeps a record of each finished one."""

  def __init__(self, workdir: str, config_file: str, overrides: Sequence[str],
               host_devices: int, env: Optional[Mapping[str, str]] = None):
    self.workdir = workdir
    self.config_file = config_file
    self.overrides = list(overrides)
    self.host_devices = host_devices
    self.env = dict(os.environ if env is None else env)

  def record_path(self, row: str, seed: int, part: str) -> str:
    return os.path.join(self.workdir, RECORDS_DIR, f"{row}_seed{seed}_{part}.json")

  def record(self, row: str, seed: int, part: str) -> Optional[dict]:
    """The record of a finished part, else None."""
    path = self.record_path(row, seed, part)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  def write_record(self, row: str, seed: int, part: str, record: dict) -> dict:
    path = self.record_path(row, seed, part)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    record = dict(record, finished=datetime.datetime.now().isoformat(timespec="seconds"))
    with open(path + ".tmp", "w") as f:
      json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)          # a record is whole or absent
    return record

  def run_workdir(self, row: str, seed: int) -> str:
    return os.path.join(self.workdir, row, f"seed_{seed}")

  def _child(self, module: str, args: Sequence[str], row: str, seed: int, part: str) -> float:
    """Runs `python -m module args`, its output to DIR/logs; returns its wall time."""
    command = [sys.executable, "-m", module, *args]
    if self.host_devices:
      command.append(f"--host_devices={self.host_devices}")
    log_path = os.path.join(self.workdir, LOGS_DIR, f"{row}_seed{seed}_{part}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "a") as out:
      out.write(f"$ {shlex.join(command)}\n")
      out.flush()
      status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                              check=False).returncode
    wall = time.perf_counter() - start
    if status != 0:
      with open(log_path) as f:
        lines = [line.strip() for line in f if line.strip()]
      last = lines[-1] if lines else "(no output)"
      message = (f"{part} of {row} seed {seed} {CHILD_STATUSES.get(status, 'failed')} "
                 f"(exit {status}, log {log_path}): {last}")
      raise ChildFailed(message, status if status in CHILD_STATUSES else 1)
    return wall

  def train(self, row: Row, seed: int) -> dict:
    """Trains the row's run of `seed` unless finished; returns its record (results, wall_s)."""
    done = self.record(row.name, seed, "train")
    workdir = self.run_workdir(row.name, seed)
    if done is not None and os.path.exists(os.path.join(workdir, "results.json")):
      return done
    args = [f"--config={self.config_file}", f"--workdir={workdir}", *self.overrides,
            f"--config.seed={seed}"]
    if row.name == "supervised":
      args.append("--config.objective=supervised")
    log.info("seed %d: training %s in %s", seed, row.name, workdir)
    wall = self._child("instdisc_jax.main", args, row.name, seed, "train")
    with open(os.path.join(workdir, "results.json")) as f:
      results = json.load(f)
    return self.write_record(row.name, seed, "train", {"results": results, "wall_s": wall})

  def evaluate(self, row: Row, seed: int, eval_config: ml_collections.ConfigDict,
               step: int) -> dict:
    """Evaluates the row's run of `seed` unless its checkpoint of `step` (the run's last) was
    evaluated already; returns the record (results, wall_s)."""
    done = self.record(row.name, seed, "evaluate")
    if done is not None and done["results"].get("step") == step:
      return done
    if not (eval_config.linear_probe or eval_config.semi_supervised_fractions):
      return {"results": {}, "wall_s": 0.0}            # nothing the table reads: no evaluator
    workdir = self.run_workdir(row.name, seed)
    log.info("seed %d: evaluating %s", seed, row.name)
    wall = self._child("instdisc_jax.evaluate",
                       [f"--workdir={workdir}", *evaluator_flags(eval_config, seed)],
                       row.name, seed, "evaluate")
    with open(os.path.join(workdir, "eval_results.json")) as f:
      results = json.load(f)
    return self.write_record(row.name, seed, "evaluate", {"results": results, "wall_s": wall})


class ChildFailed(Exception):
  """A child process failed; `status` is the exit status to end with (its line is printed)."""

  def __init__(self, message: str, status: int):
    super().__init__(message)
    self.status = status


def knn_setting(results: Mapping, config: ml_collections.ConfigDict) -> tuple[int, float]:
  """(k, tau) of a run: the one chosen on validation if its results.json says, else the
  config's."""
  choice = results.get("knn_choice")
  if isinstance(choice, Mapping):
    k = choice.get("k")
    tau = choice.get("tau", choice.get("temperature"))
    if k is not None and tau is not None:
      return int(k), float(tau)
  return int(config.knn_k), float(config.knn_temperature)


class Baselines:
  """The in-process baselines (raw pixels, random init) of a config, data loaded once."""

  def __init__(self, config: ml_collections.ConfigDict, eval_config: ml_collections.ConfigDict):
    from instdisc_jax import train  # pylint: disable=g-import-not-at-top
    from instdisc_jax.evaluation import features as features_lib  # pylint: disable=g-import-not-at-top
    self.config = config
    self.eval_config = eval_config
    # Builds the run (data, model, layout, init) as training does; writes nothing.
    self.trainer = train.Trainer(config, workdir="")
    size = config.image_size
    self.splits = {}
    for role, split in (("train", self.trainer.train_split), ("test", self.trainer.eval_split)):
      indices = np.arange(split.num_examples)
      labels = np.full(len(indices), -1, np.int32) if split.labels is None else split.labels
      self.splits[role] = (features_lib.load_images(split, indices, size),
                           np.asarray(labels, np.int32))

  def probe_config(self, seed: int):
    from instdisc_jax.evaluation import linear_probe  # pylint: disable=g-import-not-at-top
    e = self.eval_config
    if not e.linear_probe:
      return None
    return linear_probe.ProbeConfig(epochs=e.probe_epochs, batch_size=e.probe_batch_size,
                                    learning_rate=e.probe_learning_rate,
                                    weight_decay=e.probe_weight_decay, seed=seed)

  def run(self, name: str, seed: int, k: int, temperature: float) -> dict:
    """The baseline `name` ("raw_pixels" or "random_init") of `seed`, with kNN (k, tau)."""
    import jax  # pylint: disable=g-import-not-at-top

    from instdisc_jax import parallel  # pylint: disable=g-import-not-at-top
    from instdisc_jax.evaluation import baselines  # pylint: disable=g-import-not-at-top
    data = (*self.splits["train"], *self.splits["test"])
    num_classes = self.trainer.num_classes
    if name == "raw_pixels":
      return baselines.raw_pixels(*data, num_classes=num_classes, k=k, temperature=temperature,
                                  probe_config=self.probe_config(seed))
    # The run's initial state for this seed: what training starts from, never trained.
    state = self.trainer.p_init(parallel.replicate(jax.random.key_data(jax.random.key(seed))))
    embed_fn = baselines.state_embed_fn(state, model=self.trainer.model, hp=self.trainer.hp)
    evaluator = baselines.FeatureBaseline(
        embed_fn, num_classes=num_classes, k=k, temperature=temperature,
        probe_config=self.probe_config(seed), probe_kinds=self.eval_config.probe_features,
        batch_size=self.config.eval_batch_size)
    return evaluator.run(*data)


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
