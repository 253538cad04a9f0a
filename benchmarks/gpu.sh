#!/usr/bin/env bash
# The GPU benchmark suite, sized to finish in under 8 minutes on one H200; it installs nothing.
#
#   bash benchmarks/gpu.sh [--only knn_eval train_step] [--quick]
#
# Runs `python -m benchmarks.run --suite gpu` from the repository root (each benchmark in its
# own process, with a time limit: 180 s + 280 s, so the suite ends within 8 minutes whatever
# happens):
#   knn_eval --size gpu    bf16 and fp32 matmul peak (8192^3), and the weighted kNN of 50,000
#                          queries over a 1,281,167 x 128 bank, k = 200. Needs jax, flax, numpy.
#   train_step --size gpu  CIFAR ResNet-18 (batch 128) and ImageNet ResNet-50 (batch 256) train
#                          steps in bfloat16: images/s, compile time, NCE + bank share, bank
#                          copies. It imports instdisc_jax.train, which needs ml-collections,
#                          dm-pix, grain and tensorflow-datasets: carry the wheels that
#                          benchmarks/gpu_wheels.sh downloads, and install them first:
#     python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#     export PYTHONPATH=/tmp/site
#                          Without them train_step is reported as failed; knn_eval still runs.
# Writes results.json and results.md into $OUT when it is set, else into benchmarks/results/gpu.
# --quick runs the same benchmarks at the CPU smoke-test sizes (to try the script anywhere).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
out=${OUT:-benchmarks/results/gpu}
export PYTHONUNBUFFERED=1

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$python" - <<'PY'
import importlib.util
import sys

needed = ("ml_collections", "dm_pix", "grain", "tensorflow_datasets")
missing = [name for name in needed if importlib.util.find_spec(name) is None]
if missing:
  print(f"gpu.sh: {', '.join(missing)} not importable: train_step will fail (see "
        "benchmarks/gpu_wheels.sh); knn_eval still runs", file=sys.stderr)
PY
exec "$python" -m benchmarks.run --suite gpu --out "$out" "$@"
