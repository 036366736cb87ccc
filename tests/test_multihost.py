"""Two processes x 4 CPU devices (jax.distributed over gloo) give what 1 process x 8 devices gives.

The test starts two copies of tests/_multihost_worker.py on 127.0.0.1 with a free port, waits for
them within a time limit, and kills whatever is left in any case. Each runs one training step
(dense layer, synced batch norm with uneven masks, SGD) on the global mesh of 8 devices, with
``jax.jit`` on sharded inputs and with ``jaxbn.parallel.batch_map`` + ``axis_name``; the results
must match this process's 8-device run and a one-device run of the global batch.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import _multihost_worker as worker
import jax
import numpy as np
import pytest
from _deadlines import scaled

pytestmark = pytest.mark.slow  # subprocesses or whole scripts: CI runs them; -m 'not slow' skips them

WORKER = Path(__file__).with_name("_multihost_worker.py")
TIMEOUT_S = 120  # on an idle machine; stretched with its load (tests/_deadlines.py)
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(tmp_path: Path, num_processes: int = 2) -> dict[str, np.ndarray]:
  for attempt in range(2):
    try:
      return _run_workers_once(tmp_path / f"attempt{attempt}", num_processes)
    except _PortTaken:  # another program took the free port between our probe and the coordinator
      continue
  pytest.fail("multi-process workers could not bind a coordinator port twice in a row")


class _PortTaken(Exception):
  pass


def _run_workers_once(tmp_path: Path, num_processes: int) -> dict[str, np.ndarray]:
  tmp_path.mkdir()
  out = tmp_path / "multihost.npz"
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
            [sys.executable, str(WORKER), str(i), str(num_processes), str(port), str(out)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
          )
        )
    deadline = time.monotonic() + timeout
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
  with np.load(out) as results:
    return dict(results)


def test_two_processes_match_one_process_with_eight_devices(tmp_path):
  multi = _run_workers(tmp_path)
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
