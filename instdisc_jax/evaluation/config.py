"""The evaluator's config: `config.eval.*`, each field's default, doc and rule declared together.

Declared like the training config (`instdisc_jax.config_schema`, with `config_fields`), and
checked by the same rules: unknown keys get the same did-you-mean, bad values the same one line.

`python -m instdisc_jax.evaluate --workdir=DIR --config.eval.knn_k="(20,200)"` overrides a field.
`get_config(runlocal=True)` gives the small values tests use (a few optimizer steps).
"""

from __future__ import annotations

import ml_collections

from instdisc_jax.config_fields import Boolean
from instdisc_jax.config_fields import Choice
from instdisc_jax.config_fields import Integer
from instdisc_jax.config_fields import Number
from instdisc_jax.config_fields import Schema
from instdisc_jax.config_fields import TupleOf
from instdisc_jax.config_fields import field
from instdisc_jax.errors import ConfigError

FEATURE_KINDS = ("embedding", "pooled")
BANKS = ("bank", "recomputed")

POSITIVE = Number(0, low_open=True)
NON_NEGATIVE = Number(0)


def schema(runlocal: bool = False) -> Schema:
  """Every evaluator field (`config.eval.*`); `runlocal` shrinks the optimizer budgets."""
  return Schema(eval=Schema(
      seed=field(0, Integer(0), "Seeds the probe, fine-tuning, labelled subsets, queries."),
      batch_size=field(0, Integer(0),
                       "Global batch of feature extraction; 0 = run's eval batch."),

      # Weighted kNN, swept over (k, tau) from one neighbour search with the largest k.
      knn=field(True, Boolean(), "Run the kNN sweep."),
      knn_k=field((20, 200), TupleOf(Integer(1)), "Neighbour counts (capped at n)."),
      knn_temperatures=field((0.05, 0.07, 0.1), TupleOf(POSITIVE),
                             "tau of the vote weights exp(s / tau)."),
      knn_banks=field(BANKS, TupleOf(Choice(BANKS)),
                      "Training features: memory bank and/or recomputed (eval tf)."),

      # Linear probe: softmax regression on frozen, standardised features (AdamW, cosine decay).
      linear_probe=field(True, Boolean(), "Run the linear probe."),
      probe_features=field(FEATURE_KINDS, TupleOf(Choice(FEATURE_KINDS)),
                           "Features probed: 128-d embedding and/or pooled backbone."),
      probe_epochs=field(2 if runlocal else 30, Integer(1), "Passes over the training features."),
      probe_batch_size=field(256, Integer(1), "Examples per probe step."),
      probe_learning_rate=field(0.03, POSITIVE,
                                "Peak AdamW learning rate (1e-3 left the probe 4 points short)."),
      probe_weight_decay=field(1e-4, NON_NEGATIVE, "AdamW decoupled weight decay."),

      # Semi-supervised: fine-tune encoder + linear head on a class-balanced labelled subset.
      semi_supervised_fractions=field(
          (0.01, 0.1), TupleOf(Number(0, 1, low_open=True), allow_empty=True),
          "Labelled fractions; () = off."),
      finetune_steps=field(4 if runlocal else 300, Integer(1), "SGD steps per fraction."),
      finetune_batch_size=field(16 if runlocal else 128, Integer(1),
                                "Global batch (a multiple of the devices)."),
      finetune_learning_rate=field(0.05, POSITIVE, "Peak SGD learning rate (cosine decay to 0)."),
      finetune_momentum=field(0.9, Number(0, 1, high_open=True), "SGD momentum."),
      finetune_weight_decay=field(5e-4, NON_NEGATIVE, "L2 added to the gradient, as in training."),
      finetune_augment=field(False, Boolean(),
                             "Random crop + run's flip (cost Fashion-MNIST 7 points)."),
      finetune_crop_scale_min=field(0.5, Number(0, 1, low_open=True),
                                    "Smallest crop area fraction of the light augmentation."),

      # Outputs.
      export=field(True, Boolean(), "Write features_{train,eval}.npz to the workdir."),
      retrieval_grid=field(True, Boolean(),
                           "Write retrieval.png: queries and their neighbours."),
      retrieval_queries=field(8, Integer(1, 64), "Query images (rows of the grid)."),
      retrieval_neighbors=field(10, Integer(1, 50), "Neighbours shown per query."),
      retrieval_bank=field("recomputed", Choice(BANKS),
                           "Neighbours searched in: bank | recomputed features."),
      curves=field(True, Boolean(), "Write curves.png from metrics.jsonl (paper's Fig. 4)."),
  ))


def get_config(runlocal: bool = False) -> ml_collections.ConfigDict:
  """Every evaluator field at its default; `runlocal` shrinks the optimizer budgets for tests."""
  return schema(runlocal).defaults()


def validate(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
  """Raises ConfigError for an unknown field or a bad value (one line naming the field)."""
  schema().check(config)
  for name in ("batch_size", "finetune_batch_size"):
    if config.eval[name] % num_devices:
      raise ConfigError(f"config.eval.{name}={config.eval[name]}: must be a multiple of the "
                        f"number of devices ({num_devices})")
