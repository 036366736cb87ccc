"""One process of the multi-process full-batch step test (tests/test_multihost.py), and the run both sides make.

Run as ``python tests/_multihost_step_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR``: the process
sets up ``jax.distributed`` over gloo on 127.0.0.1 with 4 CPU devices of its own, builds the global
data from its own rows only (``jaxbn.parallel.global_batch``), runs :func:`run_all` on the global
mesh of all processes' devices, records what ``global_batch`` says to rows it must refuse
(:func:`refusals`) and saves what it holds in ``OUT_DIR/process{PROCESS_ID}.npz``. The test runs
the same :func:`run_all` in one process with 8 devices and compares. Importing this module has no side effects.
"""

from __future__ import annotations

import os

import numpy as np

ROWS, FEATURES, CLASSES = 40, 5, 3
# 8 devices hold 5 rows each and put 3 of them into every micro-batch of 24: 2 micro-batches, the
# second re-reading a row of the first (masked), so the remainder runs.
MICRO_BATCH_SIZE = 24
INF_ROW = 27  # in the second process's rows: only that process reads it, and both must skip the step
CASES = (("host", "ghost"), ("scan", "ghost"), ("host", "exact"), ("scan", "exact"))


def rows(start: int, stop: int) -> dict[str, np.ndarray]:
  """Rows ``start .. stop - 1`` of the data set, each drawn from its own seed: no process needs another's."""
  x = [np.random.default_rng([0, r]).normal(size=FEATURES) * 2 + 1 for r in range(start, stop)]
  return {
    "x": np.array(x, np.float32).reshape(-1, FEATURES),
    "y": (np.arange(start, stop) * 7 % CLASSES).astype(np.int32),
  }


def global_data(mesh, bad: bool = False):
  """The data set as arrays sharded over ``mesh``, each process loading only its own rows.

  With ``bad``, row :data:`INF_ROW` holds an inf, so the loss is not finite.
  """
  import jax

  import jaxbn

  k = ROWS // jax.process_count()
  start = jax.process_index() * k
  local = rows(start, start + k)
  if bad and start <= INF_ROW < start + k:
    local["x"][INF_ROW - start, 1] = np.inf
  return jaxbn.parallel.global_batch(local, mesh)


def refusals(mesh) -> dict[str, np.ndarray]:
  """What ``jaxbn.parallel.global_batch`` says, in this process, to rows no global batch can be made of.

  The second process holds no rows; it holds fewer than the first; it has no device in the mesh.
  """
  import jax

  import jaxbn

  second = jax.process_index() == 1
  cases = {
    "no_rows": (rows(0, 0 if second else 20), mesh),
    "fewer_rows": (rows(0, 16 if second else 20), mesh),
    "no_device": (rows(0, 4), jax.sharding.Mesh([d for d in mesh.devices.flat if d.process_index == 0], ("batch",))),
  }
  said = {}
  for name, (local, where) in cases.items():
    try:
      jaxbn.parallel.global_batch(local, where)
      said[f"refused/{name}"] = np.array("")
    except ValueError as err:
      said[f"refused/{name}"] = np.array(str(err))
  return said


def build(mesh, loop: str, bn_mode: str):
  """The step and the initial state (replicated over ``mesh``) of one case."""
  import flax.linen as nn
  import jax
  import optax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import jaxbn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
      x = nn.Dense(8, use_bias=False)(x)
      x = nn.relu(jaxbn.linen.BatchNorm(use_running_average=not train, momentum=0.9)(x))
      return nn.Dense(CLASSES)(x)

  model = Net()
  variables = model.init(jax.random.key(0), np.zeros((2, FEATURES), np.float32), train=False)
  # Every part of the state holds something: running clip statistics, Adam's moments, a key.
  opt = optax.chain(jaxbn.transforms.clip_by_running_norm(warmup_steps=2), optax.adamw(1e-2, weight_decay=1e-3))
  loss_fn = jaxbn.training.linen_loss(model, optax.softmax_cross_entropy_with_integer_labels, train=True)
  step = jaxbn.training.full_batch_step(loss_fn, opt, micro_batch_size=MICRO_BATCH_SIZE, loop=loop, bn_mode=bn_mode)
  state = jaxbn.training.TrainState.create(variables["params"], variables["batch_stats"], opt, key=jax.random.key(3))
  return step, jax.device_put(state, NamedSharding(mesh, P()))  # the same values in every process


def named(prefix: str, tree) -> dict[str, np.ndarray]:
  """This process's copy of every leaf of a replicated pytree, by ``prefix`` and path."""
  import jax

  return {
    f"{prefix}{jax.tree_util.keystr(path)}": np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def run_case(mesh, loop: str, bn_mode: str, checkpoint_dir: str) -> dict[str, np.ndarray]:
  """A step, a step the guard skips (an inf row), a checkpoint saved and restored, two more steps.

  Returns:
    What this process holds: the final state (``state...``), the batch statistics after the first
    step (``first...``), the metrics of the four calls, and whether the skipped step kept the state
    and the restored state equals the saved one bit for bit.
  """

  import jaxbn

  step, state = build(mesh, loop, bn_mode)
  assert step.loop == loop, step.loop
  data, bad = global_data(mesh), global_data(mesh, bad=True)
  metrics = []
  state, m = step(state, data)
  metrics.append(m)
  first = named("first", state.batch_stats)
  before = named("state", state._replace(skipped=None))
  state, m = step(state, bad)
  metrics.append(m)
  kept = same(named("state", state._replace(skipped=None)), before)
  saved = named("state", state)
  path = os.path.join(checkpoint_dir, f"{loop}_{bn_mode}")
  jaxbn.training.save_checkpoint(path, state)  # every process calls it; Orbax writes each array once
  state = jaxbn.training.restore_checkpoint(path, build(mesh, loop, bn_mode)[1])
  restored = same(named("state", state), saved)
  for _ in range(2):
    state, m = step(state, data)
    metrics.append(m)
  out = {**named("state", state), **first}
  for name in ("loss", "grad_norm", "update_norm", "skipped"):
    out[f"metrics.{name}"] = np.stack([np.asarray(getattr(m, name)) for m in metrics])
  out["skip_kept_state"], out["restored_bitwise"] = np.bool_(kept), np.bool_(restored)
  return out


def run_all(mesh, checkpoint_dir: str) -> dict[str, np.ndarray]:
  """:func:`run_case` for every case of :data:`CASES`, keys prefixed ``loop/bn_mode/``."""
  results = {}
  for loop, bn_mode in CASES:
    results.update({f"{loop}/{bn_mode}/{k}": v for k, v in run_case(mesh, loop, bn_mode, checkpoint_dir).items()})
  return results


def main(argv: list[str]) -> None:
  process_id, num_processes, port, out_dir = int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
  import jax
  from _multihost_worker import initialize

  initialize(process_id, num_processes, port)
  mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
  results = run_all(mesh, os.path.join(out_dir, "checkpoints"))
  results.update(refusals(mesh))
  np.savez(os.path.join(out_dir, f"process{process_id}.npz"), **results)
  jax.distributed.shutdown()


if __name__ == "__main__":
  from _multihost_worker import run_exiting_on_error

  run_exiting_on_error(main)
