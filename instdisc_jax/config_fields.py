"""How config fields are declared: `Field` (default, one-line doc, rule, tags), `Schema`, the rules.

A schema is written once, one `field(...)` per config field, and everything else is derived
from it: the default `ml_collections.ConfigDict`, the checks of its keys and values, and the
tagged views (the train step's static fields, the run's identity). `config_schema.SCHEMA` is
the training config's; `evaluation/config.py` declares the evaluator's the same way.

Rules are small frozen value objects: called with (field, value) they raise one `ConfigError`
line, `config.<field>=<value>: <the fix>`; tests read their bounds and choices to derive valid
and invalid values. `suggest` is the project's one "did you mean" helper (config keys, choices,
flags, model names, augmentation fields).

This module imports neither JAX nor any other module of the package but `errors`, so the command
line can use it before the runtime starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import ml_collections

from instdisc_jax.errors import ConfigError

TFDS_DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "stl10", "imagenet2012")
DATASET_PREFIXES = ("folder:", "npz:")
DTYPES = ("float32", "bfloat16")
START_FROM = "start config files from instdisc_jax.default_config.get_config()"


def suggest(name: Any, choices: Sequence[Any], prefix: str = "") -> str:
  """'; did you mean '<prefix>x'?' for the closest x of `choices` (ignoring case), or ''.

  difflib's ratio with its default cutoff (0.6): 'batchsize' finds 'batch_size', 'NCE' finds
  'nce', while a name sharing little with every choice gets no guess rather than a wrong one.
  `prefix` names the group of a nested field ('augment.') without taking part in the match.
  """
  lowered = {str(choice).lower(): choice for choice in choices}
  close = difflib.get_close_matches(str(name).lower(), list(lowered), n=1, cutoff=0.6)
  return f"; did you mean {prefix + str(lowered[close[0]])!r}?" if close else ""


def unknown_field_hint(name: str, valid: Sequence[str], group: str) -> str:
  """'; did you mean 'x'?' for a close valid name, else the list of the valid names."""
  return suggest(name, sorted(valid)) or f" (the fields of {group}: {', '.join(sorted(valid))})"


def fail(field: str, value: Any, fix: str) -> None:
  """Raises the one-line ConfigError for `config.<field>=<value>`."""
  raise ConfigError(f"config.{field}={value!r}: {fix}")


# -- rules ---------------------------------------------------------------------------------------


def is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


Rule = Callable[[str, Any], None]


@dataclasses.dataclass(frozen=True)
class Integer:
  """An integer in [low, high] (either bound optional)."""

  low: Optional[int] = None
  high: Optional[int] = None

  def __call__(self, field: str, value) -> None:
    if not is_int(value):
      fail(field, value, "must be an integer")
    if self.low is not None and value < self.low:
      fail(field, value, f"must be >= {self.low}")
    if self.high is not None and value > self.high:
      fail(field, value, f"must be <= {self.high}")


@dataclasses.dataclass(frozen=True)
class Number:
  """A finite number between low and high; `*_open` excludes the bound itself."""

  low: Optional[float] = None
  high: Optional[float] = None
  low_open: bool = False
  high_open: bool = False

  def __call__(self, field: str, value) -> None:
    if not is_number(value):
      fail(field, value, "must be a finite number")
    if self.low is not None and (value <= self.low if self.low_open else value < self.low):
      fail(field, value, f"must be {'>' if self.low_open else '>='} {self.low}")
    if self.high is not None and (value >= self.high if self.high_open else value > self.high):
      fail(field, value, f"must be {'<' if self.high_open else '<='} {self.high}")


@dataclasses.dataclass(frozen=True)
class Choice:
  """One of a fixed set of strings."""

  choices: tuple[str, ...]

  def __call__(self, field: str, value) -> None:
    if not isinstance(value, str) or value not in self.choices:
      fail(field, value, f"must be one of {', '.join(self.choices)}"
           f"{suggest(value, self.choices)}")


@dataclasses.dataclass(frozen=True)
class Boolean:
  """True or False (not 0/1 or a string)."""

  def __call__(self, field: str, value) -> None:
    if not isinstance(value, bool):
      fail(field, value, "must be True or False")


@dataclasses.dataclass(frozen=True)
class Text:
  """A string; `nonempty` also rules out ''."""

  nonempty: bool = False

  def __call__(self, field: str, value) -> None:
    if not isinstance(value, str):
      fail(field, value, "must be a string")
    if self.nonempty and not value:
      fail(field, value, "must not be empty")


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A tfds name of `TFDS_DATASETS`, folder:/path or npz:/path; `optional` also allows ''."""

  optional: bool = False

  def __call__(self, field: str, value) -> None:
    if self.optional and value == "":
      return
    Text(nonempty=True)(field, value)
    if value.startswith(DATASET_PREFIXES):
      if not value.split(":", 1)[1]:
        fail(field, value, "give a path after the prefix, e.g. folder:/data/images")
      return
    if value not in TFDS_DATASETS:
      fail(field, value, f"must be one of {', '.join(TFDS_DATASETS)}, or folder:/path or "
           f"npz:/path/file.npz{suggest(value, TFDS_DATASETS)}")


@dataclasses.dataclass(frozen=True)
class Grid:
  """A non-empty tuple of distinct values, each valid under `item` (e.g. a grid of k or tau)."""

  item: Any

  def __call__(self, field: str, value) -> None:
    if not isinstance(value, (tuple, list)) or not value:
      fail(field, value, "must be a non-empty list of values, e.g. (10, 20)")
    for v in value:
      try:
        self.item(field, v)
      except ConfigError as e:
        raise ConfigError(f"config.{field}={value!r}: the value {v!r} {str(e).split(': ', 1)[1]}"
                          ) from e
    if len(set(value)) != len(value):
      fail(field, value, "must not repeat a value")


@dataclasses.dataclass(frozen=True)
class Epochs:
  """An increasing sequence of positive epochs."""

  def __call__(self, field: str, value) -> None:
    if (not isinstance(value, (tuple, list))
        or not all(is_number(v) and v > 0 for v in value)):
      fail(field, value, "must be a list of positive epochs, e.g. (120, 160)")
    if list(value) != sorted(value):
      fail(field, value, "must be in increasing order")


@dataclasses.dataclass(frozen=True)
class TupleOf:
  """A tuple (non-empty unless `allow_empty`) whose every item passes `item`."""

  item: Rule
  allow_empty: bool = False

  def __call__(self, field: str, value) -> None:
    if not isinstance(value, (tuple, list)) or not (value or self.allow_empty):
      fail(field, value, "must be a tuple (empty for none)" if self.allow_empty
           else "must be a non-empty tuple")
    for item in value:
      self.item(field, item)


# -- fields and schemas --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: its default, its rule, a one-line doc and the views it belongs to.

  Attributes:
    default: the value of `get_config()`; its type is the field's type in the ConfigDict.
    rule: raises a one-line ConfigError for an invalid value.
    doc: what the field means, one line (the comment of a flax-style get_config).
    step: the field is static configuration of the train step (`steps.StepConfig`); a string
      names the StepConfig attribute when it differs from the field's name.
    identity: the field is part of a run's identity (`config_io.run_meta`): a checkpoint's
      shapes or meaning depend on it, so a workdir is not resumed with another value.
  """

  default: Any
  rule: Rule
  doc: str
  step: Union[bool, str] = False
  identity: bool = False


def field(default: Any, rule: Rule, doc: str, *, step: Union[bool, str] = False,
          identity: bool = False) -> Field:
  """Declares a field (see `Field`); reads like a get_config line with its comment."""
  if not doc or "\n" in doc:
    raise ValueError(f"a field's doc is one non-empty line, got {doc!r}")
  try:
    rule("default", default)
  except ConfigError as e:                      # A default its own rule refuses is a bug.
    raise ValueError(f"a field's default must pass its rule ({e})") from None
  return Field(default, rule, doc, step=step, identity=identity)


class Schema:
  """A group of named fields and subgroups, in declaration order: `Schema(seed=field(...))`."""

  def __init__(self, **members: Union[Field, "Schema"]):
    for name, member in members.items():
      if not isinstance(member, (Field, Schema)):
        raise TypeError(f"schema member {name} is a {type(member).__name__}, not a Field")
    self.members = members

  def fields(self, prefix: str = "") -> Iterator[tuple[str, Field]]:
    """(dotted name, Field) of every field, groups flattened, in declaration order."""
    for name, member in self.members.items():
      if isinstance(member, Schema):
        yield from member.fields(f"{prefix}{name}.")
      else:
        yield f"{prefix}{name}", member

  def defaults(self) -> ml_collections.ConfigDict:
    """The ConfigDict of every field's default (a new one on every call)."""
    config = ml_collections.ConfigDict()
    for name, member in self.members.items():
      config[name] = member.defaults() if isinstance(member, Schema) else member.default
    return config

  def step_fields(self) -> dict[str, str]:
    """{StepConfig attribute: dotted field} of the fields tagged `step`."""
    step_fields = {}
    for name, f in self.fields():
      if f.step:
        attr = f.step if isinstance(f.step, str) else name.rpartition(".")[2]
        if attr in step_fields:
          raise ValueError(f"fields {step_fields[attr]} and {name} are both the step's {attr}")
        step_fields[attr] = name
    return step_fields

  def identity_fields(self) -> tuple[str, ...]:
    """The dotted names of the fields tagged `identity`, in declaration order."""
    return tuple(name for name, f in self.fields() if f.identity)

  def check_keys(self, config: ml_collections.ConfigDict, prefix: str = "") -> None:
    """Rejects keys the schema does not define (recursively, with a did-you-mean) and keys it
    defines that `config` lacks."""
    for key in config.keys():
      if key not in self.members:
        group = f"config{'.' if prefix else ''}{prefix[:-1]}"
        raise ConfigError(f"config.{prefix}{key} is not a config field"
                          f"{unknown_field_hint(key, self.members, group)}")
      member = self.members[key]
      if isinstance(member, Schema):
        if not isinstance(config[key], ml_collections.ConfigDict):
          fail(prefix + key, config[key], "must be a group of fields like the default config's")
        member.check_keys(config[key], prefix=f"{prefix}{key}.")
    for key in sorted(self.members):
      if key not in config:
        raise ConfigError(f"config.{prefix}{key} is missing: {START_FROM}")

  def check(self, config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for the first unknown or missing key, then the first invalid value."""
    self.check_keys(config)
    for name, f in self.fields():
      f.rule(name, get_field(config, name))


def get_field(config, dotted: str):
  """config["a"]["b"] for "a.b"."""
  for part in dotted.split("."):
    config = config[part]
  return config
