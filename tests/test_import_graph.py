"""The package's import rules and size limit, read from the source (nothing is imported).

The algorithm and the step functions are what researchers call from their own JAX code, on
any accelerator and inside their own loops: importing them must not pull in the training loop,
the input pipeline, orbax checkpoints, absl flags or the evaluators. docs/design.md draws the
module map these rules come from.
"""

import ast
import pathlib
import re

import pytest

PACKAGE = "instdisc_jax"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE

# The algorithm (and the pieces split out of it) and the pure step functions.
CORE = (
    "objectives", "partition", "noise", "knn", "memory_bank", "sharding", "parallel", "models",
    "augment", "crop", "dataset_stats", "optim", "knn_select", "steps",
)
# What the core must not reach, directly or through another module of the package: the loop,
# the data, the checkpoints, the command lines, the evaluators and the experiments. A name
# covers its submodules.
FORBIDDEN = (
    "train", "data", "checkpointing", "checkpoint_leaves", "checkpoint_orbax", "cli", "main",
    "evaluate", "flag_errors", "peers", "evaluation", "search", "experiments",
)

MAX_LINES = 400

# `jax._src` (JAX's private modules) and absl's private `FLAGS._flags()`.
PRIVATE_API = re.compile(r"\b_src\b|\._flags\(\)|[\"']_flags[\"']")


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _imports(path: pathlib.Path, name: str, modules) -> set[str]:
  """The package's modules that `path` imports anywhere (also inside functions)."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:                                   # Relative: resolve against the package.
        anchor = package.split(".")
        anchor = anchor[:len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
      # `from a import b` imports a, and a.b when b is a module.
      targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
    else:
      continue
    for target in targets:
      parts = target.split(".")
      for end in range(1, len(parts) + 1):           # Importing a.b.c runs a, a.b and a.b.c.
        if ".".join(parts[:end]) in modules:
          found.add(".".join(parts[:end]))
  found.discard(name)
  return found


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(path, name, modules) for name, path in modules.items()}


def _path_to_forbidden(graph, start: str):
  """A chain of imports from `start` to a forbidden module, or None (breadth first)."""
  forbidden = tuple(f"{PACKAGE}.{name}" for name in FORBIDDEN)
  chains = {start: [start]}
  queue = [start]
  while queue:
    current = queue.pop(0)
    for imported in sorted(graph[current]):
      if imported in chains:
        continue
      chains[imported] = chains[current] + [imported]
      if any(imported == f or imported.startswith(f + ".") for f in forbidden):
        return chains[imported]
      queue.append(imported)
  return None


def test_the_graph_sees_the_package():
  graph = _graph()
  for name in CORE:
    assert f"{PACKAGE}.{name}" in graph, f"{name}.py is in CORE but not in the package"
  for name in FORBIDDEN:
    assert any(m == f"{PACKAGE}.{name}" for m in graph), f"{name} is in FORBIDDEN but gone"
  # The reader resolves imports: the loop imports the steps and the checkpoints.
  assert {f"{PACKAGE}.steps", f"{PACKAGE}.checkpointing"} <= graph[f"{PACKAGE}.train"]


@pytest.mark.parametrize("name", CORE)
def test_core_module_imports_nothing_of_the_loop_data_checkpoints_cli_or_evaluation(name):
  chain = _path_to_forbidden(_graph(), f"{PACKAGE}.{name}")
  assert chain is None, f"{name}.py reaches a module it must not import: {' -> '.join(chain)}"


def test_the_rule_catches_an_indirect_import():
  graph = {"a": {"b"}, "b": {f"{PACKAGE}.data.pipeline"}, f"{PACKAGE}.data.pipeline": set()}
  assert _path_to_forbidden(graph, "a") == ["a", "b", f"{PACKAGE}.data.pipeline"]
  assert _path_to_forbidden({"a": {f"{PACKAGE}.dataset_stats"},
                             f"{PACKAGE}.dataset_stats": set()}, "a") is None


def test_no_module_is_over_the_line_limit():
  too_long = []
  for path in sorted(ROOT.rglob("*.py")):
    relative = path.relative_to(ROOT).as_posix()
    lines = len(path.read_text().splitlines())
    if lines > MAX_LINES:
      too_long.append(f"{relative} ({lines} lines)")
  assert not too_long, (f"modules over {MAX_LINES} lines: {', '.join(too_long)}; split them "
                        "into cohesive modules")


def test_no_private_jax_or_absl_api():
  uses = []
  for path in sorted(ROOT.rglob("*.py")):
    for number, line in enumerate(path.read_text().splitlines(), 1):
      if PRIVATE_API.search(line):
        uses.append(f"{path.relative_to(ROOT).as_posix()}:{number}: {line.strip()}")
  assert not uses, "private APIs used:\n" + "\n".join(uses)


def test_the_private_api_pattern():
  for line in ("from jax._src import distributed", "import jax._src.lib",
               "from jax import _src", "flags.FLAGS._flags()", 'getattr(FLAGS, "_flags")'):
    assert PRIVATE_API.search(line), line
  for line in ("def define_flags() -> None:", "cli.define_runtime_flags()", "image_src = 1"):
    assert not PRIVATE_API.search(line), line
