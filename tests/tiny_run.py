"""Tiny datasets, configs and command lines for the tests of runs, workdirs and errors."""

import os
import subprocess
import sys

import numpy as np

from instdisc_jax import default_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "configs", "tiny.py")


def write_npz(path, n: int = 64, seed: int = 0, shape=(16, 16, 1)) -> str:
  """An .npz of n random uint8 images in 4 classes, with a 32-image test split."""
  rng = np.random.default_rng(seed)
  np.savez(path, images=rng.integers(0, 256, (n,) + shape, dtype=np.uint8),
           labels=rng.integers(0, 4, n),
           test_images=rng.integers(0, 256, (32,) + shape, dtype=np.uint8),
           test_labels=rng.integers(0, 4, 32))
  return str(path)


def config(npz: str, **overrides):
  """configs/tiny.py on `npz`, with field overrides (dotted names for nested fields)."""
  result = default_config.load_config_file(TINY_CONFIG)
  result.dataset = f"npz:{npz}"
  for name, value in overrides.items():
    group, _, field = name.rpartition(".")
    (result[group] if group else result)[field] = value
  return result


def environment(**extra) -> dict:
  """A child process's environment: 8 fake CPU devices, plus `extra`."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  env.update(extra)
  return env


def main_command(workdir, *flags) -> list[str]:
  """`python -m instdisc_jax.main --config=configs/tiny.py --workdir=... <flags>`."""
  return [sys.executable, "-m", "instdisc_jax.main", f"--config={TINY_CONFIG}",
          f"--workdir={workdir}", *flags]


def run_main(workdir, *flags, env=None, timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run(main_command(workdir, *flags), capture_output=True, text=True,
                        env=env or environment(), cwd=REPO, timeout=timeout)
