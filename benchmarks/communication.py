"""Communication of a full-batch step on 8 devices: bytes moved between devices per step, and step time.

    python benchmarks/communication.py            # M = 1, 4, 16 micro-batches, both loops (~3 min here)
    python benchmarks/communication.py --quick    # M = 1, 4, the host loop only (< 1 min)

The data (MNIST-1D-shaped, 4096 rows) is sharded over 8 virtual CPU devices (the script re-runs itself
with ``--xla_force_host_platform_device_count=8`` when it has fewer) and the step is
``jax.jit``'s on the global arrays. Two models differ in their batch norm only:

* ``jaxbn.linen.BatchNorm`` ("per device"): the step proves that the loss treats rows on their own
  apart from jaxbn's batch norms and runs its sweeps per device (:mod:`jaxbn.training.data_parallel`):
  each device sums its gradient over all its micro-batches, and the sums meet once per step.
* ``flax.linen.BatchNorm`` ("global arrays"): the step cannot run flax's layer per device (it would
  see one device's rows), keeps the program XLA partitions on the global arrays, and warns that the
  gradient is all-reduced once per micro-batch: what every step did before the per-device path.

Bytes come from the optimized HLO of every program a step runs: each collective (all-reduce,
all-gather, reduce-scatter, all-to-all, collective-permute) counts its result's bytes, times the trip
count of the ``while`` loops around it and the program's calls per step (host loop). Batch-norm
statistics are a few hundred bytes per layer; the gradient is the parameters' size. Times are medians
of interleaved repeats on this machine's CPU threads, which the 8 virtual devices share: they show
the host's cost of each program layout, not a network's.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

DEVICES = 8
FLAG = f"--xla_force_host_platform_device_count={DEVICES}"

if __name__ == "__main__" and FLAG not in os.environ.get("XLA_FLAGS", ""):
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FLAG}".strip())
  sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxbn  # noqa: E402
from jaxbn.training import TrainState, full_batch_step, linen_loss  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _machine import machine_info, write_results  # noqa: E402
from full_batch import CNN, _xent, make_data, make_optimizer  # noqa: E402

NORMS = {"per device": jaxbn.linen.BatchNorm, "global arrays": nn.BatchNorm}
_COLLECTIVE = re.compile(r"= (.*?) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64|c64|c128)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4}


def _computations(hlo: str) -> dict[str, list[str]]:
  """The HLO module's computations by name, each its lines."""
  out: dict[str, list[str]] = {}
  name = None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$", line)
    if head:
      name = head.group(1)
      out[name] = []
    elif line.startswith("}"):
      name = None
    elif name is not None:
      out[name].append(line)
  return out


def communicated_bytes(hlo: str) -> int:
  """Bytes the collectives of one run of an optimized HLO module produce, loops counted by their trip counts."""
  comps = _computations(hlo)
  entry = next(m.group(1) for m in re.finditer(r"^ENTRY %?([\w.\-]+)", hlo, re.M))
  total = 0

  def walk(name: str, times: int, seen: tuple[str, ...]) -> None:
    nonlocal total
    if name in seen or name not in comps:
      return
    for line in comps[name]:
      found = _COLLECTIVE.search(line)
      if found:
        total += times * sum(
          _BYTES.get(t, 8) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
          for t, dims in _SHAPE.findall(found.group(1))
        )
      trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
      body = re.search(r"\bbody=%?([\w.\-]+)", line)
      if body:
        walk(body.group(1), times * (int(trips.group(1)) if trips else 1), (*seen, name))
      for callee in re.findall(r"(?:to_apply|calls|branch_computations)=\{?%?([\w.\-]+)", line):
        if not _COLLECTIVE.search(line):  # a reduction's combiner is not a call
          walk(callee, times, (*seen, name))

  walk(entry, 1, ())
  return total


def _case(norm_name: str, loop: str, micro: int, data: Any, variables: Any) -> tuple[Any, Any, Any]:
  channels = variables["params"]["Conv_0"]["kernel"].shape[-1]
  model = CNN(norm=NORMS[norm_name], channels=channels)
  opt = make_optimizer()
  step = full_batch_step(linen_loss(model, _xent), opt, micro_batch_size=micro, loop=loop, donate=False)
  mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  state = jax.device_put(
    TrainState.create(variables["params"], variables["batch_stats"], opt), NamedSharding(mesh, P())
  )
  return step, state, jax.device_put(data, NamedSharding(mesh, P("data")))


def measure(norm_name: str, loop: str, micros: int, data: Any, variables: Any, repeats: int) -> dict[str, Any]:
  """Bytes per step from the compiled programs, and the median step time, for one configuration."""
  micro = data["x"].shape[0] // micros
  step, state, sharded = _case(norm_name, loop, micro, data, variables)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the global-array contender's warning is what it measures
    jax.block_until_ready(step(state, sharded))  # compiles (the host loop compiles its programs as they run)
    if loop == "scan":
      programs = [(step.lower(state, sharded).compile().as_text(), 1)]
    else:
      programs = [(step.programs[n].lower(*args).compile().as_text(), calls) for n, (args, calls) in step.calls.items()]
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(step(state, sharded))
      times.append(time.perf_counter() - t0)
  params = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state.params))
  moved = sum(calls * communicated_bytes(hlo) for hlo, calls in programs)
  return {
    "norm": norm_name,
    "loop": loop,
    "micro_batches": micros,
    "bytes_per_step": moved,
    "gradient_bytes": params,
    "step_s_median": statistics.median(times),
    "step_s_range": [min(times), max(times)],
  }


def markdown(result: dict[str, Any]) -> str:
  m = result["machine"]
  lines = [
    f"## Communication per step on {DEVICES} virtual devices",
    "",
    f"`{result['command']}` on {m['cpu']} ({m['cpu_count']} cores, load {m['load_average_1min']}), "
    f"JAX {m['versions'].get('jax')}; {result['rows']} rows, a CNN with {result['channels']} channels (gradient "
    f"{result['rows_gradient_bytes']:,} bytes). "
    "Bytes: collectives' results per step from the optimized HLO. Time: median (range) of "
    f"{result['repeats']} steps.",
    "",
    "| loop | micro-batches | per device: bytes (x gradient) | global arrays: bytes (x gradient) "
    "| per device: s/step | global arrays: s/step |",
    "|---|---|---|---|---|---|",
  ]
  by = {(r["norm"], r["loop"], r["micro_batches"]): r for r in result["rows_measured"]}
  g = result["rows_gradient_bytes"]
  for loop in result["loops"]:
    for micros in result["micro_batches"]:
      a, b = by[("per device", loop, micros)], by[("global arrays", loop, micros)]
      lines.append(
        f"| {loop} | {micros} | {a['bytes_per_step']:,} ({a['bytes_per_step'] / g:.2f}) "
        f"| {b['bytes_per_step']:,} ({b['bytes_per_step'] / g:.2f}) | "
        f"{a['step_s_median']:.3f} ({a['step_s_range'][0]:.3f}-{a['step_s_range'][1]:.3f}) | "
        f"{b['step_s_median']:.3f} ({b['step_s_range'][0]:.3f}-{b['step_s_range'][1]:.3f}) |"
      )
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="M = 1, 4 on the host loop, 3 repeats")
  p.add_argument("--rows", type=int, default=4096, help="rows of data (4096)")
  p.add_argument("--channels", type=int, default=128, help="CNN channels (128: a gradient of 0.4 MB)")
  p.add_argument("--repeats", type=int, help="timed steps per configuration (5; 3 with --quick)")
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
  args = p.parse_args(argv)
  if len(jax.devices()) < DEVICES:
    raise SystemExit(f"needs {DEVICES} devices: run with XLA_FLAGS={FLAG}")
  start = time.perf_counter()
  loops = ("host",) if args.quick else ("host", "scan")
  micros = (1, 4) if args.quick else (1, 4, 16)
  repeats = args.repeats or (3 if args.quick else 5)
  data = make_data(args.rows, 40)
  variables = CNN(channels=args.channels).init(jax.random.key(0), data["x"][:2])
  rows = []
  for loop in loops:
    for m in micros:
      for norm_name in NORMS:
        rows.append(measure(norm_name, loop, m, data, variables, repeats))
        r = rows[-1]
        print(
          f"{loop:5s} M={m:2d} {norm_name:14s} {r['bytes_per_step']:>10,} B  {r['step_s_median']:.3f} s", flush=True
        )
  result = {
    "command": " ".join(["python benchmarks/communication.py", *(argv if argv is not None else sys.argv[1:])]),
    "machine": machine_info(("jax", "flax")),
    "rows": args.rows,
    "channels": args.channels,
    "rows_gradient_bytes": rows[0]["gradient_bytes"],
    "loops": loops,
    "micro_batches": micros,
    "repeats": repeats,
    "rows_measured": rows,
    "wall_s": time.perf_counter() - start,
  }
  write_results(args.out, "communication" + ("_quick" if args.quick else ""), result, markdown)
  return result


if __name__ == "__main__":
  main()
