"""One process of the multi-process test (tests/test_multihost.py), and the computation both sides run.

Run as ``python tests/_multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz``: the process sets
up ``jax.distributed`` over gloo on 127.0.0.1 with 4 CPU devices of its own, runs :func:`train_step`
and :func:`full_batch_step` on the global mesh of all processes' devices, and process 0 saves the
results. The test runs the
same :func:`train_step` in one process with 8 devices and compares. Importing this module has no
side effects.
"""

from __future__ import annotations

import os
import sys

import numpy as np

ROWS, FEATURES, HIDDEN = 32, 5, 4
VALID_PER_DEVICE = (4, 0, 1, 3, 4, 2, 4, 3)  # uneven masks: devices hold different numbers of valid rows
LEARNING_RATE = 0.1


def problem() -> dict[str, np.ndarray]:
  """The global batch, mask, targets and initial parameters and state (identical in every process)."""
  rng = np.random.default_rng(0)
  per_device = ROWS // len(VALID_PER_DEVICE)
  return {
    "x": (rng.normal(size=(ROWS, FEATURES)) * 2 + 3).astype(np.float32),
    "mask": np.concatenate([np.arange(per_device) < v for v in VALID_PER_DEVICE])[:, None],
    "target": rng.normal(size=(ROWS, HIDDEN)).astype(np.float32),
    "kernel": (rng.normal(size=(FEATURES, HIDDEN)) / np.sqrt(FEATURES)).astype(np.float32),
    "scale": np.ones(HIDDEN, np.float32),
    "bias": np.zeros(HIDDEN, np.float32),
  }


def train_step(mesh, style: str) -> dict[str, np.ndarray]:
  """One SGD step of a dense layer + batch norm over the global batch sharded on ``mesh``.

  Args:
    mesh: a 1-D mesh named ``"batch"`` (all devices of all processes), or None for one device.
    style: ``"jit"`` (sharded inputs, ``axis_name=None``) or ``"batch_map"`` (``jax.shard_map`` via
      ``jaxbn.parallel.batch_map``, ``axis_name="batch"``).

  Returns:
    Host copies of the loss, output, new parameters and new running statistics.
  """
  import jax
  import jax.numpy as jnp
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import jaxbn
  from jaxbn.parallel import batch_map

  data = problem()
  axis_name = "batch" if style == "batch_map" else None

  def forward(params, state, x, mask, target):
    h = x @ params["kernel"]
    y, new_state = jaxbn.batch_norm(
      h, state, params["scale"], params["bias"], training=True, mask=mask, axis_name=axis_name, momentum=0.9
    )
    sq = jnp.where(mask, (y - target) ** 2, 0.0)
    if axis_name is not None:
      sq_sum, n = jax.lax.psum((jnp.sum(sq), jnp.sum(mask)), axis_name)
    else:
      sq_sum, n = jnp.sum(sq), jnp.sum(mask)
    return sq_sum / n, (y, new_state)

  if style == "batch_map":
    forward = batch_map(forward, mesh, in_axes=(None, None, 0, 0, 0), out_axes=(None, (0, None)))

  @jax.jit
  def step(params, state, x, mask, target):
    (loss, (y, new_state)), grads = jax.value_and_grad(forward, has_aux=True)(params, state, x, mask, target)
    new_params = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)
    return loss, y, new_params, new_state

  def put(a, spec):
    if mesh is None:
      return jnp.asarray(a)
    return jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda index: a[index])

  params = {k: put(data[k], P()) for k in ("kernel", "scale", "bias")}
  state = jax.tree.map(lambda a: put(np.asarray(a), P()), jaxbn.init_state(HIDDEN))
  loss, y, new_params, new_state = step(
    params, state, put(data["x"], P("batch")), put(data["mask"], P("batch")), put(data["target"], P("batch"))
  )
  fetch = np.asarray if mesh is None or jax.process_count() == 1 else _fetch(multihost_utils)
  out = {"loss": fetch(loss), "y": fetch(y), "state_mean": fetch(new_state.mean), "state_var": fetch(new_state.var)}
  out.update({f"param_{k}": fetch(v) for k, v in new_params.items()})
  return out


def full_batch_step(mesh) -> dict[str, np.ndarray]:
  """Two steps of ``jaxbn.training.full_batch_step`` (micro-batches of 8 rows) on data sharded over ``mesh``.

  ``mesh`` is a 1-D Auto-axis mesh named ``"batch"``, or None for one device.
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import jaxbn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
      x = nn.Dense(HIDDEN, use_bias=False)(x)
      return nn.Dense(HIDDEN)(nn.relu(jaxbn.linen.BatchNorm(use_running_average=not train, momentum=0.9)(x)))

  data = problem()
  model = Net()
  variables = model.init(jax.random.key(0), jnp.asarray(data["x"]), train=False)
  if mesh is None:
    # On 8 devices each micro-batch of 8 rows takes 1 row of every device's block: the same order here.
    per = len(data["x"]) // 8
    order = np.array([d * per + i for i in range(per) for d in range(8)])
    data = {**data, "x": data["x"][order], "target": data["target"][order]}
  opt = optax.sgd(LEARNING_RATE, momentum=0.9)
  loss_fn = jaxbn.training.linen_loss(model, lambda out, t: jnp.sum((out - t) ** 2, -1), targets="target", train=True)
  step = jaxbn.training.full_batch_step(loss_fn, opt, micro_batch_size=8, donate=False)

  def put(a, spec):
    if mesh is None:
      return jnp.asarray(a)
    return jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda index: a[index])

  state = jaxbn.training.TrainState.create(variables["params"], variables["batch_stats"], opt)
  state = jax.tree.map(lambda a: put(np.asarray(a), P()), state)
  batch = {"x": put(data["x"], P("batch")), "target": put(data["target"], P("batch"))}
  losses = []
  for _ in range(2):
    state, metrics = step(state, batch)
    losses.append(metrics.loss)
  fetch = np.asarray if mesh is None or jax.process_count() == 1 else _fetch(multihost_utils)
  leaves = jax.tree.leaves((state.params, state.batch_stats))
  out = {f"leaf{i}": fetch(leaf) for i, leaf in enumerate(leaves)}
  out["losses"] = np.stack([fetch(v) for v in losses])
  return out


def _fetch(multihost_utils):
  def fetch(a):
    if a.is_fully_replicated:
      return np.asarray(a.addressable_shards[0].data)
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))

  return fetch


def initialize(process_id: int, num_processes: int, port: int) -> None:
  """Joins the others over gloo on 127.0.0.1:``port``, with 4 CPU devices of this process's own."""
  import jax

  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", 4)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    f"127.0.0.1:{port}",
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=int(os.environ.get("JAXBN_INIT_TIMEOUT_S", "90")),
  )
  assert jax.process_count() == num_processes and jax.device_count() == 4 * num_processes


def main(argv: list[str]) -> None:
  process_id, num_processes, port, out_path = int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
  import jax

  initialize(process_id, num_processes, port)
  mesh = jax.make_mesh((jax.device_count(),), ("batch",))
  results = {}
  for style in ("jit", "batch_map"):
    results.update({f"{style}/{k}": v for k, v in train_step(mesh, style).items()})
  auto = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
  results.update({f"full_batch/{k}": v for k, v in full_batch_step(auto).items()})
  if process_id == 0:
    np.savez(out_path, **results)
  jax.distributed.shutdown()


def run_exiting_on_error(main) -> None:
  """``main(sys.argv)``; on any error, the traceback and an immediate exit.

  A clean exit would wait in jax.distributed's shutdown for the other process, which waits in its
  next collective for this one, until the test's deadline.
  """
  import traceback

  try:
    main(sys.argv)
  except BaseException:
    traceback.print_exc()
    sys.stdout.flush()
    os._exit(1)


if __name__ == "__main__":
  main(sys.argv)
