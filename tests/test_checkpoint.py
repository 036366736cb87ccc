"""Checkpoints: 10 steps straight equal 5 steps, save, restore in a new process, 5 more steps, bitwise."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
from _deadlines import scaled
from _training_setup import build

import jaxbn

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_restore_in_a_new_process_continues_bitwise(tmp_path):
  step, state, data = build()
  bad = {**data, "x": data["x"].at[7, 2].set(np.nan)}
  spike = {**data, "y": np.zeros_like(data["y"])}  # one label for all: a gradient norm 3x the others
  for batch in (data, data, bad, data, spike):  # the guard skips the third step, the clip the fifth
    state, _ = step(state, batch)
  clip = state.opt_state[0]
  assert (int(state.skipped), int(state.step), int(clip.count), int(clip.num_clipped)) == (1, 4, 4, 1)
  jaxbn.training.save_checkpoint(str(tmp_path / "ckpt"), state)
  # The template differs from the saved state in every leaf (another key too): nothing can come from it.
  like = build()[1]._replace(key=jax.random.key_data(jax.random.key(0)))
  for a, b in zip(jax.tree.leaves(like), jax.tree.leaves(state)):
    assert not np.array_equal(a, b)
  restored = jaxbn.training.restore_checkpoint(str(tmp_path / "ckpt"), like)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(state)):
    assert a.dtype == b.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
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
    timeout=scaled(240),
  )
  resumed = np.load(out)
  leaves = jax.tree.leaves(straight)
  assert len(resumed.files) == len(leaves)
  for i, leaf in enumerate(leaves):
    np.testing.assert_array_equal(resumed[f"arr_{i}"], np.asarray(leaf))


def test_a_bucket_url_reaches_orbax_as_given(monkeypatch):
  """Hosts without a shared disk (TPU VMs) checkpoint into a bucket: a URL must not become a local path."""
  import orbax.checkpoint as ocp
  from etils import epath

  seen = []

  class Recorder:
    def save(self, directory, state):
      seen.append(directory)

    def wait_until_finished(self):
      pass

    def restore(self, directory, target):
      seen.append(directory)
      return target

  monkeypatch.setattr(ocp, "StandardCheckpointer", Recorder)
  monkeypatch.setattr(type(epath.Path("gs://bucket/run")), "is_dir", lambda self: True)
  state = build()[1]
  jaxbn.training.save_checkpoint("gs://bucket/run/step_3", state)
  jaxbn.training.restore_checkpoint("gs://bucket/run/step_3", state)
  jaxbn.training.save_checkpoint("run/step_3", state)
  assert seen == ["gs://bucket/run/step_3", "gs://bucket/run/step_3", os.path.abspath("run/step_3")]
