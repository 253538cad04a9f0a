"""Weighted kNN evaluation: ours on the trainer's device split against faiss, side by side.

The bank and queries are random unit vectors (random labels for the vote). Three ways to find
the k nearest bank rows of every query, exact all three, timed in one process, interleaved
(each repeat calls each once, so a busy machine slows all three alike):

* ours on the device split the trainer uses: a CPU host is split into one XLA device per core
  (`cli.split_cpu_into_devices`, set below before JAX starts, so run this module in its own
  process). The bank is instance-sharded over the devices as the trainer's bank is, the queries
  are replicated, and `knn.nearest_neighbors` + `knn.weighted_vote` run under `jax.pmap`: every
  device scores and selects over its own shard, and the D * k candidates are merged.
* ours, jitted on one device with the whole bank (what this benchmark measured before the
  split; a GPU run has one device and the two rows coincide).
* faiss `IndexFlatIP.search` (`pip install faiss-cpu`, a benchmark-only dependency) with as many
  OpenMP threads as ours has devices; the row is skipped when faiss is not installed.

Achieved FLOP/s counts the similarity product only, 2 * Q * n * d; the peak is the median
FLOP/s of a square matmul run on every device at once (pmap), measured in the same run.
`neighbour_overlap` is the mean fraction of faiss's k neighbours that we also return (1.0 up to
float rounding at the k-th place); `same_order_as_one_device` is the fraction of queries whose
ordered neighbour list is the same on the split as on one device (matmuls of other shapes round
differently, so near-equal similarities may swap).
"""

from __future__ import annotations

import argparse
import dataclasses


@dataclasses.dataclass(frozen=True)
class Size:
  """bank rows n, queries Q, dim d, neighbours k, matmul side for the peak, repeats."""

  bank: int
  queries: int
  dim: int
  k: int
  matmul_side: int
  peak_dtypes: tuple[str, ...]
  repeats: int
  faiss: bool


SIZES = {
    "quick": Size(bank=2_000, queries=500, dim=128, k=20, matmul_side=256,
                  peak_dtypes=("float32",), repeats=2, faiss=True),
    "full": Size(bank=60_000, queries=10_000, dim=128, k=200, matmul_side=2048,
                 peak_dtypes=("float32",), repeats=5, faiss=True),
    "gpu": Size(bank=1_281_167, queries=50_000, dim=128, k=200, matmul_side=8192,
                peak_dtypes=("bfloat16", "float32"), repeats=3, faiss=False),
}


def _size_of_this_process() -> Size:
  """The --size this process was started with, read before JAX starts."""
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--size", choices=tuple(SIZES), default="full")
  return SIZES[parser.parse_known_args()[0].size]


if __name__ == "__main__":
  # One XLA device per core, as the trainer's entry points make them; before JAX starts. The
  # CLI's imports need ml-collections, which a bare GPU machine lacks; a GPU run does not split
  # its host anyway.
  try:
    from instdisc_jax import cli  # pylint: disable=g-import-not-at-top
  except ImportError:
    cli = None
  if cli is not None:
    cli.split_cpu_into_devices((_size_of_this_process().queries,))

# pylint: disable=wrong-import-position
import functools
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from instdisc_jax import knn
from instdisc_jax import parallel
from instdisc_jax.parallel import AXIS
from instdisc_jax.sharding import ShardLayout

NUM_CLASSES = 10
TEMPERATURE = 0.07




def matmul_peak(side: int, dtype: str, repeats: int) -> dict:
  """FLOP/s of a (side x side) @ (side x side) product on every device at once (pmap)."""
  key_a, key_b = jax.random.split(jax.random.key(1))
  a = parallel.replicate(np.asarray(jax.random.normal(key_a, (side, side), dtype)))
  b = parallel.replicate(np.asarray(jax.random.normal(key_b, (side, side), dtype)))
  product = jax.pmap(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  timing = common.time_calls(lambda _: product(a, b), repeats=repeats, warmup=2)
  devices = jax.local_device_count()
  return {"dtype": dtype, "side": side, "devices": devices,
          "flop_per_s": devices * 2 * side**3 / timing.median_s, "timing": timing.to_json()}


def unit_rows(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
  x = rng.normal(size=(rows, dim)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _scores(queries, rows, labels, *, num_instances: int, k: int, axis_name):
  neighbors = knn.nearest_neighbors(queries, rows, labels, num_instances=num_instances, k=k,
                                    axis_name=axis_name)
  return (knn.weighted_vote(neighbors, num_classes=NUM_CLASSES, temperature=TEMPERATURE),
          neighbors.indices)


def split_knn(queries, bank, labels, size: Size):
  """Ours as the trainer runs it: (compiled call, its arguments) over all local devices."""
  layout = ShardLayout(size.bank, jax.local_device_count())
  args = (parallel.replicate(queries), parallel.shard_local_rows(layout.shard_array(bank)),
          parallel.shard_local_rows(layout.shard_array(labels, fill=-1)))
  step = jax.pmap(functools.partial(_scores, num_instances=size.bank, k=size.k, axis_name=AXIS),
                  axis_name=AXIS)
  return step, args


def one_device_knn(queries, bank, labels, size: Size):
  """Ours jitted on one device with the whole bank: (compiled call, its arguments)."""
  step = jax.jit(functools.partial(_scores, num_instances=size.bank, k=size.k, axis_name=None))
  return step, (jnp.asarray(queries), jnp.asarray(bank), jnp.asarray(labels))


def compile_ours(make, queries, bank, labels, size: Size) -> tuple:
  """(compiled, args, record with lower/compile seconds, neighbour indices of one call)."""
  step, args = make(queries, bank, labels, size)
  lowered, lower_s = common.timed(lambda: step.lower(*args))
  compiled, compile_s = common.timed(lowered.compile)
  indices = np.asarray(compiled(*args)[1])
  if indices.ndim == 3:                                        # pmap: replicated over devices
    indices = indices[0]
  return compiled, args, {"lower_s": lower_s, "compile_s": compile_s}, indices


def process_cpu_s() -> float:
  """CPU seconds this process has used, all threads (user + system)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def time_interleaved(calls: dict, repeats: int) -> tuple[dict, dict]:
  """({name: Timing}, {name: CPU seconds per call}): every repeat calls each of `calls` once,
  in turn (after one warm-up). CPU seconds count every thread of the process (on a shared
  machine they show the work done, which wall time mixes with waiting for a core)."""
  for call in calls.values():
    jax.block_until_ready(call())
  times = {name: [] for name in calls}
  cpu = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      start, start_cpu = time.perf_counter(), process_cpu_s()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - start)
      cpu[name].append(process_cpu_s() - start_cpu)
  return {name: common.Timing(t) for name, t in times.items()}, cpu


def load_faiss(threads: int):
  """faiss with `threads` OpenMP threads, or None when it is not installed."""
  try:
    import faiss  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  faiss.omp_set_num_threads(threads)
  return faiss


def overlap(ours: np.ndarray, theirs: np.ndarray) -> float:
  """Mean over queries of |ours & theirs| / k."""
  return float(np.mean([len(np.intersect1d(a, b)) / len(b) for a, b in zip(ours, theirs)]))


def run(size_name: str) -> dict:
  size = SIZES[size_name]
  load_before = os.getloadavg()
  rng = np.random.default_rng(0)
  bank = unit_rows(rng, size.bank, size.dim)
  queries = unit_rows(rng, size.queries, size.dim)
  labels = rng.integers(0, NUM_CLASSES, size.bank).astype(np.int32)
  devices = jax.local_device_count()
  common.log(f"knn_eval: matmul peak ({size.matmul_side}^3 on {devices} devices)")
  peaks = [matmul_peak(size.matmul_side, dtype, size.repeats) for dtype in size.peak_dtypes]
  result = {"bank": size.bank, "queries": size.queries, "dim": size.dim, "k": size.k,
            "devices": devices, "matmul_peak": peaks, "loadavg_before": load_before}
  common.save_partial(result)
  fp32_peak = next((p["flop_per_s"] for p in peaks if p["dtype"] == "float32"), None)
  flop = 2 * size.queries * size.bank * size.dim

  common.log(f"knn_eval: compiling ours, n={size.bank} Q={size.queries} k={size.k}")
  split, split_args, ours, split_indices = compile_ours(split_knn, queries, bank, labels, size)
  single, single_args, ours_one, single_indices = compile_ours(one_device_knn, queries, bank,
                                                               labels, size)
  calls = {"ours": lambda: split(*split_args), "ours_one_device": lambda: single(*single_args)}
  faiss = load_faiss(devices) if size.faiss else None
  if faiss is not None:
    index = faiss.IndexFlatIP(size.dim)
    index.add(bank)
    calls["faiss"] = lambda: index.search(queries, size.k)
  common.log(f"knn_eval: timing {', '.join(calls)} interleaved, {size.repeats} repeats")
  timings, cpu_s = time_interleaved(calls, size.repeats)
  # On a shared machine the load decides what the times mean (faiss's OpenMP threads suffer
  # more from it than our devices): 1, 5 and 15 minute load averages, before and after.
  result["loadavg_after_timing"] = os.getloadavg()

  for record, name in ((ours, "ours"), (ours_one, "ours_one_device")):
    timing = timings[name]
    record.update(timing=timing.to_json(), cpu_s=cpu_s[name],
                  flop_per_s=flop / timing.median_s,
                  fraction_of_fp32_peak=(flop / timing.median_s / fp32_peak
                                         if fp32_peak else None))
  ours["devices"] = devices
  ours["same_order_as_one_device"] = float(np.mean(np.all(split_indices == single_indices, 1)))
  result.update(ours=ours, ours_one_device=ours_one)
  if size.faiss and faiss is None:
    result["faiss"] = {"skipped": "faiss is not installed (pip install faiss-cpu)"}
  elif faiss is not None:
    _, faiss_indices = index.search(queries, size.k)
    timing = timings["faiss"]
    result["faiss"] = {
        "version": faiss.__version__, "threads": faiss.omp_get_max_threads(),
        "timing": timing.to_json(), "cpu_s": cpu_s["faiss"],
        "flop_per_s": flop / timing.median_s,
        "fraction_of_fp32_peak": flop / timing.median_s / fp32_peak,
        "neighbour_overlap": overlap(split_indices, faiss_indices),
        "neighbour_overlap_one_device": overlap(single_indices, faiss_indices)}
    per_repeat = [a / b for a, b in zip(timings["ours"].times_s, timings["faiss"].times_s)]
    result["ours_over_faiss"] = {"median_ratio": timings["ours"].median_s / timing.median_s,
                                 "per_repeat": per_repeat}
  return result


def markdown(result: dict) -> str:
  devices = result.get("devices", 1)
  header = (f"Bank {result['bank']} x {result['dim']}, {result['queries']} queries, "
            f"k = {result['k']}; FLOP/s counts 2 * Q * n * d; median of repeats, the three "
            f"timed in turn in one process.")
  if "loadavg_after_timing" in result:
    header += (" Load average (1, 5, 15 min) before: "
               + ", ".join(f"{x:.1f}" for x in result["loadavg_before"]) + "; after timing: "
               + ", ".join(f"{x:.1f}" for x in result["loadavg_after_timing"]) + ".")
  peaks = common.table(
      ["matmul peak", "side", "devices", "FLOP/s", "median ms"],
      [[p["dtype"], p["side"], p.get("devices", 1), common.si(p["flop_per_s"], "FLOP/s"),
        common.ms(p["timing"]["median_s"])] for p in result["matmul_peak"]])
  if "ours" not in result:  # Stopped before the kNN finished.
    return "\n\n".join([header, peaks])

  def fraction(record):
    return f"{record['fraction_of_fp32_peak']:.2f}" if record["fraction_of_fp32_peak"] else "n/a"

  def cpu(record):
    return f"{statistics.median(record['cpu_s']):.2f}" if "cpu_s" in record else "n/a"

  ours, one = result["ours"], result["ours_one_device"]
  rows = [[f"instdisc_jax knn (pmap, {devices} devices: the trainer's split)",
           common.ms(ours["timing"]["median_s"]), cpu(ours),
           common.si(ours["flop_per_s"], "FLOP/s"),
           fraction(ours), f"compile {ours['compile_s']:.1f} s; same order as 1 device: "
           f"{ours['same_order_as_one_device']:.4f} of queries"],
          ["instdisc_jax knn (jit, 1 device)", common.ms(one["timing"]["median_s"]), cpu(one),
           common.si(one["flop_per_s"], "FLOP/s"), fraction(one),
           f"compile {one['compile_s']:.1f} s"]]
  faiss_result = result.get("faiss")
  if faiss_result is not None and "skipped" in faiss_result:
    rows.append(["faiss IndexFlatIP", "skipped", "", "", "", faiss_result["skipped"]])
  elif faiss_result is not None:
    rows.append([f"faiss-cpu {faiss_result['version']} IndexFlatIP "
                 f"({faiss_result['threads']} threads)",
                 common.ms(faiss_result["timing"]["median_s"]), cpu(faiss_result),
                 common.si(faiss_result["flop_per_s"], "FLOP/s"), fraction(faiss_result),
                 f"neighbour overlap with ours {faiss_result['neighbour_overlap']:.4f}"])
  parts = [header, peaks, common.table(
      ["implementation", "median ms", "CPU s per call (median)", "achieved", "of fp32 peak",
       "notes"], rows)]
  ratio = result.get("ours_over_faiss")
  if ratio is not None:
    parts.append(f"ours ({devices} devices) / faiss: **{ratio['median_ratio']:.2f}** (medians); "
                 "per repeat: " + ", ".join(f"{r:.2f}" for r in ratio["per_repeat"]) + ".")
  return "\n\n".join(parts)


if __name__ == "__main__":
  common.module_main(run, markdown, __doc__.splitlines()[0], SIZES)
