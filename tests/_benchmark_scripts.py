"""Loads a script of benchmarks/ as a module, once per test process (shared by the benchmark tests)."""

import functools
import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


@functools.cache
def load(name: str):
  """``benchmarks/<name>.py`` as a module."""
  spec = importlib.util.spec_from_file_location(f"jaxbn_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
  spec.loader.exec_module(module)
  return module
