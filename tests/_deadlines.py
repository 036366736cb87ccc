"""Deadlines for tests that wait on subprocesses, scaled with the machine's load.

A fixed deadline that holds on an idle 2-core machine fails spuriously when other jobs share the
cores (the multi-process and checkpoint workers compile JAX programs, which slows down in proportion).
``scaled(s)`` is ``s`` seconds times the load per core (the 1-minute load average over the number of
cores) when that is above 1, read when the wait starts; ``JAXBN_TEST_DEADLINE_FACTOR`` multiplies it
further for slow machines. The bases are generous: several times what the wait takes on an idle
2-core machine.
"""

from __future__ import annotations

import os


def load_factor() -> float:
  """The 1-minute load average per core, at least 1 (1 where the platform has no load average)."""
  try:
    load = os.getloadavg()[0]
  except (AttributeError, OSError):
    return 1.0
  return max(1.0, load / (os.cpu_count() or 1))


def scaled(seconds: float) -> float:
  """``seconds`` stretched by the machine's load and by ``JAXBN_TEST_DEADLINE_FACTOR`` (default 1)."""
  return seconds * load_factor() * float(os.environ.get("JAXBN_TEST_DEADLINE_FACTOR", "1"))
