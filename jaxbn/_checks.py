"""Trace-time argument checks shared by the public functions.

Every message names the public call, the argument, what was expected and what arrived, so a user
reading a traceback knows which line of theirs to change.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def feature_axes(fn: str, ndim: int, axis: int | Sequence[int], *, arg: str = "axis") -> tuple[int, ...]:
  """Normalizes ``axis`` (the feature axes) to sorted non-negative ints."""
  axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
  if not axes:
    raise ValueError(f"{fn}: {arg} must name at least one feature axis, got {axis!r}.")
  out = []
  for a in axes:
    if not isinstance(a, (int, np.integer)):
      raise TypeError(f"{fn}: {arg} must be an int or a sequence of ints, got {axis!r}.")
    if not -ndim <= a < ndim:
      raise ValueError(
        f"{fn}: {arg}={axis!r} is out of range for an input with {ndim} dimensions "
        f"(valid axes are {-ndim}..{ndim - 1})."
      )
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"{fn}: {arg}={axis!r} names the same axis more than once.")
  return tuple(sorted(out))


def floating_input(fn: str, x: Any, *, arg: str = "x") -> jax.Array:
  """Returns ``x`` as an array, rejecting non-floating dtypes."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
      f"{fn}: {arg} must have a real floating dtype (float16, bfloat16, float32 or float64), "
      f"got {x.dtype}. Cast it first, e.g. {arg}.astype(jnp.float32)."
    )
  return x


def stats_dtype(dtype: Any) -> jnp.dtype:
  """The dtype statistics accumulate in: float64 for float64 input, float32 otherwise."""
  return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def mask_for(fn: str, mask: Any, shape: tuple[int, ...]) -> jax.Array | None:
  """Checks that ``mask`` is boolean and broadcastable to ``shape``."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(
      f"{fn}: mask must be a boolean array (True marks valid elements), got dtype {mask.dtype}. "
      "Use mask=(m != 0) for a 0/1 mask."
    )
  try:
    np.broadcast_shapes(mask.shape, shape)
    if mask.ndim > len(shape) or np.broadcast_shapes(mask.shape, shape) != tuple(shape):
      raise ValueError
  except ValueError:
    raise ValueError(f"{fn}: mask of shape {mask.shape} is not broadcastable to x of shape {tuple(shape)}.") from None
  return mask


def feature_array(fn: str, arg: str, value: Any, feature_shape: tuple[int, ...]) -> jax.Array | None:
  """Checks a per-feature array (scale, bias, a state field) against the feature shape."""
  if value is None:
    return None
  value = jnp.asarray(value)
  if value.shape != feature_shape:
    raise ValueError(
      f"{fn}: {arg} must have the feature shape {feature_shape} (the sizes of x along `axis`), got shape {value.shape}."
    )
  return value


def concrete_number(value: Any) -> float | None:
  """The Python value of ``value`` when known at trace time, else None."""
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def in_range(fn: str, arg: str, value: Any, lo: float, hi: float) -> None:
  v = concrete_number(value)
  if v is not None and not lo <= v <= hi:
    raise ValueError(f"{fn}: {arg} must be in [{lo:g}, {hi:g}], got {v!r}.")


def positive(fn: str, arg: str, value: Any) -> None:
  v = concrete_number(value)
  if v is not None and not v > 0:
    raise ValueError(f"{fn}: {arg} must be > 0, got {v!r}.")


def unbound_axis(fn: str, axis_name: Hashable, err: Exception) -> ValueError:
  return ValueError(
    f"{fn}: axis_name={axis_name!r} is not bound here ({err}). Consider one of the following options:\n"
    f"  1. call it inside jax.shard_map(..., mesh=mesh), jax.pmap(..., axis_name={axis_name!r}) or "
    f"jax.vmap(..., axis_name={axis_name!r}) whose axis is named {axis_name!r};\n"
    "  2. under jax.jit with sharded inputs, pass axis_name=None: XLA then computes statistics over "
    "the global batch."
  )
