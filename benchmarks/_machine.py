"""The machine a benchmark ran on, recorded beside its numbers."""

from __future__ import annotations

import datetime
import importlib
import os
import platform
from collections.abc import Sequence
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
