"""Progressive sharpening and the edge of stability of full-batch gradient descent, on MNIST-1D.

Cohen et al. ("Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability", ICLR
2021) found that when a network is trained by full-batch gradient descent with step size ``lr``, the
*sharpness* (the largest eigenvalue of the training loss's Hessian) first rises ("progressive
sharpening") until it reaches ``2 / lr``, the largest curvature at which gradient descent on a quadratic
is stable, and then hovers at or just above ``2 / lr`` ("edge of stability") while the loss keeps
decreasing, no longer monotonically. This script reproduces that setting at a scale that runs on two CPU
cores: MNIST-1D (Greydanus & Kobak, ICML 2024; generated locally by the ``mnist1d`` package), the first
1000 training examples, a tanh MLP with two hidden layers of 64 units, the mean squared error against
one-hot targets (as in Cohen et al.), and ``optax.sgd(lr)`` on the full batch, for a few learning rates,
with and without batch norm (``jaxbn.linen.BatchNorm``, normalizing with the statistics of the full
batch, so that the objective is the same at every step).

    python examples/edge_of_stability.py                 # 70-100 s on 2 shared CPU cores (76 s measured)
    python examples/edge_of_stability.py --quick         # 5-10 s: lr 0.3, 600 steps, plain MLP only
    python examples/edge_of_stability.py --lrs 0.4 0.2 --steps 2000 --every 20 --models plain

Every ``--every`` steps the sharpness of the full-batch loss is computed with
``jaxbn.diagnostics.top_hessian_eigenvalue`` (Lanczos on Hessian-vector products, never forming the
Hessian; at most 20 products per measurement) and set beside ``jaxbn.diagnostics.stability_threshold(lr)``
= ``2 / lr``.

The classifier layer starts with a tenth of the usual weight variance, so every run starts with a
sharpness below all the ``2 / lr`` lines (4.4 without batch norm, 6.7 with) and the rise is seen from
the first step; with the usual initialisation the sharpness starts near 12 (measured on all 4000
examples), above 2/lr for the larger learning rates, which then begin with an unstable phase instead.

What the default run shows (learning rates 0.25, 0.2, 0.15, 4000 steps; ranges over two runs of
``python examples/edge_of_stability.py`` on 2 CPU cores, 2026-11-26 and 2026-12-07):

* Progressive sharpening: the sharpness rises from 4.4 to 0.9 * 2/lr at step 350, 900 and 2500
  (lr 0.25, 0.2, 0.15) without batch norm; the smaller the learning rate, the longer it rises.
* Edge of stability: from then on it stays at 2/lr, on average 1.03, 1.01 and 0.99 x 2/lr (range
  0.90-1.08), while the loss keeps falling (to 0.059-0.067, 0.077, 0.094-0.095) but no longer
  monotonically: it rises at 1438-1509 of the 3649 steps after that point at lr 0.25 (1119-1131 of
  3099 at 0.2, 307-311 of 1499 at 0.15).
* Batch norm does not avoid it: the batch-norm network starts sharper, reaches 2/lr sooner (steps 100,
  300, 650) and then hovers slightly above it, 1.07-1.08 x 2/lr on average (range 0.91-1.16), with the
  loss rising at 42-46% of the steps. Its final loss is lower at lr 0.2 and 0.15 (0.061-0.062 and
  0.075-0.080) but not at lr 0.25 (0.055-0.059, against 0.059-0.067 without batch norm).

At the edge of stability the trajectory is chaotic: the last digits of these numbers change between
builds (XLA versions, CPU kinds), the picture does not.

Outputs (in ``runs/edge_of_stability/`` unless ``--out`` says otherwise): ``sharpness.png`` (sharpness
with its ``2 / lr`` lines, and the training loss, per model) and ``metrics.csv``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import _common  # examples/_common.py: devices, data, progress bar, tables, plots
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbn.linen
from jaxbn.diagnostics import stability_threshold, top_hessian_eigenvalue

NAME = "edge_of_stability"
MODELS = ("plain", "batchnorm")
MODEL_LABELS = {"plain": "tanh MLP", "batchnorm": "tanh MLP + jaxbn batch norm"}
REACHED = 0.9  # the sharpness "reaches" 2/lr once it is at least this fraction of it


class MLP(nn.Module):
  """``depth`` tanh layers of ``width`` units, optionally with batch norm before each tanh, then a linear layer.

  The batch norms use the statistics of the batch they are given (the full training set); the
  hidden layers then have no bias, the batch norm's own bias plays its role.
  """

  width: int = 64
  depth: int = 2
  batch_norm: bool = False
  num_classes: int = 10
  out_scale: float = 0.1  # variance of the classifier's initial weights, relative to LeCun's 1/fan_in

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for _ in range(self.depth):
      x = nn.Dense(self.width, use_bias=not self.batch_norm)(x)
      if self.batch_norm:
        x = jaxbn.linen.BatchNorm(use_running_average=False)(x)
      x = jnp.tanh(x)
    init = nn.initializers.variance_scaling(self.out_scale, "fan_in", "normal")
    return nn.Dense(self.num_classes, kernel_init=init)(x)


def make_loss(model: nn.Module, variables: dict[str, Any], x: jax.Array, targets: jax.Array):
  """The full-batch objective ``params -> 0.5 * mean over examples of ||f(x) - y||^2``."""
  others = {k: v for k, v in variables.items() if k != "params"}

  def loss(params):
    if others:  # batch norm: training mode, statistics of the full batch; the running ones are unused
      out = model.apply({"params": params, **others}, x, mutable=list(others))[0]
    else:
      out = model.apply({"params": params}, x)
    return 0.5 * jnp.mean(jnp.sum((out - targets) ** 2, axis=-1))

  return loss


def train(
  loss, params, *, lr: float, steps: int, every: int, lanczos_iters: int, seed: int, on_steps=None
) -> dict[str, Any]:
  """Full-batch GD for ``steps`` steps, the sharpness measured before steps 0, every, 2 every, ... and at the end.

  ``on_steps(n)``, when given, is called after each stretch of ``n`` steps (a progress bar's ``update``).
  Returns the per-step losses (``losses[t]``: loss before update ``t``), the checkpoints' steps and
  sharpness values, and whether the run diverged (a non-finite loss ends it early).
  """
  optimizer = optax.sgd(lr)

  @jax.jit
  def sharpness(params):
    value, _ = top_hessian_eigenvalue(jax.grad(loss), params, num_iters=lanczos_iters, key=jax.random.key(seed))
    return value

  @jax.jit
  def run(params, opt_state, length_marker):
    def step(carry, _):
      params, opt_state = carry
      value, grads = jax.value_and_grad(loss)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), value

    (params, opt_state), values = jax.lax.scan(step, (params, opt_state), None, length=length_marker.shape[0])
    return params, opt_state, values

  opt_state = optimizer.init(params)
  losses: list[float] = []
  checkpoints: list[int] = []
  sharpness_values: list[float] = []
  diverged = False
  for start in range(0, steps + 1, every):
    checkpoints.append(start)
    sharpness_values.append(float(sharpness(params)))
    length = min(every, steps - start)
    if length == 0:
      break
    params, opt_state, values = run(params, opt_state, np.empty(length))  # the shape carries the length
    losses.extend(np.asarray(values, np.float64).tolist())
    if on_steps is not None:
      on_steps(length)
    if not np.all(np.isfinite(values)):
      diverged = True
      break
  if not diverged and checkpoints[-1] != steps:  # steps not a multiple of every: measure at the end
    checkpoints.append(steps)
    sharpness_values.append(float(sharpness(params)))
  final_loss = float(jax.jit(loss)(params))
  return {
    "losses": losses,
    "final_loss": final_loss,
    "checkpoints": checkpoints,
    "sharpness": sharpness_values,
    "diverged": diverged,
  }


def summarize(run: dict[str, Any], threshold: float) -> dict[str, Any]:
  """What the run shows: where the sharpness reached ``REACHED * 2/lr`` and where it stayed afterwards."""
  steps, sharp = np.asarray(run["checkpoints"]), np.asarray(run["sharpness"])
  reached = np.flatnonzero(sharp >= REACHED * threshold)
  out: dict[str, Any] = {"initial_sharpness": float(sharp[0]), "reached_at": None}
  losses = np.asarray(run["losses"])
  if reached.size:
    first = int(reached[0])
    after = sharp[first:] / threshold
    out.update(
      reached_at=int(steps[first]),
      ratio_mean=float(np.mean(after)),
      ratio_min=float(np.min(after)),
      ratio_max=float(np.max(after)),
      # At the edge of stability the loss still falls, but not at every step.
      loss_increases=int(np.sum(np.diff(losses[int(steps[first]) :]) > 0)),
      steps_after=max(0, len(losses) - int(steps[first]) - 1),
    )
  else:
    out["ratio_max"] = float(np.max(sharp) / threshold)
  return out


def _plot(path, results: dict[str, dict[str, Any]], models: list[str], lrs: list[float]):
  plt = _common.pyplot()
  fig, axes = plt.subplots(2, len(models), figsize=(6.0 * len(models), 7.0), dpi=120, squeeze=False, sharex=True)
  finite = [v for run in results.values() for v in run["sharpness"] if np.isfinite(v)]
  top_limit = 1.1 * max(finite + [2 / lr for lr in lrs])
  for col, model in enumerate(models):
    top, bottom = axes[0, col], axes[1, col]
    for i, lr in enumerate(lrs):
      run = results[f"{model} lr={lr:g}"]
      color = f"C{i}"
      top.plot(run["checkpoints"], run["sharpness"], color=color, marker="o", markersize=2.5, linewidth=1.2)
      top.axhline(
        run["threshold"], color=color, linestyle="--", linewidth=1.0, label=f"lr={lr:g}: 2/lr = {run['threshold']:.3g}"
      )
      bottom.plot(np.arange(len(run["losses"])), run["losses"], color=color, linewidth=1.0, label=f"lr={lr:g}")
    top.set_title(f"{MODEL_LABELS[model]}: sharpness (dashed: 2/lr)")
    top.set_ylabel("top Hessian eigenvalue")
    top.set_ylim(0, top_limit)  # the same scale in every column
    bottom.set_title(f"{MODEL_LABELS[model]}: training loss (full batch)")
    bottom.set_ylabel("MSE")
    bottom.set_yscale("log")
    bottom.set_xlabel("step")
    for ax in (top, bottom):
      ax.grid(True, alpha=0.3)
      ax.legend(fontsize=8)
  fig.suptitle("MNIST-1D, full-batch gradient descent: progressive sharpening and the edge of stability")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--lrs", type=float, nargs="+", default=None, help="learning rates (default 0.25 0.2 0.15)")
  parser.add_argument("--steps", type=int, default=None, help="full-batch GD steps per run (default 4000)")
  parser.add_argument("--every", type=int, default=None, help="measure the sharpness every this many steps (50)")
  parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="networks to train")
  parser.add_argument("--quick", action="store_true", help="a short run: lr 0.3, 600 steps every 25, plain MLP only")
  parser.add_argument("--train-examples", type=int, default=1000, help="use the first N training examples")
  parser.add_argument("--width", type=int, default=64, help="hidden width")
  parser.add_argument("--lanczos-iters", type=int, default=20, help="Hessian-vector products per sharpness")
  parser.add_argument("--seed", type=int, default=0, help="initialisation seed")
  parser.add_argument("--out", default=f"runs/{NAME}", help="output folder")
  parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
  args = parser.parse_args(argv)
  quick = {"lrs": [0.3], "steps": 600, "every": 25} if args.quick else {}
  defaults = {"lrs": [0.25, 0.2, 0.15], "steps": 4000, "every": 50}
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, quick.get(name, value))
  if args.quick and args.models == list(MODELS):
    args.models = ["plain"]
  if args.steps < 1 or args.every < 1:
    parser.error(f"--steps and --every must be >= 1, got {args.steps} and {args.every}")
  if any(lr <= 0 for lr in args.lrs):
    parser.error(f"--lrs must be > 0, got {args.lrs}")
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Trains every (model, learning rate), prints the sharpness beside 2/lr, writes the plot; returns the numbers."""
  start_time = time.perf_counter()
  args = parse_args(argv)
  out = _common.output_dir(NAME, args.out)
  raw = _common.load_mnist1d()
  x = jnp.asarray(raw["x"][: args.train_examples])
  targets = jax.nn.one_hot(jnp.asarray(raw["y"][: args.train_examples]), 10)
  print(
    f"MNIST-1D: {x.shape[0]} training examples (the full batch), tanh MLP {x.shape[1]}-"
    f"{'-'.join([str(args.width)] * 2)}-10, MSE on one-hot targets, optax.sgd; {args.steps} steps per run, "
    f"sharpness (Lanczos, {args.lanczos_iters} Hessian-vector products at most) every {args.every} steps"
  )

  results: dict[str, dict[str, Any]] = {}
  jobs = [(model, lr) for model in args.models for lr in args.lrs]
  bar = _common.progress(None, total=len(jobs) * args.steps, desc="steps", enabled=not args.no_progress)
  for model_name, lr in jobs:
    bar.set_description(f"{MODEL_LABELS[model_name]}, lr {lr:g}")  # the run in progress, its steps counted
    model = MLP(width=args.width, batch_norm=model_name == "batchnorm")
    variables = jax.jit(model.init)(jax.random.key(args.seed), x)
    loss = make_loss(model, variables, x, targets)
    run = train(
      loss,
      variables["params"],
      lr=lr,
      steps=args.steps,
      every=args.every,
      lanczos_iters=args.lanczos_iters,
      seed=args.seed,
      on_steps=bar.update,
    )
    bar.update(args.steps - len(run["losses"]))  # the steps a diverged run did not take
    run["threshold"] = float(stability_threshold(lr))
    run["summary"] = summarize(run, run["threshold"])
    run["num_params"] = sum(int(p.size) for p in jax.tree.leaves(variables["params"]))
    results[f"{model_name} lr={lr:g}"] = run
  bar.close()

  for name, run in results.items():
    model_name = name.split()[0]
    print(f"\n{MODEL_LABELS[model_name]} ({run['num_params']} parameters), {name.split()[1]}:")
    picks = sorted(set(np.linspace(0, len(run["checkpoints"]) - 1, 9).round().astype(int).tolist()))
    rows = []
    for k in picks:
      step, sharp = run["checkpoints"][k], run["sharpness"][k]
      loss_at = run["losses"][step] if step < len(run["losses"]) else run["final_loss"]
      rows.append(
        [step, f"{loss_at:.4f}", f"{sharp:.2f}", f"{run['threshold']:.2f}", f"{sharp / run['threshold']:.2f}"]
      )
    print(_common.format_table(["step", "train loss", "sharpness", "2/lr", "sharpness / (2/lr)"], rows))

  print("\nSummary (the sharpness 'reaches' 2/lr at the first measurement >= 0.9 * 2/lr):")
  rows = []
  for name, run in results.items():
    s = run["summary"]
    model_name, lr_text = name.split()
    if s["reached_at"] is None:
      after = f"never reached; max {s['ratio_max']:.2f} x 2/lr"
      increases = "-"
    else:
      after = f"{s['ratio_mean']:.2f} x 2/lr (range {s['ratio_min']:.2f}-{s['ratio_max']:.2f})"
      increases = f"{s['loss_increases']} of {s['steps_after']}" if s["steps_after"] else "-"
    rows.append(
      [
        f"{MODEL_LABELS[model_name]}, {lr_text}",
        f"{run['threshold']:.2f}",
        f"{s['initial_sharpness']:.2f}",
        "-" if s["reached_at"] is None else s["reached_at"],
        after,
        increases,
        "diverged" if run["diverged"] else f"{run['final_loss']:.4f}",
      ]
    )
  headers = ["run", "2/lr", "sharpness at step 0", "reached at step", "sharpness after", "loss rises", "final loss"]
  print(_common.format_table(headers, rows))

  plot = _plot(out / "sharpness.png", results, args.models, args.lrs)
  with open(out / "metrics.csv", "w") as f:
    f.write("model,lr,step,loss,sharpness,threshold\n")
    for name, run in results.items():
      model_name, lr_text = name.split()
      sharp_at = dict(zip(run["checkpoints"], run["sharpness"], strict=True))
      for step in range(len(run["losses"]) + 1):
        loss_at = run["losses"][step] if step < len(run["losses"]) else run["final_loss"]
        sharp = sharp_at.get(step)
        f.write(
          f"{model_name},{lr_text[3:]},{step},{loss_at:.6g},{'' if sharp is None else f'{sharp:.6g}'},"
          f"{run['threshold']:.6g}\n"
        )
  wall = time.perf_counter() - start_time
  print(f"\nwall time {wall:.1f} s (data generation and JIT compilation included); plot and metrics.csv in {out}/")
  return {"runs": results, "plots": [str(plot)], "out": str(out), "wall_time_s": wall, "args": vars(args)}


if __name__ == "__main__":
  main()
