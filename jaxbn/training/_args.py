"""Argument checks shared by the public functions of :mod:`jaxbn.training`, run once at the public edge."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxbn import _checks


def positive_int_or_none(fn: str, arg: str, value: Any) -> int | None:
  """``value`` as a Python int (NumPy integers accepted, bools refused), or None."""
  if value is None:
    return None
  if not _checks.is_int(value) or value <= 0:
    raise ValueError(f"{fn}: {arg} must be a positive int or None, got {value!r}.")
  return int(value)


def check_optimizer(fn: str, optimizer: Any) -> None:
  """Refuses an ``optimizer`` that is no Optax transformation (no ``init`` and ``update``)."""
  if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
    raise TypeError(
      f"{fn}: optimizer must be an optax.GradientTransformation (with init and update), e.g. optax.sgd(0.1), "
      f"got {optimizer!r}."
    )


def check_bn_mode(fn: str, bn_mode: Any) -> None:
  """Refuses a ``bn_mode`` other than ``"ghost"`` and ``"exact"``."""
  if bn_mode not in ("ghost", "exact"):
    raise ValueError(f"{fn}: bn_mode must be 'ghost' or 'exact', got {bn_mode!r}.")


def iterations_and_method(fn: str, arg: str, num_iters: Any, method: str = "lanczos") -> None:
  """Checks the Lanczos (or power) options of a sharpness estimate where they are given."""
  if not _checks.is_int(num_iters) or num_iters < 1:
    raise ValueError(f"{fn}: {arg} must be a positive int (Hessian-vector products per estimate), got {num_iters!r}.")
  if method not in ("lanczos", "power"):
    raise ValueError(f"{fn}: method must be 'lanczos' or 'power', got {method!r}.")


def num_rows(fn: str, data: Any) -> int:
  """The number of rows (examples) of ``data``: the leading dimension every leaf shares."""
  leaves = jax.tree.leaves(data)
  if not leaves:
    raise ValueError(f"{fn}: data must be a non-empty pytree of arrays with a leading example axis.")
  sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) else -1 for leaf in leaves}
  if len(sizes) != 1 or -1 in sizes:
    raise ValueError(
      f"{fn}: every leaf of data must have the same leading (example) dimension, got sizes {sorted(sizes)}."
    )
  n = sizes.pop()
  if n == 0:
    raise ValueError(
      f"{fn}: data has no rows (every leaf's leading dimension is 0); a full-batch step needs at least one. "
      "With several processes, build the global batch with jaxbn.parallel.global_batch, which names a process "
      "that holds no rows."
    )
  return n
