"""Timing, environment records and report formatting shared by the benchmark modules.

Every timed call is made after compilation and waited for with `jax.block_until_ready`; a
benchmark reports the median of its repeats (and keeps every repeat in the JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jaxlib


@dataclasses.dataclass
class Timing:
  """Wall-clock seconds of `repeats` steady-state calls (after compile and warm-up)."""

  times_s: list[float]

  @property
  def median_s(self) -> float:
    return statistics.median(self.times_s)

  def to_json(self) -> dict:
    return {"median_s": self.median_s, "min_s": min(self.times_s),
            "max_s": max(self.times_s), "repeats": len(self.times_s), "times_s": self.times_s}


def time_calls(call: Callable[[int], Any], *, repeats: int, warmup: int = 1) -> Timing:
  """Times `call(i)` for i = warmup, ..., warmup + repeats - 1, after `warmup` untimed calls.

  `call` runs one step (it may carry state in a closure, e.g. a donated bank) and returns what
  to wait for. Inputs should be prepared before, so only the step is timed.
  """
  for i in range(warmup):
    jax.block_until_ready(call(i))
  times = []
  for i in range(warmup, warmup + repeats):
    start = time.perf_counter()
    jax.block_until_ready(call(i))
    times.append(time.perf_counter() - start)
  return Timing(times)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
  """(fn(), seconds it took), for one-off costs such as lowering and compiling."""
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def environment() -> dict:
  """Backend, devices, versions, date and host facts of this process."""
  devices = jax.devices()
  return {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "python": platform.python_version(),
      "cpu_count": os.cpu_count(),
      "machine": platform.machine(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


_OUTPUT = {"path": None, "environment": None}


def _write_json(result: dict, partial: bool) -> None:
  record = {"environment": _OUTPUT["environment"], "result": result, "partial": partial}
  tmp = _OUTPUT["path"] + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2)
  os.replace(tmp, _OUTPUT["path"])  # A reader never sees half a file.


def save_partial(result: dict) -> None:
  """Writes the result so far, so that a run stopped at its time limit still reports it."""
  if _OUTPUT["path"]:
    _write_json(result, partial=True)


def module_main(run: Callable[[str], dict], markdown: Callable[[dict], str], description: str,
                sizes: Sequence[str], argv: Sequence[str] | None = None) -> None:
  """Command line of a benchmark module: `[--size SIZE] [--json FILE]`, SIZE one of `sizes`.

  With --json, writes `{"environment": ..., "result": run(size), "partial": false}` to FILE
  (the runner's way); without, prints the markdown report of the result.
  """
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--size", choices=tuple(sizes), default="full")
  parser.add_argument("--json", help="write the result here as JSON instead of printing it")
  args = parser.parse_args(argv)
  _OUTPUT.update(path=args.json, environment=environment())
  result = run(args.size)
  if args.json:
    _write_json(result, partial=False)
  else:
    sys.stdout.write(markdown(result) + "\n")


def log(message: str) -> None:
  """A progress line, on stderr (the runner echoes it)."""
  print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Formatting.
# ------------------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A markdown table."""
  lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines)


def ms(seconds: float) -> str:
  return f"{1000 * seconds:.1f}"


def mib(num_bytes: float) -> str:
  return f"{num_bytes / 2**20:.2f}"


def si(value: float, unit: str = "") -> str:
  """1.23e9 -> '1.23 G' + unit."""
  for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= factor:
      return f"{value / factor:.2f} {prefix}{unit}"
  return f"{value:.2f} {unit}".rstrip()
