"""Linear probe: softmax regression on frozen features, trained with optax.

Each kind of feature (the L2-normalised embedding, the pooled backbone features) is standardised
per dimension with the training set's mean and standard deviation, so one learning rate suits
both; then a linear classifier (weights and bias, zero-initialised: the problem is convex) is
trained with AdamW and a cosine-decayed learning rate on minibatches drawn from a fresh
permutation every epoch, and scored on the eval split (top-1). Features come from the shared
`FeatureCache`, so the encoder runs once per split. Training runs jitted on one device per
process (each process computes the same classifier from the same features).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from instdisc_jax import train
from instdisc_jax.evaluation import features as features_lib


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """The probe's optimisation (see `evaluation.config`)."""

  epochs: int
  batch_size: int
  learning_rate: float
  weight_decay: float
  seed: int


def standardise(train_x: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
  """Every array shifted and scaled by the per-dimension mean and std of `train_x`."""
  mean = train_x.mean(axis=0)
  std = np.maximum(train_x.std(axis=0), 1e-6)
  return [((x - mean) / std).astype(np.float32) for x in (train_x,) + others]


def _loss(params, x, y):
  logits = x @ params["w"] + params["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def fit(train_x: np.ndarray, train_y: np.ndarray, num_classes: int,
        config: ProbeConfig) -> dict:
  """The linear classifier {"w": (D, C), "b": (C,)} trained on (train_x, train_y)."""
  num = train_x.shape[0]
  batch = min(config.batch_size, num)
  steps_per_epoch = num // batch
  schedule = optax.cosine_decay_schedule(config.learning_rate,
                                         config.epochs * steps_per_epoch)
  tx = optax.adamw(schedule, weight_decay=config.weight_decay)
  params = {"w": jnp.zeros((train_x.shape[1], num_classes), jnp.float32),
            "b": jnp.zeros((num_classes,), jnp.float32)}
  x, y = jnp.asarray(train_x), jnp.asarray(train_y, jnp.int32)

  @jax.jit
  def epoch(carry, key):
    order = jax.random.permutation(key, num)[:steps_per_epoch * batch]

    def step(carry, rows):
      params, opt_state = carry
      grads = jax.grad(_loss)(params, x[rows], y[rows])
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    carry, _ = jax.lax.scan(step, carry, order.reshape(steps_per_epoch, batch))
    return carry

  carry = (params, tx.init(params))
  for key in jax.random.split(jax.random.key(config.seed), config.epochs):
    carry = epoch(carry, key)
  return carry[0]


def top1(params: dict, x: np.ndarray, y: np.ndarray) -> float:
  """Accuracy (%) of the classifier on (x, y)."""
  predictions = np.asarray(jnp.argmax(jnp.asarray(x) @ params["w"] + params["b"], axis=-1))
  return 100.0 * float(np.mean(predictions == y))


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
          num_classes: int, config: ProbeConfig) -> dict:
  """Standardise, fit on the training features, score the test features: {"top1": %}."""
  train_x, test_x = standardise(train_x, test_x)
  params = fit(train_x, train_y, num_classes, config)
  return {"top1": top1(params, test_x, test_y), "train_top1": top1(params, train_x, train_y)}


class LinearProbe:
  """`run(state)` -> {feature kind: {"top1", "train_top1"}} for each kind asked for."""

  def __init__(self, trainer: train.Trainer, cache: features_lib.FeatureCache,
               kinds: Sequence[str], config: ProbeConfig):
    self.trainer = trainer
    self.cache = cache
    self.kinds = tuple(kinds)
    self.config = config

  def run(self, state: train.TrainState) -> dict:
    train_features = self.cache.get(state, self.trainer.train_split)
    test_features = self.cache.get(state, self.trainer.eval_split)
    keep = train_features.labels >= 0       # records without a label are not trained on
    return {kind: probe(train_features.kind(kind)[keep], train_features.labels[keep],
                        test_features.kind(kind), test_features.labels,
                        self.trainer.num_classes, self.config)
            for kind in self.kinds}
