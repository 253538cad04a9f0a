"""Stopping cleanly on SIGTERM (what a preempted TPU VM receives) and SIGINT (Ctrl-C).

The first signal asks the loop to finish its current step, write a checkpoint and exit with
`EXIT_PREEMPTED`; a second SIGINT interrupts at once. With several processes the request is
agreed on at the loop's sync points (every process then stops after the same step), since one
process cannot checkpoint alone.
"""

from __future__ import annotations

import signal
from typing import Optional

import jax

from instdisc_jax import parallel

# Distinct from success (0), failure (1) and user errors (2); EX_TEMPFAIL: "try again later".
EXIT_PREEMPTED = 75


class StopSignal:
  """Records SIGTERM/SIGINT while installed (a context manager)."""

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self._signals = signals
    self._previous = {}
    self.received: Optional[str] = None

  def __enter__(self) -> "StopSignal":
    for sig in self._signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    name = signal.Signals(signum).name
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = self.received or name

  def poll(self, step: int, at_sync_point: bool) -> Optional[str]:
    """The signal to stop for after `step`, or None. Multi-process: only at sync points."""
    del step
    if jax.process_count() == 1:
      return self.received
    if not at_sync_point:
      return None
    if not parallel.any_process(self.received is not None):
      return None
    return self.received or "SIGTERM (received by another process)"


class Preempted(Exception):
  """SIGTERM/SIGINT arrived; a checkpoint of the last completed step was written."""

  def __init__(self, step: int, signal_name: str):
    super().__init__(f"stopped by {signal_name} after step {step}; checkpoint written, rerun the "
                     "same command to resume")
    self.step = step
