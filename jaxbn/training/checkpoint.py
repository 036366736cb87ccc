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


def _check_path(fn: str, path: Any) -> None:
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"{fn}: path must be a str or os.PathLike directory path, got {type(path).__name__}.")


def save_checkpoint(path: str, state: TrainState) -> None:
  """Saves the whole ``TrainState`` (params, batch statistics, optimizer state, counters) with Orbax.

  ``path`` must not exist yet; the call returns once the checkpoint is on disk.

  Args:
    path: a directory path that does not exist yet.
    state: the state to save.

  Raises:
    ImportError: Orbax is not installed (``pip install 'jaxbn[checkpoint]'``).
    TypeError: ``path`` is not a path, or ``state`` not a ``TrainState``.
  """
  fn = "jaxbn.training.save_checkpoint"
  _check_path(fn, path)
  if not isinstance(state, TrainState):
    raise TypeError(f"{fn}: state must be a jaxbn.training.TrainState, got {type(state).__name__}.")
  ocp = _orbax()

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path), state)
  checkpointer.wait_until_finished()


def restore_checkpoint(path: str, like: TrainState) -> TrainState:
  """Restores a ``TrainState`` saved by :func:`save_checkpoint`.

  Args:
    path: the checkpoint's directory.
    like: a state with the same structure, shapes and dtypes (e.g. a fresh ``TrainState.create``);
      its values are not used, its shardings are.

  Returns:
    The saved state, bit for bit, with the tree structure (NamedTuples included) of ``like``.

  Raises:
    TypeError: ``path`` is not a path.
    ValueError: no checkpoint directory at ``path``.
  """
  fn = "jaxbn.training.restore_checkpoint"
  _check_path(fn, path)
  if not os.path.isdir(path):
    raise ValueError(f"{fn}: path {os.fspath(path)!r} holds no checkpoint (no such directory).")
  ocp = _orbax()

  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  restored = ocp.StandardCheckpointer().restore(os.path.abspath(path), target)
  return jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(restored))
