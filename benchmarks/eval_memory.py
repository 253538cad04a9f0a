"""Evaluation memory per device at ImageNet's n: sharded features against gathered ones (issue 12).

Compile-only, on 8 fake CPU devices (the flag is set below, before JAX loads, so run this module
in its own process: `python -m benchmarks.eval_memory --size full`). Nothing of size n is
allocated: every step is lowered from `jax.ShapeDtypeStruct`s and read with
`Compiled.memory_analysis()` (per device: argument, output, aliased and temporary bytes).

Sharded path (this code): the training split (n = 1,281,167) and the eval split (50,000) as
`evaluation.features` tables, embedding (low_dim 128), pooled features (2048, ResNet-50's) and
labels, instance-sharded over the devices; the steps are the evaluator's own: feature extraction
(`features._extract_step`, ResNet-50 on synthetic 32 x 32 images, tables donated), the kNN sweep
(`knn_sweep._sweep_step`, k = 20 and 200, three tau, 1000 classes), the linear probe's training
call (`linear_probe.train_steps`, 64 AdamW steps of B = 256 on the pooled features) and its
scoring (`linear_probe.correct_counts`).

Gathered path (the code before this change, f437199): `FeatureCache` concatenated every split on
every host (formula: rows x (128 + 2048 + 2) x 4 bytes), and the linear probe's `fit` put the
whole pooled training matrix on one device, its epoch compiled with it (that epoch is lowered
here as it was written, the matrix an argument instead of a closed-over constant).

"Peak feature bytes per device" is the split tables a device holds at once (the cache keeps
both splits): by formula, and checked against the largest compiled argument of the steps that
read them.
"""

import os

NUM_DEVICES = 8
if __name__ == "__main__":
  # XLA reads these when JAX initialises its backends, so they are set before jax is imported;
  # only when run as a program, so that importing this module (tests, `markdown`) changes nothing.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={NUM_DEVICES}").strip()
  os.environ["JAX_PLATFORMS"] = "cpu"

# pylint: disable=wrong-import-position
import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from benchmarks import common
from benchmarks import hlo
from instdisc_jax import augment
from instdisc_jax import default_config
from instdisc_jax import parallel
from instdisc_jax import restore
from instdisc_jax import steps
from instdisc_jax.evaluation import features as features_lib
from instdisc_jax.evaluation import knn_sweep
from instdisc_jax.evaluation import linear_probe
from instdisc_jax.parallel import AXIS
from instdisc_jax.sharding import ShardLayout


@dataclasses.dataclass(frozen=True)
class Size:
  """Split sizes, encoder, feature sizes and the evaluator's batch sizes."""

  train: int
  eval: int
  model: str
  model_width: int           # 0: the model's own width
  image_size: int
  channels: int
  low_dim: int
  num_classes: int
  eval_batch: int            # global batch of extraction and of kNN queries
  probe_batch: int


SIZES = {
    "quick": Size(train=20_000, eval=2_000, model="small_resnet", model_width=4, image_size=16,
                  channels=1, low_dim=16, num_classes=10, eval_batch=256, probe_batch=64),
    "full": Size(train=1_281_167, eval=50_000, model="resnet50", model_width=0, image_size=32,
                 channels=3, low_dim=128, num_classes=1000, eval_batch=1024, probe_batch=256),
}


def _abstract(shape, dtype, devices=None) -> jax.ShapeDtypeStruct:
  """A (D, ...) argument sharded one slice per device, as the evaluator's arrays are."""
  return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype),
                              sharding=parallel.device_sharding(devices))


def _replicated(tree, num: int, devices=None):
  """Abstract per-device values of `tree` (shapes) with a leading axis of `num` devices."""
  return jax.tree.map(lambda x: _abstract((num,) + tuple(x.shape), x.dtype, devices), tree)


def _memory(pmapped, *args) -> dict:
  lowered = pmapped.lower(*args)
  compiled, compile_s = common.timed(lowered.compile)
  memory = hlo.memory(compiled)
  memory["peak"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
  memory["compile_s"] = compile_s
  return memory


def _encoder(size: Size):
  config = default_config.get_config()
  config.model, config.model_width, config.low_dim = size.model, size.model_width, size.low_dim
  config.image_size = size.image_size
  model = restore.build_model(config)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             jnp.zeros((1, size.image_size, size.image_size, size.channels)))
  transform = augment.AugmentConfig(image_size=size.image_size, mean=(0.5,) * size.channels,
                                    std=(0.25,) * size.channels)
  return config, model, variables, transform


def sharded_steps(size: Size, devices=None, which=("extract", "sweep", "probe_train",
                                                    "probe_score")) -> dict:
  """Compiled memory per device of the evaluator's steps over `devices` (all by default)."""
  num = len(jax.devices() if devices is None else devices)
  train_layout, eval_layout = ShardLayout(size.train, num), ShardLayout(size.eval, num)
  pmap = functools.partial(jax.pmap, axis_name=AXIS, devices=devices)
  config, model, variables, transform = _encoder(size)
  pooled_dim = variables["params"]["head"]["kernel"].shape[0]

  def tables(layout):
    rows = (num, layout.rows_per_shard)
    return {"embedding": _abstract(rows + (size.low_dim,), "float32", devices),
            "pooled": _abstract(rows + (pooled_dim,), "float32", devices),
            "labels": _abstract(rows, "int32", devices)}

  train_tables, eval_tables = tables(train_layout), tables(eval_layout)
  results = {"pooled_dim": pooled_dim, "devices": num}
  if "extract" in which:
    hp = steps.StepConfig.from_config(config, train_layout, transform, size.num_classes)
    state = steps.TrainState(
        step=_abstract((num,), "int32", devices),
        params={"encoder": _replicated(variables["params"], num, devices)},
        batch_stats=_replicated(variables.get("batch_stats", {}), num, devices),
        opt_state=None, bank=None, partition=None, key=None)
    local = size.eval_batch // num
    batch = {"image": _abstract((num, local, size.image_size, size.image_size, size.channels),
                                "uint8", devices),
             "label": _abstract((num, local), "int32", devices),
             "index": _abstract((num, local), "int32", devices),
             "mask": _abstract((num, local), "bool", devices)}
    step = pmap(functools.partial(features_lib._extract_step,  # pylint: disable=protected-access
                                  embed=features_lib.embed_fn(model, hp), layout=train_layout),
                donate_argnums=(1,))
    results["extract"] = _memory(step, state, train_tables, batch)
  if "sweep" in which:
    chunk_rows = min(max(1, size.eval_batch // num), eval_layout.rows_per_shard)
    step = pmap(functools.partial(
        knn_sweep._sweep_step, query_layout=eval_layout, chunk_rows=chunk_rows,  # pylint: disable=protected-access
        num_instances=size.train, num_classes=size.num_classes, ks=(20, 200),
        temperatures=(0.05, 0.07, 0.1)))
    results["sweep"] = _memory(step, eval_tables["embedding"], eval_tables["labels"],
                               _abstract((num,), "int32", devices), train_tables["embedding"],
                               train_tables["labels"])
  params = {"w": jax.ShapeDtypeStruct((pooled_dim, size.num_classes), jnp.float32),
            "b": jax.ShapeDtypeStruct((size.num_classes,), jnp.float32)}
  moments = _replicated(jax.ShapeDtypeStruct((pooled_dim,), jnp.float32), num, devices)
  if "probe_train" in which:
    tx = optax.adamw(optax.cosine_decay_schedule(0.03, 1000), weight_decay=1e-4)
    carry = _replicated((params, jax.eval_shape(tx.init, params)), num, devices)
    batch = size.probe_batch + (-size.probe_batch % num)
    steps_per_call = linear_probe.STEPS_PER_CALL
    step = pmap(functools.partial(linear_probe.train_steps, layout=train_layout, tx=tx,
                                  axis_name=AXIS))
    results["probe_train"] = _memory(
        step, carry, train_tables["pooled"], train_tables["labels"],
        _abstract((num, steps_per_call, batch), "int32", devices),
        _abstract((num, steps_per_call), "bool", devices), moments, moments)
  if "probe_score" in which:
    step = pmap(functools.partial(linear_probe.correct_counts, axis_name=AXIS))
    results["probe_score"] = _memory(step, _replicated(params, num, devices),
                                     train_tables["pooled"], train_tables["labels"], moments,
                                     moments)
  results["feature_bytes"] = {
      "train": features_lib.sharded_bytes(train_layout, size.low_dim, pooled_dim),
      "eval": features_lib.sharded_bytes(eval_layout, size.low_dim, pooled_dim)}
  return results


def _gathered_fit_epoch(carry, key, x, y, *, tx, batch: int, steps_per_epoch: int):
  """One epoch of f437199's `linear_probe.fit` (x, y: the whole training split, one device)."""
  order = jax.random.permutation(key, x.shape[0])[:steps_per_epoch * batch]

  def step(carry, rows):
    params, opt_state = carry

    def loss(params):
      logits = x[rows] @ params["w"] + params["b"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, y[rows]).mean()

    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  carry, _ = jax.lax.scan(step, carry, order.reshape(steps_per_epoch, batch))
  return carry


def _gathered_sweep_step(queries, targets, valid, rows, labels, **static):
  """f437199's `knn_sweep._sweep_step`: a replicated chunk of queries against the bank."""
  return knn_sweep.sweep_counts(queries, targets, valid, rows, labels, axis_name=AXIS, **static)


def gathered_path(size: Size, pooled_dim: int) -> dict:
  """Memory of the code before this change: host copies, the one-device probe epoch and the
  kNN sweep on replicated query chunks."""
  num = jax.device_count()
  train_layout = ShardLayout(size.train, num)
  sweep = jax.pmap(functools.partial(
      _gathered_sweep_step, num_instances=size.train, num_classes=size.num_classes,
      ks=(20, 200), temperatures=(0.05, 0.07, 0.1)), axis_name=AXIS)
  chunk = size.eval_batch
  sweep_memory = _memory(sweep, _abstract((num, chunk, size.low_dim), "float32"),
                         _abstract((num, chunk), "int32"), _abstract((num, chunk), "bool"),
                         _abstract((num, train_layout.rows_per_shard, size.low_dim), "float32"),
                         _abstract((num, train_layout.rows_per_shard), "int32"))
  tx = optax.adamw(optax.cosine_decay_schedule(0.03, 1000), weight_decay=1e-4)
  params = {"w": jax.ShapeDtypeStruct((pooled_dim, size.num_classes), jnp.float32),
            "b": jax.ShapeDtypeStruct((size.num_classes,), jnp.float32)}
  carry = (params, jax.eval_shape(tx.init, params))
  epoch = jax.jit(functools.partial(_gathered_fit_epoch, tx=tx, batch=size.probe_batch,
                                    steps_per_epoch=size.train // size.probe_batch))
  lowered = epoch.lower(carry, jax.eval_shape(lambda: jax.random.key(0)),
                        jax.ShapeDtypeStruct((size.train, pooled_dim), jnp.float32),
                        jax.ShapeDtypeStruct((size.train,), jnp.int32))
  compiled, compile_s = common.timed(lowered.compile)
  memory = hlo.memory(compiled)
  memory["peak"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
  memory["compile_s"] = compile_s
  host = {split: features_lib.gathered_bytes(ShardLayout(rows), size.low_dim, pooled_dim)
          + rows * 4                # the int32 indices the old `Features` also held
          for split, rows in (("train", size.train), ("eval", size.eval))}
  return {"probe_epoch": memory, "sweep": sweep_memory, "host_bytes": host,
          "device_feature_bytes": size.train * pooled_dim * 4 + size.train * 4}


def run(size_name: str) -> dict:
  size = SIZES[size_name]
  result = {"size": dataclasses.asdict(size)}
  common.log(f"eval_memory: sharded steps, n={size.train}, {jax.device_count()} devices")
  result["sharded"] = sharded_steps(size)
  common.save_partial(result)
  common.log("eval_memory: gathered path (f437199's linear probe epoch on one device)")
  result["gathered"] = gathered_path(size, result["sharded"]["pooled_dim"])
  sharded = result["sharded"]
  result["peak_feature_bytes_per_device"] = {
      "sharded": sum(sharded["feature_bytes"].values()),
      "gathered": result["gathered"]["device_feature_bytes"]}
  result["peak_compiled_bytes_per_device"] = {
      "sharded": max(sharded[s]["peak"] for s in ("extract", "sweep", "probe_train",
                                                  "probe_score")),
      "gathered": max(result["gathered"][s]["peak"] for s in ("probe_epoch", "sweep"))}
  return result


def markdown(result: dict) -> str:
  size, sharded, gathered = result["size"], result["sharded"], result["gathered"]
  header = (f"n = {size['train']:,} training and {size['eval']:,} eval records, "
            f"{sharded['devices']} devices, {size['model']} on {size['image_size']}x"
            f"{size['image_size']} images, features {size['low_dim']} + "
            f"{sharded['pooled_dim']} float32; compile-only (`memory_analysis()`, per device).")
  gib = lambda b: f"{b / 2**30:.3f}"   # noqa: E731
  peak_features = result["peak_feature_bytes_per_device"]
  peak_compiled = result["peak_compiled_bytes_per_device"]
  summary = common.table(
      ["path", "peak feature GiB / device", "peak compiled GiB / device",
       "feature GiB / host"],
      [["gathered (before, f437199)", gib(peak_features["gathered"]),
        gib(peak_compiled["gathered"]), gib(sum(gathered["host_bytes"].values()))],
       ["sharded (this code)", gib(peak_features["sharded"]), gib(peak_compiled["sharded"]),
        "0 (export: its own rows)"],
       ["ratio", f"{peak_features['gathered'] / peak_features['sharded']:.1f}x",
        f"{peak_compiled['gathered'] / peak_compiled['sharded']:.1f}x", ""]])
  steps = common.table(
      ["step", "argument MiB", "output MiB", "aliased MiB", "temp MiB", "peak MiB",
       "compile s"],
      [[name] + [common.mib(m[k]) for k in ("argument", "output", "alias", "temp", "peak")]
       + [f"{m['compile_s']:.1f}"]
       for name, m in [(f"sharded {s}", sharded[s]) for s in ("extract", "sweep", "probe_train",
                                                              "probe_score")]
       + [("gathered probe epoch (1 device)", gathered["probe_epoch"]),
          ("gathered sweep (replicated query chunk)", gathered["sweep"])]])
  return "\n\n".join([header, summary, steps])


if __name__ == "__main__":
  common.module_main(run, markdown, __doc__.splitlines()[0], SIZES)
