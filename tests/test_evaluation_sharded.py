"""Evaluation that shards like training, on 8 fake devices: the linear probe and the fine-tuning
give the 1-device result, every record's features live on their owner only, the kNN sweep over
sharded queries counts what a replicated sweep counts, and the n-dependent memory of every
evaluation step scales as 1/D (compiled `memory_analysis()`, two device counts)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import eval_memory
from instdisc_jax import augment
from instdisc_jax import models
from instdisc_jax import parallel
from instdisc_jax import sharding
from instdisc_jax.evaluation import features as features_lib
from instdisc_jax.evaluation import knn_sweep
from instdisc_jax.evaluation import linear_probe
from instdisc_jax.evaluation import semi_supervised
from instdisc_jax.parallel import AXIS
from instdisc_jax.sharding import ShardLayout

ONE_DEVICE = jax.devices()[:1]


def clusters(rng, num, num_classes=4, dim=12, spread=0.7):
  labels = rng.integers(0, num_classes, num)
  x = np.eye(dim, dtype=np.float32)[labels] + spread * rng.normal(size=(num, dim))
  return (3 * x + 1).astype(np.float32), labels.astype(np.int32)


def gathered_fit(train_x, train_y, num_classes, config):
  """The linear probe as it was before sharding (f437199): standardise on the host, then
  jitted epochs on one device holding the whole matrix. The reference of the sharded fit."""
  keep = train_y >= 0
  train_x, train_y = train_x[keep], train_y[keep]
  mean, std = train_x.mean(axis=0), np.maximum(train_x.std(axis=0), 1e-6)
  x = jnp.asarray((train_x - mean) / std)
  y = jnp.asarray(train_y)
  num = len(y)
  batch = min(config.batch_size, num)
  steps_per_epoch = num // batch
  tx = optax.adamw(optax.cosine_decay_schedule(config.learning_rate,
                                               config.epochs * steps_per_epoch),
                   weight_decay=config.weight_decay)
  params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}

  @jax.jit
  def epoch(carry, key):
    order = jax.random.permutation(key, num)[:steps_per_epoch * batch]

    def step(carry, rows):
      params, opt_state = carry
      grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
          x[rows] @ p["w"] + p["b"], y[rows]).mean())(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    return jax.lax.scan(step, carry, order.reshape(steps_per_epoch, batch))[0]

  carry = (params, tx.init(params))
  for key in jax.random.split(jax.random.key(config.seed), config.epochs):
    carry = epoch(carry, key)
  return jax.tree.map(np.asarray, carry[0])


def test_linear_probe_on_8_devices_matches_1_device_and_the_gathered_fit():
  rng = np.random.default_rng(0)
  x, y = clusters(rng, 203)                 # 203 rows: the last shards carry padding
  y[::17] = -1                              # unlabelled rows are not trained on
  test_x, test_y = clusters(rng, 61)
  # B = 30 is padded to 32 on 8 devices; 3 epochs of 6 steps.
  config = linear_probe.ProbeConfig(epochs=3, batch_size=30, learning_rate=0.03,
                                    weight_decay=1e-4, seed=0)
  fitted, scores = {}, {}
  for name, devices in (("1", ONE_DEVICE), ("8", None)):
    train = features_lib.Features.from_host(x, x, y, devices)
    test = features_lib.Features.from_host(test_x, test_x, test_y, devices)
    assert train.layout.num_shards == int(name)
    probe = linear_probe.Probe(4, config, devices)
    params, mean, std = probe.fit(train.pooled, train.labels, train.layout, y)
    fitted[name] = jax.tree.map(parallel.first_replica, params)
    scores[name] = (probe.top1(params, test.pooled, test.labels, mean, std),
                    probe.top1(params, train.pooled, train.labels, mean, std))
  # Tolerance: the same batches and steps; only the order of float additions differs (psum of
  # per-device partial sums, jnp vs numpy moments). Measured: weights (|w| <= 0.27) differ by
  # at most 5e-8 between 8 and 1 devices and from the gathered fit; allowed: 1e-6 + 1e-5 |w|.
  for name in ("w", "b"):
    np.testing.assert_allclose(fitted["8"][name], fitted["1"][name], rtol=1e-5, atol=1e-6)
  reference = gathered_fit(x, y, 4, config)
  for name in ("w", "b"):
    np.testing.assert_allclose(fitted["8"][name], reference[name], rtol=1e-5, atol=1e-6)
  assert scores["8"] == scores["1"]
  assert scores["8"][0] > 60                # it learnt something (chance is 25 %)


@pytest.mark.slow  # compiles a network on 1 and 8 devices
def test_finetuning_on_8_devices_matches_1_device():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (48, 8, 8, 1)).astype(np.uint8)
  labels = rng.integers(0, 4, 48).astype(np.int32)
  # One residual stage: BatchNorm in the stem and the block, and a fast compile.
  model = semi_supervised.Classifier.synced(
      models.get_model("small_resnet", low_dim=8, width=4, stage_sizes=(1,)), num_classes=4)
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0),
                                                                  jnp.zeros((1, 8, 8, 1)))
  config = semi_supervised.FinetuneConfig(steps=3, batch_size=16, learning_rate=0.05,
                                          momentum=0.9, weight_decay=5e-4, augment=True,
                                          crop_scale_min=0.5, seed=0)
  tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                   optax.sgd(optax.cosine_decay_schedule(config.learning_rate, config.steps),
                             momentum=config.momentum))
  transform = augment.AugmentConfig(image_size=8, mean=(0.5,), std=(0.25,),
                                    crop_scale=(0.5, 1.0), grayscale_prob=0.0, brightness=0.0,
                                    contrast=0.0, saturation=0.0, hue=0.0)
  initial = semi_supervised.FinetuneState(
      step=np.zeros((), np.int32), params=variables["params"],
      batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]))
  subset = np.arange(0, 48, 2)

  def load(rows):
    return {"image": images[rows], "label": labels[rows]}

  tuned, losses = {}, {}
  for name, devices in (("1", ONE_DEVICE), ("8", None)):
    p_step = jax.pmap(functools.partial(semi_supervised._finetune_step, model=model, tx=tx,  # pylint: disable=protected-access
                                        transform=transform, light=True),
                      axis_name=AXIS, devices=devices, donate_argnums=(0,))
    state, losses[name] = semi_supervised.finetune(
        p_step, parallel.replicate(jax.tree.map(np.asarray, initial), devices), subset, load,
        config, devices)
    tuned[name] = jax.tree.map(parallel.first_replica, (state.params, state.batch_stats))
  # Tolerance: BatchNorm statistics are means over devices of per-device means (exact for
  # equal per-device batches) and gradients a mean of 8 partial means: float rounding only.
  # Measured: parameters and statistics (|v| <= 1.06) differ by at most 1.2e-7 after 3 steps,
  # the loss not at all; allowed: 1e-6 + 1e-5 |v|.
  np.testing.assert_allclose(losses["8"], losses["1"], rtol=1e-6)
  flat_1, flat_8 = (jax.tree.leaves(tuned[name]) for name in ("1", "8"))
  for a, b in zip(flat_8, flat_1):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), tuned["8"][0],
                                         variables["params"]))
  assert any(changed)                       # the steps did move the encoder and the head


@pytest.mark.parametrize("num_devices", [2, 8])
def test_extraction_writes_every_record_on_its_owner_only(num_devices):
  n, dim, batch = 50, 3, 16                 # 4 global batches, the last one padded
  devices = jax.devices()[:num_devices]
  layout = ShardLayout(n, num_devices)
  values = np.arange(n * dim, dtype=np.float32).reshape(n, dim) + 1

  def write(table, indices, rows, valid):
    gather = functools.partial(sharding.gather_batch, axis_name=AXIS)
    return features_lib.write_rows(table, gather(indices), gather(rows), gather(valid),
                                   layout=layout, axis_name=AXIS)

  step = jax.pmap(write, axis_name=AXIS, devices=devices, donate_argnums=(0,))
  table = parallel.shard_local_rows(
      np.zeros((num_devices, layout.rows_per_shard, dim), np.float32), devices)
  for start in range(0, n, batch):
    indices = np.arange(start, start + batch)
    valid = indices < n
    indices = np.where(valid, indices, -1).astype(np.int32)
    rows = np.where(valid[:, None], values[np.clip(indices, 0, n - 1)], 7.0)
    split = lambda x: x.reshape((num_devices, -1) + x.shape[1:])   # noqa: E731
    table = step(table, *parallel.shard_local_rows((split(indices), split(rows), split(valid)),
                                                   devices))
  for shard in table.addressable_shards:   # each device: its ceil(n / D) rows, nothing more
    assert shard.data.nbytes == layout.rows_per_shard * dim * 4 == -(-n // num_devices) * dim * 4
  np.testing.assert_array_equal(layout.unshard_array(table), values)
  np.testing.assert_array_equal(np.asarray(table).reshape(-1, dim)[n:], 0)  # padding untouched
  take = jax.pmap(functools.partial(features_lib.take_rows, layout=layout, axis_name=AXIS),
                  axis_name=AXIS, devices=devices)
  picks = np.array([49, 0, 13, 25], np.int32)
  np.testing.assert_array_equal(
      parallel.first_replica(take(table, parallel.replicate(picks, devices))), values[picks])


def test_knn_sweep_over_sharded_queries_counts_like_a_replicated_sweep():
  rng = np.random.default_rng(2)
  rows = rng.normal(size=(90, 8)).astype(np.float32)
  rows /= np.linalg.norm(rows, axis=1, keepdims=True)
  queries = rng.normal(size=(37, 8)).astype(np.float32)    # 5 rows per shard, the last 2
  queries /= np.linalg.norm(queries, axis=1, keepdims=True)
  bank_labels = rng.integers(0, 3, 90).astype(np.int32)
  query_labels = rng.integers(0, 3, 37).astype(np.int32)
  static = dict(num_instances=90, num_classes=3, ks=(1, 7), temperatures=(0.1, 1.0))
  expected = knn_sweep.sweep_counts(queries, query_labels, np.ones(37, bool), rows, bank_labels,
                                    **static)
  query_features = features_lib.Features.from_host(queries, queries, query_labels)
  bank = features_lib.Features.from_host(rows, rows, bank_labels)
  # Two query rows per device and step: chunks [0, 2), [2, 4), then [3, 5) with row 3 counted
  # already (the last chunk is moved back to end at the shard's end).
  step = jax.pmap(functools.partial(knn_sweep._sweep_step, query_layout=query_features.layout,  # pylint: disable=protected-access
                                    chunk_rows=2, **static), axis_name=AXIS)
  totals = {}
  for chunk in range(3):
    counts = step(query_features.embedding, query_features.labels,
                  parallel.replicate(np.int32(chunk)), bank.embedding, bank.labels)
    for setting, hits in counts.items():
      for name, value in hits.items():
        key = (setting, name)
        totals[key] = totals.get(key, 0) + int(parallel.first_replica(value))
  assert totals == {(s, name): int(v) for s, hits in expected.items() for name, v in hits.items()}


@pytest.mark.slow  # compiles a network on 1 and 8 devices
def test_every_evaluation_step_holds_1_over_d_of_the_splits():
  """Compiled per-device memory of extraction, the kNN sweep and the probe's training and
  scoring, at n and 2n on 2 and 8 devices. The feature bytes a step reads (its arguments) grow
  with n as 1/D (4x less on 8 devices than on 2); its peak (argument + output - aliased +
  temporary bytes) grows by at most the D-th part of the splits' tables and of the sweep's
  (queries per step x bank rows) similarities. The rest of the peak does not depend on n (the
  encoder, the kNN's O(Q k D) candidates)."""
  tiny = eval_memory.Size(train=4096, eval=1024, model="small_resnet", model_width=4,
                          image_size=16, channels=1, low_dim=16, num_classes=10, eval_batch=64,
                          probe_batch=64)
  memory = {}
  for num_devices in (2, 8):
    for scale in (1, 2):
      size = dataclasses.replace(tiny, train=scale * tiny.train, eval=scale * tiny.eval)
      memory[num_devices, scale] = eval_memory.sharded_steps(size, jax.devices()[:num_devices])
  pooled_dim = memory[8, 1]["pooled_dim"]
  whole_train = features_lib.gathered_bytes(ShardLayout(tiny.train), tiny.low_dim, pooled_dim)
  for num_devices in (2, 8):
    per_device = memory[num_devices, 1]["feature_bytes"]["train"]
    assert per_device * num_devices == pytest.approx(whole_train, rel=0.01)
  # What doubling n adds, over all the splits' tables and the sweep's similarities.
  tables = whole_train + features_lib.gathered_bytes(ShardLayout(tiny.eval), tiny.low_dim,
                                                     pooled_dim)
  similarities = tiny.eval_batch * tiny.train * 4
  for step in ("extract", "sweep", "probe_train", "probe_score"):
    growth = {d: {key: memory[d, 2][step][key] - memory[d, 1][step][key]
                  for key in ("argument", "peak")} for d in (2, 8)}
    assert growth[8]["argument"] > 0, step
    assert growth[2]["argument"] / growth[8]["argument"] == pytest.approx(4, rel=0.05), (
        step, growth)
    for d in (2, 8):
      assert growth[d]["peak"] <= 1.1 * (tables + similarities) / d, (step, d, growth)


def test_eval_memory_benchmark_reports_both_paths():
  result = eval_memory.run("quick")
  peak = result["peak_feature_bytes_per_device"]
  size = eval_memory.SIZES["quick"]
  assert peak["gathered"] == size.train * (result["sharded"]["pooled_dim"] + 1) * 4
  assert peak["sharded"] < peak["gathered"]
  report = eval_memory.markdown(result)
  assert "gathered (before, f437199)" in report and "sharded probe_train" in report
