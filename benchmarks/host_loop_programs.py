"""Where a host-loop update's time goes: each of its compiled programs timed on its own, against MultiSteps.

    python benchmarks/host_loop_programs.py                  # flax's and jaxbn's batch norm, 8 micro-batches of 500
    python benchmarks/host_loop_programs.py --repeats 40

The contenders of ``benchmarks/full_batch.py`` (same CNN, data and optimizer). Every call of a host-loop
program (and of MultiSteps' micro step) is followed by ``jax.block_until_ready``, so that each gets its
own time; the table gives the median per call, the calls per update, and the update's median time
with nothing blocked in between. "rest" is the update's time less its timed programs: the update
program and the Python around the calls.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import pathlib
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax

from jaxbn.training import loops

_HERE = pathlib.Path(__file__).resolve().parent


def _full_batch() -> Any:
  spec = importlib.util.spec_from_file_location("full_batch_benchmark", _HERE / "full_batch.py")
  assert spec is not None and spec.loader is not None
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def measure(names: Sequence[str], examples: int, micro: int, channels: int, repeats: int) -> dict[str, Any]:
  """Per contender: the update's median seconds and, per program, (median seconds per call, calls per update)."""
  fb = _full_batch()
  data = fb.make_data(examples, 40)
  contenders, models = fb.build_contenders(list(names), data, micro, channels)
  variables = models["flax"].init(jax.random.key(0), data["x"][:2], train=False)
  times: dict[str, list[float]] = collections.defaultdict(list)
  original = loops.HostLoop._program

  def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
    program, name = original(self, *args, **kwargs)

    def run(*call_args: Any) -> Any:
      start = time.perf_counter()
      out = jax.block_until_ready(program(*call_args))
      times[name].append(time.perf_counter() - start)
      return out

    return run, name

  results = {}
  for name, c in contenders.items():
    state = c.init(fb._copy(variables["params"]), fb._copy(variables["batch_stats"]))
    for _ in range(3):  # compiles, then warms
      state, _ = c.update(state)
    jax.block_until_ready(state)
    updates = []
    for _ in range(repeats):
      start = time.perf_counter()
      state, _ = c.update(state)
      jax.block_until_ready(state)
      updates.append(time.perf_counter() - start)
    times.clear()
    if "micro step" in c.fns:  # MultiSteps: its one program, timed per call
      step = c.fns["micro step"]
      c.fns["micro step"] = lambda *a, step=step: _timed_call(times, "micro step", step, a)
    loops.HostLoop._program = timed
    try:
      for _ in range(repeats):
        state, _ = c.update(state)
    finally:
      loops.HostLoop._program = original
    per_program = {label: (statistics.median(t), len(t) // repeats) for label, t in times.items()}
    results[name] = {"update": statistics.median(updates), "programs": per_program}
  return results


def _timed_call(times: dict[str, list[float]], label: str, fn: Any, args: Any) -> Any:
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  times[label].append(time.perf_counter() - start)
  return out


def markdown(results: dict[str, Any]) -> str:
  rows = ["| contender | program | calls per update | ms per call |", "|---|---|---:|---:|"]
  for name, r in results.items():
    timed = 0.0
    for label, (seconds, calls) in r["programs"].items():
      rows.append(f"| {name} | {label} | {calls} | {1e3 * seconds:.2f} |")
      timed += seconds * calls
    rows.append(f"| {name} | rest (update program, Python) | 1 | {1e3 * (r['update'] - timed):.2f} |")
    rows.append(f"| {name} | **whole update** | | **{1e3 * r['update']:.2f}** |")
  return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--contenders", default="optax.MultiSteps,jaxbn,jaxbn + jaxbn BN", help="comma-separated names")
  p.add_argument("--examples", type=int, default=4000)
  p.add_argument("--micro-batch-size", type=int, default=500)
  p.add_argument("--channels", type=int, default=32)
  p.add_argument("--repeats", type=int, default=20)
  args = p.parse_args(argv)
  names = [n.strip() for n in args.contenders.split(",") if n.strip()]
  results = measure(names, args.examples, args.micro_batch_size, args.channels, args.repeats)
  print(markdown(results))
  return results


if __name__ == "__main__":
  main()
