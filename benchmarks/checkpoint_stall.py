"""Training time lost per checkpoint save, synchronous against asynchronous (GitHub issue 12).

Runs in its own process (`python -m benchmarks.checkpoint_stall --size full`) on the device
split the trainer uses on a CPU host: one XLA device per core (the flag is set below, before JAX
loads). It is standalone: `benchmarks/run.py` does not start it.

The state is an ImageNet-sized train state: a float32 memory bank of n = 1,281,167 x 128 (625 MiB,
instance-sharded over the devices) and the parameters, BatchNorm statistics and SGD momentum of
the repository's ResNet-50 (`models.get_model("resnet50")`, 25.6 M parameters, replicated), all
random (zeros would compress). It is saved with `instdisc_jax.checkpointing.Checkpointer`, as the
trainer saves, into a temporary directory on the local disk.

The step is a stand-in with the real step's memory traffic on the state, under `jax.pmap` with the
state donated: an SGD-with-momentum update of every parameter, 256 bank rows per device
overwritten (the bank update of a batch), and a fixed amount of matmul work for the network. What
is measured is wall-clock time over a run of steps:

  lost per save = (time of S steps with a save every K steps - time of S steps without) / saves

for synchronous saves (orbax waits for the write) and asynchronous ones (the default: the write
overlaps the next steps). The three kinds of run (no saves, synchronous, asynchronous) take
turns, and each kind's fastest round is compared. K is chosen so that the steps between two saves take longer than one
synchronous write, as in a real run, where saves are minutes apart; the final save's write is
waited for inside the timed window, so no write is left uncounted. The time spent inside the
`save` call itself (the training thread's part) is reported too.
"""

import os

if __name__ == "__main__":
  # One device per core, as the trainer splits a CPU host; set before JAX initialises.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={os.cpu_count()}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

# pylint: disable=wrong-import-position
import dataclasses
import math
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from instdisc_jax import models
from instdisc_jax import parallel
from instdisc_jax.checkpointing import Checkpointer
from instdisc_jax.sharding import ShardLayout

SHARDED = ("rows",)
MODES = {"none": None, "synchronous": False, "asynchronous": True}
META = {"benchmark": "checkpoint_stall"}
ROWS_PER_STEP = 256     # Bank rows a step writes per device.


@dataclasses.dataclass(frozen=True)
class Size:
  num_instances: int
  low_dim: int
  model: str
  image_size: int
  matmul: int            # The step's stand-in network work: `matmul_repeats` products of this
  matmul_repeats: int    # square size.
  saves: int
  max_every: int         # Cap on the steps between saves (the quick size's step is ~1 ms).
  rounds: int            # Turns of (no saves, synchronous, asynchronous).


SIZES = {
    "full": Size(1_281_167, 128, "resnet50", 224, 512, 2, saves=3, max_every=10_000,
                 rounds=2),
    "quick": Size(10_000, 16, "small_resnet", 16, 64, 1, saves=2, max_every=20, rounds=1),
}


def random_like(rng: np.random.Generator, shapes) -> dict:
  """Random float32 host arrays of the shapes of a pytree of ShapeDtypeStructs (made on the
  host: one compile per leaf shape would take minutes)."""
  return jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)


def make_state(size: Size) -> dict:
  """The train state: {"rows": instance-sharded bank, params/batch_stats/momentum replicated},
  every leaf with a leading device axis, as the trainer holds it."""
  model = models.get_model(size.model, low_dim=size.low_dim)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size.image_size, size.image_size, 3)),
                         train=False))
  rng = np.random.default_rng(0)
  params = random_like(rng, variables["params"])
  network = parallel.replicate({
      "params": params, "batch_stats": random_like(rng, variables["batch_stats"]),
      "momentum": random_like(rng, variables["params"])})
  layout = ShardLayout(size.num_instances, jax.device_count())
  shape = (jax.local_device_count(), layout.rows_per_shard, size.low_dim)
  rows = rng.standard_normal(shape, np.float32)
  return dict(network, rows=parallel.shard_local_rows(rows))


def make_step(size: Size):
  """The stand-in step (see the module doc), pmapped with the state donated."""

  def step(state, t):
    x = jnp.full((size.matmul, size.matmul), 1e-3, jnp.float32) + t
    for _ in range(size.matmul_repeats):
      x = jnp.tanh(x @ x)
    grads = jax.tree.map(lambda p: 1e-4 * p + jnp.mean(x) * 1e-6, state["params"])
    momentum = jax.tree.map(lambda m, g: 0.9 * m + g, state["momentum"], grads)
    params = jax.tree.map(lambda p, m: p - 0.01 * m, state["params"], momentum)
    start = (t * ROWS_PER_STEP) % (state["rows"].shape[0] - ROWS_PER_STEP)
    new_rows = jnp.full((ROWS_PER_STEP, state["rows"].shape[1]), jnp.mean(x), jnp.float32)
    rows = jax.lax.dynamic_update_slice(state["rows"], new_rows, (start, 0))
    return dict(state, params=params, momentum=momentum, rows=rows)

  return jax.pmap(step, axis_name=parallel.AXIS, donate_argnums=0)


def steps_arg(t: int):
  return parallel.replicate(np.int32(t))


def run_steps(state, step, first: int, count: int):
  for t in range(first, first + count):
    state = step(state, steps_arg(t))
  return state


def timed_run(state, step, *, num_steps: int, every: int, directory: str,
              asynchronous=None):
  """(state, seconds for `num_steps` steps with a save every `every` (none if `asynchronous`
  is None), seconds spent inside each `save` call)."""
  checkpointer = None
  if asynchronous is not None:
    checkpointer = Checkpointer(directory, keep=1, sharded_keys=SHARDED,
                                asynchronous=asynchronous)
  in_save = []
  jax.block_until_ready(state)
  start = time.perf_counter()
  for t in range(num_steps):
    state = step(state, steps_arg(t))
    if checkpointer is not None and (t + 1) % every == 0:
      jax.block_until_ready(state)         # Not to count queued steps as the save's own time.
      began = time.perf_counter()
      checkpointer.save(t + 1, state, {"step": t + 1}, META)
      in_save.append(time.perf_counter() - began)
  jax.block_until_ready(state)
  if checkpointer is not None:
    checkpointer.wait_until_finished()     # The last write counts too.
  elapsed = time.perf_counter() - start
  if checkpointer is not None:
    checkpointer.close()
    shutil.rmtree(directory)
  return state, elapsed, in_save


def run(size_name: str) -> dict:
  size = SIZES[size_name]
  common.log(f"checkpoint_stall: building the state (n = {size.num_instances:,}, "
             f"{size.model}) on {jax.device_count()} devices")
  state = make_state(size)
  replicated = [x for k, x in state.items() if k != "rows"]
  state_bytes = {
      "bank": state["rows"].nbytes,
      "network_one_copy": sum(x.nbytes for x in jax.tree.leaves(replicated)) // jax.device_count(),
  }
  step = make_step(size)
  state = run_steps(state, step, 0, 3)          # Compile and warm up.
  jax.block_until_ready(state)
  # One step's time, chained (the step donates its input).
  begin = time.perf_counter()
  state = run_steps(state, step, 0, 5)
  jax.block_until_ready(state)
  step_time = (time.perf_counter() - begin) / 5

  root = tempfile.mkdtemp(prefix="checkpoint_stall_")
  try:
    # A first save compiles the snapshot and checksum function; then one synchronous save
    # alone: how long a write takes, to space the saves.
    for name in ("compile", "probe"):
      state, write_s, _ = timed_run(state, step, num_steps=1, every=1,
                                    directory=os.path.join(root, name), asynchronous=False)
    every = min(size.max_every, max(5, math.ceil(1.5 * write_s / step_time)))
    num_steps = every * size.saves
    common.log(f"checkpoint_stall: step {1000 * step_time:.0f} ms, a synchronous save "
               f"{write_s:.1f} s; {size.saves} saves, one every {every} steps")
    # The three kinds of run take turns, `rounds` times, so that a slow spell of a shared
    # machine falls on all of them; each kind's fastest round is compared.
    runs = {name: {"seconds": [], "in_save_s": []} for name in MODES}
    for round_ in range(size.rounds):
      for name, asynchronous in MODES.items():
        state, elapsed, in_save = timed_run(state, step, num_steps=num_steps, every=every,
                                            directory=os.path.join(root, f"{name}{round_}"),
                                            asynchronous=asynchronous)
        runs[name]["seconds"].append(elapsed)
        runs[name]["in_save_s"] += in_save
        common.log(f"checkpoint_stall: round {round_}, {name}: {elapsed:.2f} s")
        common.save_partial({"runs": runs})
  finally:
    shutil.rmtree(root, ignore_errors=True)
  baseline = min(runs["none"]["seconds"])
  for name in ("synchronous", "asynchronous"):
    runs[name]["lost_per_save_s"] = (min(runs[name]["seconds"]) - baseline) / size.saves
    runs[name]["median_in_save_s"] = statistics.median(runs[name]["in_save_s"])
  return {"size": dataclasses.asdict(size), "devices": jax.device_count(),
          "state_bytes": state_bytes, "step_s": step_time, "synchronous_write_s": write_s,
          "save_every_steps": every, "num_steps": num_steps, "baseline_s": baseline,
          "runs": runs}


def markdown(result: dict) -> str:
  size, runs = result["size"], result["runs"]
  lines = [
      f"Checkpoint stall: n = {size['num_instances']:,} x {size['low_dim']} float32 bank "
      f"({common.mib(result['state_bytes']['bank'])} MiB) + {size['model']} params, BN "
      f"statistics and momentum ({common.mib(result['state_bytes']['network_one_copy'])} MiB), "
      f"{result['devices']} devices; stand-in step {common.ms(result['step_s'])} ms; "
      f"{size['saves']} saves, one every {result['save_every_steps']} steps "
      f"(no-save run: {result['baseline_s']:.2f} s; each kind's fastest of "
      f"{size['rounds']} rounds).",
      "",
      common.table(
          ["saves", "training time lost per save (ms)", "inside save() (ms, median)",
           f"{result['num_steps']} steps, each round (s)"],
          [[name, common.ms(runs[name]["lost_per_save_s"]),
            common.ms(runs[name]["median_in_save_s"]),
            ", ".join(f"{t:.2f}" for t in runs[name]["seconds"])]
           for name in ("synchronous", "asynchronous")]),
  ]
  return "\n".join(lines)


if __name__ == "__main__":
  common.module_main(run, markdown, __doc__.splitlines()[0], sizes=tuple(SIZES))
