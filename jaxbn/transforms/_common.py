"""The ground floor of ``jaxbn.transforms``: the prefix of every transform's messages and argument checks.

It imports none of its siblings; they import its names (the only names they share with each other).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

__all__ = ["NAME", "require_params", "static_axis"]

NAME = "jaxbn.transforms"


def static_axis(fn: str, channel_axis: Any) -> int:
  """``channel_axis`` as a Python int (None: -1, the last axis)."""
  if channel_axis is None:
    return -1
  if isinstance(channel_axis, (bool, np.bool_)):
    raise TypeError(f"{fn}: channel_axis must be an int, got {channel_axis!r}.")
  try:
    value = int(channel_axis)
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise TypeError(
      f"{fn}: channel_axis must be an int known at trace time, got {channel_axis!r}. Under "
      "optax.inject_hyperparams pass static_args=('channel_axis',), or leave it None (the last axis)."
    ) from None
  if value != channel_axis:
    raise TypeError(f"{fn}: channel_axis must be an int, got {channel_axis!r}.")
  return value


def require_params(fn: str, params: Any) -> None:
  if params is None:
    raise ValueError(
      f"{fn}: the update needs the current parameters, got params=None. "
      f"Call tx.update(grads, opt_state, params) (nnx.Optimizer does this for you)."
    )
