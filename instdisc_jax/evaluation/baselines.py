"""The reference rows of the seeds table: what the learned features are compared with.

* Raw pixels: the weighted kNN of the paper (Section 3.4) on L2-normalised pixel vectors, with
  the run's k and tau, and a logistic regression on per-pixel standardised pixels (the linear
  probe's code, `linear_probe.Probe`, data-parallel over the devices). Says how much of the
  learned features' accuracy the pixels alone already give.
* Random initialisation: the same encoder at the run's initial state, never trained, scored by
  the same kNN and linear probes (embedding and pooled features). Says how much the untrained
  architecture gives.

Everything here takes arrays, or an embed function of uint8 images; nothing reads a workdir or
builds a Trainer. The kNN shards the training vectors over the devices like the memory bank
(`features.Features.from_host`): each device scores its shard, and only each query's k best
candidates per shard are exchanged (`knn.nearest_neighbors`). The queries are replicated one
chunk at a time. The inputs are host arrays, so these baselines are for data whose pixels fit on
a host (Fashion-MNIST, CIFAR: 188 MB and 184 MB as float32); the learned features of large
datasets are evaluated by `instdisc_jax.evaluate`, which never gathers a split.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np

from instdisc_jax import knn
from instdisc_jax import parallel
from instdisc_jax import steps
from instdisc_jax.evaluation import features as features_lib
from instdisc_jax.evaluation import linear_probe
from instdisc_jax.parallel import AXIS

# Queries scored per pmapped call (replicated on every device).
QUERY_CHUNK = 1024

# embed_fn(uint8 images (b, H, W, C)) -> (embedding (b, d), pooled (b, P)), host arrays.
EmbedFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def pixel_vectors(images: np.ndarray) -> np.ndarray:
  """uint8 (N, H, W, C) images as float32 (N, H * W * C) vectors in [0, 1]."""
  images = np.asarray(images)
  return images.reshape(len(images), -1).astype(np.float32) / 255.0


def l2_normalize(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit norm (all-zero rows stay zero)."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _knn_counts(queries, targets, valid, rows, labels, *, num_instances: int, num_classes: int,
                k: int, temperature: float):
  """Top-1/top-5 hit counts of replicated queries against this device's shard of the bank."""
  scores = knn.knn_classify(queries, rows, labels, num_instances=num_instances,
                            num_classes=num_classes, k=k, temperature=temperature,
                            axis_name=AXIS)
  return knn.count_correct(scores, targets, valid=valid)


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, *, num_classes: int, k: int, temperature: float,
                 devices: parallel.Devices = None) -> dict:
  """Weighted kNN top-1/top-5 (%) of L2-normalised `test_x` against L2-normalised `train_x`.

  The vote is the paper's: w_c = sum of exp(s_i / tau) over the k nearest training vectors of
  class c (cosine similarity s_i). Training rows with label -1 take no part in the vote.
  """
  train = features_lib.Features.from_host(l2_normalize(train_x), np.zeros((len(train_y), 1)),
                                          train_y, devices)
  step = jax.pmap(functools.partial(_knn_counts, num_instances=len(train_y),
                                    num_classes=num_classes, k=k, temperature=temperature),
                  axis_name=AXIS, in_axes=(None, None, None, 0, 0), devices=devices)
  queries = l2_normalize(test_x)
  targets = np.asarray(test_y, np.int32)
  hits = {"top1": 0, "top5": 0}
  for start in range(0, len(queries), QUERY_CHUNK):
    chunk = slice(start, start + QUERY_CHUNK)
    pad = QUERY_CHUNK - len(queries[chunk])       # every call has one shape: one compilation
    counts = step(np.pad(queries[chunk], ((0, pad), (0, 0))),
                  np.pad(targets[chunk], (0, pad), constant_values=-1),
                  np.arange(QUERY_CHUNK) < QUERY_CHUNK - pad, train.embedding, train.labels)
    for name in hits:
      hits[name] += int(parallel.first_replica(counts[name]))
  return {name: 100.0 * value / max(len(queries), 1) for name, value in hits.items()}


def raw_pixels(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
               test_labels: np.ndarray, *, num_classes: int, k: int, temperature: float,
               probe_config: linear_probe.ProbeConfig | None = None,
               devices: parallel.Devices = None) -> dict:
  """The raw-pixel row: {"knn": {"top1", "top5"}, "linear_probe": {"top1", "train_top1"}}.

  kNN on L2-normalised pixels with the run's k and tau; the probe (if `probe_config`) is the
  linear probe's softmax regression on per-pixel standardised pixels.
  """
  train_x, test_x = pixel_vectors(train_images), pixel_vectors(test_images)
  results = {"knn": knn_accuracy(train_x, train_labels, test_x, test_labels,
                                 num_classes=num_classes, k=k, temperature=temperature,
                                 devices=devices)}
  if probe_config is not None:
    results["linear_probe"] = linear_probe.probe(train_x, train_labels, test_x, test_labels,
                                                 num_classes, probe_config, devices)
  return results


def embed_images(embed_fn: EmbedFn, images: np.ndarray, batch_size: int):
  """(embedding (N, d), pooled (N, P)) of uint8 `images`, `batch_size` at a time. The last batch
  is padded to full size (one compilation) and its padding dropped."""
  embeddings, pooled = [], []
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    real = len(batch)
    batch = np.pad(batch, ((0, batch_size - real),) + ((0, 0),) * (batch.ndim - 1))
    e, p = embed_fn(batch)
    embeddings.append(np.asarray(e)[:real])
    pooled.append(np.asarray(p)[:real])
  return np.concatenate(embeddings), np.concatenate(pooled)


def state_embed_fn(state: steps.TrainState, *, model, hp: steps.StepConfig) -> EmbedFn:
  """An `EmbedFn` of a (replicated) train state: `steps.embed` pmapped over all devices. The
  batch size must be a multiple of the device count."""
  p_embed = steps.pmapped(steps.embed, model=model, hp=hp, return_pooled=True)
  num_devices = jax.local_device_count()

  def embed_fn(images: np.ndarray):
    local = images.reshape((num_devices, -1) + images.shape[1:])
    embedding, pooled = p_embed(state, local)
    return (np.asarray(embedding).reshape(len(images), -1),
            np.asarray(pooled).reshape(len(images), -1))
  return embed_fn


class FeatureBaseline:
  """kNN and linear probes of the features an `EmbedFn` gives: the random-initialisation row
  (the run's initial state, untrained) or any other frozen encoder.

  `run(train_images, train_labels, test_images, test_labels)` returns {"knn": {"top1", "top5"}
  (on the embedding, with the run's k and tau), "linear_probe": {kind: {"top1", "train_top1"}}}.
  """

  def __init__(self, embed_fn: EmbedFn, *, num_classes: int, k: int, temperature: float,
               probe_config: linear_probe.ProbeConfig | None = None,
               probe_kinds=features_lib.KINDS, batch_size: int = 256,
               devices: parallel.Devices = None):
    self.embed_fn = embed_fn
    self.num_classes = num_classes
    self.k = k
    self.temperature = temperature
    self.probe_config = probe_config
    self.probe_kinds = tuple(probe_kinds)
    self.batch_size = batch_size
    self.devices = devices

  def run(self, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
          test_labels: np.ndarray) -> dict:
    train = dict(zip(features_lib.KINDS,
                     embed_images(self.embed_fn, train_images, self.batch_size)))
    test = dict(zip(features_lib.KINDS, embed_images(self.embed_fn, test_images,
                                                     self.batch_size)))
    results = {"knn": knn_accuracy(train["embedding"], train_labels, test["embedding"],
                                   test_labels, num_classes=self.num_classes, k=self.k,
                                   temperature=self.temperature, devices=self.devices)}
    if self.probe_config is not None:
      results["linear_probe"] = {
          kind: linear_probe.probe(train[kind], train_labels, test[kind], test_labels,
                                   self.num_classes, self.probe_config, self.devices)
          for kind in self.probe_kinds}
    return results
