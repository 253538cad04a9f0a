"""Train-step throughput, compile time and the share of the step spent in NCE + bank.

For each case the step is built as the trainer builds it: `restore.build_model`, `optim`,
`steps.StepConfig`, `steps.init_state` and `steps.train_step`, under `jax.pmap` over the local
devices with the state donated. The devices are the trainer's: a CPU host is split into one XLA
device per core (`cli.split_cpu_into_devices` with the cases' train and eval batch sizes, set
below before JAX starts, so run this module in its own process); a GPU or TPU host is unchanged.
Batches are synthetic uint8 images and distinct random instance indices (no dataset is read);
they are placed on the devices before the clock starts.

* images/s: global batch / median step time (after compile).
* compile: seconds to lower and to compile the step (`.lower(...).compile()`).
* NCE + bank share: 1 - t_without / t_with, where "without" is the same step with the
  objective replaced by the mean of this device's features and no index/feature all-gather,
  noise sampling or bank update (`encoder_only_step`); augmentation, forward, backward, the
  gradient psum, SGD and the BatchNorm pmean stay.
* bank copies: `copy` ops of a whole bank shard in the compiled step (an O(n) cost per step).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

import ml_collections

from instdisc_jax import cli
from instdisc_jax import default_config

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# Training-split size, image shape the device receives and classes of each dataset.
DATASETS = {
    "fashion_mnist": (60_000, (28, 28, 1), 10),
    "cifar10": (50_000, (32, 32, 3), 10),
    "imagenet2012": (1_281_167, (224, 224, 3), 1000),
}


@dataclasses.dataclass(frozen=True)
class Case:
  """One measured configuration.

  Attributes:
    config: a file name under configs/ (without .py).
    batch: global batch; None keeps the config's.
    num_instances: bank rows n; None uses the dataset's training-split size.
    overrides: (field, value) pairs set on the config.
    note: why the case differs from the config, for the report.
  """

  config: str
  batch: int | None = None
  num_instances: int | None = None
  overrides: tuple[tuple[str, Any], ...] = ()
  note: str = ""


@dataclasses.dataclass(frozen=True)
class Size:
  cases: tuple[Case, ...]
  repeats: int


SIZES = {
    "quick": Size((Case("fashion_mnist", batch=16, num_instances=1024,
                        overrides=(("num_negatives", 256),),
                        note="quick: batch 16, n = 1024, m = 256"),), repeats=2),
    "full": Size((
        Case("fashion_mnist"),
        Case("cifar10_resnet18"),
        Case("imagenet_resnet50", batch=8,
             note="CPU: global batch 8 instead of 256 (a 256 step takes minutes here)"),
    ), repeats=3),
    "gpu": Size((
        Case("cifar10_resnet18", overrides=(("compute_dtype", "bfloat16"),),
             note="bfloat16 compute"),
        Case("imagenet_resnet50", note="bfloat16 compute (the config's)"),
    ), repeats=10),
}


def load_config(case: Case) -> ml_collections.ConfigDict:
  config = default_config.load_config_file(os.path.join(CONFIG_DIR, case.config + ".py"))
  for field, value in case.overrides:
    config[field] = value
  if case.batch is not None:
    config.batch_size = case.batch
  return config


def split_host_like_the_trainer(size: Size) -> None:
  """One XLA CPU device per core (a divisor of every case's train and eval batch), as the
  trainer's entry points split a CPU host; before JAX starts. No effect on GPU or TPU."""
  configs = [load_config(case) for case in size.cases]
  cli.split_cpu_into_devices([b for c in configs for b in (c.batch_size, c.eval_batch_size)])


if __name__ == "__main__":
  _parser = argparse.ArgumentParser(add_help=False)
  _parser.add_argument("--size", choices=tuple(SIZES), default="full")
  split_host_like_the_trainer(SIZES[_parser.parse_known_args()[0].size])

# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from benchmarks import hlo
from instdisc_jax import augment
from instdisc_jax import data
from instdisc_jax import optim
from instdisc_jax import parallel
from instdisc_jax import restore
from instdisc_jax import steps
from instdisc_jax.parallel import AXIS
from instdisc_jax.sharding import ShardLayout


def synthetic_split(name: str, images: np.ndarray, num_classes: int) -> data.DatasetSplit:
  """An in-memory split of the given uint8 images with random labels."""
  labels = np.random.default_rng(0).integers(0, num_classes, len(images)).astype(np.int32)
  return data.DatasetSplit(name=f"synthetic:{name}", channels=images.shape[-1],
                           fingerprint="synthetic", images=images, label_array=labels,
                           num_classes=num_classes)


def augment_config(config: ml_collections.ConfigDict, image_shape, num_classes: int):
  """The trainer's transforms for the dataset (`restore.augment_config`).

  ImageNet images vary in size, so the trainer crops them on the host and the device only
  applies colour and flip; the synthetic images here are already image_size x image_size.
  """
  images = np.zeros((1,) + tuple(image_shape), np.uint8)
  cfg = restore.augment_config(config, synthetic_split(config.dataset, images, num_classes))
  if config.dataset == "imagenet2012":
    cfg = dataclasses.replace(cfg, crop_on_device=False)
  return cfg


@dataclasses.dataclass
class Built:
  """Everything needed to call the step of one case."""

  config: ml_collections.ConfigDict
  model: Any
  tx: optax.GradientTransformation
  hp: steps.StepConfig
  learning_rate_fn: Any
  image_shape: tuple[int, int, int]


def build(case: Case) -> Built:
  config = load_config(case)
  dataset_size, image_shape, num_classes = DATASETS[config.dataset]
  n = case.num_instances or dataset_size
  layout = ShardLayout(n, jax.device_count())
  model = restore.build_model(config)
  steps_per_epoch = n // config.batch_size
  learning_rate_fn = optim.learning_rate_schedule(config, steps_per_epoch,
                                                  config.num_epochs * steps_per_epoch)
  tx = optim.sgd(config, learning_rate_fn)
  hp = steps.StepConfig.from_config(config, layout,
                                    augment_config(config, image_shape, num_classes),
                                    num_classes)
  return Built(config, model, tx, hp, learning_rate_fn, image_shape)


def init(built: Built):
  config = built.config
  p_init = steps.pmapped(steps.init_state, model=built.model, tx=built.tx, hp=built.hp,
                         image_shape=(config.image_size, config.image_size,
                                      built.image_shape[-1]),
                         low_dim=config.low_dim, bank_init=config.bank_init,
                         bank_dtype=jnp.dtype(config.bank_dtype))
  key = jax.random.key_data(jax.random.key(config.seed))
  return p_init(parallel.replicate(np.asarray(key)))


def encoder_only_step(state: steps.TrainState, batch, *, model, tx, hp: steps.StepConfig):
  """`steps.train_step` without its NCE + bank part: the loss is the mean of this device's
  features; no index/feature all-gather, noise, objective or bank update."""
  augment_key, _ = steps.step_keys(state)
  images = augment.train_augment(augment_key, batch["image"], hp.augment)

  def loss_fn(params):
    features, new_model_state = model.apply(
        {"params": params["encoder"], "batch_stats": state.batch_stats}, images, train=True,
        mutable=["batch_stats"])
    return jnp.mean(features), new_model_state

  (loss, new_model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = dict(grads, encoder=jax.lax.psum(grads["encoder"], AXIS))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  batch_stats = jax.lax.pmean(new_model_state["batch_stats"], AXIS)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  return new_state, {"loss": jax.lax.pmean(loss, AXIS)}


def batches(built: Built, count: int) -> list:
  """`count` device-placed batches of random uint8 images and distinct instance indices."""
  rng = np.random.default_rng(0)
  batch, n = built.config.batch_size, built.hp.layout.num_instances
  out = []
  for _ in range(count):
    images = rng.integers(0, 256, (batch,) + built.image_shape, dtype=np.uint8)
    indices = rng.choice(n, batch, replace=False).astype(np.int32)
    out.append(parallel.shard_local_batch({"image": images, "index": indices}))
  return out


def time_step(step_fn, built: Built, state, inputs, repeats: int, **static):
  """Compiles and times one step function; returns (final state, record)."""
  p_step = steps.pmapped(step_fn, donate_argnums=(0,), model=built.model, tx=built.tx,
                         hp=built.hp, **static)
  lowered, lower_s = common.timed(lambda: p_step.lower(state, inputs[0]))
  compiled, compile_s = common.timed(lowered.compile)
  layout = built.hp.layout
  holder = {"state": state}

  def call(i):
    holder["state"], metrics = compiled(holder["state"], inputs[i % len(inputs)])
    return holder["state"], metrics

  timing = common.time_calls(call, repeats=repeats)
  record = {"lower_s": lower_s, "compile_s": compile_s, "timing": timing.to_json(),
            "images_per_s": built.config.batch_size / timing.median_s,
            "bank_copies": hlo.buffer_copies(compiled.as_text(),
                                             layout.rows_per_shard * built.config.low_dim),
            "memory": hlo.memory(compiled)}
  return holder["state"], record


def run_case(case: Case, repeats: int) -> dict:
  common.log(f"train_step: {case.config} {case.note}")
  built = build(case)
  state, init_s = common.timed(lambda: jax.block_until_ready(init(built)))
  inputs = batches(built, repeats + 1)
  state, with_nce = time_step(steps.train_step, built, state, inputs, repeats,
                              learning_rate_fn=built.learning_rate_fn)
  _, without = time_step(encoder_only_step, built, state, inputs, repeats)
  config = built.config
  return {
      "config": case.config, "note": case.note, "model": config.model,
      "image_size": config.image_size, "global_batch": config.batch_size,
      "compute_dtype": config.compute_dtype, "objective": config.objective,
      "num_negatives": config.num_negatives, "shared_noise": config.shared_noise,
      "num_instances": built.hp.layout.num_instances, "devices": jax.device_count(),
      "init_s": init_s, "with_nce_bank": with_nce, "without_nce_bank": without,
      "nce_bank_share": 1 - without["timing"]["median_s"] / with_nce["timing"]["median_s"],
  }


def run(size_name: str) -> dict:
  size = SIZES[size_name]
  result = {"cases": []}
  for case in size.cases:
    result["cases"].append(run_case(case, size.repeats))
    common.save_partial(result)
  return result


def markdown(result: dict) -> str:
  rows = []
  for c in result["cases"]:
    w, wo = c["with_nce_bank"], c["without_nce_bank"]
    rows.append([
        c["config"], f"{c['model']} {c['image_size']}px {c['compute_dtype']}",
        c["global_batch"], c["devices"], f"{c['num_instances']}", f"m={c['num_negatives']}"
        + (" shared" if c["shared_noise"] else ""),
        f"{w['images_per_s']:.1f}", common.ms(w["timing"]["median_s"]),
        common.ms(wo["timing"]["median_s"]), f"{100 * c['nce_bank_share']:.1f}%",
        f"{w['lower_s']:.1f} + {w['compile_s']:.1f}", len(w["bank_copies"]), c["note"]])
  return ("Median of repeats after compile, on the trainer's devices (a CPU host split into one "
          "device per core); NCE + bank share = 1 - t_without / t_with.\n\n" +
          common.table(["config", "model", "global batch", "devices", "n", "noise", "images/s",
                        "step ms", "step ms without NCE+bank", "NCE+bank share",
                        "lower + compile s", "bank copies/step (HLO)", "note"], rows))


if __name__ == "__main__":
  common.module_main(run, markdown, __doc__.splitlines()[0], SIZES)
