"""One writer per workdir: a lock file naming the process that holds it.

`<workdir>/lock.json` holds {"pid", "host", "since"}. A second run on the same workdir is
refused with a message naming the holder. A lock left by a process that no longer exists on this
host (after SIGKILL or a crash) is stale and taken over with a warning. In a multi-process run
only process 0 holds the lock. Object-store workdirs (gs://) cannot be locked this way; they are
used without a lock, with a notice.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

import jax

from instdisc_jax.errors import WorkdirError

log = logging.getLogger(__name__)

LOCK_NAME = "lock.json"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """Context manager holding `<workdir>/lock.json` (process 0 only)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(os.fspath(workdir), LOCK_NAME)
    self.held = False

  def __enter__(self) -> "WorkdirLock":
    if jax.process_index() != 0:
      return self
    if "://" in self.path:
      log.info("not locking %s: object-store workdirs have no exclusive create", self.path)
      return self
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._handle_existing()
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(record, f)
      self.held = True
      return self
    raise WorkdirError(f"could not lock {self.path}; remove it if no run is using the workdir")

  def _handle_existing(self) -> None:
    try:
      with open(self.path) as f:
        holder = json.load(f)
    except (OSError, json.JSONDecodeError):
      holder = {}
    pid, host = holder.get("pid"), holder.get("host")
    if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
      log.warning("taking over the stale lock of pid %d (no longer running): %s", pid, self.path)
      os.remove(self.path)
      return
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    raise WorkdirError(
        f"workdir {os.path.dirname(self.path)} is in use by pid {pid} on host {host} since "
        f"{since}; wait for that run to finish, or use another --workdir")

  def __exit__(self, *exc) -> None:
    if self.held:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
      self.held = False
