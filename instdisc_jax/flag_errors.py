"""Command-line parsing whose every problem is one line: absl flags and ml_collections configs.

absl and ml_collections report a bad flag in their own ways (a KeyError whose text spans two
lines for an unknown config field, a multi-line traceback for a config file that fails, an
IOError deferred until a missing config file is first used). `parse` turns each into a
`UserError` naming the flag or field, the value and the fix, worded like config validation's
messages:

  config.batchsize is not a config field; did you mean 'batch_size'? (from --config.batchsize=3)
  config.batch_size='abc': must be an integer
  --config=configs/x.py: cannot load the config file ([Errno 2] No such file or directory: ...)
  unexpected argument 'stray': flags are written --name=value (see --helpfull)

Only absl's public API is used: the flags are found by iterating `FlagValues`, and the flag a
value was refused for is found by giving each value on the command line to its flag's own parser
again (absl's messages are not parsed, so rewording them upstream changes nothing here).
"""

from __future__ import annotations

import os
import re
import traceback
from typing import Optional, Sequence

from absl import flags
import ml_collections

from instdisc_jax.config_fields import unknown_field_hint
from instdisc_jax.errors import UserError
from instdisc_jax.errors import one_line

# What a value must look like, by the absl parser that rejected it.
_EXPECTED = {"IntegerParser": "must be an integer", "FloatParser": "must be a number",
             "BooleanParser": "must be True or False"}


def parse(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS, *,
          takes_arguments: bool = False) -> list[str]:
  """`flag_values(argv)`; raises UserError with one line for any problem.

  Returns the program name and its positional arguments. Unless `takes_arguments` (search's
  further query paths), a positional argument (a value without its --flag=, a stray word) is an
  error too.
  """
  describe = _Describer(argv, flag_values)
  try:
    remaining = flag_values(argv)
  except flags.UnrecognizedFlagError as e:
    raise UserError(f"Unknown command line flag {e.flagname!r}; see --helpfull") from e
  except flags.IllegalFlagValueError as e:
    raise UserError(describe.bad_value(e)) from e
  except flags.Error as e:
    raise UserError(f"{first_line(e)}; see --helpfull") from e
  except (KeyError, AttributeError) as e:       # --config.<a field the config does not have>
    raise UserError(describe.unknown_field(e)) from e
  except OSError as e:                          # a config file that cannot be read
    raise UserError(describe.unreadable_config(e)) from e
  except (TypeError, ValueError) as e:
    raise UserError(f"bad --config override: {first_line(e)}") from e
  except Exception as e:  # pylint: disable=broad-except
    raising = describe.config_file_raising(e)
    if raising is None:
      raise
    raise UserError(f"--{raising}={describe.value_of(raising)}: cannot load the config file "
                    f"({type(e).__name__}: {first_line(e)})") from e
  for name in describe.config_flags:
    if flag_values[name].value is None:         # not given: the entry point says what to do
      continue
    try:
      flag_values[name].value.keys()            # raises the deferred error of a missing file
    except OSError as e:
      raise UserError(describe.unreadable_config(e, name)) from e
  if len(remaining) > 1 and not takes_arguments:
    extra = remaining[1]
    raise UserError(f"unexpected argument {extra!r}: flags are written --name=value "
                    "(see --helpfull)")
  return remaining


def check_overrides(argv: Sequence[str], name: str, config: ml_collections.ConfigDict) -> None:
  """Refuses `--<name>.<field>` arguments naming no field of `config`, before the flag is defined.

  `config_flags.DEFINE_config_dict` reads the overrides on the command line when it is called
  (to give each its parser), so an unknown field fails there, outside `parse`; this gives the
  same one line `parse` gives for a config file's flag.
  """
  for arg in argv[1:]:
    match = re.match(rf"^--?(?:no)?{re.escape(name)}\.([\w.-]+)", arg)
    unknown = match and _unknown_field(name, config, match.group(1), arg)
    if unknown:
      raise UserError(unknown)


def _unknown_field(name: str, config: ml_collections.ConfigDict, field: str,
                   arg: str) -> Optional[str]:
  """The one line for `arg` (--<name>.<field>=...) if `field` is not a field of `config`."""
  group = config
  parts = field.split(".")
  for depth, part in enumerate(parts):
    if not isinstance(group, ml_collections.ConfigDict):
      return None
    if part not in group:
      hint = unknown_field_hint(part, group.keys(), ".".join([name] + parts[:depth]))
      return f"{name}.{'.'.join(parts[:depth + 1])} is not a config field{hint} (from {arg})"
    group = group[part]
  return None


def first_line(error: BaseException) -> str:
  """The first line of an error's message (of the innermost error it wraps)."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def _expected(parser, value: str, refused: BaseException) -> str:
  """What `parser` needs instead of `value`: its type, or the bound a number breaks."""
  expected = _EXPECTED.get(type(parser).__name__)
  if expected is None:
    help_ = getattr(parser, "syntactic_help", "")
    expected = (f"must be {help_}" if help_ else
                f"cannot be read ({type(refused).__name__}: {first_line(refused)})")
  number = {"IntegerParser": int, "FloatParser": float}.get(type(parser).__name__)
  try:
    number = number(value) if number else None
  except ValueError:
    return expected
  low, high = getattr(parser, "lower_bound", None), getattr(parser, "upper_bound", None)
  if number is not None and low is not None and number < low:
    return f"must be >= {low}"
  if number is not None and high is not None and number > high:
    return f"must be <= {high}"
  return expected


def _last_line(text) -> str:
  lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
  return lines[-1] if lines else ""


class _Describer:
  """One-line descriptions of the errors of parsing `argv` into `flag_values`."""

  def __init__(self, argv: Sequence[str], flag_values: flags.FlagValues):
    self.argv = list(argv)
    self.flag_values = flag_values
    # Flags defined by ml_collections.config_flags: they take --<name>.<field> overrides.
    self.config_flags = [name for name in flag_values
                         if hasattr(type(flag_values[name]), "override_values")]

  def value_of(self, name: str) -> Optional[str]:
    """The value given to --name on the command line (the last one), or None."""
    value = None
    for i, arg in enumerate(self.argv):
      if arg.startswith(f"--{name}="):
        value = arg.split("=", 1)[1]
      elif arg == f"--{name}" and i + 1 < len(self.argv):
        value = self.argv[i + 1]
    return value

  def overrides(self) -> list[tuple[str, str, str]]:
    """(config flag, dotted field, the argument) of every --<config flag>.<field> argument."""
    found = []
    for arg in self.argv:
      match = re.match(r"^--?(?:no)?([\w-]+)\.([\w.-]+)", arg)
      if match and match.group(1) in self.config_flags:
        found.append((match.group(1), match.group(2), arg))
    return found

  def config_of(self, name: str) -> Optional[ml_collections.ConfigDict]:
    """The config of flag `name` before overrides, or None if it cannot be had."""
    flag = self.flag_values[name]
    try:
      path = self.value_of(name)
      config = flag.parser.parse(path) if path is not None else flag.default
    except Exception:  # pylint: disable=broad-except  # the caller falls back on the error text
      return None
    return config if isinstance(config, ml_collections.ConfigDict) else None

  def unknown_field(self, error: BaseException) -> str:
    """`--config.batchsize=3`: the field, the closest valid name or else the valid names."""
    for name, field, arg in self.overrides():
      config = self.config_of(name)
      unknown = config is not None and _unknown_field(name, config, field, arg)
      if unknown:
        return unknown
    # No override names a missing field: the config file itself failed (e.g. no get_config).
    for name in self.config_flags:
      value = self.value_of(name)
      if value is None:
        continue
      try:
        self.flag_values[name].parser.parse(value)
      except Exception as failed:  # pylint: disable=broad-except  # whatever the file raises
        return (f"--{name}={value}: cannot load the config file ({type(failed).__name__}: "
                f"{first_line(failed)})")
    return f"bad --config override: {first_line(error)}"

  def given(self) -> list[tuple[str, str]]:
    """(flag, value) of every `--flag=value` and `--flag value` on the command line."""
    found = []
    for i, arg in enumerate(self.argv[1:], 1):
      match = re.match(r"^--?([\w.-]+)(?:=(.*))?$", arg, re.DOTALL)
      if not match or match.group(1) not in self.flag_values:
        continue
      if match.group(2) is not None:
        found.append((match.group(1), match.group(2)))
      elif (not isinstance(self.flag_values[match.group(1)], flags.BooleanFlag)
            and i + 1 < len(self.argv)):
        found.append((match.group(1), self.argv[i + 1]))
    return found

  def bad_value(self, error: flags.IllegalFlagValueError) -> str:
    """A value its flag refuses: "config.batch_size='abc': must be an integer".

    The flag is the first one whose own parser refuses the value given to it; absl's message is
    used as it is only when none does (a flag validator, a flag given twice).
    """
    for name, value in self.given():
      parser = self.flag_values[name].parser
      try:
        parser.parse(value)
      except Exception as refused:  # pylint: disable=broad-except  # whatever the parser raises
        if name in self.config_flags:           # the config file itself failed to load
          return (f"--{name}={value}: cannot load the config file "
                  f"({_last_line(refused)})")
        is_field = "." in name and name.split(".", 1)[0] in self.config_flags
        return (f"{name if is_field else '--' + name}={value!r}: "
                f"{_expected(parser, value, refused)}")
    return f"{one_line(error)}; see --helpfull"

  def config_file_raising(self, error: BaseException) -> Optional[str]:
    """The config flag whose file raised `error` (while building its config), or None."""
    files = {}
    for name in self.config_flags:
      value = self.value_of(name)
      if value:
        files[os.path.abspath(value.split(":", 1)[0])] = name
    # A file that does not compile raises before any of its frames runs; SyntaxError names it.
    if isinstance(error, SyntaxError) and error.filename:
      name = files.get(os.path.abspath(error.filename))
      if name is not None:
        return name
    for frame, _ in traceback.walk_tb(error.__traceback__):
      name = files.get(os.path.abspath(frame.f_code.co_filename))
      if name is not None:
        return name
    return None

  def unreadable_config(self, error: OSError, name: Optional[str] = None) -> str:
    """A config file that is missing or unreadable, with the system's reason."""
    name = name or next(iter(self.config_flags), "config")
    cause = error.__cause__ or error
    return (f"--{name}={self.value_of(name)}: cannot load the config file "
            f"({_last_line(cause)})")
