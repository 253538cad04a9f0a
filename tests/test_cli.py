"""Runtime set-up shared by the command-line entry points."""

import os
import subprocess
import sys

import pytest

from instdisc_jax import cli


def test_host_device_count_divides_every_batch_size():
  assert cli.host_device_count(0, 2, (128, 1000)) == 2
  assert cli.host_device_count(0, 8, (128, 1000)) == 8
  assert cli.host_device_count(0, 3, (128, 1000)) == 2          # 3 does not divide 128
  assert cli.host_device_count(0, 4, (6,)) == 3
  assert cli.host_device_count(0, 1, (128,)) == 1
  assert cli.host_device_count(5, 2, (128,)) == 5               # an explicit request wins


def test_split_cpu_into_devices_respects_an_explicit_xla_flag(monkeypatch):
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  cli.split_cpu_into_devices((128, 1000))
  assert os.environ["XLA_FLAGS"] == (
      "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4 "
      "--xla_cpu_collective_call_terminate_timeout_seconds=1800")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  cli.split_cpu_into_devices((128, 1000))
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
  monkeypatch.delenv("XLA_FLAGS")
  cli.split_cpu_into_devices((128,), requested=1)
  assert "XLA_FLAGS" not in os.environ



@pytest.mark.slow
def test_the_split_flags_are_ones_xla_reads(monkeypatch):
  """XLA aborts on a flag it does not know, so a pmapped psum under the split's XLA_FLAGS
  completing shows both flags exist in the pinned jaxlib."""
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  cli.split_cpu_into_devices((2,))
  assert cli.COLLECTIVE_TIMEOUT_FLAG in os.environ["XLA_FLAGS"]
  program = ("import jax, jax.numpy as jnp; print(jax.device_count(), "
             "jax.pmap(lambda x: jax.lax.psum(x, 'i'), axis_name='i')(jnp.ones(2)).tolist())")
  done = subprocess.run([sys.executable, "-c", program], env=dict(os.environ),
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip() == "2 [2.0, 2.0]"
