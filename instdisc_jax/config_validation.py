"""Checks every config field before anything is compiled or written.

Each problem becomes a `ConfigError` with one line naming the field, the value and the fix. The
fields and their rules are `config_schema.SCHEMA`: a key it does not define is rejected with the
closest valid name, a value its field's rule refuses with the fix. What this module adds are the
relations between fields, and the checks that need the dataset (m < n, k <= n, B <= n) in
`validate_against_data`.
"""

from __future__ import annotations

import ml_collections

from instdisc_jax.config_fields import START_FROM
from instdisc_jax.config_fields import fail
from instdisc_jax.config_schema import SCHEMA
from instdisc_jax.errors import ConfigError


def validate(config: ml_collections.ConfigDict, *, num_devices: int = 1,
             num_processes: int = 1) -> None:
  """Raises ConfigError for the first invalid field; checks that need no data."""
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"the config is a {type(config).__name__}, not an ml_collections "
                      f"ConfigDict: {START_FROM}")
  SCHEMA.check(config)
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
