"""Trace-time argument checks shared by the public functions.

Every message names the public call, the argument, what was expected and what arrived, so a user
reading a traceback knows which line of theirs to change.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Literal, TypeGuard, overload

import jax
import jax.core
import jax.numpy as jnp
import numpy as np


def is_int(value: Any) -> TypeGuard[int | np.integer]:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def feature_axes(fn: str, ndim: int, axis: int | Sequence[int], *, arg: str = "axis") -> tuple[int, ...]:
  """Normalizes ``axis`` (the feature axes) to sorted non-negative ints."""
  if is_int(axis):
    axes = (axis,)
  elif isinstance(axis, (Sequence, np.ndarray)) and not isinstance(axis, (str, bytes)):
    axes = tuple(axis)
  else:
    raise TypeError(f"{fn}: {arg} must be an int or a sequence of ints (the feature axes), got {axis!r}.")
  if not axes:
    raise ValueError(f"{fn}: {arg} must name at least one feature axis, got {axis!r}.")
  out = []
  for a in axes:
    if not is_int(a):
      raise TypeError(f"{fn}: {arg} must be an int or a sequence of ints (the feature axes), got {axis!r}.")
    if not -ndim <= a < ndim:
      raise ValueError(
        f"{fn}: {arg}={axis!r} is out of range for an input with {ndim} dimensions "
        f"(valid axes are {-ndim}..{ndim - 1})."
      )
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"{fn}: {arg}={axis!r} names the same axis more than once.")
  return tuple(sorted(out))


def _show(value: Any) -> str:
  """A short repr for messages."""
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + "..."


def as_array(fn: str, arg: str, value: Any) -> jax.Array:
  """``value`` as a JAX array; what JAX cannot hold (None, a string, an object) is a TypeError naming ``arg``."""
  if value is None or isinstance(value, (str, bytes)):
    raise TypeError(f"{fn}: {arg} must be an array, got {_show(value)}.")
  try:
    return jnp.asarray(value)
  except (TypeError, ValueError) as err:
    raise TypeError(f"{fn}: {arg} must be an array, got {type(value).__name__} ({err}).") from None


def floating_input(fn: str, x: Any, *, arg: str = "x") -> jax.Array:
  """Returns ``x`` as an array, rejecting non-floating dtypes."""
  x = as_array(fn, arg, x)
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
  mask = as_array(fn, "mask", mask)
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
  value = as_array(fn, arg, value)
  if value.shape != feature_shape:
    raise ValueError(
      f"{fn}: {arg} must have the feature shape {feature_shape} (the sizes of x along `axis`), got shape {value.shape}."
    )
  return value


def concrete_number(value: Any) -> float | None:
  """The Python value of ``value`` when known at trace time, else None."""
  try:
    return float(value)
  except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
    return None


def _values(fn: str, arg: str, value: Any) -> np.ndarray | None:
  """A real hyperparameter's values (float64) when known at trace time, None when traced.

  Anything that is no real number or array of them (None, a string, a bool, an object) is a
  TypeError, traced or not.
  """
  dtype = getattr(value, "dtype", None) if isinstance(value, (jax.Array, np.ndarray, np.generic)) else None
  if isinstance(value, (bool, np.bool_)) or (
    dtype is None and not isinstance(value, (int, float, np.integer, np.floating))
  ):
    raise TypeError(f"{fn}: {arg} must be a number, got {_show(value)}.")
  if dtype is not None and not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
    raise TypeError(f"{fn}: {arg} must be a number, got an array of dtype {dtype}.")
  if isinstance(value, jax.core.Tracer):
    return None
  return np.asarray(value).astype(np.float64)


def _values_text(v: np.ndarray) -> str:
  """A scalar as Python's float repr (``nan``, ``-1e-05``), an array in short form."""
  return repr(float(v)) if v.ndim == 0 else np.array2string(v, threshold=8)


def in_range(fn: str, arg: str, value: Any, lo: float, hi: float, *, hi_open: bool = False) -> None:
  """Checks ``lo <= value <= hi`` (``< hi`` with ``hi_open``), elementwise, when known at trace time."""
  v = _values(fn, arg, value)
  if v is not None and not np.all((lo <= v) & ((v < hi) if hi_open else (v <= hi))):
    raise ValueError(f"{fn}: {arg} must be in [{lo:g}, {hi:g}{')' if hi_open else ']'}, got {_values_text(v)}.")


def positive(fn: str, arg: str, value: Any, *, finite: bool = False) -> None:
  """Checks ``value > 0`` (and finite, with ``finite=True``) when it is known at trace time."""
  v = _values(fn, arg, value)
  if v is not None and not np.all(v > 0):
    raise ValueError(f"{fn}: {arg} must be > 0, got {_values_text(v)}.")
  if finite and v is not None and not np.all(np.isfinite(v)):
    raise ValueError(f"{fn}: {arg} must be finite and > 0, got {_values_text(v)}.")


def at_least(fn: str, arg: str, value: Any, lo: float) -> None:
  """Checks ``value >= lo`` (which fails for NaN) when it is known at trace time."""
  v = _values(fn, arg, value)
  if v is not None and not np.all(v >= lo):
    raise ValueError(f"{fn}: {arg} must be >= {lo:g}, got {_values_text(v)}.")


def finite(fn: str, arg: str, value: Any) -> None:
  """Checks that ``value`` is a finite real number (or array of them) when it is known at trace time."""
  v = _values(fn, arg, value)
  if v is not None and not np.all(np.isfinite(v)):
    raise ValueError(f"{fn}: {arg} must be finite, got {_values_text(v)}.")


def callable_arg(fn: str, arg: str, value: Any) -> None:
  """Checks that ``value`` (a function argument: a gradient function, a loss) is callable."""
  if not callable(value):
    raise TypeError(f"{fn}: {arg} must be callable, got {_show(value)}.")


def mapping(fn: str, arg: str, value: Any) -> Mapping:
  """``value``, which must be a mapping (Flax variables, a statistics dict)."""
  if not isinstance(value, Mapping):
    raise TypeError(f"{fn}: {arg} must be a mapping (e.g. a dict of Flax variables), got {type(value).__name__}.")
  return value


def stats(fn: str, value: Any, *, arg: str = "stats") -> tuple[jax.Array, jax.Array, jax.Array]:
  """``value`` (a :class:`jaxbn.Stats` or a tuple ``(count, mean, m2)``) as the tuple of its three arrays.

  The caller makes the ``Stats``: this ground-floor module imports nothing of jaxbn.
  """
  if not isinstance(value, tuple) or len(value) != 3:
    raise TypeError(f"{fn}: {arg} must be a jaxbn.Stats (count, mean, m2), got {_show(value)}.")
  count, mean, m2 = (as_array(fn, f"{arg}.{name}", v) for name, v in zip(("count", "mean", "m2"), value))
  return count, mean, m2


def call_kwargs(fn: str, call: Callable[..., Any], kwargs: Mapping[str, Any], what: str) -> None:
  """Checks that ``call`` (a model's ``__call__``) accepts the keyword arguments passed on to it."""
  try:
    signature = inspect.signature(call)
  except (TypeError, ValueError):  # no signature to read: the call itself will tell
    return
  try:
    signature.bind_partial(**kwargs)
  except TypeError as err:
    raise TypeError(
      f"{fn}: the keyword arguments {sorted(kwargs)} are passed to {what}, which refuses them: {err}."
    ) from None


@overload
def static_bool(fn: str, arg: str, value: Any, *, allow_none: Literal[False] = False) -> bool: ...
@overload
def static_bool(fn: str, arg: str, value: Any, *, allow_none: bool) -> bool | None: ...
def static_bool(fn: str, arg: str, value: Any, *, allow_none: bool = False) -> bool | None:
  """A Python bool (or None with ``allow_none``) that selects code at trace time."""
  if value is None and allow_none:
    return None
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  expected = "None, True or False" if allow_none else "a Python bool (True or False)"
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
      f"{fn}: {arg} must be {expected} known at trace time, got a traced value ({value.aval}). "
      "Consider one of the following options:\n"
      f"  1. mark it static: jax.jit(f, static_argnames=({arg!r},)) (or static_argnums);\n"
      f"  2. pass a Python bool, not a jax.Array;\n"
      f"  3. to choose at run time, call both branches under jax.lax.cond."
    )
  raise TypeError(f"{fn}: {arg} must be {expected}, got {value!r}.")


@overload
def floating_dtype(fn: str, arg: str, dtype: Any, *, allow_none: Literal[False]) -> jnp.dtype: ...
@overload
def floating_dtype(fn: str, arg: str, dtype: Any, *, allow_none: bool = True) -> jnp.dtype | None: ...
def floating_dtype(fn: str, arg: str, dtype: Any, *, allow_none: bool = True) -> jnp.dtype | None:
  """``dtype`` as a NumPy dtype, which must be a real floating one (None passes through with ``allow_none``)."""
  if dtype is None and allow_none:
    return None
  try:
    d = None if dtype is None else jnp.dtype(dtype)
  except TypeError:
    d = None
  if d is None or not jnp.issubdtype(d, jnp.floating):
    expected = "None or a real floating dtype" if allow_none else "a real floating dtype"
    raise TypeError(f"{fn}: {arg} must be {expected} (float16, bfloat16, float32 or float64), got {dtype!r}.")
  return d


def state_count(fn: str, count: Any, feature_shape: tuple[int, ...], *, arg: str = "state.count") -> jax.Array:
  """A state's batch count as an array: a scalar, or one count per feature (the feature shape).

  Python and NumPy scalars become int32 (the layout of :func:`jaxbn.init_state`).
  """
  if isinstance(count, (bool, np.bool_)) or count is None or isinstance(count, (str, bytes)):
    raise TypeError(f"{fn}: {arg} must be an integer count of batches, got {count!r}.")
  if isinstance(count, (int, np.integer)):
    return jnp.asarray(count, jnp.int32)
  try:
    count = jnp.asarray(count)
  except TypeError:
    raise TypeError(f"{fn}: {arg} must be an integer count of batches, got {type(count).__name__}.") from None
  if not (jnp.issubdtype(count.dtype, jnp.integer) or jnp.issubdtype(count.dtype, jnp.floating)):
    raise TypeError(f"{fn}: {arg} must be an integer count of batches, got dtype {count.dtype}.")
  if count.shape not in ((), tuple(feature_shape)):
    raise ValueError(
      f"{fn}: {arg} must be a scalar (one count for all features) or have the feature shape {tuple(feature_shape)} "
      f"(one count per feature, see jaxbn.init_state(..., per_feature_count=True)), got shape {count.shape}."
    )
  return count


def unbound_axis(fn: str, axis_name: Hashable, err: Exception) -> ValueError:
  return ValueError(
    f"{fn}: axis_name={axis_name!r} is not bound here ({err}). Consider one of the following options:\n"
    f"  1. call it inside jax.shard_map(..., mesh=mesh), jax.pmap(..., axis_name={axis_name!r}) or "
    f"jax.vmap(..., axis_name={axis_name!r}) whose axis is named {axis_name!r};\n"
    "  2. under jax.jit with sharded inputs, pass axis_name=None: XLA then computes statistics over "
    "the global batch."
  )


def leading_rows(fn: str, x: jax.Array, row_mask: jax.Array, where: str) -> None:
  """A micro-batch's row mask must match the leading axis of a batch norm's input."""
  if x.ndim == 0 or x.shape[0] != row_mask.shape[0]:
    raise ValueError(
      f"{fn}: {where} gets an input of shape {x.shape}, whose leading axis is not the micro-batch's "
      f"{row_mask.shape[0]} rows, so the mask of the rows the last micro-batch re-reads cannot be applied "
      "(e.g. the layer runs inside a vmap over the rows). Use a micro_batch_size that divides the number of "
      "rows (no mask is needed then), or call the batch norm on the whole micro-batch."
    )
