"""Does batch norm make gradients explode in deep networks? Measured on deep ReLU MLPs.

Yang et al. ("A Mean Field Theory of Batch Normalization", ICLR 2019) show that at initialisation a
deep ReLU network with batch norm and no skip connections has gradients that grow exponentially
towards the input, by about sqrt(pi / (pi - 1)) ~ 1.21 per layer, and that residual connections
remove most of the growth. This script measures it on MNIST-1D (512 examples by default) for a sweep
of depths and three stacks of ``depth`` hidden layers of the same width:

* ``none``:   ``h <- relu(h @ W)`` (He initialisation, no normalization),
* ``bn``:     ``h <- relu(batch_norm(h @ W))``,
* ``bn+res``: ``h <- h + relu(batch_norm(h)) @ W`` (pre-activation residual blocks, He et al. 2016,
  with a final batch norm and ReLU before the classifier).

For each it reports the gradient norm of every hidden kernel at initialisation (the ratio between the
layer nearest the input and the last one, and the growth per layer), and the training loss after a
number of full-batch gradient-descent steps at one learning rate with three update rules: plain GD,
GD with gradient-norm damping ``u <- g / (1 + beta * ||g||)``, and GD with global-norm clipping
(``optax.clip_by_global_norm``).

    python examples/gradient_explosion.py                       # ~1-2 minutes on 2 CPU cores
    python examples/gradient_explosion.py --depths 8 16 --lr 0.1

Outputs (in ``runs/gradient_explosion/`` unless ``--out`` says otherwise): ``gradient_norms.png``
(per-layer gradient norms at initialisation of the deepest stacks) and ``final_loss.png`` (loss after
training against depth).
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
from jax import lax

import jaxbn
import jaxbn.transforms

NAME = "gradient_explosion"
VARIANTS = ("none", "bn", "bn+res")
VARIANT_LABELS = {"none": "no normalization", "bn": "batch norm", "bn+res": "batch norm + residual"}
THEORY_GROWTH = math.sqrt(math.pi / (math.pi - 1.0))  # Yang et al. 2019, ReLU, large batch and width
CHANCE_LOSS = math.log(10.0)  # cross-entropy of a uniform guess over the 10 classes

# ---- Model: a deep MLP whose hidden layers are stacked and scanned over ---------------------------------


def init_model(key: jax.Array, *, depth: int, width: int, in_features: int, num_classes: int = 10):
  """Parameters and batch-norm states for an MLP with ``depth`` hidden ``width x width`` layers.

  The hidden layers' parameters and states are stacked along a leading ``depth`` axis so that the
  forward pass is one ``lax.scan`` (compilation time does not grow with depth).
  """
  k_in, k_hidden, k_head = jax.random.split(key, 3)
  params = {
    "input": jax.random.normal(k_in, (in_features, width)) * math.sqrt(1.0 / in_features),
    "hidden": {
      "kernel": jax.random.normal(k_hidden, (depth, width, width)) * math.sqrt(2.0 / width),
      "scale": jnp.ones((depth, width)),
      "bias": jnp.zeros((depth, width)),
    },
    "head": {"kernel": jax.random.normal(k_head, (width, num_classes)) * math.sqrt(1.0 / width)},
  }
  state = jaxbn.init_state(width)
  bn_state = {"hidden": jax.tree.map(lambda a: jnp.broadcast_to(a, (depth, *a.shape)), state), "final": state}
  return params, bn_state


def apply_model(params, bn_state, x: jax.Array, *, variant: str, training: bool = True):
  """Logits and the new batch-norm states (``variant`` in ``VARIANTS``)."""

  def layer(h, layer_params_and_state):
    p, state = layer_params_and_state
    if variant == "none":
      return jax.nn.relu(h @ p["kernel"]), state
    if variant == "bn":
      z, state = jaxbn.batch_norm(h @ p["kernel"], state, p["scale"], p["bias"], training=training)
      return jax.nn.relu(z), state
    z, state = jaxbn.batch_norm(h, state, p["scale"], p["bias"], training=training)
    return h + jax.nn.relu(z) @ p["kernel"], state

  h = x @ params["input"]
  h, hidden_state = lax.scan(layer, h, (params["hidden"], bn_state["hidden"]))
  final_state = bn_state["final"]
  if variant == "bn+res":  # the residual stream grows with depth; normalize it before the classifier
    h, final_state = jaxbn.batch_norm(h, final_state, training=training)
    h = jax.nn.relu(h)
  return h @ params["head"]["kernel"], {"hidden": hidden_state, "final": final_state}


def loss_fn(params, bn_state, x, y, *, variant: str):
  logits, new_bn_state = apply_model(params, bn_state, x, variant=variant)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_bn_state


# ---- Update rules -----------------------------------------------------------------------------------------


def make_optimizer(lr, beta, clip) -> optax.GradientTransformation:
  """Plain GD after damping (off for ``beta=0``) and global-norm clipping (off for ``clip=inf``).

  The three numbers may be traced, so one compiled training loop serves all three update rules.
  """
  return optax.chain(
    jaxbn.transforms.scale_by_norm_damping(beta),  # u <- u / (1 + beta * ||u||)
    optax.clip_by_global_norm(clip),
    optax.sgd(lr),
  )


# ---- Measurements -----------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("variant", "steps"))
def train(params, bn_state, x, y, lr, beta, clip, *, variant: str, steps: int):
  """``steps`` full-batch updates from ``params``.

  Returns:
    ``(losses, layer_grad_norms)``: the training loss before each step and after the last, shape
    (steps + 1,), and the gradient norm of each hidden kernel at each step, shape (steps, depth); row 0
    is the measurement at initialisation.
  """
  optimizer = make_optimizer(lr, beta, clip)

  # The full-batch step (jaxbn.training will provide it): gradient over all examples, one update,
  # batch-norm state threaded through.
  def step(carry, _):
    params, bn_state, opt_state = carry
    (loss, bn_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, bn_state, x, y, variant=variant)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    layer_norms = jnp.sqrt(jnp.sum(jnp.square(grads["hidden"]["kernel"]), axis=(1, 2)))
    return (optax.apply_updates(params, updates), bn_state, opt_state), (loss, layer_norms)

  carry = (params, bn_state, optimizer.init(params))
  (params, bn_state, _), (losses, layer_norms) = lax.scan(step, carry, length=steps)
  final_loss, _ = loss_fn(params, bn_state, x, y, variant=variant)
  return jnp.append(losses, final_loss), layer_norms


def verdict(initial: float, final: float) -> str:
  """``diverged`` (not finite or above the initial loss), ``stalled`` (not below 90% of chance) or ``trains``."""
  if not math.isfinite(final) or final > initial:
    return "diverged"
  if final > 0.9 * CHANCE_LOSS:
    return "stalled"
  return "trains"


# ---- Script -----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32, 64], help="numbers of hidden layers")
  parser.add_argument("--width", type=int, default=64, help="hidden width")
  parser.add_argument("--examples", type=int, default=512, help="MNIST-1D training examples (the full batch)")
  parser.add_argument("--steps", type=int, default=50, help="full-batch gradient steps per run")
  parser.add_argument("--lr", type=float, default=1.0, help="learning rate of every update rule")
  parser.add_argument("--beta", type=float, default=1.0, help="damping strength in u <- g / (1 + beta ||g||)")
  parser.add_argument("--clip", type=float, default=1.0, help="max global gradient norm for the clipping rule")
  parser.add_argument("--seed", type=int, default=0, help="initialisation seed")
  parser.add_argument("--out", default=f"runs/{NAME}", help="output folder")
  parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
  args = parser.parse_args(argv)
  if min(args.depths) < 2:
    parser.error(f"--depths must be >= 2, got {args.depths}")
  return args


def _plot_final_losses(path, rows: list[dict[str, Any]], rules: dict[str, str], *, title: str):
  plt = _common.pyplot()
  fig, ax = plt.subplots(figsize=(8.4, 4.2), dpi=120)
  ceiling = 2 * max(max(r["initial_loss"] for r in rows), CHANCE_LOSS)
  styles = dict(zip(rules, ("-", "--", ":"), strict=True))
  for color, variant in zip(("C0", "C1", "C2"), VARIANTS, strict=True):
    sel = [r for r in rows if r["variant"] == variant]
    depths = [r["depth"] for r in sel]
    for rule, label in rules.items():
      finals = np.array([r["final_loss"][rule] for r in sel])
      shown = np.where(np.isfinite(finals), np.minimum(finals, ceiling), ceiling)
      ax.plot(depths, shown, styles[rule], color=color, marker="o", markersize=3, label=f"{variant}, {label}")
      bad = ~np.isfinite(finals)
      ax.plot(np.asarray(depths)[bad], shown[bad], "x", color=color, markersize=9)
  ax.axhline(CHANCE_LOSS, color="gray", linewidth=0.8, label="chance (log 10)")
  ax.set_xscale("log", base=2)
  ax.set_xticks(sorted({r["depth"] for r in rows}), [str(d) for d in sorted({r["depth"] for r in rows})])
  ax.set_yscale("log")
  ax.set_xlabel("hidden layers")
  ax.set_ylabel("training loss after the last step")
  ax.set_title(title, fontsize=10)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), handlelength=4)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the sweep, prints the table, writes the plots; returns the measurements."""
  start = time.perf_counter()
  args = parse_args(argv)
  out = _common.output_dir(NAME, args.out)
  data = _common.load_mnist1d()
  x, y = jnp.asarray(data["x"][: args.examples]), jnp.asarray(data["y"][: args.examples])
  rules = {
    "gd": (f"GD lr={args.lr:g}", (args.lr, 0.0, jnp.inf)),
    "damped": (f"+damping b={args.beta:g}", (args.lr, args.beta, jnp.inf)),
    "clipped": (f"+clip {args.clip:g}", (args.lr, 0.0, args.clip)),
  }
  print(
    f"MNIST-1D, {len(x)} examples (full batch), width {args.width}, {args.steps} steps per run; "
    f"theory for batch norm: x{THEORY_GROWTH:.3f} per layer"
  )

  rows, layer_norms = [], {}
  configs = [(d, v) for d in sorted(args.depths) for v in VARIANTS]
  bar = _common.progress(configs, total=len(configs), desc="depth x network", enabled=not args.no_progress)
  for depth, variant in bar:
    bar.set_description(f"depth {depth}, {variant}")  # the run in progress
    params, bn_state = init_model(jax.random.key(args.seed), depth=depth, width=args.width, in_features=x.shape[1])
    final = {}
    for rule, (_, hyper) in rules.items():  # one compiled loop: the hyperparameters are traced
      losses, norms = train(params, bn_state, x, y, *hyper, variant=variant, steps=args.steps)
      final[rule] = float(losses[-1])
    initial, norms = float(losses[0]), np.asarray(norms[0])  # the same for every rule: the initialisation
    layer_norms[depth, variant] = norms
    ratio = float(norms[0] / norms[-1])
    rows.append(
      {
        "depth": depth,
        "variant": variant,
        "first_over_last": ratio,
        "growth_per_layer": ratio ** (1.0 / (depth - 1)),
        "initial_loss": initial,
        "final_loss": final,
        "verdict": {rule: verdict(initial, f) for rule, f in final.items()},
      }
    )

  headers = ["depth", "network", "|g_1|/|g_L|", "growth/layer", "loss at init", *(label for label, _ in rules.values())]
  table_rows = [
    [
      r["depth"],
      r["variant"],
      f"{r['first_over_last']:.3g}",
      f"{r['growth_per_layer']:.3f}",
      f"{r['initial_loss']:.3f}",
      *(f"{r['final_loss'][rule]:.3g} {r['verdict'][rule]}" for rule in rules),
    ]
    for r in rows
  ]
  print(_common.format_table(headers, table_rows))
  print(
    "|g_l| = gradient norm of hidden kernel l at initialisation (1 = nearest the input); growth/layer = "
    f"(|g_1|/|g_L|)^(1/(L-1)); last columns: training loss after {args.steps} steps (diverged: not finite or "
    f"above the initial loss; stalled: above 90% of chance, {CHANCE_LOSS:.3f})."
  )

  deepest = max(args.depths)
  layers = np.arange(1, deepest + 1)
  bn_last = layer_norms[deepest, "bn"][-1]
  curves = {VARIANT_LABELS[v]: (layers, layer_norms[deepest, v]) for v in VARIANTS}
  curves[f"x{THEORY_GROWTH:.2f} per layer (Yang et al. 2019)"] = (layers, bn_last * THEORY_GROWTH ** (deepest - layers))
  plots = [
    _common.save_curve(
      out / "gradient_norms.png",
      curves,
      title=f"{deepest} hidden layers at initialisation: |dL/dW_l|",
      xlabel="hidden layer l (1 = nearest the input)",
      ylabel="gradient norm",
      logy=True,
    ),
    _plot_final_losses(
      out / "final_loss.png",
      rows,
      {rule: label for rule, (label, _) in rules.items()},
      title=f"Training loss after {args.steps} full-batch steps (x: not finite)",
    ),
  ]
  wall = time.perf_counter() - start
  print(f"wall time {wall:.1f} s; plots written to {out}/")
  return {
    "rows": rows,
    "layer_grad_norms": {f"{d}/{v}": n.tolist() for (d, v), n in layer_norms.items()},
    "theory_growth": THEORY_GROWTH,
    "wall_time_s": wall,
    "plots": [str(p) for p in plots],
    "out": str(out),
  }


if __name__ == "__main__":
  main()
