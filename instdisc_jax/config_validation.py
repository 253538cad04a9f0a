"""Checks every config field before anything is compiled or written.

Each problem becomes a `ConfigError` with one line naming the field, the value and the fix. The
schema is `default_config.get_config()`: a key it does not define is rejected with the closest
valid name. `FIELDS` gives the rule of every field of the schema (a test keeps the two in step);
the rules are small value objects, so tests can also derive valid and invalid values from them.
Checks that need the dataset (m < n, k <= n, B <= n) are in `validate_against_data`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from typing import Any, Optional, Sequence

import ml_collections

from instdisc_jax import default_config
from instdisc_jax import models
from instdisc_jax import objectives
from instdisc_jax.errors import ConfigError

TFDS_DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "stl10", "imagenet2012")
DATASET_PREFIXES = ("folder:", "npz:")
DTYPES = ("float32", "bfloat16")


def fail(field: str, value: Any, fix: str) -> None:
  """Raises the one-line ConfigError for `config.<field>=<value>`."""
  raise ConfigError(f"config.{field}={value!r}: {fix}")


def suggest(name: Any, choices: Sequence[str]) -> str:
  """'; did you mean 'x'?' for the closest of `choices` (ignoring case), or ''."""
  lowered = {str(choice).lower(): choice for choice in choices}
  close = difflib.get_close_matches(str(name).lower(), list(lowered), n=1, cutoff=0.6)
  return f"; did you mean {lowered[close[0]]!r}?" if close else ""


def unknown_field_hint(name: str, valid: Sequence[str], group: str) -> str:
  """'; did you mean 'x'?' for a close valid name, else the list of the valid names."""
  return suggest(name, sorted(valid)) or f" (the fields of {group}: {', '.join(sorted(valid))})"


def check_keys(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict,
               prefix: str = "") -> None:
  """Rejects keys the schema does not define (recursively), with a did-you-mean."""
  for key in config.keys():
    if key not in schema:
      hint = unknown_field_hint(key, schema.keys(), f"config{'.' if prefix else ''}{prefix[:-1]}")
      raise ConfigError(f"config.{prefix}{key} is not a config field{hint}")
    if isinstance(schema[key], ml_collections.ConfigDict):
      if not isinstance(config[key], ml_collections.ConfigDict):
        fail(prefix + key, config[key], "must be a group of fields like the default config's")
      check_keys(config[key], schema[key], prefix=f"{prefix}{key}.")
  for key in schema.keys():
    if key not in config:
      raise ConfigError(f"config.{prefix}{key} is missing: start config files from "
                        "instdisc_jax.default_config.get_config()")


# -- field rules ---------------------------------------------------------------------------------


def is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


@dataclasses.dataclass(frozen=True)
class Integer:
  """An integer in [low, high] (either bound optional)."""

  low: Optional[int] = None
  high: Optional[int] = None

  def __call__(self, field: str, value) -> None:
    if not is_int(value):
      fail(field, value, "must be an integer")
    if self.low is not None and value < self.low:
      fail(field, value, f"must be >= {self.low}")
    if self.high is not None and value > self.high:
      fail(field, value, f"must be <= {self.high}")


@dataclasses.dataclass(frozen=True)
class Number:
  """A finite number between low and high; `*_open` excludes the bound itself."""

  low: Optional[float] = None
  high: Optional[float] = None
  low_open: bool = False
  high_open: bool = False

  def __call__(self, field: str, value) -> None:
    if not is_number(value):
      fail(field, value, "must be a finite number")
    if self.low is not None and (value <= self.low if self.low_open else value < self.low):
      fail(field, value, f"must be {'>' if self.low_open else '>='} {self.low}")
    if self.high is not None and (value >= self.high if self.high_open else value > self.high):
      fail(field, value, f"must be {'<' if self.high_open else '<='} {self.high}")


@dataclasses.dataclass(frozen=True)
class Choice:
  """One of a fixed set of strings."""

  choices: tuple[str, ...]

  def __call__(self, field: str, value) -> None:
    if not isinstance(value, str) or value not in self.choices:
      fail(field, value, f"must be one of {', '.join(self.choices)}"
           f"{suggest(value, self.choices)}")


@dataclasses.dataclass(frozen=True)
class Boolean:
  """True or False (not 0/1 or a string)."""

  def __call__(self, field: str, value) -> None:
    if not isinstance(value, bool):
      fail(field, value, "must be True or False")


@dataclasses.dataclass(frozen=True)
class Text:
  """A string; `nonempty` also rules out ''."""

  nonempty: bool = False

  def __call__(self, field: str, value) -> None:
    if not isinstance(value, str):
      fail(field, value, "must be a string")
    if self.nonempty and not value:
      fail(field, value, "must not be empty")


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A tfds name of `TFDS_DATASETS`, folder:/path or npz:/path; `optional` also allows ''."""

  optional: bool = False

  def __call__(self, field: str, value) -> None:
    if self.optional and value == "":
      return
    Text(nonempty=True)(field, value)
    if value.startswith(DATASET_PREFIXES):
      if not value.split(":", 1)[1]:
        fail(field, value, "give a path after the prefix, e.g. folder:/data/images")
      return
    if value not in TFDS_DATASETS:
      fail(field, value, f"must be one of {', '.join(TFDS_DATASETS)}, or folder:/path or "
           f"npz:/path/file.npz{suggest(value, TFDS_DATASETS)}")


@dataclasses.dataclass(frozen=True)
class Epochs:
  """An increasing sequence of positive epochs."""

  def __call__(self, field: str, value) -> None:
    if (not isinstance(value, (tuple, list))
        or not all(is_number(v) and v > 0 for v in value)):
      fail(field, value, "must be a list of positive epochs, e.g. (120, 160)")
    if list(value) != sorted(value):
      fail(field, value, "must be in increasing order")


@dataclasses.dataclass(frozen=True)
class Grid:
  """A non-empty tuple of distinct values, each valid under `item` (e.g. a grid of k or tau)."""

  item: Any

  def __call__(self, field: str, value) -> None:
    if not isinstance(value, (tuple, list)) or not value:
      fail(field, value, "must be a non-empty list of values, e.g. (10, 20)")
    for v in value:
      try:
        self.item(field, v)
      except ConfigError as e:
        raise ConfigError(f"config.{field}={value!r}: the value {v!r} {str(e).split(': ', 1)[1]}"
                          ) from e
    if len(set(value)) != len(value):
      fail(field, value, "must not repeat a value")


FIELDS: dict[str, Any] = {
    "seed": Integer(0, 2**63 - 1),
    "dataset": Dataset(),
    "train_split": Text(nonempty=True),
    "eval_dataset": Dataset(optional=True),
    "eval_split": Text(),
    "data_dir": Text(),
    "image_size": Integer(8, 1024),
    "validation_size": Integer(0),
    "validation_seed": Integer(0, 2**63 - 1),
    "model": Choice(tuple(models.MODELS)),
    "model_width": Integer(0, 4096),
    "low_dim": Integer(1, 65536),
    "cross_device_bn": Boolean(),
    "head_batchnorm": Boolean(),
    "compute_dtype": Choice(DTYPES),
    "objective": Choice(tuple(objectives.OBJECTIVES)),
    "num_negatives": Integer(1),
    "shared_noise": Boolean(),
    "temperature": Number(0, low_open=True),
    "bank_momentum": Number(0, 1, high_open=True),
    "bank_init": Choice(("uniform", "unit", "features")),
    "bank_dtype": Choice(DTYPES),
    "z_mode": Choice(tuple(objectives.Z_MODES)),
    "z_momentum": Number(0, 1, high_open=True),
    "proximal_weight": Number(0),
    "batch_size": Integer(1),
    "num_epochs": Integer(1),
    "num_train_steps": Integer(-1),
    "learning_rate": Number(0, low_open=True),
    "lr_schedule": Choice(("step", "cosine")),
    "lr_boundaries": Epochs(),
    "lr_decay_factor": Number(0, 1, low_open=True),
    "warmup_epochs": Number(0),
    "momentum": Number(0, 1, high_open=True),
    "nesterov": Boolean(),
    "weight_decay": Number(0),
    "augment.crop_scale_min": Number(0, 1, low_open=True),
    "augment.color_jitter": Number(0, 0.5),
    "augment.grayscale_prob": Number(0, 1),
    "augment.flip": Boolean(),
    "knn_k": Integer(1),
    "knn_temperature": Number(0, low_open=True),
    "eval_every_epochs": Integer(0),
    "eval_batch_size": Integer(1),
    "recompute_features": Boolean(),
    "knn_select_k": Grid(Integer(1)),
    "knn_select_temperatures": Grid(Number(0, low_open=True)),
    "checkpoint_every_steps": Integer(0),
    "keep_checkpoints": Integer(1),
    "log_every_steps": Integer(1),
    "progress_bar": Boolean(),
}


def get_field(config, dotted: str):
  """config["a"]["b"] for "a.b"."""
  for part in dotted.split("."):
    config = config[part]
  return config


def validate(config: ml_collections.ConfigDict, *, num_devices: int = 1,
             num_processes: int = 1) -> None:
  """Raises ConfigError for the first invalid field; checks that need no data."""
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"the config is a {type(config).__name__}, not an ml_collections "
                      "ConfigDict: start config files from "
                      "instdisc_jax.default_config.get_config()")
  check_keys(config, default_config.get_config())
  for field, check in FIELDS.items():
    check(field, get_field(config, field))
  # Relations between fields.
  if config.batch_size % num_devices:
    fail("batch_size", config.batch_size,
         f"must be divisible by the number of devices ({num_devices}), e.g. "
         f"{max(num_devices, config.batch_size // num_devices * num_devices)}")
  if config.batch_size % num_processes:
    fail("batch_size", config.batch_size,
         f"must be divisible by the number of processes ({num_processes})")
  if config.eval_batch_size % num_devices:
    fail("eval_batch_size", config.eval_batch_size,
         f"must be divisible by the number of devices ({num_devices}), e.g. "
         f"{max(num_devices, config.eval_batch_size // num_devices * num_devices)}")
  if config.warmup_epochs >= config.num_epochs and config.num_train_steps <= 0:
    fail("warmup_epochs", config.warmup_epochs,
         f"must be less than num_epochs ({config.num_epochs})")
  if config.num_train_steps == 0:
    fail("num_train_steps", 0, "use -1 to train for num_epochs, or a positive step count")


def validate_against_data(config: ml_collections.ConfigDict, num_instances: int) -> None:
  """Checks that need n, the number of training instances."""
  if config.batch_size > num_instances:
    fail("batch_size", config.batch_size,
         f"exceeds the {num_instances} training images; use at most {num_instances}")
  if config.objective in ("nce", "infonce") and config.num_negatives >= num_instances:
    fail("num_negatives", config.num_negatives,
         f"must be less than the number of training images n={num_instances}")
  if config.knn_k > num_instances:
    fail("knn_k", config.knn_k,
         f"must be at most the number of training images n={num_instances}")
