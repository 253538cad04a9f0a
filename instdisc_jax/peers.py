"""A watchdog over the other processes of a multi-process run, so that none waits for a dead one.

Without it, a process whose peer dies can be blocked in a collective or a barrier that never
completes: JAX's coordination service notices a dead process only after its heartbeat timeout
(100 s) and then aborts the others with a stack trace, and a process that fails with an error
waits at exit for peers that wait for it (up to JAX's 300 s shutdown timeout).

With `start()`, every process publishes a heartbeat in the coordination service's key-value
store every `INTERVAL_SECONDS` and, on the way out (`reporting_exit`), how it ended. A thread in
each process reads the others' entries; when a peer failed or its heartbeat is older than
`TIMEOUT_SECONDS`, it prints one line `error: ...` on stderr and ends this process at once with
`EXIT_PEER_LOST`, skipping the exit handlers (JAX's would wait at the shutdown barrier for the
peer). A failing process likewise leaves without that barrier. Process 0 leaves last: the
coordination service that holds the entries runs in it, and JAX aborts the other processes as
soon as it is gone. A process failing with an uncaught exception (such as an error from a
collective whose peer died) first watches the heartbeats for `SILENCE_SECONDS`, and names a
silent peer if there is one.

When process 0 dies, the coordination service (which runs in it) dies too, and JAX aborts the
others at once ("Terminating process because the JAX distributed service detected fatal
errors"), before this watchdog can say anything.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback
from typing import Optional

from instdisc_jax.errors import one_line
from instdisc_jax.preemption import EXIT_PREEMPTED

EXIT_PEER_LOST = 1
INTERVAL_SECONDS = 1.0
# Well below the time JAX takes to notice a dead process (half to all of its 100 s heartbeat
# timeout), so that this message comes first; far above any stall of a live process's threads.
TIMEOUT_SECONDS = 30.0
# How long a process that learns of a peer's failure gives its own main thread to end first (it
# may be failing the same way, and should say so itself).
FAILURE_GRACE_SECONDS = 2.0
# How long process 0, stopping after a failure, waits for the others to have read it and left.
FAILURE_NOTICE_SECONDS = 10.0
# How long a process failing with an uncaught exception watches its peers' heartbeats, to tell
# whether one of them died (the usual cause of an error in a collective).
SILENCE_SECONDS = 3.0
_PREFIX = "instdisc_peers/"
_OK = "ok"

_watchdog: Optional["Watchdog"] = None


def _silent(peer: int, count: int, seconds: float) -> str:
  return (f"process {peer} of {count} stopped responding (no heartbeat for {seconds:.0f} s): it "
          "died, was killed or hangs")


class Watchdog:
  """Publishes this process's heartbeat and end; stops this process when a peer is lost.

  `client` is the `jax.distributed` client (its key-value store); `exit_process` ends the
  process without exit handlers.
  """

  def __init__(self, client, process_index: int, process_count: int, *,
               interval: float = INTERVAL_SECONDS, timeout: float = TIMEOUT_SECONDS,
               exit_process=os._exit):
    self._client = client
    self._index = process_index
    self._peers = [p for p in range(process_count) if p != process_index]
    self._count = process_count
    self._interval = interval
    self._timeout = timeout
    self._exit_process = exit_process
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="instdisc-peer-watchdog",
                                    daemon=True)

  def start(self) -> None:
    self._thread.start()

  def _key(self, process: int, field: str) -> str:
    return f"{_PREFIX}{process}/{field}"

  def _entries(self) -> dict[tuple[int, str], str]:
    """{(process, "beat" or "end"): value} of every process."""
    entries = {}
    for key, value in self._client.key_value_dir_get(_PREFIX):
      process, field = key.rstrip("/").split("/")[-2:]
      entries[(int(process), field)] = value
    return entries

  def _run(self) -> None:
    beats = 0
    seen = {}                                  # peer -> (last heartbeat value, when it changed)
    ended = set()
    while not self._stop.is_set():
      try:
        self._client.key_value_set(self._key(self._index, "beat"), str(beats),
                                   allow_overwrite=True)
        entries = self._entries()
      except Exception as e:  # pylint: disable=broad-except
        if self._stop.is_set():
          return
        self._lost(f"lost contact with the coordination service in process 0 "
                   f"({type(e).__name__}: {one_line(e)[:200]})")
        return
      beats += 1
      now = time.monotonic()
      for peer in self._peers:
        if peer in ended:
          continue
        end = entries.get((peer, "end"))
        if end == _OK:
          ended.add(peer)
          continue
        if end is not None:
          # When all processes fail alike (a NaN loss), each should report its own error.
          if not self._stop.wait(FAILURE_GRACE_SECONDS):
            self._lost(f"process {peer} of {self._count} {end}", peer)
          return
        beat = entries.get((peer, "beat"))
        if peer not in seen or seen[peer][0] != beat:
          seen[peer] = (beat, now)
        elif now - seen[peer][1] > self._timeout:
          self._lost(_silent(peer, self._count, self._timeout), peer)
          return
      self._stop.wait(self._interval)

  def _lost(self, reason: str, peer: Optional[int] = None) -> None:
    """Ends this process: a peer is gone, so its next collective would never complete."""
    print(f"error: {reason}; process {self._index} stops too, since the others cannot go on "
          "without it. Completed checkpoints are kept: restart every process to resume from the "
          "newest.", file=sys.stderr, flush=True)
    self._leave(f"stopped after losing a peer ({reason})", gone=() if peer is None else (peer,))
    sys.stdout.flush()
    self._exit_process(EXIT_PEER_LOST)

  def _leave(self, end: str, gone=()) -> None:
    """Publishes how this process ends. Process 0, whose coordination service holds the entries
    (and aborts the other processes when it goes), then waits up to FAILURE_NOTICE_SECONDS for
    every peer but `gone` to have published its own end, i.e. to have read this one and left."""
    if not self._publish_end(end) or self._index != 0:
      return
    waiting = [peer for peer in self._peers if peer not in gone]
    deadline = time.monotonic() + FAILURE_NOTICE_SECONDS
    while time.monotonic() < deadline:
      try:
        entries = self._entries()
      except Exception:  # pylint: disable=broad-except
        return
      if all((peer, "end") in entries for peer in waiting):
        time.sleep(0.5)                        # they exit right after publishing
        return
      time.sleep(0.1)

  def stop_for_silent_peer(self, window: float) -> None:
    """Ends this process as `_lost` if a peer's heartbeat does not move within `window` s.

    For a process that is failing anyway (so a slow peer taken for a dead one costs nothing): an
    error from a collective usually means that a peer died, and saying which is clearer.
    """
    try:
      before = self._entries()
      time.sleep(window)
      after = self._entries()
    except Exception:  # pylint: disable=broad-except
      return
    for peer in self._peers:
      if (peer, "end") not in after and before.get((peer, "beat")) == after.get((peer, "beat")):
        self._stop.set()
        self._lost(_silent(peer, self._count, window), peer)
        return

  def _publish_end(self, value: str) -> bool:
    try:
      self._client.key_value_set(self._key(self._index, "end"), one_line(value)[:500],
                                 allow_overwrite=True)
      return True
    except Exception:  # pylint: disable=broad-except  # the service may be gone already
      return False

  def finish(self, status: int) -> None:
    """Publishes how this process ends (`status` as for sys.exit) and stops the thread.

    Success and preemption (which all processes agree on) end quietly; any other status tells
    the peers to stop.
    """
    self._stop.set()
    self._thread.join(self._timeout)
    if status in (0, EXIT_PREEMPTED):
      self._publish_end(_OK)
    else:
      self._leave(f"failed (exit status {status}; see its log)")


def start() -> None:
  """Starts the watchdog of this process (call after `jax.distributed.initialize`)."""
  global _watchdog  # pylint: disable=global-statement
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1 or _watchdog is not None:
    return
  _watchdog = Watchdog(distributed.global_state.client, jax.process_index(),
                       jax.process_count())
  _watchdog.start()


def _status(exit_code) -> int:
  """The exit status of `sys.exit(exit_code)`."""
  if exit_code is None:
    return 0
  return exit_code if isinstance(exit_code, int) else 1


@contextlib.contextmanager
def reporting_exit():
  """Around a program's main: tells the peers how this process ends.

  A failing process (any status but 0 and `EXIT_PREEMPTED`, or an uncaught exception) then exits
  at once, without exit handlers: its peers stop on its failure, so it would wait in vain at
  JAX's shutdown barrier. Without a watchdog (one process) this does nothing.
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
