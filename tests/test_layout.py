"""The package's shape, checked from its source: sizes, one-way imports, no reaching into a sibling's privates.

These hold the layout docs/development.md's "How the code is organized" describes: a module of at most 600
lines, functions of at most 90 lines (docstring not counted), no import circle between jaxbn's
modules, and no module that imports an underscore name of another module (shared helpers live in
the private ground-floor modules under names without an underscore).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "jaxbn"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 90


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(ROOT.rglob("*.py")):
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = path
  return out


MODULES = _modules()


def _tree(name: str) -> ast.Module:
  return ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))


def _resolve(name: str, node: ast.ImportFrom) -> str:
  """The absolute module of a ``from ... import`` in module ``name``."""
  if not node.level:
    return node.module or ""
  package = name.split(".") if MODULES[name].name == "__init__.py" else name.split(".")[:-1]
  base = package[: len(package) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str) -> list[tuple[str, str | None, int]]:
  """``(module, imported name or None, line)`` for every jaxbn import in module ``name``, at any depth."""
  found = []
  for node in ast.walk(_tree(name)):
    if isinstance(node, ast.Import):
      found += [(alias.name, None, node.lineno) for alias in node.names if alias.name.startswith("jaxbn")]
    elif isinstance(node, ast.ImportFrom):
      module = _resolve(name, node)
      if module.startswith("jaxbn"):
        for alias in node.names:
          sub = f"{module}.{alias.name}"
          found.append((sub, None, node.lineno) if sub in MODULES else (module, alias.name, node.lineno))
  return found


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_and_function_sizes(name):
  path = MODULES[name]
  lines = len(path.read_text().splitlines())
  assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT.parent)} has {lines} lines (limit {MAX_MODULE_LINES})"
  for node in ast.walk(_tree(name)):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      body = node.body
      first = body[0]
      docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
      start = (first.end_lineno or first.lineno) + 1 if docstring and len(body) > 1 else body[0].lineno
      length = (node.end_lineno or node.lineno) - start + 1
      assert length <= MAX_FUNCTION_LINES, (
        f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name} is {length} lines without its docstring "
        f"(limit {MAX_FUNCTION_LINES})"
      )


def test_no_import_circle():
  graph = {name: {m for m, _, _ in _imports(name) if m in MODULES and m != name} for name in MODULES}
  # A package imports its submodules to re-export them; that edge is not a dependency of the parent's code.
  graph = {name: {m for m in deps if not m.startswith(name + ".")} for name, deps in graph.items()}
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(name):
    state[name] = 1
    stack.append(name)
    for dep in sorted(graph[name]):
      if state.get(dep) == 1:
        cycle = [*stack[stack.index(dep) :], dep]
        pytest.fail("import circle: " + " -> ".join(cycle))
      if dep not in state:
        visit(dep)
    stack.pop()
    state[name] = 2

  for name in sorted(graph):
    if name not in state:
      visit(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_name_of_another_module(name):
  bad = []
  aliases = {}
  for module, imported, line in _imports(name):
    if imported is not None and imported.startswith("_") and module != name:
      bad.append(f"line {line}: from {module} import {imported}")
  tree = _tree(name)
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and _resolve(name, node).startswith("jaxbn"):
      for alias in node.names:
        sub = f"{_resolve(name, node)}.{alias.name}"
        if sub in MODULES:
          aliases[alias.asname or alias.name] = sub
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("jaxbn") and alias.asname:
          aliases[alias.asname] = alias.name
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
      if node.attr.startswith("_") and not node.attr.startswith("__"):
        bad.append(f"line {node.lineno}: {aliases[node.value.id]}.{node.attr}")
  assert not bad, f"{MODULES[name].relative_to(ROOT.parent)} reaches into another module's private names: {bad}"
