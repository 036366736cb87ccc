"""Where a host-loop update's time goes: each of its compiled programs timed on its own, against MultiSteps.

    python benchmarks/host_loop_programs.py                  # flax's and jaxbn's batch norm, 8 micro-batches of 500
    python benchmarks/host_loop_programs.py --repeats 40     # results/host_loop_programs.{json,md}

The host-loop contenders of ``benchmarks/full_batch.py`` (same CNN, data and optimizer; ``loop="host"``). Every call of a host-loop
program (and of MultiSteps' micro step) is followed by ``jax.block_until_ready``, so that each gets its
own time; the table gives the median per call, the calls per update, and the update's median time
with nothing blocked in between. "rest" is the update's time less its timed calls: jaxbn's update
program and the Python around the calls, less what blocking after every call costs (for MultiSteps,
whose one program is timed, only the latter: it comes out negative).
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

_HERE = pathlib.Path(__file__).resolve().parent
for _path in (_HERE, _HERE.parent):  # _machine and full_batch, and jaxbn when it is not installed
  if str(_path) not in sys.path:
    sys.path.insert(0, str(_path))

import _machine  # noqa: E402
import full_batch as fb  # noqa: E402
import jax  # noqa: E402

from jaxbn.training import loops  # noqa: E402


def measure(
  names: Sequence[str], examples: int, length: int, micro: int, channels: int, repeats: int
) -> dict[str, Any]:
  """Per contender: the update's median seconds and, per program, (median seconds per call, calls per update)."""
  data = fb.make_data(examples, length)
  contenders, models = fb.build_contenders(list(names), data, micro, channels)
  variables = models["flax"].init(jax.random.key(0), data["x"][:2], train=False)
  times: dict[str, list[float]] = collections.defaultdict(list)
  original = loops.HostLoop._program

  def timed_program(self: Any, *args: Any, **kwargs: Any) -> Any:
    program, name = original(self, *args, **kwargs)
    return _timed(times[name], program), name

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
      c.fns["micro step"] = _timed(times["micro step"], c.fns["micro step"])
    loops.HostLoop._program = timed_program
    try:
      for _ in range(repeats):
        state, _ = c.update(state)
    finally:
      loops.HostLoop._program = original
    per_program = {label: (statistics.median(t), len(t) // repeats) for label, t in times.items()}
    results[name] = {"update": statistics.median(updates), "programs": per_program}
  return results


def _timed(seconds: list[float], fn: Any) -> Any:
  """``fn``, appending the seconds of each call (until its results are ready) to ``seconds``."""

  def run(*args: Any) -> Any:
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    seconds.append(time.perf_counter() - start)
    return out

  return run


def markdown(result: dict[str, Any]) -> str:
  m = result["machine"]
  rows = [
    f"{m['cpu']} ({m['cpu_count']} cores, load {m['load_average_1min']}), {m['backend']}, {m['date']}; "
    f"config {result['config']}",
    "",
    "| contender | program | calls per update | ms per call |",
    "|---|---|---:|---:|",
  ]
  for name, r in result["contenders"].items():
    timed = 0.0
    for label, (seconds, calls) in r["programs"].items():
      rows.append(f"| {name} | {label} | {calls} | {1e3 * seconds:.2f} |")
      timed += seconds * calls
    rows.append(f"| {name} | rest: the update less the timed calls | 1 | {1e3 * (r['update'] - timed):.2f} |")
    rows.append(f"| {name} | **whole update** | | **{1e3 * r['update']:.2f}** |")
  return "\n".join(rows) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    "--contenders", default="optax.MultiSteps,jaxbn host loop,jaxbn host loop + jaxbn BN", help="comma-separated names"
  )
  p.add_argument("--examples", type=int, default=4000)
  p.add_argument("--length", type=int, default=40, help="sequence length (MNIST-1D's: 40)")
  p.add_argument("--micro-batch-size", type=int, default=500)
  p.add_argument("--channels", type=int, default=32)
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--out", type=pathlib.Path, default=_HERE / "results", help="folder for the JSON and Markdown")
  args = p.parse_args(argv)
  names = [n.strip() for n in args.contenders.split(",") if n.strip()]
  start = time.perf_counter()
  result = {
    "machine": _machine.machine_info(["jax", "jaxlib", "flax", "optax"]),
    "config": vars(args) | {"out": str(args.out)},
    "contenders": measure(names, args.examples, args.length, args.micro_batch_size, args.channels, args.repeats),
  }
  result["wall_s"] = time.perf_counter() - start
  _machine.write_results(args.out, "host_loop_programs", result, markdown)
  return result


if __name__ == "__main__":
  main()
