"""The README's "Use from your own JAX code" example runs, on 8 devices, as printed there, and
its step, compiled as written, reads the donated bank once: no temporaries that grow with n."""

import importlib.util
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from instdisc_jax import memory_bank
from instdisc_jax import objectives

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "own_pmap_step.py")


def test_readme_shows_the_example_file():
  readme = open(os.path.join(REPO, "README.md")).read()
  section = readme.split("## Use from your own JAX code", 1)[1]
  shown = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  assert shown == open(EXAMPLE).read()


@pytest.mark.slow
def test_example_runs_on_eight_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, EXAMPLE], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  losses = re.findall(r"step \d: loss (\S+)", out.stdout)
  assert len(losses) == 3 and all(float(x) > 0 for x in losses)
  assert "kNN predictions:" in out.stdout


def _example():
  spec = importlib.util.spec_from_file_location("own_pmap_step", EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)                    # definitions only: main() is not run
  return module


def example_step_memory(num_instances: int, bank_dtype, devices: int = 8,
                        per_device_batch: int = 8) -> dict:
  """`memory_analysis()` of the example's `train_step`, pmapped and donated exactly as its
  `main` does, compiled (not run) for a bank of `num_instances` rows in `bank_dtype`."""
  example = _example()
  step = jax.pmap(example.train_step, axis_name=example.AXIS, donate_argnums=(1,))
  struct = lambda shape, dtype: jax.ShapeDtypeStruct((devices,) + shape, dtype)
  partition = jax.tree.map(lambda x: struct(x.shape, x.dtype), objectives.Partition.create())
  bank = jax.eval_shape(lambda key: memory_bank.init_bank(
      key, num_instances, example.dim, num_shards=devices, dtype=bank_dtype), jax.random.key(0))
  compiled = step.lower(struct((16, example.dim), jnp.float32), bank, partition,
                        struct((per_device_batch, 16), jnp.float32),
                        struct((per_device_batch,), jnp.int32),
                        struct((2,), jnp.uint32)).compile()
  stats = compiled.memory_analysis()
  return {"temp": stats.temp_size_in_bytes, "alias": stats.alias_size_in_bytes}


def test_example_step_temporaries_do_not_grow_with_n():
  """Regression: the example read the bank in the objective and again in the update, and XLA
  then copied the donated bank every step (temporaries growing with n)."""
  small = example_step_memory(2 * 10**4, jnp.float32)
  large = example_step_memory(2 * 10**6, jnp.float32)
  bank_growth = large["alias"] - small["alias"]        # the donated bank shard grew 100x
  assert bank_growth > 0.9 * (250_000 - 2_500) * 32 * 4
  assert large["temp"] - small["temp"] < bank_growth / 100, (small, large)


def test_bf16_bank_step_temporaries_do_not_grow_with_n():
  """Regression: XLA:CPU has no bfloat16 scatter, and a bfloat16 bank went through a float32
  copy of the whole shard (temporaries 2x the bank), then through a materialised uint16 view of
  it (1x). Stored as bits (`MemoryBank.value_dtype`), the step bit-casts only the rows it
  gathers and scatters: no growth, on every backend."""
  small = example_step_memory(2 * 10**4, jnp.bfloat16)
  large = example_step_memory(2 * 10**6, jnp.bfloat16)
  bank_growth = large["alias"] - small["alias"]        # the donated bank shard grew 100x
  assert bank_growth > 0.9 * (250_000 - 2_500) * 32 * 2
  assert large["temp"] - small["temp"] < bank_growth / 100, (small, large)


@pytest.mark.slow
def test_example_runs_with_a_bf16_bank(capsys):
  """The same example with its bank in bfloat16 (stored as bits), in this process's 8 devices:
  it trains and its kNN reads the bank's values."""
  _example().main(bank_dtype=jnp.bfloat16)
  out = capsys.readouterr().out
  losses = re.findall(r"step \d: loss (\S+)", out)
  assert len(losses) == 3 and all(float(x) > 0 for x in losses)
  assert "kNN predictions:" in out
