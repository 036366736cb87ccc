"""Checkpoints of a whole ``TrainState`` with Orbax: saved once on disk, restored bit for bit."""

from __future__ import annotations

import os
from typing import Any

import jax

from jaxbn.training.state import TrainState


def _orbax() -> Any:
  try:
    import orbax.checkpoint as ocp
  except ImportError as err:
    raise ImportError(
      "jaxbn.training checkpoints need Orbax: pip install 'jaxbn[checkpoint]' (or orbax-checkpoint)."
    ) from err
  return ocp


def _location(fn: str, path: Any) -> str:
  """``path`` as Orbax takes it: a local path made absolute, a URL (``gs://bucket/dir``) as given."""
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"{fn}: path must be a str or os.PathLike directory path, got {type(path).__name__}.")
  text = os.fspath(path)
  if not isinstance(text, str):
    raise TypeError(f"{fn}: path must be a str or os.PathLike directory path, got bytes {text!r}.")
  # abspath would turn "gs://b/c" into "<cwd>/gs:/b/c"; hosts without a shared disk (TPU VMs) use buckets.
  return text if "://" in text else os.path.abspath(text)


def save_checkpoint(path: str, state: TrainState) -> None:
  """Saves the whole ``TrainState`` (params, batch statistics, optimizer state, counters) with Orbax.

  ``path`` must not exist yet; the call returns once the checkpoint is on disk.

  With several processes (``jax.distributed``), every process calls it with the same ``path``, on
  a file system every host reaches (a shared disk, or a bucket: ``gs://bucket/run/step_100``), and
  Orbax writes each array once.

  Args:
    path: a directory path that does not exist yet: local, or a URL Orbax writes to (``gs://...``).
    state: the state to save.

  Raises:
    ImportError: Orbax is not installed (``pip install 'jaxbn[checkpoint]'``).
    TypeError: ``path`` is not a path, or ``state`` not a ``TrainState``.
  """
  fn = "jaxbn.training.save_checkpoint"
  location = _location(fn, path)
  if not isinstance(state, TrainState):
    raise TypeError(f"{fn}: state must be a jaxbn.training.TrainState, got {type(state).__name__}.")
  ocp = _orbax()

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(location, state)
  checkpointer.wait_until_finished()


def restore_checkpoint(path: str, like: TrainState) -> TrainState:
  """Restores a ``TrainState`` saved by :func:`save_checkpoint`.

  Args:
    path: the checkpoint's directory (local, or a URL such as ``gs://...``).
    like: a state with the same structure, shapes and dtypes (e.g. a fresh ``TrainState.create``);
      its values are not used, its shardings are.

  Returns:
    The saved state, bit for bit, with the tree structure (NamedTuples included) of ``like``.

  Raises:
    TypeError: ``path`` is not a path.
    ValueError: no checkpoint directory at ``path``.
  """
  fn = "jaxbn.training.restore_checkpoint"
  location = _location(fn, path)
  ocp = _orbax()
  from etils import epath  # Orbax's own path library: local directories and buckets alike

  if not epath.Path(location).is_dir():
    raise ValueError(f"{fn}: path {location!r} holds no checkpoint (no such directory).")
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  restored = ocp.StandardCheckpointer().restore(location, target)
  return jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(restored))
