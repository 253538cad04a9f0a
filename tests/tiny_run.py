"""Tiny datasets, configs and command lines for the tests of runs, workdirs and errors."""

import contextlib
import os
import subprocess
import sys

import jax
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


def blob_images(rng: np.random.Generator, n: int, size: int = 16):
  """Four separable classes: a bright square in one of the four quadrants, plus noise."""
  labels = rng.integers(0, 4, n)
  images = rng.integers(0, 40, (n, size, size, 1))
  half = size // 2
  for image, label in zip(images, labels):
    row, col = divmod(int(label), 2)
    image[row * half:(row + 1) * half, col * half:(col + 1) * half] += 200
  return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)


def write_blobs_npz(path, n: int = 96, n_test: int = 40, seed: int = 0) -> str:
  """An .npz of `blob_images`: n training and n_test test images."""
  rng = np.random.default_rng(seed)
  images, labels = blob_images(rng, n)
  test_images, test_labels = blob_images(rng, n_test)
  np.savez(path, images=images, labels=labels, test_images=test_images, test_labels=test_labels)
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


def cached_environment(cache_dir) -> dict:
  """`environment()` with every compiled program cached in `cache_dir`: a test that starts the
  same run several times compiles it once."""
  return environment(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                     JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                     JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def main_command(workdir, *flags) -> list[str]:
  """`python -m instdisc_jax.main --config=configs/tiny.py --workdir=... <flags>`."""
  return [sys.executable, "-m", "instdisc_jax.main", f"--config={TINY_CONFIG}",
          f"--workdir={workdir}", *flags]


def run_main(workdir, *flags, env=None, timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run(main_command(workdir, *flags), capture_output=True, text=True,
                        env=env or environment(), cwd=REPO, timeout=timeout)


@contextlib.contextmanager
def counting_compilations():
  """Collects the durations of the XLA compilations done inside the block."""
  durations = []

  def listener(event, duration, **kwargs):
    del kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      durations.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield durations
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
