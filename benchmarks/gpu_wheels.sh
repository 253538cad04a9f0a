#!/usr/bin/env bash
# Downloads, on a machine with PyPI access, the wheels that `benchmarks/gpu.sh` needs on a GPU
# machine that has jax, flax, optax, orbax, chex, numpy, absl-py, etils, protobuf, pyarrow,
# psutil, requests, tqdm, wrapt, attrs, pyyaml and six but nothing else of ours (Python 3.12,
# x86-64). The train-step benchmark imports instdisc_jax.train, whose imports reach
# ml-collections, dm-pix, grain and tensorflow-datasets; these and their missing dependencies are
# fetched here (about 10 MiB), without dependencies of their own.
#
# Usage: benchmarks/gpu_wheels.sh [DIR]      (default DIR: .whl, which .gitignore ignores)
# Then, on the GPU machine, before benchmarks/gpu.sh:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site DIR/*.whl
#   export PYTHONPATH=/tmp/site
set -euo pipefail

dir=${1:-.whl}
python=${PYTHON:-python3}
mkdir -p "$dir"

# Versions as resolved in requirements.txt's environment (pip show in the project's venv).
wheels=(
  ml-collections==1.1.0
  dm-pix==0.4.5
  grain==0.2.18
  portpicker==1.6.0
  array-record==0.8.6
  tensorflow-datasets==4.9.10
  tensorflow-metadata==1.21.0
  googleapis-common-protos==1.76.0
  dm-tree==0.1.10
  immutabledict==4.3.1
  simple-parsing==0.1.9
  docstring-parser==0.18.0
  termcolor==3.3.0
  toml==0.10.2
)
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
           manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$dir" "${wheels[@]}"
# promise is published as a source archive only; it is pure Python, so build its wheel here.
"$python" -m pip wheel --quiet --no-deps -w "$dir" promise==2.3
du -sh "$dir"
