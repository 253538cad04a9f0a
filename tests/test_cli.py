"""Runtime set-up shared by the command-line entry points."""

import os

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
      "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  cli.split_cpu_into_devices((128, 1000))
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
  monkeypatch.delenv("XLA_FLAGS")
  cli.split_cpu_into_devices((128,), requested=1)
  assert "XLA_FLAGS" not in os.environ
