"""Full-batch training over several processes (hosts): each loads only its own rows, all train one model.

Every process runs this same script. ``jax.distributed.initialize`` joins them into one job whose
devices form one mesh; each process loads its own share of the rows and
``jaxbn.parallel.global_batch`` makes them one global batch, sharded over all devices, without
moving a row between processes; ``jaxbn.training.full_batch_step`` then runs on every process
with the same state (replicated) and applies the same full-batch update everywhere. The final state
is saved by all processes into one Orbax checkpoint and read back.

Without arguments the script shows it on one machine: it starts itself twice on 127.0.0.1 (2
processes x 4 virtual CPU devices, collectives over gloo), then trains the same steps in one process
with 8 devices and prints whether both processes agree with it::

    python examples/several_hosts.py            # 30-60 s on 2 CPU cores (idle to shared)

On a cluster, start the same command on every host, telling each its place in the job, or let JAX
find it (TPU pod slices, SLURM, Open MPI; see docs/several_hosts.md)::

    python examples/several_hosts.py --coordinator 10.0.0.1:1234 --num-processes 4 --process-id 0  # on host 0
    python examples/several_hosts.py --auto                                                         # on every host
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn

ROWS, FEATURES, CLASSES = 1024, 16, 4


def load_rows(start: int, stop: int) -> dict[str, np.ndarray]:
  """Rows ``start .. stop - 1`` of the data set.

  Stands in for reading your own files, e.g. ``np.load("x.npy", mmap_mode="r")[start:stop]``: each
  row is drawn from its own seed, so a process reads nothing but its own rows.
  """
  teacher = np.random.default_rng(0).normal(size=(FEATURES, CLASSES))
  x = np.array([np.random.default_rng([1, r]).normal(size=FEATURES) for r in range(start, stop)], np.float32)
  return {"x": x.reshape(-1, FEATURES), "y": np.argmax(np.tanh(x) @ teacher, axis=1).astype(np.int32)}


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Dense(32, use_bias=False)(x)
    x = nn.relu(jaxbn.linen.BatchNorm(use_running_average=not train)(x))
    return nn.Dense(CLASSES)(x)


def train(steps: int, micro_batch_size: int, checkpoint: str | None = None) -> tuple[list[float], Any]:
  """``steps`` full-batch steps on the mesh of every process's devices; what every process runs.

  Returns:
    The loss of every step and the final ``TrainState`` (replicated: every process holds all of it).
  """
  mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
  # This process's share of the rows: the processes' shares, in process order, are the data set.
  share = ROWS // jax.process_count()
  start = jax.process_index() * share
  data = jaxbn.parallel.global_batch(load_rows(start, start + share), mesh)

  model = MLP()
  opt = optax.sgd(0.1, momentum=0.9)
  loss_fn = jaxbn.training.linen_loss(model, optax.softmax_cross_entropy_with_integer_labels, train=True)
  step = jaxbn.training.full_batch_step(loss_fn, opt, micro_batch_size=micro_batch_size)

  def fresh_state() -> jaxbn.training.TrainState:
    # The same key in every process gives the same initial parameters; put them on every device.
    variables = model.init(jax.random.key(0), np.zeros((1, FEATURES), np.float32), train=False)
    state = jaxbn.training.TrainState.create(variables["params"], variables["batch_stats"], opt)
    return jax.device_put(state, NamedSharding(mesh, P()))

  state, losses = fresh_state(), []
  for _ in range(steps):
    state, metrics = step(state, data)
    losses.append(float(metrics.loss))  # replicated: every process can read it
  if checkpoint is not None:
    jaxbn.training.save_checkpoint(checkpoint, state)  # every process calls it; each array is written once
    restored = jaxbn.training.restore_checkpoint(checkpoint, fresh_state())
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)))
  return losses, state


def run_process(args: argparse.Namespace) -> None:
  """One process of a multi-process job: join the others, train, save what this process holds."""
  if args.cpu_devices:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # collectives between CPU processes
  if args.auto:
    jax.distributed.initialize()  # TPU pod slices, SLURM, Open MPI, ...: JAX finds the job's layout
  else:
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
  me = f"[process {jax.process_index()} of {jax.process_count()}, "
  me += f"{jax.local_device_count()} of {jax.device_count()} devices]"
  checkpoint = None if args.out is None else os.path.join(os.path.abspath(args.out), "checkpoint")
  losses, state = train(args.steps, args.micro_batch_size, checkpoint)
  print(me, "loss per step:", " ".join(f"{v:.4f}" for v in losses), flush=True)
  if args.out is not None:
    leaves = {f"leaf{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves((state.params, state.batch_stats)))}
    np.savez(os.path.join(args.out, f"process{jax.process_index()}.npz"), losses=np.array(losses), **leaves)
  jax.distributed.shutdown()


def run_locally(args: argparse.Namespace, processes: int = 2, devices: int = 8) -> dict[str, Any]:
  """Starts this script ``processes`` times on 127.0.0.1, then compares with 1 process x ``devices``."""
  with tempfile.TemporaryDirectory() as out, socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    command = [sys.executable, os.path.abspath(__file__), "--coordinator", f"127.0.0.1:{port}"]
    command += ["--num-processes", str(processes), "--cpu-devices", str(devices // processes), "--out", out]
    command += ["--steps", str(args.steps), "--micro-batch-size", str(args.micro_batch_size)]
    start = time.perf_counter()
    children = [subprocess.Popen([*command, "--process-id", str(i)], env=env) for i in range(processes)]
    try:
      codes = [c.wait(timeout=args.timeout) for c in children]
    finally:
      for c in children:
        if c.poll() is None:
          c.kill()
    if codes != [0] * processes:
      raise SystemExit(f"the processes failed (exit codes {codes}); see their output above.")
    print(f"{processes} processes x {devices // processes} devices: {time.perf_counter() - start:.1f} s")
    results = [dict(np.load(os.path.join(out, f"process{i}.npz"))) for i in range(processes)]

  losses, state = train(args.steps, args.micro_batch_size)  # this process: all rows, `devices` devices
  reference = [np.asarray(a) for a in jax.tree.leaves((state.params, state.batch_stats))]
  agree = all(all(np.array_equal(r[k], results[0][k]) for k in r) for r in results[1:])
  diff = max(
    float(np.max(np.abs(np.asarray(r[f"leaf{i}"]) - want))) for r in results for i, want in enumerate(reference)
  )
  diff = max(diff, float(np.max(np.abs(results[0]["losses"] - np.array(losses)))))
  print(f"1 process x {devices} devices, loss per step:", " ".join(f"{v:.4f}" for v in losses))
  print(f"The {processes} processes hold the same parameters and batch statistics bit for bit: {agree}")
  print(
    f"Largest difference from 1 process x {devices} devices (losses, parameters, batch statistics): {diff:.1e}"
    " (float rounding: gloo's all-reduce adds the devices' gradients in another order)"
  )
  if not agree or diff > 1e-5:
    raise SystemExit("the processes do not agree with the single-process run")
  return {"losses": losses, "processes_agree": agree, "max_diff": diff}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  job = parser.add_argument_group("one process of a job (without these: the 2-process demonstration on this machine)")
  job.add_argument("--coordinator", help="host:port of process 0, reachable from every process")
  job.add_argument("--num-processes", type=int, help="number of processes in the job")
  job.add_argument("--process-id", type=int, help="this process's index, 0 .. num_processes - 1")
  job.add_argument("--auto", action="store_true", help="let jax.distributed.initialize() find the job (TPU, SLURM)")
  job.add_argument("--cpu-devices", type=int, default=0, help="run on this many virtual CPU devices per process")
  job.add_argument("--out", help="folder for the checkpoint and each process's final state")
  parser.add_argument("--steps", type=int, default=5, help="full-batch steps")
  parser.add_argument("--micro-batch-size", type=int, default=384, help="rows per micro-batch, over all devices")
  parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the local processes")
  args = parser.parse_args(argv)
  explicit = (args.coordinator, args.num_processes, args.process_id)
  if args.auto and any(v is not None for v in explicit):
    parser.error(
      "--auto finds the coordinator and the processes itself: drop --coordinator/--num-processes/--process-id"
    )
  if any(v is not None for v in explicit) and None in explicit:
    parser.error("a process of a job needs all of --coordinator, --num-processes and --process-id (or --auto)")
  if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
    parser.error(f"--process-id must be in 0 .. {args.num_processes - 1}, got {args.process_id}")
  for name in ("steps", "micro_batch_size"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  if args.cpu_devices < 0:
    parser.error(f"--cpu-devices must be >= 0, got {args.cpu_devices}")
  return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
  args = parse_args(argv)
  if args.auto or args.coordinator is not None:
    try:
      run_process(args)
    except BaseException:
      # Exit at once: a clean exit would wait in jax.distributed's shutdown for the other processes,
      # which wait for this one in their next collective.
      import traceback

      traceback.print_exc()
      sys.stdout.flush()
      os._exit(1)
    return None
  try:
    jax.config.update("jax_platforms", "cpu")  # the reference run uses the CPU devices, as the processes do
    jax.config.update("jax_num_cpu_devices", 8)
  except RuntimeError:
    pass  # JAX has started already (a caller used it): the devices it has must do
  if jax.default_backend() != "cpu" or jax.device_count() != 8:
    raise SystemExit(f"the comparison needs 8 CPU devices in this process, JAX has {jax.devices()}: run it fresh.")
  return run_locally(args)


if __name__ == "__main__":
  main()
