"""Orbax plumbing of the checkpoints: the `integrity` item's handler and a quiet fallback.

Quiet fallback: when one read of a restore fails, orbax abandons the checkpoint's other reads and
closes its event loop; tensorstore then completes those reads and cannot deliver them to the
closed loop, and Python prints each such "Event loop is closed" error (hundreds for a large
state), each read coroutine left un-awaited with a read error of its own, and asyncio logs each
read task whose error nobody retrieved ("Task exception was never retrieved", with a traceback,
whenever the task is garbage-collected). And a reader of a
running run may list a checkpoint that the run deletes (`keep_checkpoints`) before it is read:
orbax then logs "Metadata file does not exist" for it. None of these carry information (a
checkpoint that cannot be used is named in the `Checkpointer`'s own warning, one that vanished
is passed over on purpose), so `install_quiet_fallback` drops exactly these, from
`sys.unraisablehook`, asyncio's logger and orbax's (absl's) logger, and passes everything else on.

Test hook: with the environment variable `INSTDISC_TEST_CHECKPOINT_WRITE_DELAY_S` set to a number
of seconds, the background part of every save first sleeps that long, so tests can act (e.g.
SIGKILL the process) while a save is reliably in flight. It is for tests only; never set it in a
real run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys

import orbax.checkpoint as ocp

WRITE_DELAY_ENV = "INSTDISC_TEST_CHECKPOINT_WRITE_DELAY_S"
# orbax's (absl) log message for a step directory without `_CHECKPOINT_METADATA`.
_MISSING_METADATA = "Metadata file does not exist: %s"


# -- quiet fallback --------------------------------------------------------------------------------


def _is_abandoned_read_callback(unraisable) -> bool:
  """Whether an unraisable exception comes from an abandoned read of a failed orbax restore (see
  the module doc): tensorstore failing to deliver a read to the closed event loop, or a read
  coroutine finalised with its own read error, never awaited."""
  code = getattr(unraisable.object, "cr_code", None)
  if code is not None:
    return (code.co_name == "_read_array_index_and_device_put"
            and f"{os.sep}orbax{os.sep}" in code.co_filename)
  error = unraisable.exc_value
  if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
    return False
  frames = []
  traceback = unraisable.exc_traceback
  while traceback is not None:
    frames.append(traceback.tb_frame.f_code.co_name)
    traceback = traceback.tb_next
  return "_check_closed" in frames and "call_soon_threadsafe" in frames


class _MissingStepMetadataFilter(logging.Filter):
  """Drops orbax's warning about a checkpoint without step metadata (see the module doc)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.msg != _MISSING_METADATA


class _AbandonedReadTaskFilter(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" for a task that failed in orbax's code
  (an abandoned read of a failed restore, see the module doc); keeps it for every other task."""

  def filter(self, record: logging.LogRecord) -> bool:
    if not (isinstance(record.msg, str)
            and record.msg.startswith("Task exception was never retrieved")
            and record.exc_info and record.exc_info[2] is not None):
      return True
    return f"{os.sep}orbax{os.sep}" not in record.exc_info[2].tb_frame.f_code.co_filename


def _add_filter_once(logger: logging.Logger, kind: type) -> None:
  if not any(isinstance(f, kind) for f in logger.filters):
    logger.addFilter(kind())


def install_quiet_fallback() -> None:
  """Wraps `sys.unraisablehook` to drop abandoned-read callbacks, and filters asyncio's report of
  abandoned read tasks and orbax's warning about missing step metadata; passes on the rest.
  Installs each once, however often called."""
  _add_filter_once(logging.getLogger("asyncio"), _AbandonedReadTaskFilter)
  _add_filter_once(logging.getLogger("absl"), _MissingStepMetadataFilter)
  previous = sys.unraisablehook
  if getattr(previous, "instdisc_quiet_fallback", False):
    return

  def hook(unraisable):
    if not _is_abandoned_read_callback(unraisable):
      previous(unraisable)

  hook.instdisc_quiet_fallback = True
  sys.unraisablehook = hook


# -- the integrity item and the test hook ---------------------------------------------------------


class IntegrityHandler(ocp.JsonCheckpointHandler):
  """The `integrity` item's handler: orbax's JSON handler, plus the test-only write delay.

  With `WRITE_DELAY_ENV` set, a save's background part sleeps that many seconds before the
  checkpoint can be finalised (see the module doc); otherwise it is the plain JSON handler.
  """

  async def async_save(self, directory, item=None, args=None):
    futures = list(await super().async_save(directory, item, args) or [])
    delay = float(os.environ.get(WRITE_DELAY_ENV) or 0)
    if delay > 0:
      futures.append(ocp.future.CommitFutureAwaitingContractedSignals(
          asyncio.sleep(delay), name="instdisc_test_write_delay"))
    return futures


@ocp.args.register_with_handler(IntegrityHandler, for_save=True)
@dataclasses.dataclass
class IntegritySave(ocp.args.JsonSave):
  """`JsonSave` for the `integrity` item (its handler is `IntegrityHandler`)."""


@ocp.args.register_with_handler(IntegrityHandler, for_restore=True)
@dataclasses.dataclass
class IntegrityRestore(ocp.args.JsonRestore):
  """`JsonRestore` for the `integrity` item (what it writes is plain JSON: any reader's
  `JsonRestore` reads it too)."""
