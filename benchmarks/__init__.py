"""Speed and memory measurements of instdisc_jax (never timed unit tests).

`python -m benchmarks.run [--quick] [--out DIR]` runs the CPU suite and writes `results.json` and
`results.md`; `benchmarks/gpu.sh` runs the GPU suite. Each benchmark module runs in its own
subprocess (`python -m benchmarks.<module> --size ... --json FILE`), so a benchmark can set XLA
flags (8 fake CPU devices) before JAX starts and hold a large bank without affecting the others.
See docs/benchmarks.md.

This file imports nothing: `benchmarks.bank_step` must set XLA_FLAGS before anything imports jax.
"""
