"""Features of a whole split under the eval transform, extracted once and shared by evaluators.

Extraction runs the pmapped encoder over `data.eval_batches` (every record once, padded to whole
global batches, padding masked), all-gathers each batch, and keeps the real rows, so every
process ends up with the features of the whole split in record order, whatever the topology.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from instdisc_jax import data
from instdisc_jax import parallel
from instdisc_jax import sharding
from instdisc_jax import train
from instdisc_jax.data import images as images_lib
from instdisc_jax.parallel import AXIS


@dataclasses.dataclass(frozen=True)
class Features:
  """One split's features, row i = record i."""

  embedding: np.ndarray   # float32 (N, low_dim), L2-normalised
  pooled: np.ndarray      # float32 (N, D), the pooled backbone features
  labels: np.ndarray      # int32 (N,), -1 when unknown
  indices: np.ndarray     # int32 (N,), the record (instance) index

  def kind(self, name: str) -> np.ndarray:
    """The features called `name` ("embedding" or "pooled")."""
    return {"embedding": self.embedding, "pooled": self.pooled}[name]


def _extract_step(state: train.TrainState, batch, *, model, hp: train.StepConfig):
  embedding, pooled = train.embed(state, batch["image"], model=model, hp=hp, return_pooled=True)
  return {name: sharding.gather_batch(value, AXIS) for name, value in (
      ("embedding", embedding), ("pooled", pooled), ("label", batch["label"]),
      ("index", batch["index"]), ("mask", batch["mask"]))}


def batches(trainer: train.Trainer, split, batch_size: int):
  """This process's padded eval batches of `split`, as `Trainer` reads them."""
  return data.eval_batches(split, global_batch_size=batch_size,
                           process_index=jax.process_index(),
                           process_count=jax.process_count(),
                           image_size=trainer.config.image_size)


def load_images(split, indices: np.ndarray, image_size: int) -> np.ndarray:
  """uint8 images of the records `indices`; variable-size records get the eval crop."""
  if split.in_memory:
    return split.images[indices]
  box = None if split.fixed_size else images_lib.eval_box
  return np.stack([split.load(int(i), image_size, box)["image"] for i in indices])


class FeatureCache:
  """Extracts each split's features at most once for the train state last asked about."""

  def __init__(self, trainer: train.Trainer, batch_size: int):
    self.trainer = trainer
    self.batch_size = batch_size
    self._p_extract = train.pmapped(_extract_step, model=trainer.model, hp=trainer.hp)
    self._state = None
    self._cache: dict = {}

  def get(self, state: train.TrainState, split) -> Features:
    """The features of `split` under `state`'s network (computed again for another state)."""
    if state is not self._state:
      self._state, self._cache = state, {}
    key = split.name
    if key not in self._cache:
      parts = []
      for batch in batches(self.trainer, split, self.batch_size):
        out = self._p_extract(state, parallel.shard_local_batch(batch))
        out = {name: parallel.first_replica(value) for name, value in out.items()}
        parts.append({name: value[out["mask"]] for name, value in out.items()})
      joined = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
      self._cache[key] = Features(embedding=joined["embedding"], pooled=joined["pooled"],
                                  labels=joined["label"].astype(np.int32),
                                  indices=joined["index"].astype(np.int32))
    return self._cache[key]

  def bank_rows(self, state: train.TrainState) -> jax.Array:
    """Recomputed training features as a sharded bank (what `Trainer.features_bank` builds)."""
    features = self.get(state, self.trainer.train_split)
    dtype = state.bank.rows.dtype
    full = self.trainer.layout.shard_array(np.asarray(jnp.asarray(features.embedding, dtype)))
    return parallel.shard_local_rows(full[parallel.local_device_indices()])
