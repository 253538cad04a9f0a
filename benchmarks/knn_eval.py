"""Weighted kNN evaluation: our jitted `knn.nearest_neighbors` + `knn.weighted_vote` on one
device, against faiss `IndexFlatIP` on the same data, and the device's matmul peak.

The bank and queries are random unit vectors (random labels for the vote). Achieved FLOP/s
counts the similarity product only, 2 * Q * n * d; the peak is the median FLOP/s of a jitted
square matmul measured in the same run. faiss (`pip install faiss-cpu`, a benchmark-only
dependency) is timed on the CPU with its default threads; the row is skipped when faiss is not
installed. `neighbour_overlap` is the mean fraction of faiss's k neighbours that we also return
(1.0 up to float rounding at the k-th place).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from instdisc_jax import knn

NUM_CLASSES = 10
TEMPERATURE = 0.07


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
                 peak_dtypes=("float32",), repeats=3, faiss=True),
    "gpu": Size(bank=1_281_167, queries=50_000, dim=128, k=200, matmul_side=8192,
                peak_dtypes=("bfloat16", "float32"), repeats=3, faiss=False),
}


def matmul_peak(side: int, dtype: str, repeats: int) -> dict:
  """FLOP/s of a jitted (side x side) @ (side x side) product (float32 accumulation)."""
  key_a, key_b = jax.random.split(jax.random.key(1))
  a = jax.random.normal(key_a, (side, side), dtype)
  b = jax.random.normal(key_b, (side, side), dtype)
  product = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  timing = common.time_calls(lambda _: product(a, b), repeats=repeats, warmup=2)
  return {"dtype": dtype, "side": side, "flop_per_s": 2 * side**3 / timing.median_s,
          "timing": timing.to_json()}


def unit_rows(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
  x = rng.normal(size=(rows, dim)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@functools.partial(jax.jit, static_argnames=("k",))
def knn_scores(queries, rows, labels, *, k: int):
  """Class scores of the weighted kNN and the neighbours' indices, single device."""
  neighbors = knn.nearest_neighbors(queries, rows, labels, num_instances=rows.shape[0], k=k)
  return (knn.weighted_vote(neighbors, num_classes=NUM_CLASSES, temperature=TEMPERATURE),
          neighbors.indices)


def time_ours(queries, bank, labels, size: Size) -> tuple[dict, np.ndarray]:
  args = (jnp.asarray(queries), jnp.asarray(bank), jnp.asarray(labels))
  lowered, lower_s = common.timed(lambda: knn_scores.lower(*args, k=size.k))
  compiled, compile_s = common.timed(lowered.compile)
  timing = common.time_calls(lambda _: compiled(*args), repeats=size.repeats)
  indices = np.asarray(compiled(*args)[1])
  return {"lower_s": lower_s, "compile_s": compile_s, "timing": timing.to_json(),
          "flop_per_s": 2 * size.queries * size.bank * size.dim / timing.median_s}, indices


def time_faiss(queries, bank, size: Size) -> tuple[dict, np.ndarray | None]:
  try:
    import faiss  # pylint: disable=import-outside-toplevel
  except ImportError:
    return {"skipped": "faiss is not installed (pip install faiss-cpu)"}, None
  index = faiss.IndexFlatIP(size.dim)
  index.add(bank)
  timing = common.time_calls(lambda _: index.search(queries, size.k), repeats=size.repeats)
  _, indices = index.search(queries, size.k)
  return {"version": faiss.__version__, "threads": faiss.omp_get_max_threads(),
          "timing": timing.to_json(),
          "flop_per_s": 2 * size.queries * size.bank * size.dim / timing.median_s}, indices


def overlap(ours: np.ndarray, theirs: np.ndarray) -> float:
  """Mean over queries of |ours & theirs| / k."""
  return float(np.mean([len(np.intersect1d(a, b)) / len(b) for a, b in zip(ours, theirs)]))


def run(size_name: str) -> dict:
  size = SIZES[size_name]
  rng = np.random.default_rng(0)
  bank = unit_rows(rng, size.bank, size.dim)
  queries = unit_rows(rng, size.queries, size.dim)
  labels = rng.integers(0, NUM_CLASSES, size.bank).astype(np.int32)
  common.log(f"knn_eval: matmul peak ({size.matmul_side}^3)")
  peaks = [matmul_peak(size.matmul_side, dtype, size.repeats) for dtype in size.peak_dtypes]
  result = {"bank": size.bank, "queries": size.queries, "dim": size.dim, "k": size.k,
            "matmul_peak": peaks}
  common.save_partial(result)
  common.log(f"knn_eval: ours, n={size.bank} Q={size.queries} k={size.k}")
  ours, our_indices = time_ours(queries, bank, labels, size)
  fp32_peak = next((p["flop_per_s"] for p in peaks if p["dtype"] == "float32"), None)
  ours["fraction_of_fp32_peak"] = ours["flop_per_s"] / fp32_peak if fp32_peak else None
  result["ours"] = ours
  if size.faiss:
    common.log("knn_eval: faiss IndexFlatIP")
    faiss_result, faiss_indices = time_faiss(queries, bank, size)
    if faiss_indices is not None:
      faiss_result["fraction_of_fp32_peak"] = faiss_result["flop_per_s"] / fp32_peak
      faiss_result["neighbour_overlap"] = overlap(our_indices, faiss_indices)
    result["faiss"] = faiss_result
  return result


def markdown(result: dict) -> str:
  header = (f"Bank {result['bank']} x {result['dim']}, {result['queries']} queries, "
            f"k = {result['k']}; FLOP/s counts 2 * Q * n * d; median of repeats.")
  peaks = common.table(
      ["matmul peak", "side", "FLOP/s", "median ms"],
      [[p["dtype"], p["side"], common.si(p["flop_per_s"], "FLOP/s"),
        common.ms(p["timing"]["median_s"])] for p in result["matmul_peak"]])
  if "ours" not in result:  # Stopped before the kNN finished.
    return "\n\n".join([header, peaks])
  ours = result["ours"]
  rows = [["instdisc_jax knn (jit, 1 device)", common.ms(ours["timing"]["median_s"]),
           common.si(ours["flop_per_s"], "FLOP/s"),
           f"{ours['fraction_of_fp32_peak']:.2f}" if ours["fraction_of_fp32_peak"] else "n/a",
           f"compile {ours['compile_s']:.1f} s"]]
  faiss_result = result.get("faiss")
  if faiss_result is not None and "skipped" in faiss_result:
    rows.append(["faiss IndexFlatIP", "skipped", "", "", faiss_result["skipped"]])
  elif faiss_result is not None:
    rows.append([f"faiss-cpu {faiss_result['version']} IndexFlatIP "
                 f"({faiss_result['threads']} threads)",
                 common.ms(faiss_result["timing"]["median_s"]),
                 common.si(faiss_result["flop_per_s"], "FLOP/s"),
                 f"{faiss_result['fraction_of_fp32_peak']:.2f}",
                 f"neighbour overlap with ours {faiss_result['neighbour_overlap']:.4f}"])
  return "\n\n".join([header, peaks, common.table(
      ["implementation", "median ms", "achieved", "of fp32 peak", "notes"], rows)])


if __name__ == "__main__":
  common.module_main(run, markdown, __doc__.splitlines()[0], SIZES)
