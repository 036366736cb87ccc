"""The machine a benchmark ran on, recorded beside its numbers, and the files the results go to."""

from __future__ import annotations

import datetime
import importlib
import json
import os
import pathlib
import platform
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax


def machine_info(modules: Sequence[str]) -> dict[str, Any]:
  """Backend, device, CPU model and count, load average, Python and the versions of ``modules``."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  versions = {}
  for mod in modules:
    try:
      versions[mod] = importlib.import_module(mod).__version__
    except (ImportError, AttributeError):
      versions[mod] = None
  try:
    load = os.getloadavg()[0]
  except OSError:
    load = None
  return {
    "backend": jax.default_backend(),
    "device": jax.devices()[0].device_kind,
    "cpu": cpu,
    "cpu_count": os.cpu_count(),
    "load_average_1min": load,
    "python": platform.python_version(),
    "versions": versions,
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
  }


def write_results(
  out: pathlib.Path, name: str, result: dict[str, Any], markdown: Callable[[dict[str, Any]], str]
) -> None:
  """Writes ``out/name.json`` and ``out/name.md`` (``markdown(result)``), prints the table and where it went."""
  out.mkdir(parents=True, exist_ok=True)
  stem = out / name
  stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
  text = markdown(result)
  stem.with_suffix(".md").write_text(text)
  print(text)
  print(f"wrote {stem}.json and {stem}.md in {result['wall_s']:.0f} s", file=sys.stderr)
