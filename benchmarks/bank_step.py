"""NCE + memory-bank cost of one train step versus the number of instances n (GitHub issue 2).

Runs on 8 fake CPU devices (the flag is set below, before JAX loads, so run this module in its
own process: `python -m benchmarks.bank_step --size full`). The timed function is exactly the
per-step NCE + bank work of `instdisc_jax.train.train_step`, under `jax.pmap` with the bank
donated:

  all-gather of the batch's instance indices and features, `noise.sample`, the value and the
  gradient (w.r.t. this device's features) of `objectives.nce_loss`, and `memory_bank.update`.

For every n, per-example and shared noise are timed (median of repeats, fresh batch and noise key
every call) and the ratio to the smallest n is reported; the goal is a flat cost (ratio <= 1.2),
since a step touches O(B * m) bank rows whatever n is. The compiled HLO is read for the
collectives (bytes per step), for copies of the bank (an O(n) cost per step) and for the
executable's temporary memory; the same bytes are also derived from the shapes by formula.
"""

import os

NUM_DEVICES = 8
if __name__ == "__main__":
  # XLA reads these when JAX initialises its backends, so they are set before jax is imported;
  # only when run as a program, so that importing this module (for `markdown`) changes nothing.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={NUM_DEVICES}").strip()
  os.environ["JAX_PLATFORMS"] = "cpu"

# pylint: disable=wrong-import-position
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks import hlo
from instdisc_jax import memory_bank
from instdisc_jax import noise as noise_lib
from instdisc_jax import objectives
from instdisc_jax import parallel
from instdisc_jax import sharding
from instdisc_jax.parallel import AXIS
from instdisc_jax.sharding import ShardLayout

# The reference's hyper-parameters (instdisc_jax.default_config); they do not change the cost.
TEMPERATURE = 0.07
BANK_MOMENTUM = 0.5
Z_MODE = "frozen"
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Size:
  """What one run measures.

  Attributes:
    num_instances: the n values, smallest first (ratios are to the first).
    batch: global batch B.
    num_noise: m.
    dim: feature dimension d.
    repeats: timed calls per (n, noise mode).
    noise_sweep: m values compiled (not run) at the smallest n, to show the collectives do
      not depend on m.

  A bfloat16 bank is compiled (not run) at the smallest and the largest n, for its temporaries.
  """

  num_instances: tuple[int, ...]
  batch: int
  num_noise: int
  dim: int
  repeats: int
  noise_sweep: tuple[int, ...]


SIZES = {
    "quick": Size((1_000, 10_000), batch=64, num_noise=256, dim=128, repeats=2,
                  noise_sweep=(1024,)),
    "full": Size((10**4, 10**5, 10**6, 10**7), batch=256, num_noise=4096, dim=128, repeats=5,
                 noise_sweep=(1024, 4096, 16384)),
}


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Static arguments of the step (hashable)."""

  layout: ShardLayout
  batch: int
  num_noise: int
  shared_noise: bool


def nce_bank_step(bank, partition, local_features, local_indices, key_data, *, spec: StepSpec):
  """The NCE + bank part of `steps.train_step` on one device (call under pmap over AXIS).

  Args:
    bank: this device's `MemoryBank` shard (rows_per_shard, d), as `TrainState.bank`; donated.
    partition: the replicated `objectives.Partition`.
    local_features: (B / D, d) this device's L2-normalised features (the encoder's output).
    local_indices: int32 (B / D,) their instance indices.
    key_data: the step's noise key (raw key data), the same on every device.

  Returns:
    (new bank, partition, metrics, loss, d loss / d local_features).
  """
  indices = sharding.gather_batch(local_indices, AXIS)
  noise = noise_lib.sample(jax.random.wrap_key_data(key_data), spec.layout, spec.num_noise,
                           spec.batch, shared=spec.shared_noise, axis_name=AXIS)
  # One read of the bank, as in steps.train_step (a second read makes XLA copy the bank).
  rows = objectives.step_rows(bank, indices, noise, AXIS)

  def loss_fn(local):
    features = sharding.gather_batch(local, AXIS)
    share, aux = objectives.nce_loss(features, indices, bank, noise, partition,
                                     temperature=TEMPERATURE, z_mode=Z_MODE, axis_name=AXIS,
                                     rows=rows)
    return share, (aux, features)

  (share, (aux, features)), grad = jax.value_and_grad(loss_fn, has_aux=True)(local_features)
  bank = memory_bank.update(bank, rows, features, momentum=BANK_MOMENTUM)
  return (bank, aux["partition"], aux["metrics"], objectives.global_loss(share, AXIS),
          grad)


def p_step(spec: StepSpec):
  return jax.pmap(functools.partial(nce_bank_step, spec=spec), axis_name=AXIS,
                  donate_argnums=(0,))


def constant_bank(layout: ShardLayout, dim: int, dtype) -> memory_bank.MemoryBank:
  """A bank of (D, rows_per_shard, d) unit rows, built on each device (the threefry init is slow
  at 1e7), stored as `init_bank` stores it."""
  value = 1.0 / np.sqrt(dim)
  rows = jax.pmap(lambda _: jnp.full((layout.rows_per_shard, dim), value, dtype),
                  axis_name=AXIS)(jnp.arange(layout.num_shards))
  return memory_bank.MemoryBank.from_values(rows, num_instances=layout.num_instances,
                                            num_shards=layout.num_shards)


def abstract_bank(layout: ShardLayout, dim: int, dtype) -> memory_bank.MemoryBank:
  """The shapes of `constant_bank`, without allocating it."""
  return jax.eval_shape(functools.partial(
      memory_bank.MemoryBank.from_values, num_instances=layout.num_instances,
      num_shards=layout.num_shards),
      jax.ShapeDtypeStruct((layout.num_shards, layout.rows_per_shard, dim), dtype))


def step_inputs(rng: np.random.Generator, n: int, size: Size):
  """One step's device inputs: features, distinct instance indices and the noise key."""
  features = rng.normal(size=(size.batch, size.dim)).astype(np.float32)
  features /= np.linalg.norm(features, axis=1, keepdims=True)
  indices = rng.choice(n, size.batch, replace=False).astype(np.int32)
  key = jax.random.key_data(jax.random.key(int(rng.integers(2**31))))
  batch = parallel.shard_local_batch({"features": features, "indices": indices})
  return batch["features"], batch["indices"], parallel.replicate(np.asarray(key))


def abstract_inputs(layout: ShardLayout, size: Size, dtype):
  """Shapes of the step's arguments, for compiling without allocating a bank."""
  d, per_device = size.dim, size.batch // NUM_DEVICES
  struct = jax.ShapeDtypeStruct
  return (abstract_bank(layout, d, dtype),
          jax.tree.map(lambda x: struct(x.shape, x.dtype),
                       parallel.replicate(objectives.Partition.create())),
          struct((NUM_DEVICES, per_device, d), jnp.float32),
          struct((NUM_DEVICES, per_device), jnp.int32),
          struct((NUM_DEVICES, 2), jnp.uint32))


def formula_bytes(batch: int, dim: int, num_devices: int) -> dict:
  """Per-step collective bytes per device from the shapes alone (the B-sized collectives).

  payload: the global tensor of each collective; ring: what a ring moves into one device,
  (D - 1) / D of the payload for an all-gather or a reduce-scatter. The scalar all-reduces of
  Z and the metrics (4 bytes each) are not counted here; the HLO column includes them.
  """
  payload = {
      "all-gather features (B x d f32)": batch * dim * 4,
      "all-gather indices (B int32)": batch * 4,
      "reduce-scatter feature gradients (B x d f32)": batch * dim * 4,
  }
  total = sum(payload.values())
  return {"payload_bytes": payload, "total_payload_bytes": total,
          "total_ring_bytes": total * (num_devices - 1) / num_devices}


def analyse(compiled, rows_per_shard: int, dim: int) -> dict:
  """Collectives, bank copies, aliasing and memory of a compiled step."""
  text = compiled.as_text()
  ops = hlo.collectives(text, NUM_DEVICES)
  return {"collectives": ops, "collective_totals": hlo.collective_totals(ops),
          "bank_copies": hlo.buffer_copies(text, rows_per_shard * dim),
          "input_output_alias": hlo.input_output_alias(text), "memory": hlo.memory(compiled)}


def run_one_mode(bank, n: int, size: Size, shared: bool, inputs) -> tuple[jax.Array, dict]:
  """Compiles and times one noise mode at one n; returns the updated bank and the record."""
  layout = ShardLayout(n, NUM_DEVICES)
  partition = parallel.replicate(objectives.Partition.create())
  spec = StepSpec(layout, size.batch, size.num_noise, shared)
  lowered, lower_s = common.timed(lambda: p_step(spec).lower(bank, partition, *inputs[0]))
  compiled, compile_s = common.timed(lowered.compile)
  record = {"lower_s": lower_s, "compile_s": compile_s,
            **analyse(compiled, layout.rows_per_shard, size.dim)}

  # One untimed call that also checks the donated bank is updated in its own buffer.
  pointer = bank.rows.addressable_shards[0].data.unsafe_buffer_pointer()
  out = compiled(bank, partition, *inputs[0])
  jax.block_until_ready(out)
  record["donated_in_place"] = bool(
      bank.rows.is_deleted()
      and out[0].rows.addressable_shards[0].data.unsafe_buffer_pointer() == pointer)
  state = {"bank": out[0]}

  def call(i):
    out = compiled(state["bank"], partition, *inputs[1 + i % (len(inputs) - 1)])
    state["bank"] = out[0]
    return out

  record["timing"] = common.time_calls(call, repeats=size.repeats, warmup=0).to_json()
  return state["bank"], record


def compile_only(n: int, size: Size, num_noise: int, dtype, shared: bool = True) -> dict:
  """HLO facts of the step at (n, m, bank dtype, noise mode), without allocating anything."""
  layout = ShardLayout(n, NUM_DEVICES)
  spec = StepSpec(layout, size.batch, num_noise, shared_noise=shared)
  compiled = p_step(spec).lower(*abstract_inputs(layout, size, dtype)).compile()
  return analyse(compiled, layout.rows_per_shard, size.dim)


def bf16_bank(n: int, size: Size) -> dict:
  """A bfloat16 bank's step at n, compiled (not run) with per-example and shared noise."""
  common.log(f"bank_step: bf16 bank at n={n:.0e}, compile only")
  return {"n": n, **{("shared" if shared else "per_example"): compile_only(
      n, size, size.num_noise, jnp.bfloat16, shared) for shared in (False, True)}}


def run(size_name: str) -> dict:
  size = SIZES[size_name]
  if jax.device_count() != NUM_DEVICES:
    raise RuntimeError(f"expected {NUM_DEVICES} devices, JAX sees {jax.device_count()}: run "
                       "`python -m benchmarks.bank_step` (it sets XLA_FLAGS before jax loads)")
  rng = np.random.default_rng(0)
  per_n = []
  for n in size.num_instances:
    layout = ShardLayout(n, NUM_DEVICES)
    common.log(f"bank_step: n={n:.0e} ({layout.rows_per_shard} rows per device)")
    bank = constant_bank(layout, size.dim, jnp.float32)
    inputs = [step_inputs(rng, n, size) for _ in range(size.repeats + 1)]
    entry = {"n": n, "rows_per_shard": layout.rows_per_shard,
             "bank_bytes_per_device_formula": {
                 name: layout.rows_per_shard * size.dim * jnp.dtype(dtype).itemsize
                 for name, dtype in DTYPES.items()}}
    for shared in (False, True):
      bank, entry["shared" if shared else "per_example"] = run_one_mode(
          bank, n, size, shared, inputs)
    del bank
    per_n.append(entry)

  base = per_n[0]
  for entry in per_n:
    for mode in ("per_example", "shared"):
      entry[mode]["ratio_to_smallest_n"] = (entry[mode]["timing"]["median_s"]
                                            / base[mode]["timing"]["median_s"])
  smallest, largest = size.num_instances[0], size.num_instances[-1]
  noise_sweep = [{"num_noise": m, **compile_only(smallest, size, m, jnp.float32)}
                 for m in size.noise_sweep]
  return {"batch": size.batch, "num_noise": size.num_noise, "dim": size.dim,
          "num_devices": NUM_DEVICES, "temperature": TEMPERATURE, "z_mode": Z_MODE,
          "per_n": per_n, "noise_sweep": noise_sweep,
          "bf16_bank": [bf16_bank(n, size) for n in (smallest, largest)],
          "formula": formula_bytes(size.batch, size.dim, NUM_DEVICES)}


# ------------------------------------------------------------------------------------------------
# Report.
# ------------------------------------------------------------------------------------------------


def bf16_temporaries_grow(bf16: list) -> bool:
  """Whether the bfloat16 bank's temporaries grow from the smallest to the largest n by more
  than 1 % of the bank's growth (a few bytes of layout padding do not count)."""
  smallest, largest = bf16[0], bf16[-1]
  bank_growth = largest["shared"]["memory"]["alias"] - smallest["shared"]["memory"]["alias"]
  return any(largest[mode]["memory"]["temp"] - smallest[mode]["memory"]["temp"]
             > bank_growth / 100 for mode in ("per_example", "shared"))


def _alias_bytes(record: dict) -> str:
  memory = record["memory"]
  return common.mib(memory["alias"]) if memory else "n/a"


def _temp_bytes(record: dict) -> str:
  memory = record["memory"]
  return common.mib(memory["temp"]) if memory else "n/a"


def markdown(result: dict) -> str:
  """The report section: time vs n, bank bytes, collectives (HLO and formula), bank copies."""
  header = (f"B = {result['batch']}, m = {result['num_noise']}, d = {result['dim']}, "
            f"{result['num_devices']} fake CPU devices, z_mode = {result['z_mode']}; median of "
            "repeats; ratio = time / time at the smallest n (goal: <= 1.2).")
  rows = []
  for entry in result["per_n"]:
    pe, sh = entry["per_example"], entry["shared"]
    formula = entry["bank_bytes_per_device_formula"]
    rows.append([
        f"{entry['n']:.0e}", entry["rows_per_shard"],
        f"{common.mib(formula['f32'])} / {_alias_bytes(pe)}",
        common.mib(formula["bf16"]),
        common.ms(pe["timing"]["median_s"]), f"{pe['ratio_to_smallest_n']:.2f}",
        common.ms(sh["timing"]["median_s"]), f"{sh['ratio_to_smallest_n']:.2f}",
        f"{len(pe['bank_copies'])} / {len(sh['bank_copies'])}",
        f"{_temp_bytes(pe)} / {_temp_bytes(sh)}",
        "yes" if pe["donated_in_place"] and sh["donated_in_place"] else "NO",
        f"{pe['collective_totals']['all']['payload_bytes']:.0f} / "
        f"{sh['collective_totals']['all']['payload_bytes']:.0f}",
    ])
  timing = common.table(
      ["n", "rows/device", "bank MiB/device f32 (formula / HLO alias)",
       "bf16 (formula)", "per-example ms", "ratio", "shared ms", "ratio",
       "bank copies per step (per-ex. / shared, HLO)", "temp MiB (per-ex. / shared, HLO)",
       "output in donated buffer", "collective payload bytes/step (per-ex. / shared, HLO)"],
      rows)

  formula = result["formula"]
  first = result["per_n"][0]["shared"]
  ops = common.table(
      ["HLO op", "shape", "JAX op", "payload bytes", "ring bytes/device"],
      [[op["op"], op["shape"].split("{")[0], op["jax_op"], f"{op['payload_bytes']:.0f}",
        f"{op['ring_bytes']:.0f}"] for op in first["collectives"]])
  formula_rows = [[name, value] for name, value in formula["payload_bytes"].items()]
  formula_rows.append(["total (formula)", formula["total_payload_bytes"]])
  formula_rows.append(["total ring bytes/device (formula)", f"{formula['total_ring_bytes']:.0f}"])
  hlo_all = first["collective_totals"]["all"]
  formula_rows.append(["total payload / ring (HLO, incl. scalars)",
                       f"{hlo_all['payload_bytes']:.0f} / {hlo_all['ring_bytes']:.0f}"])
  sweep = common.table(
      ["m (compiled only, smallest n)", "collective ops", "payload bytes (HLO)",
       "ring bytes/device (HLO)"],
      [[s["num_noise"], s["collective_totals"]["all"]["count"],
        f"{s['collective_totals']['all']['payload_bytes']:.0f}",
        f"{s['collective_totals']['all']['ring_bytes']:.0f}"] for s in result["noise_sweep"]])
  bf16 = result["bf16_bank"]
  bf16_table = common.table(
      ["bf16 bank, n (compiled only)", "bank MiB/device (HLO alias)",
       "temp MiB (per-ex. / shared, HLO)", "bank copies per step (per-ex. / shared)"],
      [[f"{entry['n']:.0e}", _alias_bytes(entry["shared"]),
        f"{_temp_bytes(entry['per_example'])} / {_temp_bytes(entry['shared'])}",
        f"{len(entry['per_example']['bank_copies'])} / {len(entry['shared']['bank_copies'])}"]
       for entry in bf16])
  bf16_text = ("A bfloat16 bank's step, compiled at the smallest and the largest n: its "
               "temporaries " + ("do not grow with n." if not bf16_temporaries_grow(bf16) else
                                 "GROW with n: the step materialises bank-sized buffers."))
  largest = result["per_n"][-1]
  copies = largest["per_example"]["bank_copies"] + largest["shared"]["bank_copies"]
  copy_text = (
      "No copy of the bank in the compiled step." if not copies else
      f"Copies of the bank in the compiled step at n = {largest['n']:.0e} (per-example, then "
      "shared noise), each O(n) per step:\n\n" + "\n".join(f"    {c}" for c in copies))
  return "\n\n".join([
      header, timing, bf16_table, bf16_text, copy_text,
      "Collectives per step (shared noise, smallest n; from the compiled HLO):", ops,
      "The same bytes by formula from the shapes:",
      common.table(["collective", "bytes"], formula_rows), "Collectives versus m:", sweep])


if __name__ == "__main__":
  common.module_main(run, markdown, __doc__.splitlines()[0], SIZES)
