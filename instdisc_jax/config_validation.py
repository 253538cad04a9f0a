"""Checks every config field before anything is compiled or written.

Each problem becomes a `ConfigError` with one line naming the field, the value and the fix. The
schema is `default_config.get_config()`: a key it does not define is rejected with the closest
valid name. Checks that need the dataset (m < n, k <= n) are in `validate_against_data`.
"""

from __future__ import annotations

import difflib
import numbers
from typing import Any, Callable, Optional, Sequence

import ml_collections

from instdisc_jax import default_config
from instdisc_jax import models
from instdisc_jax import objectives
from instdisc_jax.errors import ConfigError

TFDS_DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "stl10", "imagenet2012")
DATASET_PREFIXES = ("folder:", "npz:")
DTYPES = ("float32", "bfloat16")


def _fail(field: str, value: Any, fix: str) -> None:
  raise ConfigError(f"config.{field}={value!r}: {fix}")


def _suggest(name: str, choices: Sequence[str]) -> str:
  close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
  return f"; did you mean {close[0]!r}?" if close else ""


def check_keys(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict,
               prefix: str = "") -> None:
  """Rejects keys the schema does not define (recursively), with a did-you-mean."""
  for key in config.keys():
    if key not in schema:
      valid = sorted(schema.keys())
      raise ConfigError(f"config.{prefix}{key} is not a config field{_suggest(key, valid)} "
                        f"(valid fields: {', '.join(valid)})")
    if isinstance(schema[key], ml_collections.ConfigDict):
      if not isinstance(config[key], ml_collections.ConfigDict):
        _fail(prefix + key, config[key], "must be a group of fields like the default config's")
      check_keys(config[key], schema[key], prefix=f"{prefix}{key}.")


# -- value checks --------------------------------------------------------------------------------


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(low: Optional[int] = None, high: Optional[int] = None) -> Callable:
  def check(field, value):
    if not _is_int(value):
      _fail(field, value, "must be an integer")
    if low is not None and value < low:
      _fail(field, value, f"must be >= {low}")
    if high is not None and value > high:
      _fail(field, value, f"must be <= {high}")
  return check


def number(low=None, high=None, low_open=False, high_open=False) -> Callable:
  def check(field, value):
    if not _is_number(value):
      _fail(field, value, "must be a number")
    if low is not None and (value <= low if low_open else value < low):
      _fail(field, value, f"must be {'>' if low_open else '>='} {low}")
    if high is not None and (value >= high if high_open else value > high):
      _fail(field, value, f"must be {'<' if high_open else '<='} {high}")
  return check


def boolean(field, value) -> None:
  if not isinstance(value, bool):
    _fail(field, value, "must be True or False")


def text(field, value) -> None:
  if not isinstance(value, str):
    _fail(field, value, "must be a string")


def nonempty_text(field, value) -> None:
  text(field, value)
  if not value:
    _fail(field, value, "must not be empty")


def one_of(*choices) -> Callable:
  def check(field, value):
    if value not in choices:
      _fail(field, value, f"must be one of {', '.join(map(str, choices))}"
            f"{_suggest(value, [str(c) for c in choices])}")
  return check


def dataset_spec(field, value) -> None:
  nonempty_text(field, value)
  if value.startswith(DATASET_PREFIXES):
    if not value.split(":", 1)[1]:
      _fail(field, value, "give a path after the prefix, e.g. folder:/data/images")
    return
  if value not in TFDS_DATASETS:
    _fail(field, value, f"must be one of {', '.join(TFDS_DATASETS)}, or folder:/path or "
          f"npz:/path/file.npz{_suggest(value, TFDS_DATASETS)}")


def epoch_boundaries(field, value) -> None:
  if not isinstance(value, (tuple, list)) or not all(_is_number(v) and v > 0 for v in value):
    _fail(field, value, "must be a list of positive epochs, e.g. (120, 160)")
  if list(value) != sorted(value):
    _fail(field, value, "must be in increasing order")


FIELDS: dict[str, Callable] = {
    "seed": integer(0),
    "dataset": dataset_spec,
    "train_split": nonempty_text,
    "eval_dataset": lambda f, v: text(f, v) if v == "" else dataset_spec(f, v),
    "eval_split": text,
    "data_dir": text,
    "image_size": integer(8, 1024),
    "model": one_of(*models.MODELS),
    "model_width": integer(0, 4096),
    "low_dim": integer(1, 65536),
    "cross_device_bn": boolean,
    "compute_dtype": one_of(*DTYPES),
    "objective": one_of(*objectives.OBJECTIVES),
    "num_negatives": integer(1),
    "shared_noise": boolean,
    "temperature": number(0, low_open=True),
    "bank_momentum": number(0, 1, high_open=True),
    "bank_init": one_of("uniform", "unit", "features"),
    "bank_dtype": one_of(*DTYPES),
    "z_mode": one_of(*objectives.Z_MODES),
    "z_momentum": number(0, 1, high_open=True),
    "proximal_weight": number(0),
    "batch_size": integer(1),
    "num_epochs": integer(1),
    "num_train_steps": integer(-1),
    "learning_rate": number(0, low_open=True),
    "lr_schedule": one_of("step", "cosine"),
    "lr_boundaries": epoch_boundaries,
    "lr_decay_factor": number(0, 1, low_open=True),
    "warmup_epochs": number(0),
    "momentum": number(0, 1, high_open=True),
    "nesterov": boolean,
    "weight_decay": number(0),
    "augment.crop_scale_min": number(0, 1, low_open=True),
    "augment.color_jitter": number(0, 0.5),
    "augment.grayscale_prob": number(0, 1),
    "augment.flip": boolean,
    "knn_k": integer(1),
    "knn_temperature": number(0, low_open=True),
    "eval_every_epochs": integer(0),
    "eval_batch_size": integer(1),
    "recompute_features": boolean,
    "checkpoint_every_steps": integer(0),
    "keep_checkpoints": integer(1),
    "log_every_steps": integer(1),
    "progress_bar": boolean,
}


def _get(config, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def validate(config: ml_collections.ConfigDict, *, num_devices: int = 1,
             num_processes: int = 1) -> None:
  """Raises ConfigError for the first invalid field; checks that need no data."""
  check_keys(config, default_config.get_config())
  for field, check in FIELDS.items():
    check(field, _get(config, field))
  # Relations between fields.
  if config.batch_size % num_devices:
    _fail("batch_size", config.batch_size,
          f"must be divisible by the number of devices ({num_devices}), e.g. "
          f"{max(num_devices, config.batch_size // num_devices * num_devices)}")
  if config.batch_size % num_processes:
    _fail("batch_size", config.batch_size,
          f"must be divisible by the number of processes ({num_processes})")
  if config.eval_batch_size % num_devices:
    _fail("eval_batch_size", config.eval_batch_size,
          f"must be divisible by the number of devices ({num_devices})")
  if config.warmup_epochs >= config.num_epochs and config.num_train_steps <= 0:
    _fail("warmup_epochs", config.warmup_epochs,
          f"must be less than num_epochs ({config.num_epochs})")
  if config.num_train_steps == 0:
    _fail("num_train_steps", 0, "use -1 to train for num_epochs, or a positive step count")


def validate_against_data(config: ml_collections.ConfigDict, num_instances: int) -> None:
  """Checks that need n, the number of training instances."""
  if config.batch_size > num_instances:
    _fail("batch_size", config.batch_size,
          f"exceeds the {num_instances} training images; use at most {num_instances}")
  if config.objective in ("nce", "infonce") and config.num_negatives >= num_instances:
    _fail("num_negatives", config.num_negatives,
          f"must be less than the number of training images n={num_instances}")
  if config.knn_k > num_instances:
    _fail("knn_k", config.knn_k,
          f"must be at most the number of training images n={num_instances}")
