"""Semi-supervised evaluation: fine-tune the pretrained encoder and a linear head on a small,
class-balanced labelled subset of the training split, then score the eval split (top-1).

The subset takes round(fraction * n_c) (at least one) images of every class c, drawn by a
generator seeded by (seed, c), so it is the same on every process and every run. The classifier
is the pretrained encoder (its BatchNorm statistics included) with a zero-initialised linear layer
on the pooled backbone features. Training is data-parallel like the train step (pmapped over all
devices and processes, each device its rows of the global batch, gradients averaged); the
global batch at step s is a slice of the concatenated per-epoch permutations of the subset
seeded by (seed, epoch), each process taking its rows of it. Nothing depends on the topology, so
D devices compute the one-device fine-tuning up to the order of float additions
(`tests/test_evaluation_sharded.py`): BatchNorm normalises with the statistics of the whole
global batch (means over the devices, whatever the run's `cross_device_bn`), and example i of
the global batch is augmented with the key `fold_in(fold_in(key, step), i)`. Images get the
run's normalisation and, with `augment`, a light augmentation (RandomResizedCrop with area in
[crop_scale_min, 1] and the run's horizontal flip; no colour changes).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from instdisc_jax import augment
from instdisc_jax import data
from instdisc_jax import parallel
from instdisc_jax import sharding
from instdisc_jax import steps
from instdisc_jax.evaluation import features as features_lib
from instdisc_jax.parallel import AXIS


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """The fine-tuning recipe (see `evaluation.config`)."""

  steps: int
  batch_size: int
  learning_rate: float
  momentum: float
  weight_decay: float
  augment: bool
  crop_scale_min: float
  seed: int


def balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices of round(fraction * n_c) (>= 1) random examples of every class c."""
  chosen = []
  for c in np.unique(labels[labels >= 0]):
    members = np.flatnonzero(labels == c)
    count = max(1, int(round(fraction * len(members))))
    chosen.append(np.random.default_rng((seed, int(c))).choice(members, count, replace=False))
  return np.sort(np.concatenate(chosen))


def global_batch(num: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Positions (into the subset) of the global batch at `step`: slice `step` of the
  concatenation of permutations of range(num) seeded by (seed, epoch)."""
  positions = []
  start = step * batch_size
  while len(positions) < batch_size:
    epoch, offset = divmod(start, num)
    taken = data.epoch_permutation(seed, epoch, num)[offset:offset + batch_size - len(positions)]
    positions.extend(taken.tolist())
    start += len(taken)
  return np.asarray(positions)


class Classifier(nn.Module):
  """The encoder's pooled backbone features followed by a linear layer to the classes.

  Only applied: its parameters are the pretrained encoder's and a zero-initialised layer
  (`SemiSupervised._initial_state`), so it is never initialised itself.
  """

  encoder: nn.Module
  num_classes: int

  @classmethod
  def synced(cls, encoder: nn.Module, num_classes: int) -> "Classifier":
    """The classifier whose BatchNorm uses the whole global batch (means over AXIS)."""
    return cls(encoder=encoder.clone(bn_axis_name=AXIS), num_classes=num_classes)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    _, pooled = self.encoder(images, train=train, return_pooled=True)
    return nn.Dense(self.num_classes, name="classifier")(pooled)


@flax.struct.dataclass
class FinetuneState:
  """Replicated over devices like the train state."""

  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: optax.OptState


def _finetune_step(state: FinetuneState, batch, key_data, *, model: Classifier,
                   tx: optax.GradientTransformation, transform: augment.AugmentConfig,
                   light: bool, axis_name: str = AXIS):
  """One SGD step on this device's part of the global batch; returns (state, global loss).

  `model` must average its BatchNorm statistics over `axis_name` (`Classifier.synced`).
  """
  if light:
    step_key = jax.random.fold_in(jax.random.wrap_key_data(key_data), state.step)
    local = batch["image"].shape[0]
    position = sharding.shard_index(axis_name) * local + jnp.arange(local)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(step_key, position)
    augmented = jax.vmap(functools.partial(augment.augment_image, cfg=transform))(
        keys, augment.to_float(batch["image"]))
    images = augment.normalize(augmented, transform.mean, transform.std)
  else:
    images = augment.eval_transform(batch["image"], transform)

  def loss_fn(params):
    logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, images,
                                  train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, updates

  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, axis_name)   # equal per-device batches: the global mean
  param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
  # The running statistics were updated from the global batch's: already equal on all devices.
  return state.replace(step=state.step + 1,
                       params=optax.apply_updates(state.params, param_updates),
                       batch_stats=updates["batch_stats"],
                       opt_state=opt_state), jax.lax.pmean(loss, axis_name)


def _correct_step(state: FinetuneState, batch, *, model: Classifier,
                  transform: augment.AugmentConfig):
  """(correct predictions, real examples) of a global eval batch, summed over devices."""
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                       augment.eval_transform(batch["image"], transform), train=False)
  hits = (jnp.argmax(logits, axis=-1) == batch["label"]) & batch["mask"]
  return (jax.lax.psum(jnp.sum(hits, dtype=jnp.int32), AXIS),
          jax.lax.psum(jnp.sum(batch["mask"], dtype=jnp.int32), AXIS))


def finetune(p_step, tuned: FinetuneState, subset: np.ndarray, load, config: FinetuneConfig,
             devices: parallel.Devices = None) -> tuple[FinetuneState, float]:
  """Runs `config.steps` pmapped `_finetune_step`s (`p_step`, mapped over `devices`) from the
  replicated state `tuned`; returns the state and the last step's loss.

  load: record indices -> {"image", "label"} host arrays. Process p loads its rows
  [p * b, (p + 1) * b) of each global batch, b = batch_size / processes.
  """
  local = config.batch_size // jax.process_count()
  first = jax.process_index() * local
  key = parallel.replicate(jax.random.key_data(jax.random.key(config.seed)), devices)
  loss = float("nan")
  for step in range(config.steps):
    rows = subset[global_batch(len(subset), config.batch_size, config.seed, step)]
    batch = load(rows[first:first + local])
    num_local = len(parallel.local_device_indices(devices))
    batch = parallel.shard_local_rows(jax.tree.map(
        lambda x: x.reshape((num_local, -1) + x.shape[1:]), batch), devices)
    tuned, loss = p_step(tuned, batch, key)
    # One step in flight at a time: with several steps queued, XLA:CPU's in-process
    # all-reduce was seen to wait forever for a device (2 host devices, 2 cores).
    loss = float(parallel.first_replica(loss))
  return tuned, loss


class SemiSupervised:
  """`run(state)` -> {"1%": {"labelled", "top1", "final_loss"}, ...} for each fraction.

  model: the run's encoder (`restore.build_model`); transform: the run's transforms
  (`restore.augment_config`), whose normalisation the fine-tuning keeps. The eval split is
  read in the `FeatureCache`'s batches and image size.
  """

  def __init__(self, cache: features_lib.FeatureCache, *, model, transform: augment.AugmentConfig,
               train_split, eval_split, num_classes: int, fractions: Sequence[float],
               config: FinetuneConfig):
    self.cache = cache
    self.train_split = train_split
    self.eval_split = eval_split
    self.num_classes = num_classes
    self.fractions = tuple(fractions)
    self.config = config
    self.model = Classifier.synced(model, num_classes)
    schedule = optax.cosine_decay_schedule(config.learning_rate, config.steps)
    self.tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                          optax.sgd(schedule, momentum=config.momentum or None))
    self.transform = dataclasses.replace(
        transform, crop_scale=(config.crop_scale_min, 1.0), crop_on_device=True,
        grayscale_prob=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    self._p_step = steps.pmapped(_finetune_step, donate_argnums=(0,), model=self.model,
                                 tx=self.tx, transform=self.transform, light=config.augment)
    self._p_correct = steps.pmapped(_correct_step, model=self.model, transform=self.transform)

  def _initial_state(self, state: steps.TrainState) -> FinetuneState:
    """The pretrained encoder (first replica) with a fresh head, replicated on the devices."""
    encoder = jax.tree.map(parallel.first_replica, state.params["encoder"])
    batch_stats = jax.tree.map(parallel.first_replica, state.batch_stats)
    # The encoder's embedding head takes the pooled features: its input size is theirs.
    pooled_dim = encoder["head"]["kernel"].shape[0]
    params = {"encoder": encoder, "classifier": {
        "kernel": np.zeros((pooled_dim, self.num_classes), np.float32),
        "bias": np.zeros((self.num_classes,), np.float32)}}
    return parallel.replicate(FinetuneState(
        step=np.zeros((), np.int32), params=params, batch_stats={"encoder": batch_stats},
        opt_state=jax.tree.map(np.asarray, self.tx.init(params))))

  def _finetune(self, state: steps.TrainState, subset: np.ndarray) -> tuple[FinetuneState, float]:
    """The fine-tuned classifier and its last step's loss (`config.steps` >= 1 steps)."""
    split, image_size = self.train_split, self.cache.image_size

    def load(rows):
      return {"image": features_lib.load_images(split, rows, image_size),
              "label": split.labels[rows].astype(np.int32)}
    return finetune(self._p_step, self._initial_state(state), subset, load, self.config)

  def _top1(self, tuned: FinetuneState) -> float:
    """Top-1 accuracy (%) of the fine-tuned classifier on the eval split."""
    correct = total = 0
    for batch in features_lib.batches(self.eval_split, self.cache.batch_size,
                                      self.cache.image_size):
      batch = {name: batch[name] for name in ("image", "label", "mask")}
      hits, real = self._p_correct(tuned, parallel.shard_local_batch(batch))
      correct += int(parallel.first_replica(hits))
      total += int(parallel.first_replica(real))
    return 100.0 * correct / max(total, 1)

  def run(self, state: steps.TrainState) -> dict:
    results = {}
    for fraction in self.fractions:
      subset = balanced_subset(self.train_split.labels, fraction, self.config.seed)
      tuned, loss = self._finetune(state, subset)
      results[f"{100 * fraction:g}%"] = {"labelled": int(len(subset)),
                                         "top1": self._top1(tuned), "final_loss": loss}
    return results
