"""The gradient penalty's time and memory: ``penalty_method="hvp"`` against ``"finite_difference"``.

``full_batch_step(..., gradient_penalty=alpha, penalty_block_size=b)`` adds SGD's implicit regularizer
``(alpha / 4) * sum_k (n_k / N) ||grad L_k||^2`` over blocks of ``b`` rows (Smith et al. 2021,
Geiping et al. 2022; ``jaxbn/training/penalty.py``). Per block, ``"hvp"`` takes a gradient and a
forward-mode Hessian-vector product, ``"finite_difference"`` two gradients; a block that is the whole
micro-batch reuses the micro-batch's gradient (ghost batch norm; under exact batch norm, ``bn_mode="exact"``,
each block takes its own, in the loss sweep). This script measures, on MNIST-1D's CNN with jaxbn's
batch norm (4000 rows, the main job's model and data), the seconds per full-batch step on the
default loop and the temporary memory XLA allocates in the step's largest compiled program, each
against the plain step of the same batch-norm mode (no penalty) measured in the same run, arms in rotating
order.

Usage::

  python benchmarks/gradient_penalty.py           # about 4 minutes on 2 idle cores
  python benchmarks/gradient_penalty.py --quick   # a smoke run on random rows

Results go to ``benchmarks/results/gradient_penalty[_quick].{json,md}``.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

_HERE = pathlib.Path(__file__).resolve().parent
for _path in (_HERE, _HERE.parent):  # _machine, and jaxbn when it is not installed
  if str(_path) not in sys.path:
    sys.path.insert(0, str(_path))

import _machine  # noqa: E402
import jax  # noqa: E402
import optax  # noqa: E402
from full_batch import CNN, make_data  # noqa: E402

import jaxbn  # noqa: E402
from jaxbn.training import TrainState, full_batch_step, linen_loss  # noqa: E402

ALPHA = 0.1


def arms(micro: int, block: int) -> dict[str, dict[str, Any]]:
  """The step options of every arm: no penalty, then each method with blocks of the micro-batch and of ``block``;
  then exact batch norm without and with each method's penalty (blocks of the micro-batch)."""
  out: dict[str, dict[str, Any]] = {"no penalty": {}}
  for method in ("hvp", "finite_difference"):
    for size in (micro, block):
      out[f"{method}, blocks of {size}"] = {
        "gradient_penalty": ALPHA,
        "penalty_block_size": size,
        "penalty_method": method,
      }
  out["exact, no penalty"] = {"bn_mode": "exact"}
  for method in ("hvp", "finite_difference"):
    out[f"exact, {method}, blocks of {micro}"] = {
      "bn_mode": "exact",
      "gradient_penalty": ALPHA,
      "penalty_block_size": micro,
      "penalty_method": method,
    }
  return out


def baseline(name: str) -> str:
  """The arm an arm's ratios are taken against: the plain step of the same batch-norm mode."""
  return "exact, no penalty" if name.startswith("exact") else "no penalty"


def largest_temp_bytes(step: Any) -> int:
  """The temporary bytes of the step's largest compiled program (the host loop's programs, or the one scanned step)."""
  sizes = []
  for label, (args, _) in step.calls.items():
    analysis = step.programs[label].lower(*args).compile().memory_analysis()
    if analysis is not None:
      sizes.append(int(analysis.temp_size_in_bytes))
  return max(sizes, default=-1)


def run(args: argparse.Namespace) -> dict[str, Any]:
  examples = 256 if args.quick else 4000
  data = make_data(examples, 40, mnist1d=not args.quick)
  micro, block = (64, 16) if args.quick else (args.micro_batch, args.block)
  model = CNN(norm=jaxbn.linen.BatchNorm)
  variables = model.init(jax.random.key(0), data["x"][:2], train=False)
  opt = optax.sgd(0.05, momentum=0.9, nesterov=True)
  loss_fn = linen_loss(model, optax.softmax_cross_entropy_with_integer_labels, train=True)
  steps, states, first = {}, {}, {}
  for name, options in arms(micro, block).items():
    steps[name] = full_batch_step(loss_fn, opt, micro_batch_size=micro, loop="host", **options)
    state = TrainState.create(variables["params"], variables["batch_stats"], opt)
    start = time.perf_counter()
    states[name], metrics = steps[name](state, data)
    jax.block_until_ready(states[name])
    first[name] = {
      "compile_and_first_step_s": time.perf_counter() - start,
      "loss": float(metrics.loss),
      "penalty": None if metrics.gradient_penalty is None else float(metrics.gradient_penalty),
    }
  times: dict[str, list[float]] = {name: [] for name in steps}
  names = list(steps)
  for r in range(args.repeats):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      start = time.perf_counter()
      for _ in range(args.steps):
        states[name], _ = steps[name](states[name], data)
      jax.block_until_ready(states[name])
      times[name].append((time.perf_counter() - start) / args.steps)
  temps = {name: largest_temp_bytes(step) for name, step in steps.items()}
  results = {}
  for name in steps:
    base = baseline(name)
    results[name] = {
      **first[name],
      "baseline": base,
      "step_s": times[name],
      "median_step_s": statistics.median(times[name]),
      "time_ratio": statistics.median(times[name]) / statistics.median(times[base]),
      "temp_bytes": temps[name],
      "temp_ratio": temps[name] / temps[base] if temps[base] > 0 else None,
    }
  return {
    "config": {
      "examples": examples,
      "micro_batch_size": micro,
      "block": block,
      "alpha": ALPHA,
      "loop": "host",
      "repeats": args.repeats,
      "steps_per_repeat": args.steps,
      "data": "random rows" if args.quick else "MNIST-1D",
    },
    "results": results,
  }


def markdown(result: dict[str, Any]) -> str:
  c, m = result["config"], result["machine"]
  lines = [
    f"# Gradient penalty: seconds per step and temporary memory ({m['date']})",
    "",
    f"{c['examples']} rows ({c['data']}), micro-batches of {c['micro_batch_size']}, alpha {c['alpha']}, "
    f"loop={c['loop']!r}; median of {c['repeats']} repeats of {c['steps_per_repeat']} steps, arms in rotating "
    f"order. Machine: {m['cpu']} ({m['cpu_count']} cores, load {m['load_average_1min']}), {m['device']}, "
    f"jax {m['versions']['jax']}.",
    "",
    "| arm | s per step, median (range) | vs the same mode without penalty | largest program's temporaries, MiB "
    "| vs the same mode without penalty |",
    "|---|---:|---:|---:|---:|",
  ]
  for name, r in result["results"].items():
    temp_ratio = "" if r["temp_ratio"] is None else f"{r['temp_ratio']:.2f}"
    lines.append(
      f"| {name} | {r['median_step_s']:.3f} ({min(r['step_s']):.3f}-{max(r['step_s']):.3f}) | "
      f"{r['time_ratio']:.2f} | {r['temp_bytes'] / 2**20:.1f} | {temp_ratio} |"
    )
  lines += ["", f"Command: `{result['command']}`", ""]
  return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="256 random rows, one repeat (smoke run)")
  p.add_argument("--micro-batch", type=int, default=500, help="micro-batch size (500)")
  p.add_argument("--block", type=int, default=100, help="the smaller penalty block size (100)")
  p.add_argument("--repeats", type=int, help="repeats per arm (5; 1 with --quick)")
  p.add_argument("--steps", type=int, default=2, help="timed steps per repeat (2)")
  p.add_argument("--out", type=pathlib.Path, default=_HERE / "results", help="folder for the JSON and Markdown")
  args = p.parse_args(argv)
  if args.repeats is None:
    args.repeats = 1 if args.quick else 5
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  start = time.perf_counter()
  result = run(args)
  result["machine"] = _machine.machine_info(["jax", "jaxlib", "flax", "optax"])
  given = sys.argv[1:] if argv is None else list(argv)
  result["command"] = " ".join(["python benchmarks/gradient_penalty.py", *given])
  result["wall_s"] = time.perf_counter() - start
  _machine.write_results(args.out, "gradient_penalty_quick" if args.quick else "gradient_penalty", result, markdown)
  return result


if __name__ == "__main__":
  main()
