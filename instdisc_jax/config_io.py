"""A run's config on disk and its identity: `config.json` in the workdir, and `run_meta`.

`save_config` writes the config a run trains with; `load_config` reads it back for the
evaluator and the other programs that open a finished run. `run_meta` is what a checkpoint's
shapes and meaning depend on (the schema's `identity` fields, `config_schema`); a resume
compares it with `incompatible_fields`.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from instdisc_jax import config_validation
from instdisc_jax import default_config
from instdisc_jax.config_fields import get_field
from instdisc_jax.config_schema import IDENTITY_FIELDS
from instdisc_jax.errors import UserError
from instdisc_jax.errors import one_line
from instdisc_jax.sharding import ShardLayout

CONFIG_NAME = "config.json"
RESULTS_NAME = "results.json"           # The final kNN accuracies (`train.Trainer.final_evaluation`).


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the run's config to `<workdir>/config.json` (process 0), for the evaluator."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, CONFIG_NAME), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (the schema's defaults for fields it lacks)."""
  path = os.path.join(workdir, CONFIG_NAME)
  if not os.path.exists(path):
    raise UserError(f"{path} not found: --workdir must be a directory written by "
                    "instdisc_jax.main")
  try:
    with open(path) as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError(f"a JSON {type(saved).__name__}, not an object")
    config = default_config.get_config()
    config.update_from_flattened_dict(_flatten(saved))
    # Fields it does not know, or values no run could have trained with, are damage too.
    config_validation.validate(config)
  except (OSError, ValueError, KeyError, TypeError, AttributeError, UserError) as e:
    reason = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {one_line(e)}"
    raise UserError(
        f"{path} is damaged ({reason}); rerun training with the run's command line, which "
        "writes it again, or restore it from a copy") from e
  return config


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
  return flat


def run_meta(config: ml_collections.ConfigDict, layout: ShardLayout, dataset_fingerprint: str):
  """What a checkpoint's shapes and meaning depend on (compared on resume): the layout, the
  fields the schema tags `identity` and the data's fingerprint."""
  return {
      "num_instances": layout.num_instances, "num_devices": layout.num_shards,
      **{name: get_field(config, name) for name in IDENTITY_FIELDS},
      "dataset_fingerprint": dataset_fingerprint,
  }


def incompatible_fields(saved: dict, current: dict) -> list[str]:
  """Fields of `run_meta` that differ, as 'name (saved X, now Y)' strings."""
  return [f"{k} (saved {saved.get(k)!r}, now {current[k]!r})"
          for k in current if saved.get(k) != current[k]]
