"""Smoke test of the benchmark suite: `python -m benchmarks.run --quick` writes its reports.

Benchmarks are not tests: nothing here looks at a timing. The suite runs once (tiny sizes, two
benchmarks at a time) and the checks read its results.json and results.md: every benchmark ran
and reported the expected fields, and the per-step communication of the NCE + bank step, read
from the compiled HLO, is the same at every n and every m.
"""

import json
import os
from pathlib import Path
import subprocess
import sys

import pytest

from benchmarks import bank_step

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = ("bank_step", "knn_eval", "train_step", "input_pipeline")
ENVIRONMENT_KEYS = ("date_utc", "backend", "device_kind", "device_count", "jax", "cpu_count")


# The suite runs every benchmark once at its quick size (about 20 s).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("benchmarks")
  env = dict(os.environ)
  # conftest's 8 fake devices are for the unit tests; bank_step sets its own, the rest use 1.
  env["XLA_FLAGS"] = " ".join(flag for flag in env.get("XLA_FLAGS", "").split()
                              if "xla_force_host_platform_device_count" not in flag)
  process = subprocess.run(
      [sys.executable, "-m", "benchmarks.run", "--quick", "--jobs", "2", "--out", str(out)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert process.returncode == 0, process.stderr[-5000:]
  return (json.loads((out / "results.json").read_text()),
          (out / "results.md").read_text())


def results(report, name):
  return report[0]["benchmarks"][name]["result"]


def test_every_benchmark_ran_and_recorded_its_environment(report):
  combined, _ = report
  assert (combined["suite"], combined["size"]) == ("cpu", "quick")
  assert tuple(combined["benchmarks"]) == BENCHMARKS
  for name, record in combined["benchmarks"].items():
    assert "error" not in record, name
    assert record["partial"] is False
    assert set(ENVIRONMENT_KEYS) <= set(record["environment"])
  assert combined["benchmarks"]["bank_step"]["environment"]["device_count"] == 8


def test_bank_step_reports_time_bytes_and_collectives(report):
  result = results(report, "bank_step")
  assert len(result["per_n"]) >= 2
  payloads = set()
  for entry in result["per_n"]:
    assert set(entry["bank_bytes_per_device_formula"]) == {"f32", "bf16"}
    for mode in ("per_example", "shared"):
      record = entry[mode]
      assert record["timing"]["repeats"] >= 1
      assert "ratio_to_smallest_n" in record
      assert record["memory"]["alias"] == entry["bank_bytes_per_device_formula"]["f32"]
      assert {op["op"] for op in record["collectives"]} <= {
          "all-gather", "all-reduce", "reduce-scatter"}
      payloads.add(record["collective_totals"]["all"]["payload_bytes"])
  for sweep in result["noise_sweep"]:
    payloads.add(sweep["collective_totals"]["all"]["payload_bytes"])
  assert len(payloads) == 1  # The same at every n and m.
  # The HLO adds only the scalar all-reduces (4 bytes each) to the formula's B-sized tensors.
  assert 0 <= payloads.pop() - result["formula"]["total_payload_bytes"] < 100
  smallest, largest = result["bf16_bank"]
  assert largest["shared"]["memory"]["alias"] == (
      result["per_n"][-1]["bank_bytes_per_device_formula"]["bf16"])
  # A bf16 bank (stored as bits) has no temporaries that grow with n.
  assert not bank_step.bf16_temporaries_grow(result["bf16_bank"]), (smallest, largest)


def test_knn_eval_reports_ours_faiss_and_the_peak(report):
  result = results(report, "knn_eval")
  assert result["ours"]["flop_per_s"] > 0
  assert [peak["dtype"] for peak in result["matmul_peak"]] == ["float32"]
  faiss = result["faiss"]
  assert "skipped" in faiss or {"version", "neighbour_overlap"} <= set(faiss)


def test_train_step_reports_throughput_share_and_compile_time(report):
  [case] = results(report, "train_step")["cases"]
  assert case["config"] == "fashion_mnist"
  for variant in ("with_nce_bank", "without_nce_bank"):
    assert {"images_per_s", "lower_s", "compile_s", "bank_copies", "timing"} <= set(
        case[variant])
  assert "nce_bank_share" in case


def test_input_pipeline_is_compared_with_the_train_step(report):
  combined, _ = report
  result = results(report, "input_pipeline")
  assert result["host_images_per_s"] > 0 and result["host_and_augment_images_per_s"] > 0
  assert "input_pipeline_over_fashion_mnist_train_step" in combined["comparisons"]


def test_markdown_has_a_section_per_benchmark(report):
  _, markdown = report
  for name in BENCHMARKS:
    assert f"(`benchmarks/{name}.py`)" in markdown
  assert "FAILED" not in markdown
  assert "input path / train step" in markdown
