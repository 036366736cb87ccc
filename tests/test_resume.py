"""Training that survives a kill: ``examples/full_batch_mnist1d.py`` checkpoints, resumes and starts over.

The first test runs the example three times in subprocesses (tiny sizes, 40 steps, a checkpoint every
10): once straight through; once SIGKILLed at step 25, after the checkpoints of steps 10 and 20; then
the same command again, which resumes from step 20 and must write the straight run's ``metrics.csv``
byte for byte and end with a bitwise equal state (parameters, optimizer and clip state, batch
statistics, counters, metrics). The second, in-process, truncates the newest checkpoint, refuses other
flags and starts over with ``--fresh``.
"""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from _deadlines import scaled
from test_examples import EXAMPLES, _load

# A learning rate high enough for clip_by_running_norm (z-score 1) to act after its 25-step warm-up,
# so that its restored statistics decide something (here it rescales step 37).
TINY = "--steps 40 --lr 2 --spike-z 1 --train-examples 400 --channels 8 --eval-every 5".split()
COMMAND = [sys.executable, str(EXAMPLES / "full_batch_mnist1d.py"), *TINY, "--checkpoint-every", "10", "--no-progress"]
HOLD = ["--hold-after-step", "25"]  # the example's test-only flag: sleep after step 25 until killed
# Every run, killed or not, is the same plain single-device CPU process, whatever the test process has.
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def _start(out: pathlib.Path, *extra: str) -> tuple[subprocess.Popen, pathlib.Path]:
  """Starts the example writing to ``out``; its stdout and stderr go to ``out.log``."""
  log = out.with_suffix(".log")
  with open(log, "w") as f:
    proc = subprocess.Popen([*COMMAND, "--out", str(out), *extra], stdout=f, stderr=subprocess.STDOUT, env=ENV)
  return proc, log


def _finish(proc: subprocess.Popen, log: pathlib.Path) -> str:
  """Waits for a run that must succeed; returns its output."""
  assert proc.wait(timeout=scaled(300)) == 0, log.read_text()
  return log.read_text()


def _run(out: pathlib.Path) -> str:
  return _finish(*_start(out))


def _kill_when_holding(proc: subprocess.Popen, log: pathlib.Path, timeout: float = 240.0) -> str:
  """SIGKILLs the run once it says it holds after step 25 (it sleeps there, so there is no race)."""
  deadline = time.monotonic() + scaled(timeout)
  while "holding after step 25" not in log.read_text():
    assert proc.poll() is None, f"the run ended before step 25 (exit {proc.returncode}):\n{log.read_text()}"
    assert time.monotonic() < deadline, f"no 'holding after step 25' within {timeout} s:\n{log.read_text()}"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=scaled(60)) == -signal.SIGKILL
  return log.read_text()


def _final_state(out: pathlib.Path) -> list[np.ndarray]:
  """The leaves of the whole saved state (training state and metrics) of the newest checkpoint."""
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.restore((out / "checkpoints" / str(_steps(out)[-1]) / "state").resolve())
  return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def _steps(out: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def _assert_same_run(out: pathlib.Path, reference: pathlib.Path) -> None:
  assert (out / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()
  got, want = _final_state(out), _final_state(reference)
  assert len(got) == len(want) > 10
  for a, b in zip(got, want, strict=True):
    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.slow
def test_killed_run_resumes_bitwise(tmp_path):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  reference = _start(straight)  # concurrently with the run to kill
  printed = _kill_when_holding(*_start(killed, *HOLD))
  _finish(*reference)
  assert "resuming" not in printed
  assert _steps(killed) == [10, 20]
  assert _steps(straight) == [20, 30, 40]  # the newest 3 kept

  # The same command again (without the test-only hold) resumes from the newest checkpoint.
  printed = _run(killed)
  assert "resuming from the checkpoint of step 20 of 40" in printed, printed
  _assert_same_run(killed, straight)


@pytest.fixture(scope="module")
def full_batch():
  return _load("full_batch_mnist1d")


@pytest.mark.slow
def test_corrupt_checkpoint_falls_back_other_flags_are_refused_fresh_starts_over(full_batch, tmp_path, capsys):
  # In one process (the runs are compared with each other only): a run of 6 steps, a checkpoint every 2.
  run, reference = tmp_path / "run", tmp_path / "reference"
  args = ["--steps", "6", "--train-examples", "400", "--channels", "8", "--checkpoint-every", "2", "--no-progress"]
  first = full_batch.main([*args, "--out", str(run)])
  assert _steps(run) == [2, 4, 6] and first["resumed_from_step"] == 0
  shutil.copytree(run, reference)

  # A truncated newest checkpoint: the run says so, sets it aside and resumes from the one before.
  data = [p for p in (run / "checkpoints" / "6" / "state" / "d").iterdir() if p.is_file()]
  assert data
  for p in data:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
  capsys.readouterr()
  again = full_batch.main([*args, "--out", str(run)])
  printed = capsys.readouterr().out
  assert "the checkpoint of step 6" in printed and "cannot be restored" in printed, printed
  assert "resuming from the checkpoint of step 4 of 6" in printed, printed
  assert (run / "checkpoints_unreadable" / "6").is_dir()  # set aside, not deleted
  assert again["resumed_from_step"] == 4 and again["history"] == first["history"]
  _assert_same_run(run, reference)

  # Other settings are refused, naming them; --checkpoint-every 0 neither reads nor writes checkpoints;
  # --fresh deletes them and starts from the initial state. The last two through resume alone, the
  # function main opens the checkpoints with, as they decide before any step.
  with pytest.raises(ValueError, match=r"--steps 6; this run has --steps 8\. .*--fresh"):
    full_batch.main([*args, "--steps", "8", "--out", str(run)])
  checkpoints, done, state, log = full_batch.resume(
    full_batch.parse_args([*args, "--checkpoint-every", "0"]), run, None
  )
  assert checkpoints is None and done == 0 and state is None and not log["evaluated"].any()
  assert _steps(run) == [2, 4, 6]

  capsys.readouterr()
  checkpoints, done, state, log = full_batch.resume(
    full_batch.parse_args([*args, "--steps", "8", "--fresh"]), run, None
  )
  checkpoints.close()
  assert "--fresh: deleted the checkpoints" in capsys.readouterr().out
  assert done == 0 and state is None and log["loss"].shape == (8,) and not log["evaluated"].any()
  assert _steps(run) == []
