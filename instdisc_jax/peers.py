"""A watchdog over the other processes of a multi-process run, so that none waits for a dead one.

Without it, a process whose peer dies can be blocked in a collective or a barrier that never
completes: JAX's coordination service notices a dead process only after its heartbeat timeout
(100 s) and then aborts the others with a stack trace, and a process that fails with an error
waits at exit for peers that wait for it (up to JAX's 300 s shutdown timeout).

With `start()`, a thread in every process meets the others once per `INTERVAL_SECONDS` in a
heartbeat round: `jax.experimental.multihost_utils.live_devices`, which returns once every live
process has called it. A second thread times the rounds; when none completes for
`TIMEOUT_SECONDS`, a peer has died or hangs (it no longer meets), and the watchdog prints one line
`error: ...` on stderr and ends this process at once with `EXIT_PEER_LOST`, skipping the exit
handlers (JAX's would wait at the shutdown barrier for the peer). A failing process likewise
leaves without that barrier (`reporting_exit`); its peers then see its rounds stop. A process
failing with an uncaught exception (such as an error from a collective whose peer died) first
waits `SILENCE_SECONDS` for a round, and names the silent peer if none comes.

Process 0 leaves last where it can: the coordination service runs in it, and JAX aborts the other
processes as soon as it is gone. Failing while its peers run on, it stays until their watchdogs
have ended them; when process 0 dies, JAX aborts the others at once ("Terminating process because
the JAX distributed service detected fatal errors"), before this watchdog can say anything.

All processes of a run end together (the last thing each does is collective), so one that ends
normally simply stops meeting and shuts `jax.distributed` down, where JAX's shutdown barrier holds
it until the others get there. docs/design.md ("Private APIs") records what JAX's other public
fault-tolerance APIs do and why this watchdog does not use them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback
from typing import Callable, Optional

from instdisc_jax.errors import one_line
from instdisc_jax.preemption import EXIT_PREEMPTED

EXIT_PEER_LOST = 1
INTERVAL_SECONDS = 1.0
# Well below the time JAX takes to notice a dead process (half to all of its 100 s heartbeat
# timeout), so that this message comes first; far above any stall of a live process's threads.
TIMEOUT_SECONDS = 30.0
# How long process 0, failing, gives its peers to stop meeting before it checks (for as long
# again) whether they run on: when all processes fail alike (a NaN loss, a bad dataset), they are
# gone by then. Above one interval, since a peer that stops may already be in one more round.
FAILURE_GRACE_SECONDS = 2.0
# How long a process failing with an uncaught exception waits for a heartbeat round, to tell
# whether a peer died (the usual cause of an error in a collective).
SILENCE_SECONDS = 3.0
# How long a process ending normally waits, once `jax.distributed` is shut down, for the round
# still waiting for the peers to end (it fails at once).
LAST_ROUND_SECONDS = 5.0

_watchdog: Optional["Watchdog"] = None


def meet_live_processes() -> None:
  """One heartbeat round: returns once every live process has called it.

  `live_devices` is a barrier over the processes that JAX's coordination service considers alive
  (the body of the `with` is empty: only the meeting matters). It raises `ProcessFailureError`
  once the service has declared a process dead, and any error when the service is gone.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  with multihost_utils.live_devices(jax.devices()):
    pass


def _shutdown_jax_distributed() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.shutdown()


def _failed_round(error: Exception, count: int) -> str:
  failed = getattr(error, "failed_devices", None)     # multihost_utils.ProcessFailureError
  if failed:
    processes = ", ".join(str(p) for p in sorted({d.process_index for d in failed}))
    return f"JAX's coordination service reports process {processes} of {count} failed"
  return (f"lost contact with the coordination service in process 0 "
          f"({type(error).__name__}: {one_line(error)[:200]})")


class Watchdog:
  """Meets the other processes every `interval` s; ends this process when they stop meeting.

  `meet` is one heartbeat round (`meet_live_processes`); `exit_process` ends the process without
  exit handlers; `shutdown` is `jax.distributed.shutdown`.
  """

  def __init__(self, process_index: int, process_count: int, *,
               meet: Callable[[], None] = meet_live_processes,
               interval: float = INTERVAL_SECONDS, timeout: float = TIMEOUT_SECONDS,
               exit_process=os._exit, shutdown: Optional[Callable[[], None]] = None):
    self._index = process_index
    self._count = process_count
    self._meet = meet
    self._interval = interval
    self._timeout = timeout
    self._exit_process = exit_process
    self._shutdown = shutdown or _shutdown_jax_distributed
    self._rounds = 0                             # heartbeat rounds completed
    self._stopped = False
    self._changed = threading.Condition()        # notified on each round and on stopping
    self._rounds_thread = threading.Thread(target=self._meet_forever, name="instdisc-peer-rounds",
                                           daemon=True)
    self._watch_thread = threading.Thread(target=self._watch, name="instdisc-peer-watchdog",
                                          daemon=True)

  def start(self) -> None:
    self._rounds_thread.start()
    self._watch_thread.start()

  def _stop(self) -> bool:
    """Stops meeting and watching; whether this call stopped them (False: already stopped)."""
    with self._changed:
      first, self._stopped = not self._stopped, True
      self._changed.notify_all()
      return first

  def _meet_forever(self) -> None:
    while not self._stopped:
      try:
        self._meet()
      except Exception as e:  # pylint: disable=broad-except
        self._lost(_failed_round(e, self._count))  # after `_stop`, when JAX shuts down: quiet
        return
      with self._changed:
        self._rounds += 1
        self._changed.notify_all()
        self._changed.wait_for(lambda: self._stopped, self._interval)

  def _round_within(self, seconds: float) -> bool:
    """Whether a heartbeat round completes (or the watchdog stops) within `seconds`."""
    with self._changed:
      seen = self._rounds
      return self._changed.wait_for(lambda: self._rounds != seen or self._stopped, seconds)

  def _watch(self) -> None:
    while not self._stopped:
      if not self._round_within(self._timeout):
        self._lost(self._silent(self._timeout))
        return

  def _silent(self, seconds: float) -> str:
    """A peer has stopped meeting. With two processes it is the other one; with more, a round
    does not say which process is missing."""
    others = [p for p in range(self._count) if p != self._index]
    who = (f"process {others[0]}" if len(others) == 1
           else f"one of processes {', '.join(map(str, others))}")
    return (f"{who} of {self._count} stopped responding (no heartbeat for {seconds:.0f} s): it "
            "failed, died, was killed or hangs")

  def _lost(self, reason: str) -> None:
    """Ends this process: a peer is gone, so its next collective would never complete."""
    if not self._stop():
      return
    print(f"error: {reason}; process {self._index} stops too, since the others cannot go on "
          "without it. Completed checkpoints are kept: restart every process to resume from the "
          "newest.", file=sys.stderr, flush=True)
    sys.stdout.flush()
    if self._index == 0 and self._count > 2:
      # The other survivors miss the same rounds and stop within moments; once process 0 (and
      # with it the coordination service) is gone, JAX aborts them before they can say why.
      time.sleep(2 * self._interval)
    self._exit_process(EXIT_PEER_LOST)

  def stop_for_silent_peer(self, window: float) -> None:
    """Ends this process as `_lost` if no heartbeat round completes within `window` s.

    For a process that is failing anyway (so a slow peer taken for a dead one costs nothing): an
    error from a collective usually means that a peer died, and saying which is clearer.
    """
    if not self._round_within(window):
      self._lost(self._silent(window))

  def finish(self, status: int) -> None:
    """Stops the heartbeat rounds as this process ends (`status` as for sys.exit).

    Ending normally (0 or `EXIT_PREEMPTED`), it shuts `jax.distributed` down. Process 0 failing
    (any other status) while its peers run on stays until their watchdogs have missed its rounds
    for `timeout` s and ended them with one line.
    """
    if status in (0, EXIT_PREEMPTED):
      self._stop()
      # JAX's exit handler would shut `jax.distributed` down too, but then a round still waiting
      # for the peers (which have stopped meeting) returns while Python finalises, and the process
      # aborts ("FATAL: exception not rethrown", exit status 134). Shutting down here, at JAX's
      # shutdown barrier with the others, ends that round while the thread can still return.
      self._shutdown()
      self._rounds_thread.join(LAST_ROUND_SECONDS)
      return
    if self._index == 0 and not self._stopped and self._peers_run_on():
      self._stop()
      time.sleep(self._timeout + 2 * self._interval)
    self._stop()

  def _peers_run_on(self) -> bool:
    """Whether the peers still meet `FAILURE_GRACE_SECONDS` after this process failed (a round
    completes within as long again)."""
    time.sleep(FAILURE_GRACE_SECONDS)
    return self._round_within(FAILURE_GRACE_SECONDS)


def start() -> None:
  """Starts the watchdog of this process (call after `jax.distributed.initialize`)."""
  global _watchdog  # pylint: disable=global-statement
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1 or _watchdog is not None:
    return
  _watchdog = Watchdog(jax.process_index(), jax.process_count())
  _watchdog.start()


def _status(exit_code) -> int:
  """The exit status of `sys.exit(exit_code)`."""
  if exit_code is None:
    return 0
  return exit_code if isinstance(exit_code, int) else 1


@contextlib.contextmanager
def reporting_exit():
  """Around a program's main: stops the watchdog as this process ends.

  A failing process (any status but 0 and `EXIT_PREEMPTED`, or an uncaught exception) then exits
  at once, without exit handlers: its peers stop when it no longer meets them, so it would wait in
  vain at JAX's shutdown barrier. Without a watchdog (one process) this does nothing.
  """
  try:
    yield
  except SystemExit as e:
    if _watchdog is not None and not isinstance(e.code, (int, type(None))):
      print(e.code, file=sys.stderr, flush=True)   # what Python would print on the way out
    _end(_status(e.code))
    raise
  except BaseException as e:
    if _watchdog is not None:
      traceback.print_exc()
      _watchdog.stop_for_silent_peer(SILENCE_SECONDS)
      print(f"error: {type(e).__name__}: {one_line(e)[:300]}", file=sys.stderr, flush=True)
      _end(1)
    raise
  else:
    _end(0)


def _end(status: int) -> None:
  global _watchdog  # pylint: disable=global-statement
  watchdog, _watchdog = _watchdog, None
  if watchdog is None:
    return
  watchdog.finish(status)
  if status not in (0, EXIT_PREEMPTED):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # pylint: disable=protected-access
