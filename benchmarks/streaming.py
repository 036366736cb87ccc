"""Streaming a data set from disk through a full-batch step: speed against the same data in memory, and host memory.

A data set several times a stated device-memory budget is written to disk (``np.save``) and trained on
through ``full_batch_step`` (the host loop, ghost batch norm), read back with
``np.load(..., mmap_mode="r")`` and wrapped in ``jaxbn.training.HostData``, so that each micro-batch is
read from the file and put on the device while the one before is computed: the device holds at most
two micro-batches of data (the budget is two micro-batches). The reference is the same step on the
same rows loaded whole into device memory (``jax.device_put``), the in-memory host loop. Both run the
same model from the same parameters; their losses must agree exactly (they are the same numbers).

Each measurement runs in a fresh process, streamed and in-memory alternating, so that the peak
resident memory of the process (``VmHWM`` of ``/proc/self/status``) is that of one way of training
alone; ``resident before`` is the process's resident memory after compiling, before the first timed
step (JAX, XLA and the compiled programs). The data file is read through the operating system's page
cache (warm after the first pass); streaming drops the pages of the rows it has read from the
process (``madvise``), so the process never holds the file.

Usage::

  python benchmarks/streaming.py            # 1 GiB on disk, 16 x a 64 MiB budget (about 3 minutes on 2 cores)
  python benchmarks/streaming.py --quick    # 64 MiB, a smoke run
  python benchmarks/full_batch.py --streaming [options]   # the same, from the full-batch benchmark

Results go to ``benchmarks/results/streaming[_quick].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

_HERE = pathlib.Path(__file__).resolve().parent
for _path in (_HERE, _HERE.parent):  # _machine, and jaxbn when it is not installed
  if str(_path) not in sys.path:
    sys.path.insert(0, str(_path))

import _machine  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxbn  # noqa: E402
from jaxbn.training import HostData, TrainState, full_batch_step, linen_loss  # noqa: E402

MODES = ("streamed", "in memory")


class MLP(nn.Module):
  """Wide rows, little compute per byte: the case where reading the data could limit the step."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(16, use_bias=False)(x)
    x = nn.relu(jaxbn.linen.BatchNorm(use_running_average=False)(x))
    return nn.Dense(10)(x)


def write_data(folder: pathlib.Path, rows: int, features: int) -> None:
  """``x.npy`` (float32, ``rows x features``) and ``y.npy`` (int32 labels), written in chunks."""
  rng = np.random.default_rng(0)
  x = np.lib.format.open_memmap(folder / "x.npy", mode="w+", dtype=np.float32, shape=(rows, features))
  for start in range(0, rows, 8192):
    stop = min(start + 8192, rows)
    x[start:stop] = rng.normal(size=(stop - start, features)).astype(np.float32)
  x.flush()
  del x
  np.save(folder / "y.npy", rng.integers(0, 10, rows).astype(np.int32))


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def child(folder: pathlib.Path, mode: str, micro: int, steps: int) -> dict[str, Any]:
  """Trains ``steps`` timed steps (after one that compiles) in this process; times, losses and memory."""
  x = np.load(folder / "x.npy", mmap_mode="r")
  y = np.load(folder / "y.npy")
  if mode == "streamed":
    data: Any = HostData({"x": x, "y": y})
  else:
    data = jax.device_put({"x": np.array(x), "y": y})  # the whole data set read into memory, on the device
    jax.block_until_ready(data)
  model = MLP()
  variables = model.init(jax.random.key(0), jnp.zeros((2, x.shape[1])))
  opt = optax.sgd(0.01, momentum=0.9)
  loss_fn = linen_loss(model, optax.softmax_cross_entropy_with_integer_labels)
  step = full_batch_step(loss_fn, opt, micro_batch_size=micro, loop="host")
  state = TrainState.create(variables["params"], variables["batch_stats"], opt)
  state, metrics = step(state, data)  # compiles
  losses = [float(metrics.loss)]
  before = _status_kib("VmRSS")
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, data)
    losses.append(float(metrics.loss))  # waits for the step
    times.append(time.perf_counter() - start)
  return {
    "mode": mode,
    "seconds_per_step": times,
    "samples_per_s": len(y) / statistics.median(times),
    "losses": losses,
    "resident_before_kib": before,
    "peak_resident_kib": _status_kib("VmHWM"),
  }


def run(args: argparse.Namespace, folder: pathlib.Path) -> dict[str, Any]:
  """Writes the data, runs the children alternating, and summarizes."""
  start = time.perf_counter()
  write_data(folder, args.rows, args.features)
  data_bytes = sum(os.path.getsize(folder / f) for f in ("x.npy", "y.npy"))
  runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
  for repeat in range(args.repeats):
    for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
      argv = [sys.executable, __file__, "--child", mode, "--dir", str(folder), "--micro-batch", str(args.micro_batch)]
      out = subprocess.run([*argv, "--steps", str(args.steps)], check=True, capture_output=True, text=True).stdout
      runs[mode].append(json.loads(out.splitlines()[-1]))
      print(f"{mode}: {runs[mode][-1]['samples_per_s']:.0f} samples/s", file=sys.stderr, flush=True)
  losses = {m: runs[m][0]["losses"] for m in MODES}
  summary = {
    m: {
      "samples_per_s": statistics.median(r["samples_per_s"] for r in runs[m]),
      "samples_per_s_range": [min(r["samples_per_s"] for r in runs[m]), max(r["samples_per_s"] for r in runs[m])],
      "peak_resident_mib": max(r["peak_resident_kib"] for r in runs[m]) / 1024,
      "resident_before_mib": statistics.median(r["resident_before_kib"] for r in runs[m]) / 1024,
    }
    for m in MODES
  }
  micro_bytes = data_bytes / args.rows * args.micro_batch
  return {
    "machine": _machine.machine_info(["jax", "jaxlib", "flax", "optax", "numpy"]),
    "config": {
      "rows": args.rows,
      "features": args.features,
      "micro_batch_size": args.micro_batch,
      "micro_batches": -(-args.rows // args.micro_batch),
      "data_mib": data_bytes / 2**20,
      "budget_mib": 2 * micro_bytes / 2**20,
      "steps_timed": args.steps,
      "repeats": args.repeats,
      "model": "Dense(16, no bias) -> jaxbn BatchNorm -> relu -> Dense(10), sgd(0.01, momentum 0.9)",
    },
    "results": summary,
    "ratio": summary["streamed"]["samples_per_s"] / summary["in memory"]["samples_per_s"],
    "same_losses": losses["streamed"] == losses["in memory"],
    "losses": losses,
    "runs": runs,
    "wall_s": time.perf_counter() - start,
  }


def markdown(result: dict[str, Any]) -> str:
  c, m = result["config"], result["machine"]
  lines = [
    f"`python benchmarks/streaming.py` on {m['cpu']} ({m['cpu_count']} cores, load {m['load_average_1min']:.1f}), "
    f"JAX {m['versions']['jax']}, {m['date']}. Data on disk: {c['rows']} rows x {c['features']} float32 features + "
    f"int32 labels = {c['data_mib']:.0f} MiB, {c['data_mib'] / c['budget_mib']:.0f} x a device-memory budget of "
    f"{c['budget_mib']:.0f} MiB (two micro-batches of {c['micro_batch_size']} rows; {c['micro_batches']} per "
    f"step). Host loop, ghost batch norm; median (range) over {c['repeats']} fresh processes of "
    f"{c['steps_timed']} steps each.",
    "",
    "| data | samples/s | vs in memory | peak resident MiB | resident before the first timed step, MiB |",
    "|---|---:|---:|---:|---:|",
  ]
  base = result["results"]["in memory"]["samples_per_s"]
  for mode in MODES:
    r = result["results"][mode]
    lo, hi = r["samples_per_s_range"]
    name = "streamed from disk (HostData over np.load(mmap_mode='r'))" if mode == "streamed" else "in device memory"
    lines.append(
      f"| {name} | {r['samples_per_s']:.0f} ({lo:.0f}-{hi:.0f}) | {r['samples_per_s'] / base:.2f} | "
      f"{r['peak_resident_mib']:.0f} | {r['resident_before_mib']:.0f} |"
    )
  lines += [
    "",
    f"Losses of the two ways, step by step: {'identical' if result['same_losses'] else 'DIFFERENT'} "
    f"({', '.join(f'{v:.6f}' for v in result['losses']['streamed'])}).",
    "",
  ]
  return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="64 MiB of data, one repeat (smoke run)")
  p.add_argument("--rows", type=int, help="rows of the data set (262144: 1 GiB)")
  p.add_argument("--features", type=int, default=1024, help="float32 features per row (1024)")
  p.add_argument("--micro-batch", type=int, help="micro-batch size (8192 rows, 32 MiB)")
  p.add_argument("--steps", type=int, default=3, help="timed steps per process (3)")
  p.add_argument("--repeats", type=int, help="processes per way of training (3)")
  p.add_argument("--dir", type=pathlib.Path, help="folder for the data files (default: a temporary one)")
  p.add_argument("--out", type=pathlib.Path, default=_HERE / "results", help="folder for the JSON and Markdown")
  p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  quick = dict(rows=16384, micro_batch=2048, repeats=1)
  full = dict(rows=262144, micro_batch=8192, repeats=3)
  for key, value in (quick if args.quick else full).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.child:
    measured = child(args.dir, args.child, args.micro_batch, args.steps)
    print(json.dumps(measured))
    return measured
  with tempfile.TemporaryDirectory(dir=args.dir) as folder:
    result = run(args, pathlib.Path(folder))
  _machine.write_results(args.out, "streaming_quick" if args.quick else "streaming", result, markdown)
  return result


if __name__ == "__main__":
  main()
