"""The peer watchdog of multi-process runs, with processes played by threads.

tests/test_multihost.py kills a real process; these cover every way a peer can end, in
milliseconds. `Rounds` stands in for `multihost_utils.live_devices`: a barrier over all processes.
"""

import functools
import gc
import os
import sys
import threading
import time

import pytest

from instdisc_jax import peers

INTERVAL, TIMEOUT = 0.01, 0.3


class Rounds:
  """Heartbeat rounds: `meet(p)` returns once every process has met as often as p. While `error`
  is set, every call raises it (as JAX does once its coordination service is gone)."""

  def __init__(self, count):
    self.met = [0] * count
    self.changed = threading.Condition()
    self.error = None
    self.closed = False

  def meet(self, process):
    with self.changed:
      if self.error is not None:
        raise self.error
      self.met[process] += 1
      self.changed.notify_all()
      round_ = self.met[process]
      self.changed.wait_for(
          lambda: self.closed or self.error is not None or min(self.met) >= round_)
      if self.error is not None:
        raise self.error

  def fail(self, error):
    with self.changed:
      self.error = error
      self.changed.notify_all()

  def close(self):
    """Releases the threads still waiting for a round (at the end of a test)."""
    with self.changed:
      self.closed = True
      self.changed.notify_all()


@pytest.fixture
def rounds():
  """rounds(count): new `Rounds`, closed after the test."""
  made = []

  def make(count=2):
    made.append(Rounds(count))
    return made[-1]

  yield make
  for r in made:
    r.close()


class Exits:
  """Stands in for os._exit: records the status (the watchdog thread then returns)."""

  def __init__(self):
    self.status = None
    self.called = threading.Event()

  def __call__(self, status):
    self.status = status
    self.called.set()


@pytest.fixture(autouse=True)
def short_waits(monkeypatch):
  monkeypatch.setattr(peers, "FAILURE_GRACE_SECONDS", 0.05)
  monkeypatch.setattr(peers, "SILENCE_SECONDS", 0.2)
  monkeypatch.setattr(peers, "LAST_ROUND_SECONDS", 1.0)


def watchdog(rounds, index, count=2, timeout=TIMEOUT, exit_process=None, shutdown=None):
  """(the watchdog of process `index`, its Exits); `shutdown` stands in for
  jax.distributed.shutdown (by default it does nothing)."""
  exits = Exits()
  dog = peers.Watchdog(index, count, meet=functools.partial(rounds.meet, index),
                       interval=INTERVAL, timeout=timeout, exit_process=exit_process or exits,
                       shutdown=shutdown or (lambda: None))
  return dog, exits


def started(*dogs):
  for dog, _ in dogs:
    dog.start()
  return dogs


def pair(r):
  """The watchdogs of processes 0 and 1 of 2."""
  return watchdog(r, 0), watchdog(r, 1)


def installed(monkeypatch, dog):
  """Starts `dog` and makes it the process's watchdog, as `peers.start` would."""
  dog.start()
  monkeypatch.setattr(peers, "_watchdog", dog)
  return dog


def meet_forever(rounds, process, stop):
  """A live peer without a watchdog: it meets every INTERVAL until `stop` is set."""
  def run():
    while not stop.is_set():
      rounds.meet(process)
      time.sleep(INTERVAL)
  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  return thread


def test_live_peers_keep_each_other_running(rounds):
  # A pause of every thread longer than the timeout (a full garbage collection late in the
  # suite) looks like a silent peer: it stopped this test once in CI with TIMEOUT = 0.3 s. Live
  # peers get a timeout far above such pauses, and the collector waits until the end.
  timeout = 2.0
  r = rounds(3)
  gc.disable()
  try:
    dogs = started(*(watchdog(r, i, count=3, timeout=timeout) for i in range(3)))
    time.sleep(1.5 * timeout)
  finally:
    gc.enable()
  for dog, exits in dogs:
    assert exits.status is None
    dog.finish(0)
  assert min(r.met) > 10


def test_a_peer_that_never_meets_stops_this_process(rounds, capsys):
  start = time.monotonic()
  (_, exits), = started(watchdog(rounds(), 1))
  assert exits.called.wait(10)
  assert TIMEOUT <= time.monotonic() - start < TIMEOUT + 2
  assert exits.status == peers.EXIT_PEER_LOST
  err = capsys.readouterr().err
  assert err.startswith("error: process 0 of 2 stopped responding (no heartbeat for 0 s): it "
                        "failed, died, was killed or hangs; process 1 stops too")
  assert err.endswith("restart every process to resume from the newest.\n")
  assert len(err.splitlines()) == 1


def test_a_failed_peer_stops_the_others(rounds, capsys):
  (dog0, exits0), (dog1, exits1) = started(*pair(rounds()))
  time.sleep(3 * INTERVAL)
  dog1.finish(2)                                  # then os._exit(2) in a real process
  stopped = time.monotonic()
  assert exits0.called.wait(10)
  assert time.monotonic() - stopped < TIMEOUT + 2
  assert (exits0.status, exits1.status) == (peers.EXIT_PEER_LOST, None)
  assert capsys.readouterr().err.startswith("error: process 1 of 2 stopped responding")


def test_more_than_two_processes_name_the_candidates(rounds, capsys):
  r = rounds(4)
  (_, exits), = started(watchdog(r, 2, count=4))
  stop = threading.Event()
  for peer in (0, 1):                             # process 3 never meets
    meet_forever(r, peer, stop)
  try:
    assert exits.called.wait(10)
  finally:
    stop.set()
  assert capsys.readouterr().err.startswith(
      "error: one of processes 0, 1, 3 of 4 stopped responding (no heartbeat for 0 s)")


def test_a_peer_that_jax_declares_failed(rounds, capsys):
  class Device:
    def __init__(self, process_index):
      self.process_index = process_index

  class ProcessFailureError(Exception):           # as multihost_utils.ProcessFailureError
    def __init__(self, failed_devices):
      super().__init__(f"Devices failed: {failed_devices}")
      self.failed_devices = failed_devices

  r = rounds()
  (_, exits), = started(watchdog(r, 0, timeout=60))
  r.fail(ProcessFailureError({Device(1), Device(1)}))
  assert exits.called.wait(10)
  assert capsys.readouterr().err.startswith(
      "error: JAX's coordination service reports process 1 of 2 failed; process 0 stops too")


def test_lost_coordination_service(rounds, capsys):
  r = rounds()
  r.fail(RuntimeError("UNAVAILABLE: Socket closed\nRPC: /xla.coordination/Heartbeat"))
  (_, exits), = started(watchdog(r, 1, timeout=60))
  assert exits.called.wait(10)
  err = capsys.readouterr().err
  assert err.startswith(
      "error: lost contact with the coordination service in process 0 (RuntimeError: "
      "UNAVAILABLE: Socket closed RPC: /xla.coordination/Heartbeat); process 1 stops too")
  assert len(err.splitlines()) == 1


def test_ending_normally_shuts_jax_down_under_the_last_round(rounds, capsys):
  # The peer has stopped meeting; JAX's shutdown ends the round still waiting for it (with an
  # error, quietly), so that no thread is left in JAX when Python finalises.
  r = rounds()
  shutdowns = []

  def shutdown():
    shutdowns.append(time.monotonic())
    r.fail(RuntimeError("CANCELLED: the coordination service has shut down"))

  (dog, exits), = started(watchdog(r, 1, shutdown=shutdown))
  time.sleep(3 * INTERVAL)
  start = time.monotonic()
  dog.finish(0)
  assert len(shutdowns) == 1 and time.monotonic() - start < 0.5
  assert not dog._rounds_thread.is_alive()  # pylint: disable=protected-access
  time.sleep(TIMEOUT + 0.1)
  assert exits.status is None
  assert capsys.readouterr().err == ""


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("status", [0, peers.EXIT_PREEMPTED, 2])
def test_finishing_stops_the_rounds_at_once(rounds, index, status):
  # A normal end shuts jax.distributed down (a failure leaves that to os._exit). Process 0
  # failing waits only while its peers run on; here they do not (nobody meets it).
  r = rounds()
  shutdown = functools.partial(r.fail, RuntimeError("CANCELLED: shut down"))
  (dog, exits), = started(watchdog(r, index, timeout=5, shutdown=shutdown))
  start = time.monotonic()
  dog.finish(status)
  assert time.monotonic() - start < 1
  assert (r.error is not None) == (status in (0, peers.EXIT_PREEMPTED))
  met = r.met[index]
  time.sleep(10 * INTERVAL)
  assert r.met[index] == met
  assert exits.status is None


def test_process_0_failing_leaves_after_the_others_stopped(rounds, capsys):
  (dog0, exits0), (_, exits1) = started(*pair(rounds()))
  time.sleep(3 * INTERVAL)
  start = time.monotonic()
  dog0.finish(2)
  assert time.monotonic() - start >= TIMEOUT
  assert exits1.called.is_set()                   # before process 0 (and its service) went
  assert (exits0.status, exits1.status) == (None, peers.EXIT_PEER_LOST)
  assert capsys.readouterr().err.startswith("error: process 0 of 2 stopped responding")


def test_processes_failing_alike_leave_at_once(rounds):
  # A NaN loss or a bad dataset: every process fails at the same point; process 0 does not wait
  # for peers that are already gone.
  (dog0, exits0), (dog1, exits1) = started(*pair(rounds()))
  time.sleep(3 * INTERVAL)
  threading.Thread(target=dog1.finish, args=(2,)).start()
  start = time.monotonic()
  dog0.finish(2)
  assert time.monotonic() - start < TIMEOUT
  assert exits0.status is exits1.status is None


class Exited(Exception):
  pass


@pytest.fixture
def os_exits(monkeypatch):
  """os._exit replaced by a recorder that raises Exited; the statuses it was called with."""
  statuses = []

  def fake_exit(status):
    statuses.append(status)
    raise Exited

  monkeypatch.setattr(os, "_exit", fake_exit)
  return statuses


def test_reporting_exit_ends_a_failing_process_at_once(rounds, monkeypatch, os_exits):
  r = rounds()
  installed(monkeypatch, watchdog(r, 1)[0])
  with pytest.raises(Exited):
    with peers.reporting_exit():
      sys.exit(2)
  assert os_exits == [2]
  met = r.met[1]
  time.sleep(10 * INTERVAL)
  assert r.met[1] == met                          # it no longer meets its peers


def test_reporting_exit_prints_an_exit_message(rounds, monkeypatch, os_exits, capsys):
  installed(monkeypatch, watchdog(rounds(), 1)[0])
  with pytest.raises(Exited):
    with peers.reporting_exit():
      sys.exit("cannot go on")
  assert os_exits == [1]
  assert capsys.readouterr().err == "cannot go on\n"


def test_reporting_exit_reports_an_uncaught_exception(rounds, monkeypatch, os_exits, capsys):
  r = rounds()
  stop = threading.Event()
  meet_forever(r, 0, stop)
  dog, exits = watchdog(r, 1)
  installed(monkeypatch, dog)
  try:
    with pytest.raises(Exited):
      with peers.reporting_exit():
        raise RuntimeError("out of memory\nwhile allocating")
  finally:
    stop.set()
  assert os_exits == [1]
  assert exits.status is None
  err = capsys.readouterr().err
  assert err.startswith("Traceback (most recent call last):")
  assert err.splitlines()[-1] == "error: RuntimeError: out of memory while allocating"


def test_an_uncaught_exception_names_a_silent_peer(rounds, monkeypatch, os_exits, capsys):
  # An error from a collective whose peer was killed: the peer no longer meets.
  installed(monkeypatch, watchdog(rounds(), 1, timeout=60, exit_process=os._exit)[0])
  with pytest.raises(Exited):
    with peers.reporting_exit():
      raise RuntimeError("Gloo all-reduce failed: Connection closed by peer")
  assert os_exits == [peers.EXIT_PEER_LOST]
  assert capsys.readouterr().err.splitlines()[-1].startswith(
      "error: process 0 of 2 stopped responding (no heartbeat for 0 s): it failed, died, was "
      "killed or hangs; process 1 stops too")


def test_reporting_exit_lets_success_exit_normally(rounds, monkeypatch):
  r = rounds()
  installed(monkeypatch, watchdog(r, 1, shutdown=functools.partial(r.fail, KeyError()))[0])
  with pytest.raises(SystemExit):
    with peers.reporting_exit():
      sys.exit(0)
  assert isinstance(r.error, KeyError)            # jax.distributed was shut down
  assert peers._watchdog is None  # pylint: disable=protected-access


def test_reporting_exit_without_a_watchdog_changes_nothing():
  assert peers._watchdog is None  # pylint: disable=protected-access
  with pytest.raises(SystemExit) as raised:
    with peers.reporting_exit():
      sys.exit(3)
  assert raised.value.code == 3


def test_the_package_uses_no_private_jax_module():
  package = os.path.dirname(peers.__file__)
  for directory, _, files in os.walk(package):
    for name in files:
      if name.endswith(".py"):
        with open(os.path.join(directory, name)) as f:
          assert "_src" not in f.read(), os.path.relpath(os.path.join(directory, name), package)
