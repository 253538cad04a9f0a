"""The evaluator's config: `config.eval.*`, one comment per field, and its validation.

`python -m instdisc_jax.evaluate --workdir=DIR --config.eval.knn_k="(20,200)"` overrides a field.
`get_config(runlocal=True)` gives the small values tests use (a few optimizer steps).
"""

from __future__ import annotations

import ml_collections

from instdisc_jax import config_validation as cv
from instdisc_jax.errors import ConfigError

FEATURE_KINDS = ("embedding", "pooled")
BANKS = ("bank", "recomputed")


def get_config(runlocal: bool = False) -> ml_collections.ConfigDict:
  """Every evaluator field; `runlocal` shrinks the optimizer budgets for tests."""
  config = ml_collections.ConfigDict()
  config.eval = e = ml_collections.ConfigDict()
  e.seed = 0                          # Seeds the probe, fine-tuning, labelled subsets, queries.
  e.batch_size = 0                    # Global batch of feature extraction; 0 = run's eval batch.

  # Weighted kNN, swept over (k, tau) from one neighbour search with the largest k.
  e.knn = True                        # Run the kNN sweep.
  e.knn_k = (20, 200)                 # Neighbour counts (capped at n).
  e.knn_temperatures = (0.05, 0.07, 0.1)  # tau of the vote weights exp(s / tau).
  e.knn_banks = BANKS                 # Training features: memory bank and/or recomputed (eval tf).

  # Linear probe: softmax regression on frozen, standardised features (AdamW, cosine decay).
  e.linear_probe = True               # Run the linear probe.
  e.probe_features = FEATURE_KINDS    # Features probed: 128-d embedding and/or pooled backbone.
  e.probe_epochs = 2 if runlocal else 30  # Passes over the training features.
  e.probe_batch_size = 256            # Examples per probe step.
  e.probe_learning_rate = 0.03        # Peak AdamW learning rate (1e-3 left the probe 4 points short).
  e.probe_weight_decay = 1e-4         # AdamW decoupled weight decay.

  # Semi-supervised: fine-tune encoder + linear head on a class-balanced labelled subset.
  e.semi_supervised_fractions = (0.01, 0.1)  # Labelled fractions; () = off.
  e.finetune_steps = 4 if runlocal else 300  # SGD steps per fraction.
  e.finetune_batch_size = 16 if runlocal else 128  # Global batch (a multiple of the devices).
  e.finetune_learning_rate = 0.05     # Peak SGD learning rate (cosine decay to 0).
  e.finetune_momentum = 0.9           # SGD momentum.
  e.finetune_weight_decay = 5e-4      # L2 added to the gradient, as in training.
  e.finetune_augment = False          # Random crop + run's flip (cost Fashion-MNIST 7 points).
  e.finetune_crop_scale_min = 0.5     # Smallest crop area fraction of the light augmentation.

  # Outputs.
  e.export = True                     # Write features_{train,eval}.npz to the workdir.
  e.retrieval_grid = True             # Write retrieval.png: queries and their neighbours.
  e.retrieval_queries = 8             # Query images (rows of the grid).
  e.retrieval_neighbors = 10          # Neighbours shown per query.
  e.retrieval_bank = "recomputed"     # Neighbours searched in: bank | recomputed features.
  e.curves = True                     # Write curves.png from metrics.jsonl (paper's Fig. 4).
  return config


def _tuple_of(check, allow_empty: bool = False):
  """A check that the value is a tuple (non-empty unless allowed) whose items pass `check`."""
  def validate(field, value):
    if not isinstance(value, (tuple, list)) or not (value or allow_empty):
      need = "a tuple (empty for none)" if allow_empty else "a non-empty tuple"
      raise ConfigError(f"config.{field}={value!r}: must be {need}")
    for item in value:
      check(field, item)
  return validate


FIELDS = {
    "seed": cv.Integer(0),
    "batch_size": cv.Integer(0),
    "knn": cv.Boolean(),
    "knn_k": _tuple_of(cv.Integer(1)),
    "knn_temperatures": _tuple_of(cv.Number(0, low_open=True)),
    "knn_banks": _tuple_of(cv.Choice(BANKS)),
    "linear_probe": cv.Boolean(),
    "probe_features": _tuple_of(cv.Choice(FEATURE_KINDS)),
    "probe_epochs": cv.Integer(1),
    "probe_batch_size": cv.Integer(1),
    "probe_learning_rate": cv.Number(0, low_open=True),
    "probe_weight_decay": cv.Number(0),
    "semi_supervised_fractions": _tuple_of(cv.Number(0, 1, low_open=True), allow_empty=True),
    "finetune_steps": cv.Integer(1),
    "finetune_batch_size": cv.Integer(1),
    "finetune_learning_rate": cv.Number(0, low_open=True),
    "finetune_momentum": cv.Number(0, 1, high_open=True),
    "finetune_weight_decay": cv.Number(0),
    "finetune_augment": cv.Boolean(),
    "finetune_crop_scale_min": cv.Number(0, 1, low_open=True),
    "export": cv.Boolean(),
    "retrieval_grid": cv.Boolean(),
    "retrieval_queries": cv.Integer(1, 64),
    "retrieval_neighbors": cv.Integer(1, 50),
    "retrieval_bank": cv.Choice(BANKS),
    "curves": cv.Boolean(),
}


def validate(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
  """Raises ConfigError for an unknown field or a bad value (one line naming the field)."""
  cv.check_keys(config, get_config())
  for field, check in FIELDS.items():
    check(f"eval.{field}", config.eval[field])
  for field in ("batch_size", "finetune_batch_size"):
    if config.eval[field] % num_devices:
      raise ConfigError(f"config.eval.{field}={config.eval[field]}: must be a multiple of the "
                        f"number of devices ({num_devices})")
