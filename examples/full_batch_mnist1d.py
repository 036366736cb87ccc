"""Full-batch gradient descent on MNIST-1D with a batch-norm CNN.

Every update uses the gradient over all 4000 training examples, so the batch statistics that batch
norm computes in training are the statistics of the whole training set. The data set is generated
locally by the ``mnist1d`` package (Greydanus & Kobak, "Scaling Down Deep Learning with MNIST-1D",
ICML 2024); nothing is downloaded.

    pip install -e ".[examples]"
    python examples/full_batch_mnist1d.py                  # ~96% test accuracy, 300 steps
    python examples/full_batch_mnist1d.py --devices 4      # the same batch sharded over 4 (virtual) devices

The model is written as pure functions over a params dict and a dict of ``jaxbn.BatchNormState``:
``logits, new_bn_state = apply_model(params, bn_state, x, training=...)``. The running statistics are
threaded through the training step and used for evaluation (``training=False``).

Outputs (in ``runs/full_batch_mnist1d/`` unless ``--out`` says otherwise): ``loss.png``,
``grad_norm.png``, ``test_accuracy.png`` and ``metrics.csv``.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import _common  # examples/_common.py: devices, data, progress bar, tables, plots
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn

NAME = "full_batch_mnist1d"

# ---- Model: a 1-D CNN with batch norm, as pure functions ------------------------------------------------
# Three convolutions (stride 2: length 40 -> 20 -> 10 -> 5), each followed by batch norm over the batch
# and length axes (features last, NWC) and a ReLU, then a linear classifier on the flattened features.
# The convolutions have no bias: the batch norm bias that follows plays its role.
#
# Batch-norm momentum: in full-batch training every batch is the whole training set, so the batch
# statistics already are the training-set statistics and averaging them over steps only adds lag. The
# default here is 0 (the running statistics are those of the last step); with the usual 0.9 they trail
# the weights by ~10 steps, and while the learning rate is high the test accuracy measured with them
# falls to chance level although the training accuracy is 80%.

CONVS = ((5, 2), (3, 2), (3, 2))  # (kernel width, stride) per convolution


def init_model(key: jax.Array, *, channels: int = 32, length: int = 40, num_classes: int = 10):
  """He-initialised parameters and fresh batch-norm running statistics.

  Returns:
    ``(params, bn_state)``: nested dicts of arrays, and a dict of ``jaxbn.BatchNormState``.
  """
  params, bn_state = {}, {}
  keys = jax.random.split(key, len(CONVS) + 1)
  fan_in_channels = 1
  for i, (width, stride) in enumerate(CONVS):
    fan_in = width * fan_in_channels
    params[f"conv{i}"] = {
      "kernel": jax.random.normal(keys[i], (width, fan_in_channels, channels)) * math.sqrt(2.0 / fan_in),
      "scale": jnp.ones(channels),
      "bias": jnp.zeros(channels),
    }
    bn_state[f"conv{i}"] = jaxbn.init_state(channels)
    fan_in_channels = channels
    length = -(-length // stride)
  features = length * channels
  params["head"] = {
    "kernel": jax.random.normal(keys[-1], (features, num_classes)) * math.sqrt(1.0 / features),
    "bias": jnp.zeros(num_classes),
  }
  return params, bn_state


def apply_model(params, bn_state, x: jax.Array, *, training: bool, momentum: float = 0.0):
  """Logits for a batch of sequences ``x`` of shape (batch, length).

  Returns:
    ``(logits, new_bn_state)``; in evaluation (``training=False``) the running statistics are used
    and returned unchanged.
  """
  h = x[..., None]  # (batch, length, 1 channel)
  new_bn_state = {}
  for i, (_, stride) in enumerate(CONVS):
    p = params[f"conv{i}"]
    h = lax.conv_general_dilated(h, p["kernel"], (stride,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))
    h, new_bn_state[f"conv{i}"] = jaxbn.batch_norm(
      h, bn_state[f"conv{i}"], p["scale"], p["bias"], training=training, momentum=momentum
    )
    h = jax.nn.relu(h)
  h = h.reshape(h.shape[0], -1)
  return h @ params["head"]["kernel"] + params["head"]["bias"], new_bn_state


# ---- Full-batch training step ----------------------------------------------------------------------------
# jaxbn.training will provide this step (loss, gradient over the whole training set, optimizer update,
# batch-norm state threaded through); until then it is written out here, and it is all there is to swap.


def make_optimizer(learning_rate: float, steps: int, *, weight_decay: float, clip: float | None):
  """Nesterov SGD with linear warm-up (10% of the steps), cosine decay, weight decay and optional clipping."""
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, learning_rate, warmup_steps=max(1, steps // 10), decay_steps=max(2, steps), end_value=learning_rate * 0.01
  )
  return optax.chain(
    optax.clip_by_global_norm(clip) if clip else optax.identity(),
    optax.add_decayed_weights(weight_decay),
    optax.sgd(schedule, momentum=0.9, nesterov=True),
  )


def make_train_step(optimizer: optax.GradientTransformation, *, bn_momentum: float):
  """A jitted full-batch step: ``(params, bn_state, opt_state, x, y) -> (params, bn_state, opt_state, metrics)``."""

  def loss_fn(params, bn_state, x, y):
    logits, new_bn_state = apply_model(params, bn_state, x, training=True, momentum=bn_momentum)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (new_bn_state, logits)

  @jax.jit
  def train_step(params, bn_state, opt_state, x, y):
    (loss, (bn_state, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, bn_state, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "train_accuracy": jnp.mean(logits.argmax(-1) == y)}
    return params, bn_state, opt_state, metrics

  return train_step


@jax.jit
def evaluate(params, bn_state, x, y) -> jax.Array:
  """Accuracy with the running batch-norm statistics."""
  logits, _ = apply_model(params, bn_state, x, training=False)
  return jnp.mean(logits.argmax(-1) == y)


# ---- Script ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  parser.add_argument("--steps", type=int, default=300, help="full-batch gradient steps")
  parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate (after warm-up)")
  parser.add_argument("--weight-decay", type=float, default=2e-2, help="L2 weight decay added to the gradient")
  parser.add_argument("--clip", type=float, default=None, help="clip the gradient's global norm to this (off if unset)")
  parser.add_argument("--bn-momentum", type=float, default=0.0, help="momentum of the running batch-norm statistics")
  parser.add_argument("--channels", type=int, default=32, help="channels of each convolution")
  parser.add_argument("--devices", type=int, default=1, help="number of devices to shard the full batch over")
  parser.add_argument("--seed", type=int, default=0, help="parameter initialisation seed (the data set is fixed)")
  parser.add_argument("--eval-every", type=int, default=1, help="evaluate test accuracy every this many steps")
  parser.add_argument("--train-examples", type=int, default=None, help="use only the first N training examples")
  parser.add_argument("--out", default=f"runs/{NAME}", help="output folder")
  parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error(f"--steps must be >= 1, got {args.steps}")
  if args.eval_every < 1:
    parser.error(f"--eval-every must be >= 1, got {args.eval_every}")
  return args


def _shardings(devices: list[Any], sizes: tuple[int, ...]):
  """(data, replicated) shardings: the batch axis split over ``devices``, everything else replicated."""
  if len(devices) == 1:
    single = jax.sharding.SingleDeviceSharding(devices[0])
    return single, single
  bad = [s for s in sizes if s % len(devices)]
  if bad:
    raise ValueError(f"--devices {len(devices)} must divide the number of examples {sizes}; {bad} is not divisible.")
  # Auto axes: under jax.jit with a sharded batch XLA computes the batch-norm statistics (and the
  # gradient) over the global batch; no axis_name is needed.
  mesh = jax.make_mesh((len(devices),), ("batch",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
  return NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Trains, prints the test accuracy beside the published MNIST-1D results, writes plots; returns the numbers."""
  start = time.perf_counter()
  args = parse_args(argv)
  devices = _common.use_devices(args.devices)  # first: may create virtual CPU devices
  out = _common.output_dir(NAME, args.out)

  data = _common.load_mnist1d()
  x, y = data["x"][: args.train_examples], data["y"][: args.train_examples]
  data_sharding, replicated = _shardings(devices, (len(x), len(data["x_test"])))
  x, y, x_test, y_test = jax.device_put((x, y, data["x_test"], data["y_test"]), data_sharding)

  params, bn_state = init_model(jax.random.key(args.seed), channels=args.channels, length=x.shape[1])
  optimizer = make_optimizer(args.lr, args.steps, weight_decay=args.weight_decay, clip=args.clip)
  opt_state = optimizer.init(params)
  params, bn_state, opt_state = jax.device_put((params, bn_state, opt_state), replicated)
  train_step = make_train_step(optimizer, bn_momentum=args.bn_momentum)
  num_params = sum(p.size for p in jax.tree.leaves(params))
  print(
    f"MNIST-1D: {len(x)} train / {len(x_test)} test examples; CNN with batch norm, {num_params} parameters; "
    f"{args.steps} full-batch steps on {len(devices)} {devices[0].platform} device(s)"
  )

  history: dict[str, list[float]] = {"loss": [], "grad_norm": [], "train_accuracy": []}
  eval_steps, test_accuracy = [], []
  bar = _common.progress(range(1, args.steps + 1), total=args.steps, desc="full-batch GD", enabled=not args.no_progress)
  for step in bar:
    params, bn_state, opt_state, metrics = train_step(params, bn_state, opt_state, x, y)
    for k, v in metrics.items():
      history[k].append(float(v))
    if step % args.eval_every == 0 or step == args.steps:
      eval_steps.append(step)
      test_accuracy.append(float(evaluate(params, bn_state, x_test, y_test)))
      bar.set_postfix(loss=f"{history['loss'][-1]:.4f}", test_acc=f"{test_accuracy[-1]:.3f}", refresh=False)

  # Metrics at step t are those of the parameters before update t; test accuracy is after it.
  steps_axis = np.arange(1, args.steps + 1)
  plots = [
    _common.save_curve(
      out / "loss.png",
      {"train loss (full batch)": (steps_axis, history["loss"])},
      title="MNIST-1D, full-batch GD: training loss",
      ylabel="cross-entropy",
      logy=True,
    ),
    _common.save_curve(
      out / "grad_norm.png",
      {"||gradient||": (steps_axis, history["grad_norm"])},
      title="MNIST-1D, full-batch GD: gradient norm",
      ylabel="global L2 norm",
      logy=True,
    ),
    _common.save_curve(
      out / "test_accuracy.png",
      {
        "test (running batch-norm statistics)": (eval_steps, 100 * np.asarray(test_accuracy)),
        "train (batch statistics, before the step)": (steps_axis, 100 * np.asarray(history["train_accuracy"])),
      },
      title="MNIST-1D, full-batch GD: accuracy",
      ylabel="accuracy (%)",
      hlines={f"published {name}: {acc:.0f}%": acc for name, acc in _common.MNIST1D_PUBLISHED if acc >= 60},
    ),
  ]
  test_at = dict(zip(eval_steps, test_accuracy, strict=True))
  with open(out / "metrics.csv", "w") as f:
    f.write("step,loss,grad_norm,train_accuracy,test_accuracy\n")
    for i, step in enumerate(steps_axis):
      acc = test_at.get(int(step))
      f.write(
        f"{step},{history['loss'][i]:.6g},{history['grad_norm'][i]:.6g},{history['train_accuracy'][i]:.4f},"
        f"{'' if acc is None else f'{acc:.4f}'}\n"
      )

  final_test = test_accuracy[-1]
  train_accuracy = float(evaluate(params, bn_state, x, y))
  wall = time.perf_counter() - start
  rows = [[f"{name} (published)", f"{acc:.0f}%"] for name, acc in _common.MNIST1D_PUBLISHED]
  rows.append([f"this run: CNN + jaxbn batch norm, {args.steps} full-batch steps", f"{100 * final_test:.1f}%"])
  print(_common.format_table(["MNIST-1D model", "test accuracy"], rows))
  print(
    f"train accuracy {100 * train_accuracy:.1f}%, final train loss {history['loss'][-1]:.4f}; "
    f"wall time {wall:.1f} s (data generation and JIT compilation included)"
  )
  print(f"plots and metrics.csv written to {out}/")
  return {
    "test_accuracy": final_test,
    "train_accuracy": train_accuracy,
    "final_loss": history["loss"][-1],
    "history": history,
    "eval_steps": eval_steps,
    "test_accuracy_history": test_accuracy,
    "steps": args.steps,
    "devices": len(devices),
    "num_params": num_params,
    "wall_time_s": wall,
    "plots": [str(p) for p in plots],
    "out": str(out),
  }


if __name__ == "__main__":
  main()
