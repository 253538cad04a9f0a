"""The peer watchdog of multi-process runs, against an in-memory key-value store.

tests/test_multihost.py kills a real process; these cover every way a peer can end, in
milliseconds.
"""

import os
import sys
import threading
import time

import pytest

from instdisc_jax import peers

INTERVAL, TIMEOUT = 0.01, 0.3


class FakeClient:
  """The key-value part of a `jax.distributed` client; `broken` makes every call fail."""

  def __init__(self):
    self.store = {}
    self.lock = threading.Lock()
    self.broken = False

  def key_value_set(self, key, value, allow_overwrite=False):
    with self.lock:
      if self.broken:
        raise RuntimeError("UNAVAILABLE: Socket closed")
      if key in self.store and not allow_overwrite:
        raise RuntimeError(f"ALREADY_EXISTS: {key}")
      self.store[key] = value

  def key_value_dir_get(self, prefix):
    with self.lock:
      if self.broken:
        raise RuntimeError("UNAVAILABLE: Socket closed")
      return [(k, v) for k, v in sorted(self.store.items()) if k.startswith(prefix)]


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
  monkeypatch.setattr(peers, "FAILURE_NOTICE_SECONDS", 2.0)
  monkeypatch.setattr(peers, "SILENCE_SECONDS", 0.2)


def watchdog(client, index, count=2):
  exits = Exits()
  dog = peers.Watchdog(client, index, count, interval=INTERVAL, timeout=TIMEOUT,
                       exit_process=exits)
  return dog, exits


def installed(monkeypatch, dog):
  """Starts `dog` and makes it the process's watchdog, as `peers.start` would."""
  dog.start()
  monkeypatch.setattr(peers, "_watchdog", dog)
  return dog


def beat_forever(client, process, stop):
  """A live peer: a heartbeat that keeps changing until `stop` is set."""
  def run():
    beats = 0
    while not stop.is_set():
      client.key_value_set(f"instdisc_peers/{process}/beat", str(beats), allow_overwrite=True)
      beats += 1
      time.sleep(INTERVAL)
  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  return thread


def test_live_peers_keep_each_other_running():
  client = FakeClient()
  dogs = [watchdog(client, i) for i in range(2)]
  for dog, _ in dogs:
    dog.start()
  time.sleep(3 * TIMEOUT)
  for dog, exits in dogs:
    assert exits.status is None
    dog.finish(0)
  assert client.store["instdisc_peers/0/end"] == client.store["instdisc_peers/1/end"] == "ok"


def test_a_peer_without_heartbeat_stops_this_process(capsys):
  client = FakeClient()
  dog, exits = watchdog(client, 1)
  start = time.monotonic()
  dog.start()
  assert exits.called.wait(10)
  assert TIMEOUT <= time.monotonic() - start < TIMEOUT + 2
  assert exits.status == peers.EXIT_PEER_LOST
  err = capsys.readouterr().err
  assert err.startswith("error: process 0 of 2 stopped responding (no heartbeat for 0 s): it "
                        "died, was killed or hangs; process 1 stops too")
  assert len(err.splitlines()) == 1
  assert client.store["instdisc_peers/1/end"].startswith("stopped after losing a peer")


def test_a_failed_peer_stops_this_process(capsys):
  client = FakeClient()
  stop = threading.Event()
  beat_forever(client, 1, stop)
  dog, exits = watchdog(client, 0)
  dog.start()
  client.key_value_set("instdisc_peers/1/end", "failed (exit status 2; see its log)")
  try:
    assert exits.called.wait(5)    # the peer's heartbeat goes on: only its failure stops this one
  finally:
    stop.set()
  assert exits.status == peers.EXIT_PEER_LOST
  assert capsys.readouterr().err.startswith(
      "error: process 1 of 2 failed (exit status 2; see its log); process 0 stops too")


def test_a_process_failing_itself_reports_its_own_error():
  # All processes fail alike: the main thread ends the process within the grace period, and the
  # watchdog does not speak for it.
  client = FakeClient()
  dog, exits = watchdog(client, 1)
  dog.start()
  client.key_value_set("instdisc_peers/0/end", "failed (exit status 1; see its log)")
  dog.finish(1)
  assert exits.status is None
  assert client.store["instdisc_peers/1/end"] == "failed (exit status 1; see its log)"


def test_a_finished_peer_is_no_longer_watched():
  client = FakeClient()
  client.key_value_set("instdisc_peers/1/end", "ok")
  dog, exits = watchdog(client, 0)
  dog.start()
  time.sleep(3 * TIMEOUT)
  dog.finish(0)
  assert exits.status is None


@pytest.mark.parametrize("status, end", [(0, "ok"), (peers.EXIT_PREEMPTED, "ok"),
                                         (2, "failed (exit status 2; see its log)")])
def test_finish_publishes_how_the_process_ended(status, end):
  client = FakeClient()
  dog, exits = watchdog(client, 1)
  dog.start()
  dog.finish(status)
  assert client.store["instdisc_peers/1/end"] == end
  assert exits.status is None


def test_process_0_leaves_after_the_others_read_its_failure():
  client = FakeClient()
  dog, _ = watchdog(client, 0, count=3)
  dog.start()

  def others_stop():
    time.sleep(0.3)
    client.key_value_set("instdisc_peers/1/end", "stopped after losing a peer (...)")
    client.key_value_set("instdisc_peers/2/end", "stopped after losing a peer (...)")

  threading.Thread(target=others_stop, daemon=True).start()
  start = time.monotonic()
  dog.finish(2)
  assert 0.3 <= time.monotonic() - start < peers.FAILURE_NOTICE_SECONDS


def test_lost_coordination_service(capsys):
  client = FakeClient()
  dog, exits = watchdog(client, 1)
  client.broken = True
  dog.start()
  assert exits.called.wait(10)
  assert capsys.readouterr().err.startswith(
      "error: lost contact with the coordination service in process 0 (RuntimeError: "
      "UNAVAILABLE: Socket closed); process 1 stops too")


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


def test_reporting_exit_ends_a_failing_process_at_once(monkeypatch, os_exits):
  client = FakeClient()
  installed(monkeypatch, watchdog(client, 1)[0])
  with pytest.raises(Exited):
    with peers.reporting_exit():
      sys.exit(2)
  assert os_exits == [2]
  assert client.store["instdisc_peers/1/end"] == "failed (exit status 2; see its log)"


def test_reporting_exit_prints_an_exit_message(monkeypatch, os_exits, capsys):
  installed(monkeypatch, watchdog(FakeClient(), 1)[0])
  with pytest.raises(Exited):
    with peers.reporting_exit():
      sys.exit("cannot go on")
  assert os_exits == [1]
  assert capsys.readouterr().err == "cannot go on\n"


def test_reporting_exit_reports_an_uncaught_exception(monkeypatch, os_exits, capsys):
  client = FakeClient()
  stop = threading.Event()
  beat_forever(client, 0, stop)
  dog, exits = watchdog(client, 1)
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


def test_an_uncaught_exception_names_a_silent_peer(monkeypatch, os_exits, capsys):
  # An error from a collective whose peer was killed: the peer's heartbeat has stopped.
  client = FakeClient()
  client.key_value_set("instdisc_peers/0/beat", "7")
  installed(monkeypatch, peers.Watchdog(client, 1, 2, interval=INTERVAL, timeout=60,
                                        exit_process=os._exit))
  with pytest.raises(Exited):
    with peers.reporting_exit():
      raise RuntimeError("Gloo all-reduce failed: Connection closed by peer")
  assert os_exits == [peers.EXIT_PEER_LOST]
  assert capsys.readouterr().err.splitlines()[-1].startswith(
      "error: process 0 of 2 stopped responding (no heartbeat for 0 s): it died, was killed or "
      "hangs; process 1 stops too")


def test_reporting_exit_lets_success_exit_normally(monkeypatch):
  client = FakeClient()
  installed(monkeypatch, watchdog(client, 1)[0])
  with pytest.raises(SystemExit):
    with peers.reporting_exit():
      sys.exit(0)
  assert client.store["instdisc_peers/1/end"] == "ok"
  assert peers._watchdog is None  # pylint: disable=protected-access


def test_reporting_exit_without_a_watchdog_changes_nothing():
  assert peers._watchdog is None  # pylint: disable=protected-access
  with pytest.raises(SystemExit) as raised:
    with peers.reporting_exit():
      sys.exit(3)
  assert raised.value.code == 3
