"""Orbax plumbing of the checkpoints: the `integrity` item's handler and a quiet fallback.

Quiet fallback: when one read of a restore fails, orbax abandons the checkpoint's other reads and
closes its event loop; tensorstore then completes those reads and cannot deliver them to the
closed loop, and Python prints each such "Event loop is closed" error (hundreds for a large
state), each read coroutine left un-awaited with a read error of its own, asyncio logs each
read task whose error nobody retrieved ("Task exception was never retrieved", with a traceback,
whenever the task is garbage-collected), and Python warns of each of orbax's coroutines that was
created but never awaited (a RuntimeWarning, often only when the interpreter exits). And a reader of a
running run may list a checkpoint that the run deletes (`keep_checkpoints`) before it is read:
orbax then logs "Metadata file does not exist" for it. None of these carry information (a
checkpoint that cannot be used is named in the `Checkpointer`'s own warning, one that vanished
is passed over on purpose), so `install_quiet_fallback` drops exactly these, from
`sys.unraisablehook`, asyncio's logger, the warning of an unawaited coroutine (the hook
`warnings._warn_unawaited_coroutine`, through which CPython issues it; kept where absent) and
orbax's (absl's) logger, and passes everything else on: what it drops comes from code in orbax.

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
import warnings

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
    return _in_orbax(code)
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


_NEVER_RETRIEVED = ("Task exception was never retrieved", "Future exception was never retrieved")


def _is_read_error(error: BaseException) -> bool:
  """Whether `error` was raised by orbax's code or is tensorstore's (set on a future from C++,
  such errors carry no Python frame, only tensorstore's spec in their text)."""
  traceback = error.__traceback__
  if traceback is None:
    return "tensorstore" in str(error)
  while traceback is not None:
    if _in_orbax(traceback.tb_frame.f_code):
      return True
    traceback = traceback.tb_next
  return False


class _AbandonedReadTaskFilter(logging.Filter):
  """Drops asyncio's "Task/Future exception was never retrieved" for an abandoned read of a failed
  restore (see the module doc): an error of orbax's code or of tensorstore; keeps the others."""

  def filter(self, record: logging.LogRecord) -> bool:
    if not (isinstance(record.msg, str) and record.msg.startswith(_NEVER_RETRIEVED)
            and record.exc_info and record.exc_info[1] is not None):
      return True
    return not _is_read_error(record.exc_info[1])


def _add_filter_once(logger: logging.Logger, kind: type) -> None:
  if not any(isinstance(f, kind) for f in logger.filters):
    logger.addFilter(kind())


def _in_orbax(code) -> bool:
  return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _quiet_unawaited_orbax_coroutines() -> None:
  """Drops CPython's warning of a never-awaited coroutine when orbax's code defines it."""
  previous = getattr(warnings, "_warn_unawaited_coroutine", None)
  if previous is None or getattr(previous, "instdisc_quiet_fallback", False):
    return

  def warn(coroutine):
    if not _in_orbax(getattr(coroutine, "cr_code", None)):
      previous(coroutine)

  warn.instdisc_quiet_fallback = True
  warnings._warn_unawaited_coroutine = warn  # pylint: disable=protected-access


def install_quiet_fallback() -> None:
  """Wraps `sys.unraisablehook` to drop abandoned-read callbacks, and filters asyncio's report of
  abandoned read tasks and orbax's warning about missing step metadata; passes on the rest.
  Installs each once, however often called."""
  _add_filter_once(logging.getLogger("asyncio"), _AbandonedReadTaskFilter)
  _add_filter_once(logging.getLogger("absl"), _MissingStepMetadataFilter)
  _quiet_unawaited_orbax_coroutines()
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
