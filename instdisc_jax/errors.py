"""Errors that are the user's to fix, reported as one line and exit status 2.

Raise `UserError` (or a subclass) for anything a user can correct: a bad config value, a missing
dataset, an unusable workdir. The message must name the field (or file), the offending value and
the fix, in one line. `instdisc_jax.main` catches these, prints `error: <message>` to stderr and
exits with `EXIT_USER_ERROR`; with `--verbose` it re-raises for the traceback.

`NonFiniteLossError` is one line too, but reports a failed run rather than bad input.
"""

EXIT_USER_ERROR = 2


class UserError(Exception):
  """A problem the user can fix; `str(error)` is the whole one-line message."""

  def __init__(self, message: str):
    if "\n" in message:
      raise ValueError(f"UserError messages are one line, got: {message!r}")
    super().__init__(message)


class ConfigError(UserError):
  """A config field has an invalid value, type or name."""


class DataError(UserError):
  """A dataset is missing, empty, unreadable or of the wrong shape."""


class WorkdirError(UserError):
  """The workdir is locked by another run or belongs to an incompatible config."""


class NonFiniteLossError(UserError):
  """Training diverged: the loss, or the train state about to be checkpointed, is NaN or
  infinite. The message names the step; the last good checkpoint is kept. `instdisc_jax.main`
  exits with status 1 for it (the run failed), not 2."""


def one_line(message) -> str:
  """`message` (any object) with every run of white space, newlines included, as one space."""
  return " ".join(str(message).split())
