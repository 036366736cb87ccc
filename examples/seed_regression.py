"""The smallest case for batch norm: fit y = x with gradient descent, with and without it.

Inputs ``[10, 20, 30, 40, 50]`` with targets ``[10.0, ..., 50.0]`` (and the same at scale 1:
``[1, ..., 5]``). Two models, trained by full-batch gradient descent on the mean squared error from
``w = b = 0`` at the same learning rate:

* ``plain``: ``y = w * x + b``,
* ``batch norm``: ``y = w * batch_norm(x) + b``, the same linear model on normalized inputs.

Gradient descent on a quadratic is stable only for learning rates below ``2 / lambda_max``, with
``lambda_max`` the largest eigenvalue of the loss Hessian. For the plain model ``lambda_max`` grows
with the square of the input scale (about 2200 here at scale 10, 24 at scale 1), so the default
learning rate 0.1 diverges at both scales; with batch norm the Hessian is ``2 * I`` whatever the
scale, and the same learning rate converges by a factor 0.64 per step.

    python examples/seed_regression.py              # prints the tables, writes runs/seed_regression/loss.png
    python examples/seed_regression.py --lr 0.0005  # small enough for the plain model at scale 10

The batch-norm model keeps an equal-weight (``running_average="cumulative"``) average of the batch
statistics; with one full batch every step it equals the data's statistics, so the model predicts
the same with the running statistics (``training=False``) as in training.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from typing import Any

import _common  # examples/_common.py: devices, data, progress bar, tables, plots
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbn

NAME = "seed_regression"
DATASETS = {
  "scale 10": ([10.0, 20.0, 30.0, 40.0, 50.0], [10.0, 20.0, 30.0, 40.0, 50.0]),
  "scale 1": ([1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0]),
}
MODELS = ("plain", "batch norm")
REPORT_STEPS = (0, 1, 2, 3, 5, 10, 20, 50, 100, 200)

# ---- Models -----------------------------------------------------------------------------------------------


def init_model():
  """``w = b = 0`` and a fresh running state for the one input feature."""
  return {"w": jnp.zeros(()), "b": jnp.zeros(())}, jaxbn.init_state(1)


def apply_model(params, bn_state, x: jax.Array, *, model: str, training: bool):
  """Predictions for inputs ``x`` of shape (n,), and the new batch-norm state."""
  features = x[:, None]  # (batch, 1 feature)
  if model == "batch norm":
    features, bn_state = jaxbn.batch_norm(features, bn_state, training=training, running_average="cumulative")
  return params["w"] * features[:, 0] + params["b"], bn_state


def loss_fn(params, bn_state, x, y, *, model: str):
  pred, new_bn_state = apply_model(params, bn_state, x, model=model, training=True)
  return jnp.mean((pred - y) ** 2), new_bn_state


# ---- Full-batch gradient descent --------------------------------------------------------------------------
# A hand-written step on purpose: the whole update fits on one screen (jaxbn.training.full_batch_step
# does the same with micro-batches, a guard and batch-norm state; examples/full_batch_mnist1d.py uses it).


@functools.partial(jax.jit, static_argnames=("model", "steps"))
def train(params, bn_state, x, y, lr, *, model: str, steps: int):
  """``steps`` GD updates; returns the final params and state and the loss before each step and after the last."""
  optimizer = optax.sgd(lr)

  def step(carry, _):
    params, bn_state, opt_state = carry
    (loss, bn_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, bn_state, x, y, model=model)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), bn_state, opt_state), loss

  (params, bn_state, _), losses = jax.lax.scan(step, (params, bn_state, optimizer.init(params)), length=steps)
  final_loss, _ = loss_fn(params, bn_state, x, y, model=model)
  return params, bn_state, jnp.append(losses, final_loss)


def max_stable_lr(params, bn_state, x, y, *, model: str) -> float:
  """``2 / lambda_max`` of the loss Hessian in ``(w, b)`` (the loss is quadratic in them)."""
  hessian = jax.jacrev(jax.grad(lambda p: loss_fn(p, bn_state, x, y, model=model)[0]))(params)
  matrix = np.array([[hessian[a][b] for b in ("w", "b")] for a in ("w", "b")], np.float64)
  return 2.0 / float(np.linalg.eigvalsh(matrix).max())


# ---- Script -----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  parser.add_argument("--lr", type=float, default=0.1, help="learning rate of both models")
  parser.add_argument("--steps", type=int, default=50, help="gradient-descent steps")
  parser.add_argument("--out", default=f"runs/{NAME}", help="output folder")
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error(f"--steps must be >= 1, got {args.steps}")
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Trains the four (data set, model) pairs, prints the tables, writes a plot; returns the numbers."""
  start = time.perf_counter()
  args = parse_args(argv)
  out = _common.output_dir(NAME, args.out)
  runs = {}
  for data_name, (xs, ys) in DATASETS.items():
    x, y = jnp.asarray(xs), jnp.asarray(ys)
    for model in MODELS:
      params, bn_state = init_model()
      stable = max_stable_lr(params, bn_state, x, y, model=model)
      params, bn_state, losses = train(params, bn_state, x, y, args.lr, model=model, steps=args.steps)
      losses = np.asarray(losses, np.float64)
      pred_eval, _ = apply_model(params, bn_state, x, model=model, training=False)
      final = float(losses[-1])
      runs[f"{data_name} / {model}"] = {
        "losses": losses.tolist(),
        "initial_loss": float(losses[0]),
        "final_loss": final,
        "diverged": not math.isfinite(final) or final > float(losses[0]),
        "max_stable_lr": stable,
        "params": {k: float(v) for k, v in params.items()},
        "eval_predictions": np.asarray(pred_eval).tolist(),
      }

  shown = [s for s in REPORT_STEPS if s <= args.steps]
  print(f"Mean squared error by gradient-descent step, learning rate {args.lr:g}, from w = b = 0:")
  print(_common.format_table(["step", *runs], [[s, *(f"{r['losses'][s]:.4g}" for r in runs.values())] for s in shown]))
  print()
  summary = [
    [
      name,
      f"{r['max_stable_lr']:.3g}",
      f"{r['final_loss']:.3g}",
      "yes" if r["diverged"] else "no",
      f"{r['params']['w']:.4g}, {r['params']['b']:.4g}",
      " ".join(f"{p:.3g}" for p in r["eval_predictions"]),
    ]
    for name, r in runs.items()
  ]
  headers = ["run", "stable lr < 2/lambda_max", f"loss after {args.steps}", "diverged", "w, b", "predictions (eval)"]
  print(_common.format_table(headers, summary))

  plot = _common.save_curve(
    out / "loss.png",
    {name: np.where(np.isfinite(r["losses"]), r["losses"], np.nan) for name, r in runs.items()},
    title=f"y = x by gradient descent, learning rate {args.lr:g}",
    ylabel="mean squared error",
    logy=True,
  )
  wall = time.perf_counter() - start
  print(f"wall time {wall:.1f} s; plot written to {plot}")
  return {"runs": runs, "lr": args.lr, "steps": args.steps, "plots": [str(plot)], "wall_time_s": wall, "out": str(out)}


if __name__ == "__main__":
  main()
