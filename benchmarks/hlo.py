"""Reading a compiled XLA executable: its collectives, copies of a buffer, and memory use.

Everything here reads the *optimised* HLO (`jax.stages.Compiled.as_text()`), i.e. what actually
runs, after XLA has combined small all-reduces into tuples and turned the transpose of an
all-gather into a reduce-scatter.

Bytes of a collective, per device and per call (g = devices in its replica group):

* `result_bytes`: the size of the op's result on one device (from the HLO shape);
* `operand_bytes`: the size of its operand on one device, derived from the result: all-gather
  result / g, reduce-scatter result * g, otherwise equal to the result;
* `payload_bytes`: the larger of the two, i.e. the size of the whole (global) tensor;
* `ring_bytes`: what a bandwidth-optimal ring moves into one device: all-gather and all-to-all
  (g - 1)/g * the larger of operand and result, reduce-scatter the same, all-reduce twice that
  (a reduce-scatter plus an all-gather), collective-permute the operand.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")

_DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*"
    r"(?P<shape>\([^=]*?\)|[a-z][a-z0-9]*\[[0-9,]*\](?:\{[^}]*\})?)\s+"
    r"(?P<op>[a-z][a-z0-9\-]*)\(")
_ARRAY = re.compile(r"(?P<dtype>[a-z][a-z0-9]*)\[(?P<dims>[0-9,]*)\]")
_EXPLICIT_GROUPS = re.compile(r"replica_groups=\{\{(?P<first>[0-9,]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(?P<count>[0-9]+),(?P<size>[0-9]+)\]")
_BYTE_KEYS = ("result_bytes", "operand_bytes", "payload_bytes", "ring_bytes")
_OP_NAME = re.compile(r'op_name="(?P<op_name>[^"]*)"')


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  """[(dtype, dims)] of an HLO shape string (one array or a tuple of them)."""
  out = []
  for match in _ARRAY.finditer(shape):
    dims = tuple(int(d) for d in match["dims"].split(",") if d)
    out.append((match["dtype"], dims))
  return out


def shape_bytes(shape: str) -> float:
  """Bytes of an HLO shape string (tuples summed). Unknown element types raise KeyError."""
  return sum(_DTYPE_BYTES[dtype] * math.prod(dims) for dtype, dims in _arrays(shape))


def _group_size(line: str, default: int) -> int:
  explicit = _EXPLICIT_GROUPS.search(line)
  if explicit:
    return len([d for d in explicit["first"].split(",") if d])
  iota = _IOTA_GROUPS.search(line)
  if iota:
    return int(iota["size"])
  return default


def _short_op_name(line: str) -> str:
  """The JAX op in the metadata without the jit/shard_map scopes, e.g. 'jvp()/all_gather'."""
  match = _OP_NAME.search(line)
  if not match:
    return ""
  return re.sub(r"^(?:(?:jit\([^)]*\)|shard_map|pmap\([^)]*\))/)*", "", match["op_name"])


def collectives(hlo_text: str, num_devices: int) -> list[dict[str, Any]]:
  """Every collective op of the module with its per-device bytes (see the module docstring).

  Asynchronous collectives are counted once, at their `-done` op; `-start` ops are skipped.
  `num_devices` is the group size where the op names no replica groups.
  """
  found = []
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    op = match["op"].removesuffix("-done")
    if op not in COLLECTIVES:
      continue
    g = _group_size(line, num_devices)
    result = shape_bytes(match["shape"])
    if op == "all-gather":
      operand, ring = result / g, result * (g - 1) / g
    elif op == "reduce-scatter":
      operand, ring = result * g, result * (g - 1)
    elif op == "all-reduce":
      operand, ring = result, 2 * result * (g - 1) / g
    elif op == "collective-permute":
      operand, ring = result, result
    else:
      operand, ring = result, result * (g - 1) / g
    found.append({"op": op, "name": match["name"], "shape": match["shape"], "group_size": g,
                  "result_bytes": result, "operand_bytes": operand,
                  "payload_bytes": max(result, operand), "ring_bytes": ring,
                  "jax_op": _short_op_name(line)})
  return found


def collective_totals(ops: list[dict[str, Any]]) -> dict[str, Any]:
  """Op count and summed bytes per collective kind, plus overall sums."""
  totals: dict[str, Any] = {}
  for op in ops:
    entry = totals.setdefault(op["op"], dict.fromkeys(("count",) + _BYTE_KEYS, 0))
    entry["count"] += 1
    for key in _BYTE_KEYS:
      entry[key] += op[key]
  totals["all"] = {key: sum(op[key] for op in ops) for key in _BYTE_KEYS}
  totals["all"]["count"] = len(ops)
  return totals


def buffer_copies(hlo_text: str, num_elements: int) -> list[str]:
  """`copy` instructions whose result has exactly `num_elements` elements (e.g. a bank shard).

  Returns the instructions as 'name = shape copy(operand)' strings.
  """
  found = []
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match or match["op"] not in ("copy", "copy-start"):
      continue
    arrays = _arrays(match["shape"])
    if any(math.prod(dims) == num_elements for _, dims in arrays):
      found.append(line.strip().split(", metadata=")[0])
  return found


def memory(compiled) -> Optional[dict[str, int]]:
  """Argument, output, aliased (donated in place) and temporary bytes of an executable."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return {key: int(getattr(stats, f"{key}_size_in_bytes"))
          for key in ("argument", "output", "alias", "temp")}


def input_output_alias(hlo_text: str) -> str:
  """The module's `input_output_alias={...}` attribute ('' when nothing is donated)."""
  start = hlo_text.find("input_output_alias={")
  if start < 0:
    return ""
  start += len("input_output_alias=")
  depth = 0
  for end in range(start, len(hlo_text)):
    depth += {"{": 1, "}": -1}.get(hlo_text[end], 0)
    if depth == 0:
      return hlo_text[start:end + 1]
  return hlo_text[start:]
