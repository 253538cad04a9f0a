r"""Ships a trained encoder as a portable `jax.export` function: its users need jax and numpy
(and flatbuffers, jax.export's file format), not this project.

  python -m instdisc_jax.export_encoder --workdir=W --out=DIR                 # any batch size
  python -m instdisc_jax.export_encoder --workdir=W --out=DIR --batch_size=64 # a fixed one

DIR receives:

* `encoder.jax`: `encode(params, images) -> features`, serialised with `jax.export`: the run's
  eval transform (uint8 -> [0, 1] -> normalised with the run's mean and std) followed by the
  network in inference mode (BatchNorm running statistics), ending in the L2-normalised
  `low_dim` embedding the memory bank holds. `images` are uint8 (b, S, S, C); with no
  `--batch_size` the batch dimension b is symbolic, so one file serves every batch size.
* `params.npz`: the network's variables as a flat {"params/...", "batch_stats/..."} dict of
  arrays; `dict(np.load(...))` is the `params` argument as it is.
* `encoder.json`: the input the encoder expects and where it came from (run, step, dataset).
* `README.md`: how to load and call it without this project.

The parameters are an argument rather than constants baked into the StableHLO, so the
serialised function stays small and the weights stay readable with numpy alone. The function is
lowered for CPU, CUDA and TPU so the same file runs on each (`--platforms` narrows that).

Bad input (a workdir without a checkpoint, an `--out` that already holds an export, a batch size
below 0) is one line and exit status 2, before anything is written.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

from absl import flags
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from instdisc_jax import augment
from instdisc_jax import cli
from instdisc_jax import parallel
from instdisc_jax import restore
from instdisc_jax import steps
from instdisc_jax.errors import UserError

FLAGS = flags.FLAGS
ENCODER_NAME = "encoder.jax"
PARAMS_NAME = "params.npz"
INFO_NAME = "encoder.json"
README_NAME = "README.md"
OUTPUTS = (ENCODER_NAME, PARAMS_NAME, INFO_NAME, README_NAME)
PLATFORMS = ("cpu", "cuda", "tpu")
_SEP = "/"


def flat_variables(state: steps.TrainState) -> dict[str, np.ndarray]:
  """The encoder's variables of a (replicated, device-axis) train state, as host arrays keyed
  "params/<module>/<name>" and "batch_stats/<module>/<name>"."""
  variables = {"params": state.params["encoder"], "batch_stats": state.batch_stats}
  return {key: parallel.first_replica(value)
          for key, value in traverse_util.flatten_dict(variables, sep=_SEP).items()}


def encoder_function(model, augment_config: augment.AugmentConfig):
  """`encode(flat variables, uint8 images) -> L2-normalised embedding`: `steps.embed` for one
  device, taking its variables as the flat dict `flat_variables` makes."""

  def encode(variables: dict, images: jax.Array) -> jax.Array:
    nested = traverse_util.unflatten_dict(variables, sep=_SEP)
    features = model.apply(nested, augment.eval_transform(images, augment_config), train=False)
    return features.astype(jnp.float32)

  return encode


def export(model, augment_config: augment.AugmentConfig, variables: dict, *,
           batch_size: Optional[int], channels: int,
           platforms: Sequence[str] = PLATFORMS) -> jax.export.Exported:
  """Exports `encoder_function` for uint8 (batch_size, S, S, channels) images; batch_size None
  makes the batch dimension symbolic."""
  size = augment_config.image_size
  batch = jax.export.symbolic_shape("b")[0] if batch_size is None else batch_size
  specs = (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables),
           jax.ShapeDtypeStruct((batch, size, size, channels), jnp.uint8))
  return jax.export.export(jax.jit(encoder_function(model, augment_config)),
                           platforms=tuple(platforms))(*specs)


def describe(run: restore.TrainedRun, batch_size: Optional[int],
             platforms: Sequence[str]) -> dict:
  """What `encoder.json` records: the input, the output and the run it came from."""
  spec, step = run.spec, run.step
  config, cfg, split = spec.config, spec.augment_config, spec.train_split
  return {
      "input": {"dtype": "uint8", "shape": [batch_size or "b", config.image_size,
                                            config.image_size, split.channels],
                "layout": "NHWC, RGB or grey, 0-255",
                "preparation": ("each image's centre square resized to image_size (bilinear)"
                                if split.fixed_size else
                                "shorter side resized to image_size * 256 / 224, then the "
                                "centre image_size square")},
      "output": {"dtype": "float32", "shape": [batch_size or "b", config.low_dim],
                 "meaning": "L2-normalised embedding; cosine similarity = dot product"},
      "normalization": {"mean": list(cfg.mean), "std": list(cfg.std)},
      "model": config.model, "low_dim": config.low_dim, "image_size": config.image_size,
      "channels": split.channels, "batch_size": batch_size,
      "platforms": list(platforms), "dataset": config.dataset, "step": step,
      "workdir": os.path.abspath(run.workdir),
  }


def readme(info: dict) -> str:
  """DIR/README.md: loading and calling the encoder with jax and numpy only."""
  size, channels = info["image_size"], info["channels"]
  batch = info["batch_size"]
  example_batch = batch or 8
  return f"""# Portable instdisc_jax encoder

Trained on `{info['dataset']}` ({info['model']}, step {info['step']}). Needs only `jax`, `numpy`
and `flatbuffers` (jax's serialisation format: `pip install jax flatbuffers`); this project need
not be installed.

```python
import jax
import numpy as np

with open("{ENCODER_NAME}", "rb") as f:
  encoder = jax.export.deserialize(bytearray(f.read()))
params = dict(np.load("{PARAMS_NAME}"))

images = np.zeros(({example_batch}, {size}, {size}, {channels}), np.uint8)  # your images
features = np.asarray(encoder.call(params, images))  # float32 ({example_batch}, {info["low_dim"]})
similarity = features @ features.T                   # cosine similarities
```

* **Input**: uint8 `(b, {size}, {size}, {channels})`, pixel values 0-255,
  {'grey' if channels == 1 else 'RGB'}, batch size {'any (symbolic)' if batch is None else batch}.
  Prepare each image as training did: {info['input']['preparation']}.
* **Output**: float32 `(b, {info['low_dim']})`, L2-normalised, so the dot product of two
  features is their cosine similarity.
* The function normalises the pixels itself (mean {info['normalization']['mean']}, std
  {info['normalization']['std']}) and runs the network in inference mode.
* Lowered for {', '.join(info['platforms'])}; `jax.jit(encoder.call)` compiles it once per
  input shape. `{INFO_NAME}` holds these facts as JSON.
"""


def check_out(out: str) -> None:
  """Refuses an `--out` that is a file or already holds an export (nothing is overwritten)."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f"--out={out} is a file; give a directory for the encoder")
  clashes = [name for name in OUTPUTS if os.path.exists(os.path.join(out, name))]
  if clashes:
    raise UserError(f"--out={out} already holds {', '.join(clashes)}; give a new directory or "
                    "remove those files")


def write(out: str, exported: jax.export.Exported, variables: dict, info: dict) -> None:
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, ENCODER_NAME), "wb") as f:
    f.write(exported.serialize())
  np.savez(os.path.join(out, PARAMS_NAME), **variables)
  with open(os.path.join(out, INFO_NAME), "w") as f:
    json.dump(info, f, indent=2)
  with open(os.path.join(out, README_NAME), "w") as f:
    f.write(readme(info))


def main(argv):
  del argv
  with cli.user_errors_exit():
    cli.require(FLAGS.workdir, "--workdir", "give the directory of a training run")
    cli.require(FLAGS.out, "--out", "give a new directory for the encoder")
    if FLAGS.batch_size < 0:
      raise UserError(f"--batch_size={FLAGS.batch_size}: must be 0 (any batch size) or more")
    check_out(FLAGS.out)
    run = restore.open_run(FLAGS.workdir, cli.start_runtime_of_run(FLAGS.workdir))
    if jax.process_index() != 0:
      return
    variables = flat_variables(run.state)
    batch_size = FLAGS.batch_size or None
    exported = export(run.spec.model, run.spec.augment_config, variables,
                      batch_size=batch_size, channels=run.spec.train_split.channels,
                      platforms=FLAGS.platforms)
    write(FLAGS.out, exported, variables, describe(run, batch_size, FLAGS.platforms))
    print(f"wrote the encoder of step {run.step} to {FLAGS.out} (see {README_NAME} there)",
          flush=True)


def define_flags() -> None:
  """The program's flags; defined only when it runs, so importing the module defines none."""
  flags.DEFINE_string("workdir", None, "A workdir written by instdisc_jax.main.")
  flags.DEFINE_string("out", None, "A new directory for the encoder.")
  flags.DEFINE_integer("batch_size", 0, "Fixed batch size of the exported function; 0 = any "
                       "(symbolic).")
  flags.DEFINE_multi_enum("platforms", list(PLATFORMS), PLATFORMS,
                          "Platforms the function is lowered for.")
  cli.define_runtime_flags()


if __name__ == "__main__":
  define_flags()
  sys.exit(cli.run(main))
