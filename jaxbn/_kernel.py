"""The normalize kernel: ``(x - mean) * inv_std * scale + bias``, unchecked.

The public :func:`jaxbn.normalize`, the custom-VJP forward of :mod:`jaxbn._fused`, evaluation with the
running statistics and the variants all normalize through :func:`scale_shift`; callers pass checked
values (see :mod:`jaxbn._options`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["bshape", "inv_std", "normalize", "scale_shift"]


def bshape(x_shape: tuple[int, ...], feature_axes: tuple[int, ...]) -> tuple[int, ...]:
  """The shape a per-feature array broadcasts to against an input of ``x_shape``."""
  return tuple(x_shape[a] if a in feature_axes else 1 for a in range(len(x_shape)))


def inv_std(var: jax.Array, count: jax.Array, epsilon: Any) -> jax.Array:
  """Per feature ``rsqrt(var + epsilon)``, and 0 for a feature with no valid element (``count == 0``).

  Such a feature has no statistics (its mean and variance read 0): a zero inverse standard deviation
  normalizes it to 0, so its output is the bias and its gradient is 0 for ``x``, ``scale`` and
  ``epsilon``, where ``rsqrt(0 + epsilon)`` would give ``x / sqrt(epsilon)``.
  """
  inv = lax.rsqrt(var + jnp.asarray(epsilon, var.dtype))
  return jnp.where(count > 0, inv, jnp.zeros((), inv.dtype))


def scale_shift(
  x: jax.Array,
  mean: jax.Array,
  inv: jax.Array,
  scale: jax.Array | None,
  bias: jax.Array | None,
  feature_axes: tuple[int, ...],
  dtype: Any,
) -> jax.Array:
  """``(x - mean) * inv * scale + bias`` in the dtype of ``mean``, cast to ``dtype``; unchecked.

  The per-feature arrays have the feature shape (the sizes of ``x`` along the sorted
  ``feature_axes``); ``inv`` is the inverse standard deviation.
  """
  cdt = mean.dtype
  b = bshape(x.shape, feature_axes)
  mul = inv if scale is None else inv * scale.astype(cdt)
  y = (x.astype(cdt) - mean.reshape(b)) * mul.reshape(b)
  if bias is not None:
    y = y + bias.astype(cdt).reshape(b)
  return y.astype(dtype)


def normalize(
  x: jax.Array,
  mean: jax.Array,
  var: jax.Array,
  scale: jax.Array | None,
  bias: jax.Array | None,
  feature_axes: tuple[int, ...],
  epsilon: Any,
  dtype: Any,
) -> jax.Array:
  """``(x - mean) * rsqrt(var + epsilon) * scale + bias`` with given statistics, in ``mean``'s dtype; unchecked.

  ``epsilon`` takes the real dtype of ``mean`` (the real part's for a complex mean).
  """
  inv = lax.rsqrt(var + jnp.asarray(epsilon, jnp.finfo(mean.dtype).dtype))
  return scale_shift(x, mean, inv, scale, bias, feature_axes, dtype)
