"""The seeds table: what each row and column is, the numbers of one seed, their mean +- std over
seeds, and the markdown (`experiments.seeds` runs the parts and writes it)."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import ml_collections
import numpy as np


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
      *command_header(
          f"{config.dataset}: instance discrimination and baselines over {len(seeds)} seed(s)",
          command, date, devices),
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


def command_header(title: str, command: str, date: str, devices: str) -> list[str]:
  """A results page's first lines: its title, then the command that made it, when and where."""
  return [f"# {title}", "", f"Command (run {date} on {devices}):", "", "```", command, "```", ""]
