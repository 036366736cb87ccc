"""Synced batch norm and the full-batch step on several devices: four parallel styles, one answer.

Runs the same computations once on one device and then with the batch split over N devices (8
virtual CPU devices by default, or the accelerators when at least two are present), and prints the
largest difference from the single-device result for each style:

* ``jax.jit`` with the batch sharded by a ``NamedSharding`` (the primary path): no ``axis_name``
  anywhere; XLA computes the batch-norm statistics and the gradient over the global batch.
* ``jax.shard_map`` with ``axis_name``: each device runs on its shard; the batch norms
  (``jaxbn.batch_norm(..., axis_name=...)``, ``jaxbn.linen.BatchNorm(axis_name=...)``) merge their
  statistics exactly over the named axis, and ``full_batch_step(..., jit=False, axis_name=...)``
  reduces the loss and gradient over it.
* ``jaxbn.batch_map``: the same ``shard_map`` written with vmap-style ``in_axes``/``out_axes``.
* ``jax.pmap`` with ``axis_name``, the older style, with the step built with ``jit=False``.

A last row runs ``shard_map``/``pmap`` WITHOUT the batch norms' ``axis_name``: each device then
normalizes with its own shard's statistics (what a model written for one device does when it is
mapped), and the differences are no longer rounding.

Two computations are compared. "batch norm": ``jaxbn.batch_norm`` on a (rows, 16) batch (output, the
gradient of a loss with respect to the input, and the new running statistics). "full-batch step":
``--steps`` updates of ``jaxbn.training.full_batch_step`` on an MLP with two ``jaxbn.linen.BatchNorm``
layers on MNIST-1D (loss at every step, then parameters and running statistics), with micro-batches
of ``--micro-batch-size`` rows (ghost batches for batch norm). With micro-batches, every multi-device
step slices each device's own shard, so each device gets rows laid out such that the k-th micro-batches of all
devices together are the k-th micro-batch of the single-device run (see :func:`device_major_order`);
the numbers then agree exactly up to float rounding.

    python examples/multi_device.py                        # 8 virtual CPU devices, 27-60 s on 2 CPU cores (idle to shared)
    python examples/multi_device.py --devices 4 --steps 10 --micro-batch-size 500

Matrix products run at full float32 precision (``jax.default_matmul_precision("highest")``): on GPUs
the default TF32 products would otherwise make the styles differ by ~1e-3.
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

import _common  # examples/_common.py: devices, data, progress bar, tables, plots
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.linen
import jaxbn.training
import jaxbn.transforms

AXIS = "batch"
STYLES = ("jit + NamedSharding", "jax.shard_map", "jaxbn.batch_map", "jax.pmap", "no BN axis_name (local stats)")
COLUMNS = ("bn output", "bn d/dx", "bn running", "step losses", "step params", "step bn stats")


class MLP(nn.Module):
  """Two hidden layers, each Dense (no bias) -> jaxbn batch norm -> GELU, then a linear classifier.

  GELU rather than ReLU: the styles differ by float rounding, and at a ReLU kink a rounding-level
  difference can flip a unit on or off, after which the trajectories differ by ~1e-5 instead.
  """

  width: int = 64
  num_classes: int = 10
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = functools.partial(
      jaxbn.linen.BatchNorm, use_running_average=not train, momentum=0.9, axis_name=self.axis_name
    )
    for _ in range(2):
      x = nn.gelu(norm()(nn.Dense(self.width, use_bias=False)(x)))
    return nn.Dense(self.num_classes)(x)


def device_major_order(n: int, micro_batch_size: int, num_devices: int) -> np.ndarray:
  """Row order under which per-device micro-batches form the single-device run's micro-batches.

  The single-device step uses the micro-batches ``rows[k*m:(k+1)*m]``. A multi-device step (shard_map,
  pmap, and jax.jit on sharded data) slices each device's shard into micro-batches of
  ``m / num_devices`` rows; laying out device ``j``'s shard as the ``j``-th ``1/num_devices`` of every global micro-batch makes the k-th
  micro-batches of all devices together exactly the single-device k-th micro-batch. Returns the
  permutation to apply to the rows before splitting them evenly over the devices.
  """
  chunks = [np.arange(start, min(start + micro_batch_size, n)) for start in range(0, n, micro_batch_size)]
  return np.concatenate([np.concatenate([c.reshape(num_devices, -1)[j] for c in chunks]) for j in range(num_devices)])


def _max_diff(got: Any, want: Any) -> float:
  """Largest absolute difference over all leaves of two pytrees of the same structure."""
  diffs = jax.tree.map(
    lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))), got, want
  )
  return max(jax.tree.leaves(diffs), default=0.0)


def _scale(tree: Any) -> float:
  return max((float(np.max(np.abs(np.asarray(a)))) for a in jax.tree.leaves(tree)), default=0.0)


# ---- batch norm alone ------------------------------------------------------------------------------------


def batch_norm_case(rows: int, features: int = 16, seed: int = 0):
  """Inputs of the batch-norm comparison: a batch with nonzero means, parameters, a loss weight."""
  k = jax.random.split(jax.random.key(seed), 4)
  x = 3.0 * jax.random.normal(k[0], (rows, features)) + jnp.linspace(-5.0, 5.0, features)[None]
  scale = 1.0 + 0.1 * jax.random.normal(k[1], (features,))
  bias = 0.1 * jax.random.normal(k[2], (features,))
  target = jax.random.normal(k[3], (rows, features))  # a per-row weight in the loss, split like x
  return x, target, jaxbn.init_state(features), scale, bias


def batch_norm_fn(axis_name: str | None, total_rows: int):
  """``(x, target, state, scale, bias) -> (y, dloss/dx, new_state)`` on one device's rows.

  The loss is this device's part of ``sum(sin(y) * target) / total_rows``; its gradient with respect
  to ``x`` needs the global statistics' sums in the backward pass as well, which the fused backward
  of ``jaxbn.batch_norm`` exchanges over ``axis_name``.
  """

  def fn(x, target, state, scale, bias):
    def loss(x):
      y, new_state = jaxbn.batch_norm(x, state, scale, bias, training=True, momentum=0.9, axis_name=axis_name)
      return jnp.sum(jnp.sin(y) * target) / total_rows, (y, new_state)

    (_, (y, new_state)), dx = jax.value_and_grad(loss, has_aux=True)(x)
    return y, dx, new_state

  return fn


def run_batch_norm(style: str, devices: list[Any], mesh: jax.sharding.Mesh, inputs: tuple) -> tuple:
  """``(y, dx, new_state)`` of the batch-norm case in one style (global arrays, state of device 0)."""
  x, target, state, scale, bias = inputs
  n = x.shape[0]
  sharded = NamedSharding(mesh, P(AXIS))
  if style == "one device":
    args = jax.device_put(inputs, devices[0])
    return jax.jit(batch_norm_fn(None, n))(*args)
  if style == "jit + NamedSharding":
    args = jax.device_put((x, target), sharded) + jax.device_put((state, scale, bias), NamedSharding(mesh, P()))
    return jax.jit(batch_norm_fn(None, n))(*args)
  if style in ("jax.shard_map", "jaxbn.batch_map"):
    fn = batch_norm_fn(AXIS, n)
    if style == "jax.shard_map":
      specs = (P(AXIS), P(AXIS), P(), P(), P())
      mapped = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=(P(AXIS), P(AXIS), P()))
    else:
      mapped = jaxbn.batch_map(fn, mesh, in_axes=(0, 0, None, None, None), out_axes=(0, 0, None))
    return jax.jit(mapped)(*jax.device_put((x, target), sharded), state, scale, bias)
  # pmap, with and without the batch norm's axis_name: rows reshaped to (devices, rows per device).
  per_device = lambda a: a.reshape(len(devices), -1, *a.shape[1:])
  fn = batch_norm_fn(AXIS if style == "jax.pmap" else None, n)
  y, dx, new_state = jax.pmap(fn, axis_name=AXIS, in_axes=(0, 0, None, None, None), devices=devices)(
    per_device(x), per_device(target), state, scale, bias
  )
  return y.reshape(x.shape), dx.reshape(x.shape), jax.tree.map(lambda a: np.asarray(a)[0], new_state)


# ---- the full-batch step ---------------------------------------------------------------------------------


def make_step(axis_name: str | None, bn_axis_name: str | None, micro_batch_size: int | None, *, jit: bool):
  """(model, optimizer, step) with the batch norms synced over ``bn_axis_name``."""
  model = MLP(axis_name=bn_axis_name)
  loss_fn = jaxbn.training.linen_loss(model, optax.softmax_cross_entropy_with_integer_labels, train=True)
  optimizer = optax.chain(
    jaxbn.transforms.clip_by_running_norm(warmup_steps=2),
    optax.sgd(0.1, momentum=0.9, nesterov=True),
  )
  step = jaxbn.training.full_batch_step(
    loss_fn,
    optimizer,
    micro_batch_size=micro_batch_size,
    update_batch_stats=loss_fn.update_batch_stats,
    jit=jit,
    axis_name=axis_name,
    donate=False,
  )
  return model, optimizer, step


def run_steps(
  style: str, devices: list[Any], mesh: jax.sharding.Mesh, data: dict, variables: Any, *, steps: int, micro: int | None
):
  """``(losses, final TrainState)`` after ``steps`` full-batch steps from ``variables`` in one style.

  The state returned is device 0's (all devices hold the same in the synced styles).
  """
  n, d = len(data["x"]), len(devices)
  _, optimizer, _ = make_step(None, None, None, jit=True)
  state = jaxbn.training.TrainState.create(variables["params"], variables["batch_stats"], optimizer)
  losses = []

  def run_jit(step, state, data):
    for _ in range(steps):
      state, metrics = step(state, data)
      losses.append(float(metrics.loss))
    return np.asarray(losses), state

  if style == "one device":
    _, _, step = make_step(None, None, micro, jit=True)
    return run_jit(step, *jax.device_put((state, data), devices[0]))

  # Every other style puts micro / d of each device's own rows into every micro-batch (jax.jit with
  # sharded data does so by itself): device j gets the j-th part of every global micro-batch.
  order = device_major_order(n, micro or n, d)
  data = jax.tree.map(lambda a: np.asarray(a)[order], data)
  if style == "jit + NamedSharding":
    _, _, step = make_step(None, None, micro, jit=True)
    return run_jit(
      step, jax.device_put(state, NamedSharding(mesh, P())), jax.device_put(data, NamedSharding(mesh, P(AXIS)))
    )
  per_device_micro = None if micro is None else micro // d
  if style in ("jax.shard_map", "jaxbn.batch_map"):
    _, _, step = make_step(AXIS, AXIS, per_device_micro, jit=False)
    if style == "jax.shard_map":
      mapped = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()))
    else:
      mapped = jaxbn.batch_map(step, mesh, in_axes=(None, 0), out_axes=(None, None))
    mapped = jax.jit(mapped)
    # The state enters replicated over the mesh, as it leaves: the second call reuses the compiled step.
    state = jax.device_put(state, NamedSharding(mesh, P()))
    data = jax.device_put(data, NamedSharding(mesh, P(AXIS)))
    for _ in range(steps):
      state, metrics = mapped(state, data)
      losses.append(float(metrics.loss))
    return np.asarray(losses), state

  bn_axis = AXIS if style == "jax.pmap" else None
  _, _, step = make_step(AXIS, bn_axis, per_device_micro, jit=False)
  pmapped = jax.pmap(step, axis_name=AXIS, devices=devices)
  shards = jax.tree.map(lambda a: a.reshape(d, -1, *a.shape[1:]), data)
  # One copy of the state per device, laid out as pmap's outputs are, so the second call reuses the first's program.
  replicated = jax.pmap(lambda s: s, axis_name=AXIS, devices=devices)(
    jax.tree.map(lambda a: jnp.broadcast_to(a, (d, *a.shape)), state)
  )
  for _ in range(steps):
    replicated, metrics = pmapped(replicated, shards)
    losses.append(float(metrics.loss[0]))
  return np.asarray(losses), jax.tree.map(lambda a: np.asarray(a)[0], replicated)


# ---- script ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  parser.add_argument(
    "--devices", type=int, default=None, help="devices to split the batch over (default: 8, or all accelerators)"
  )
  parser.add_argument("--steps", type=int, default=5, help="full-batch steps to compare")
  parser.add_argument("--examples", type=int, default=4000, help="MNIST-1D training examples in the full batch")
  parser.add_argument(
    "--micro-batch-size", type=int, default=1000, help="global rows per micro-batch (0: the whole batch at once)"
  )
  parser.add_argument("--bn-rows", type=int, default=512, help="rows of the batch-norm comparison")
  parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error(f"--steps must be >= 1, got {args.steps}")
  if args.micro_batch_size < 0:
    parser.error(f"--micro-batch-size must be >= 0, got {args.micro_batch_size}")
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs every style, prints the table of largest differences from one device; returns them."""
  start = time.perf_counter()
  args = parse_args(argv)
  devices = _common.parallel_devices(args.devices)  # first: may create virtual CPU devices
  d = len(devices)
  micro = args.micro_batch_size or None
  data = _common.load_mnist1d()
  data = {"x": data["x"][: args.examples], "y": data["y"][: args.examples]}
  n = len(data["x"])
  for what, size in (("--examples", n), ("--bn-rows", args.bn_rows), ("--micro-batch-size", micro or d)):
    if size % d:
      raise ValueError(f"{what} {size} must be divisible by the number of devices ({d}).")
  if n % (micro or n) % d:
    raise ValueError(f"--examples {n} must leave a last micro-batch divisible by the number of devices ({d}).")
  mesh = jax.make_mesh((d,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
  print(
    f"{d} {devices[0].platform} devices; batch norm on ({args.bn_rows}, 16); full-batch step on {n} MNIST-1D "
    f"examples, {args.steps} steps, " + ("whole batch at once" if micro is None else f"micro-batches of {micro} rows")
  )

  # Each style compiles its own programs (seconds each on a CPU): the bar names the one in progress.
  bar = _common.progress(None, total=1 + len(STYLES), desc="styles", enabled=not args.no_progress)
  with jax.default_matmul_precision("highest"):
    bar.set_description("one device (the reference)")
    bn_inputs = batch_norm_case(args.bn_rows)
    bn_ref = run_batch_norm("one device", devices, mesh, bn_inputs)
    variables = MLP().init(jax.random.key(0), data["x"][:2], train=False)  # the same start for every style
    losses_ref, state_ref = run_steps("one device", devices, mesh, data, variables, steps=args.steps, micro=micro)
    bar.update()
    diffs: dict[str, dict[str, float]] = {}
    for style in STYLES:
      bar.set_description(style)
      y, dx, bn_state = run_batch_norm(style, devices, mesh, bn_inputs)
      losses, state = run_steps(style, devices, mesh, data, variables, steps=args.steps, micro=micro)
      diffs[style] = dict(
        zip(
          COLUMNS,
          (
            _max_diff(y, bn_ref[0]),
            _max_diff(dx, bn_ref[1]),
            _max_diff(bn_state, bn_ref[2]),
            _max_diff(losses, losses_ref),
            _max_diff(state.params, state_ref.params),
            _max_diff(state.batch_stats, state_ref.batch_stats),
          ),
          strict=True,
        )
      )
      bar.update()
  bar.close()

  scales = [_scale(bn_ref[0]), _scale(bn_ref[1]), _scale(bn_ref[2]), _scale(losses_ref)]
  scales += [_scale(state_ref.params), _scale(state_ref.batch_stats)]
  rows = [[style, *(f"{diffs[style][c]:.1e}" for c in COLUMNS)] for style in STYLES]
  rows.append(["(largest |value|, one device)", *(f"{s:.1e}" for s in scales)])
  print(f"largest |difference| from one device ({d} devices):")
  print(_common.format_table(["style", *COLUMNS], rows))
  relative = {s: max(diffs[s][c] / max(sc, 1e-30) for c, sc in zip(COLUMNS, scales, strict=True)) for s in STYLES}
  agree = [s for s in STYLES[:-1] if relative[s] < 1e-4]
  print(
    f"{len(agree)} of {len(STYLES) - 1} synced styles agree with one device to 1e-4 of the largest value; "
    f"without the batch norms' axis_name the relative difference is {relative[STYLES[-1]]:.1e}. "
    f"Wall time {time.perf_counter() - start:.1f} s."
  )
  return {
    "devices": d,
    "platform": devices[0].platform,
    "diffs": diffs,
    "relative": relative,
    "scales": dict(zip(COLUMNS, scales, strict=True)),
    "losses": losses_ref,
  }


if __name__ == "__main__":
  main()
