"""One writer per workdir: a lock file naming the process that holds it.

`<workdir>/lock.json` holds {"pid", "host", "start", "since"} ("start" identifies the process
beyond its pid, which the system reuses). It is created whole (written aside, then hard-linked
into place, which fails if a lock exists), so a reader never sees half a lock. A second run on
the same workdir is refused with a message naming the holder. A lock whose process no longer
exists on this host (after SIGKILL or a crash, or a restarted container that reuses the pid) is
stale and taken over with a warning. A lock from another host cannot be checked: the message
says which file to delete if that run is gone. In a multi-process run only process 0 holds the
lock. Object-store workdirs (gs://) cannot be locked this way; they are used without a lock, with
a notice.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Optional

import jax

from instdisc_jax.errors import WorkdirError

log = logging.getLogger(__name__)

LOCK_NAME = "lock.json"


def create_workdir(workdir: str) -> None:
  """Creates `workdir` (and its parents), as a one-line WorkdirError if that fails."""
  if "://" in workdir:
    return
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"cannot create --workdir {workdir}: {e.strerror or e}") from e
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(f"--workdir {workdir} is not writable by this user; give it write "
                       "permission (chmod u+w) or use another --workdir")


def _start_time(pid: int) -> Optional[str]:
  """When process `pid` started (clock ticks since boot), or None where /proc cannot tell."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
  except OSError:
    return None
  # Field 22; the command name (field 2) may hold spaces, so count from its closing parenthesis.
  return stat[stat.rindex(")") + 2:].split()[19]


def _alive(pid: int, start: Optional[str]) -> bool:
  """Whether the process that wrote a lock with (pid, start) still runs on this host."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  current = _start_time(pid)
  return start is None or current is None or current == start


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
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "start": _start_time(os.getpid()), "since": time.time()}
    aside = f"{self.path}.{os.getpid()}.tmp"
    try:
      with open(aside, "w") as f:
        json.dump(record, f)
    except OSError as e:
      raise WorkdirError(f"cannot write the lock file of --workdir {os.path.dirname(self.path)} "
                         f"({e.strerror or e}); give it write permission or use another "
                         "--workdir") from e
    try:
      for _ in range(2):
        try:
          os.link(aside, self.path)
        except FileExistsError:
          self._remove_if_stale()
          continue
        self.held = True
        return self
    finally:
      os.remove(aside)
    raise WorkdirError(f"could not lock {self.path}; delete it if no run is using the workdir")

  def _remove_if_stale(self) -> None:
    """Removes a stale lock; raises WorkdirError naming the holder of a live one."""
    try:
      with open(self.path) as f:
        holder = json.load(f)
    except FileNotFoundError:
      return                                         # Released meanwhile: try again.
    except (OSError, json.JSONDecodeError):
      holder = {}
    pid, host = holder.get("pid"), holder.get("host")
    if not isinstance(pid, int):
      raise WorkdirError(f"{self.path} is damaged; delete it if no run is using the workdir")
    if host == socket.gethostname() and not _alive(pid, holder.get("start")):
      log.warning("taking over the stale lock of pid %d (no longer running): %s", pid, self.path)
      os.remove(self.path)
      return
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    if host == socket.gethostname():
      fix = "wait for that run to finish, or use another --workdir"
    else:
      fix = (f"wait for that run to finish, or use another --workdir (if that run is gone, "
             f"delete {self.path})")
    raise WorkdirError(f"workdir {os.path.dirname(self.path)} is in use by pid {pid} on host "
                       f"{host} since {since}; {fix}")

  def __exit__(self, *exc) -> None:
    if self.held:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
      self.held = False
