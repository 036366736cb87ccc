"""One process of the two-process streaming test (tests/test_streaming.py), and the run both sides make.

Run as ``python tests/_multihost_stream_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_FILE``: the process
sets up ``jax.distributed`` over gloo on 127.0.0.1 with 4 CPU devices of its own, wraps only its own
rows in a ``jaxbn.training.HostData`` sharded over the global mesh, runs :func:`run` (two steps, ghost
and exact batch norm, the host loop) and saves the results. The test runs :func:`run` in one process
with 8 devices on the whole data set in device memory and compares. Importing it has no side effects.
"""

from __future__ import annotations

import numpy as np

ROWS, MICRO_BATCH_SIZE = 48, 16  # 6 rows per device, 2 of them per micro-batch: 3 micro-batches


def rows(start: int, stop: int) -> dict[str, np.ndarray]:
  """Rows ``start .. stop - 1``, each from its own seed: no process needs another's."""
  x = [np.random.default_rng([1, r]).normal(size=4) * 2 + 1 for r in range(start, stop)]
  return {"x": np.array(x, np.float32), "y": (np.arange(start, stop) % 3).astype(np.int32)}


def run(mesh, data) -> dict[str, np.ndarray]:
  """Two steps in ghost and in exact mode from the same parameters: the states' leaves and the losses."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  import jaxbn

  model = nn.Sequential([nn.Dense(6, use_bias=False), jaxbn.linen.BatchNorm(use_running_average=False), nn.Dense(3)])
  variables = model.init(jax.random.key(0), jnp.zeros((2, 4)))
  loss_fn = jaxbn.training.linen_loss(model, optax.softmax_cross_entropy_with_integer_labels)
  opt = optax.sgd(0.1)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  out = {}
  for bn_mode in ("ghost", "exact"):
    step = jaxbn.training.full_batch_step(loss_fn, opt, micro_batch_size=MICRO_BATCH_SIZE, bn_mode=bn_mode, loop="host")
    state = jax.device_put(
      jaxbn.training.TrainState.create(variables["params"], variables["batch_stats"], opt), replicated
    )
    losses = []
    for _ in range(2):
      state, metrics = step(state, data)
      losses.append(np.asarray(metrics.loss))
    for i, leaf in enumerate(jax.tree.leaves(state.params) + jax.tree.leaves(state.batch_stats)):
      out[f"{bn_mode}/{i}"] = np.asarray(leaf.addressable_data(0))  # replicated: every device holds it all
    out[f"{bn_mode}/loss"] = np.stack(losses)
  return out


def main(argv: list[str]) -> None:
  process_id, num_processes, port, out_file = int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
  import jax
  from _multihost_worker import initialize
  from jax.sharding import NamedSharding, PartitionSpec

  import jaxbn

  initialize(process_id, num_processes, port)
  mesh = jax.make_mesh((jax.device_count(),), ("batch",))
  k = ROWS // num_processes
  mine = rows(process_id * k, (process_id + 1) * k)  # this process reads only its own rows
  data = jaxbn.training.HostData(mine, sharding=NamedSharding(mesh, PartitionSpec("batch")))
  results = run(mesh, data)
  if process_id == 0:
    np.savez(out_file, **results)
  jax.distributed.shutdown()


if __name__ == "__main__":
  from _multihost_worker import run_exiting_on_error

  run_exiting_on_error(main)
