"""Checkpoints: 10 steps straight equal 5 steps, save, restore in a new process, 5 more steps, bitwise."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
from _training_setup import build

import jaxbn

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_restore_in_a_new_process_continues_bitwise(tmp_path):
  step, state, data = build()
  for _ in range(5):
    state, _ = step(state, data)
  jaxbn.training.save_checkpoint(str(tmp_path / "ckpt"), state)
  restored = jaxbn.training.restore_checkpoint(str(tmp_path / "ckpt"), build()[1])
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  straight = state
  for _ in range(5):
    straight, _ = step(straight, data)

  out = tmp_path / "resumed.npz"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  subprocess.run(
    [sys.executable, str(ROOT / "tests" / "_checkpoint_worker.py"), str(tmp_path / "ckpt"), "5", str(out)],
    cwd=ROOT,
    env=env,
    check=True,
    timeout=240,
  )
  resumed = np.load(out)
  leaves = jax.tree.leaves(straight)
  assert len(resumed.files) == len(leaves)
  for i, leaf in enumerate(leaves):
    np.testing.assert_array_equal(resumed[f"arr_{i}"], np.asarray(leaf))
