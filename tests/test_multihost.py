"""Two processes x 4 CPU devices (jax.distributed over gloo) give what 1 process x 8 devices gives.

Each test starts two copies of a worker on 127.0.0.1 with a free port, waits for them within a time
limit, and kills whatever is left in any case. tests/_multihost_worker.py runs one training step
(dense layer, synced batch norm with uneven masks, SGD) on the global mesh of 8 devices, with
``jax.jit`` on sharded inputs and with ``jaxbn.parallel.batch_map`` + ``axis_name``; the results
must match this process's 8-device run and a one-device run of the global batch.
tests/_multihost_step_worker.py runs ``jaxbn.training.full_batch_step`` with each process holding
only its own rows, in ghost and exact modes on both loops, through the guard and a checkpoint.
"""

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _multihost_step_worker as step_worker
import _multihost_worker as worker
import jax
import numpy as np
import pytest
from _deadlines import scaled

pytestmark = pytest.mark.slow  # subprocesses or whole scripts: CI runs them; -m 'not slow' skips them

WORKER = Path(__file__).with_name("_multihost_worker.py")
STEP_WORKER = Path(__file__).with_name("_multihost_step_worker.py")
TIMEOUT_S = 120  # on an idle machine; stretched with its load (tests/_deadlines.py)
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(
  tmp_path: Path,
  script: Path = WORKER,
  out: str = "multihost.npz",
  meanwhile: Callable[[], Any] | None = None,
  num_processes: int = 2,
) -> tuple[Path, Any]:
  """Runs ``script PROCESS_ID NUM_PROCESSES PORT FOLDER/out`` in every process.

  ``meanwhile()`` runs here while the workers do (once, also when they must be restarted), filling
  the cores while the workers wait on each other. Returns the FOLDER the workers wrote into and what
  ``meanwhile`` returned.
  """
  done = []

  def run_meanwhile() -> None:
    if meanwhile is not None and not done:
      done.append(meanwhile())

  for attempt in range(2):
    folder = tmp_path / f"attempt{attempt}"
    try:
      _run_workers_once(folder, script, out, num_processes, run_meanwhile)
      return folder, done[0] if done else None
    except _PortTaken:  # another program took the free port between our probe and the coordinator
      continue
  pytest.fail("multi-process workers could not bind a coordinator port twice in a row")


class _PortTaken(Exception):
  pass


def _run_workers_once(
  tmp_path: Path, script: Path, out: str, num_processes: int, meanwhile: Callable[[], None]
) -> None:
  tmp_path.mkdir()
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(WORKER.parent.parent), env.get("PYTHONPATH")) if p)
  logs = [tmp_path / f"worker{i}.log" for i in range(num_processes)]
  procs = []
  timeout = scaled(TIMEOUT_S)
  env["JAXBN_INIT_TIMEOUT_S"] = str(int(scaled(90)))
  try:
    for i in range(num_processes):
      with open(logs[i], "w") as log:
        procs.append(
          subprocess.Popen(
            [sys.executable, str(script), str(i), str(num_processes), str(port), str(tmp_path / out)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
          )
        )
    deadline = time.monotonic() + timeout
    meanwhile()
    while any(p.poll() is None for p in procs):
      if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait(timeout=30)
  codes = [p.returncode for p in procs]
  if codes != [0] * num_processes:
    if any("already in use" in log.read_text() for log in logs):
      raise _PortTaken
    tails = "\n".join(f"--- worker {i} (exit {c}) ---\n{logs[i].read_text()[-3000:]}" for i, c in enumerate(codes))
    pytest.fail(f"multi-process workers failed or timed out after {timeout:.0f} s:\n{tails}")


def _load(path: Path) -> dict[str, np.ndarray]:
  with np.load(path) as results:
    return dict(results)


def test_two_processes_match_one_process_with_eight_devices(tmp_path):
  multi = _load(_run_workers(tmp_path)[0] / "multihost.npz")
  mesh = jax.make_mesh((8,), ("batch",))
  reference = worker.train_step(None, "jit")  # one device, the global batch
  for style in ("jit", "batch_map"):
    single = worker.train_step(mesh, style)
    for key, want in reference.items():
      np.testing.assert_allclose(single[key], want, **TOL, err_msg=f"1 process x 8 devices, {style}: {key}")
      np.testing.assert_allclose(
        multi[f"{style}/{key}"], want, **TOL, err_msg=f"2 processes x 4 devices, {style}: {key}"
      )
  # jaxbn.training.full_batch_step on data sharded over both processes' devices.
  reference = worker.full_batch_step(None)
  auto = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
  single = worker.full_batch_step(auto)
  for key, want in reference.items():
    np.testing.assert_allclose(single[key], want, **TOL, err_msg=f"full_batch_step, 1 process x 8 devices: {key}")
    np.testing.assert_allclose(multi[f"full_batch/{key}"], want, **TOL, err_msg=f"full_batch_step, 2 x 4: {key}")
  # The step changed what it should: parameters moved, running statistics left their initial values.
  assert np.abs(multi["batch_map/param_kernel"] - worker.problem()["kernel"]).max() > 1e-3
  assert np.abs(multi["batch_map/state_mean"]).max() > 1e-3


def test_full_batch_step_with_each_process_holding_its_own_rows(tmp_path):
  """full_batch_step over 2 processes x 4 devices, each process giving only its own rows, equals 1 x 8.

  Ghost and exact batch norm, each on the host loop and the scanned one (the default); 5
  rows per device, put 3 at a time into micro-batches of 24, so the second micro-batch holds a remainder.
  Per case: a step, a step with an inf in a row only the second process holds (the guard must skip
  it in both processes and change nothing), a checkpoint saved by both processes and restored, and
  two more steps: 3 applied steps. Each process builds the data from its own rows with
  ``jaxbn.parallel.global_batch``, which must refuse, in both processes alike, a process with no
  rows, with fewer rows than the other, or with no device in the mesh.

  Bitwise: the two processes (the same replicated program), the counters and the key, the skipped
  step, the restore, and the running statistics after the first step (all-gathered and merged in
  device order, the same in both runs). Within 1e-6: every float after 3 steps, because the
  gradient's all-reduce sums the 8 devices' partial gradients in device order within one process
  and in gloo's ring order across processes (the last bits of float32 sums differ), and every later
  value inherits that rounding.
  """
  auto = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
  folder, single = _run_workers(
    tmp_path, STEP_WORKER, ".", meanwhile=lambda: step_worker.run_all(auto, str(tmp_path / "single"))
  )
  processes = [_load(folder / f"process{i}.npz") for i in range(2)]
  # Rows no global batch can be made of: every process stops with the same clear error (none waits).
  for case, says in (
    ("no_rows", "process(es) [1] passed no rows in local_data (rows per process: [20, 0])"),
    ("fewer_rows", "the processes passed different numbers of rows in local_data (rows per process: [20, 16])"),
    ("no_device", "process(es) [1] have no device in the mesh"),
  ):
    for i, process in enumerate(processes):
      assert says in str(process.pop(f"refused/{case}")), (case, i)
  assert processes[0].keys() == processes[1].keys() == single.keys()
  for key, want in single.items():
    np.testing.assert_array_equal(processes[1][key], processes[0][key], err_msg=f"process 1 vs process 0: {key}")
    got = processes[0][key]
    if "/first" in key or not np.issubdtype(want.dtype, np.floating):
      np.testing.assert_array_equal(got, want, err_msg=f"2 x 4 vs 1 x 8 devices: {key}")
    else:
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"2 x 4 vs 1 x 8 devices: {key}")
  for loop, bn_mode in step_worker.CASES:
    case = {k.split("/", 2)[2]: v for k, v in processes[0].items() if k.startswith(f"{loop}/{bn_mode}/")}
    assert case["skip_kept_state"] and case["restored_bitwise"], (loop, bn_mode)
    np.testing.assert_array_equal(case["metrics.skipped"], [False, True, False, False])
    assert not np.isfinite(case["metrics.loss"][1]) and np.all(np.isfinite(case["metrics.loss"][[0, 2, 3]]))
    assert (int(case["state.step"]), int(case["state.skipped"])) == (3, 1)
    assert case["metrics.loss"][3] < case["metrics.loss"][0], (loop, bn_mode)  # the steps trained
