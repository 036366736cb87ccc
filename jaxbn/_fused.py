"""Training-mode batch norm with a closed-form backward pass (``jax.custom_vjp``).

Forward: one pass over ``x`` for the statistics (one collective across devices), one to normalize.
Backward, with ``xhat = (x - mean) * inv_std`` recomputed from ``x``::

    dbias  = sum(dy)                       dscale = sum(dy * xhat)
    dx     = scale * inv_std * (dy - valid / N * (sum(dy) + xhat * sum(dy * xhat)))
    depsilon = -0.5 * sum over features of scale * inv_std**2 * sum(dy * xhat)

where the sums run over every element (the normalized output of masked elements depends on the
statistics too), ``valid`` is the mask and ``N`` the global count of valid elements per feature.
A feature with no valid element has ``inv_std = 0`` (see :func:`inv_std`): its output is the bias,
and of its gradients only ``dbias`` is nonzero.
Across devices the per-feature sums are reduced in ONE collective (those of ``dy * scale`` as well
where ``scale`` may differ between devices); ``dscale``/``dbias``/``depsilon`` are the local
contributions or their sums over devices, as autodiff of the plain formula gives them under
``pmap``/``shard_map``, with the sharding of the parameter under an Explicit mesh.

Residuals are ``x`` in its storage dtype plus per-feature vectors (mean, inv_std, scale, count), not
a float32 copy of ``xhat``. ``jax.custom_vjp`` has no forward mode; ``batch_norm(fused=None)`` falls
back to the plain formula where ``jax.jvp`` traces it (see :func:`jaxbn._sharding.forward_mode_active` for the cases
it cannot see).

References:
  Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing Internal
  Covariate Shift", 2015 (the gradient formulas).
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import _checks
from jaxbn._kernel import bshape, inv_std, scale_shift
from jaxbn._sharding import same_sharding, varying
from jaxbn.stats import Stats, compute_stats, gather_rows, group_weights

__all__ = ["batch_norm_train"]


def _sums_across(local, axis_name, groups, fn):
  """(sums within each device's group, sums over all devices), in one collective."""
  try:
    if groups is None:
      total = lax.psum(local, axis_name)
      return total, total
  except NameError as err:
    raise _checks.unbound_axis(fn, axis_name, err) from None
  # Rows gathered by a psum are typed as the same on every device, so the all-device total can be
  # returned for an unvarying parameter. lax.axis_size is unbound in a custom_vjp backward under vmap.
  size = sum(len(g) for g in groups)
  gathered = gather_rows(local, axis_name, size=size, fn=fn)
  w = group_weights(fn, axis_name, groups, size)
  return jnp.tensordot(w.astype(local.dtype), gathered, axes=1), jnp.sum(gathered, axis=0)


def _param_cotangent(x, param_varying, local, everywhere, axis_name):
  """The scale/bias cotangent autodiff would produce.

  Under ``jax.shard_map`` a parameter that is the same on every device (not varying over an axis
  the data varies over) gets the sum of all devices' contributions; under ``jax.pmap``/``jax.vmap``,
  or for a per-device parameter, each device keeps its own contribution.
  """
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  summed = tuple(sorted(varying(x) - param_varying, key=str))
  if not summed:
    return local
  if set(summed) == set(names):
    return everywhere
  # The data also varies over mesh axes outside axis_name (statistics per sub-axis of the mesh):
  # the parameter's cotangent sums over those too, at the cost of a second collective.
  return lax.psum(local, summed)


def _forward(x, scale, bias, mask, epsilon, feature_axes, axis_name, groups, out_dtype, fn):
  stats = compute_stats(x, feature_axes, mask=mask, axis_name=axis_name, axis_index_groups=groups, fn=fn)
  inv = inv_std(stats.var, stats.count, epsilon)
  y = scale_shift(x, stats.mean, inv, scale, bias, feature_axes, out_dtype)
  return y, stats, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _bn_train(x, scale, bias, mask, epsilon, feature_axes, axis_name, groups, out_dtype, fn):
  y, stats, _ = _forward(x, scale, bias, mask, epsilon, feature_axes, axis_name, groups, out_dtype, fn)
  return y, stats


def _bn_train_fwd(x, scale, bias, mask, epsilon, feature_axes, axis_name, groups, out_dtype, fn):
  y, stats, inv = _forward(x, scale, bias, mask, epsilon, feature_axes, axis_name, groups, out_dtype, fn)
  return (y, stats), (x, scale, bias, mask, epsilon, stats.count, stats.mean, inv)


def _bn_train_bwd(feature_axes, axis_name, groups, out_dtype, fn, res, cotangents):
  x, scale, bias, mask, epsilon, count, mean, inv = res
  dy, _ = cotangents  # the statistics feed only the (stop-gradient) running average
  cdt = mean.dtype
  b = bshape(x.shape, feature_axes)
  reduce_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  dy = dy.astype(cdt)
  # sum(dy * xhat) as inv * sum(dy * (x + (-mean))): a broadcast of -mean, which no other op
  # broadcasts, so XLA:CPU fuses it into the reduction. A broadcast of the mean would be merged
  # (CSE) with the forward's x - mean, the optimization barrier notwithstanding, and XLA:CPU then
  # writes it out full-size in the forward pass and keeps it until this sum: one more
  # activation-sized buffer per layer at the peak. x + (-mean) is x - mean to the bit, unlike
  # sum(dy * x) - mean * sum(dy), which cancels when |mean| >> std. -xhat for dx comes from a mean
  # XLA cannot merge with the sum's: no full-size xhat is written between the sums and dx.
  xc, m = x.astype(cdt), lax.optimization_barrier(mean.reshape(b))
  centered = xc + (-mean).reshape(b)
  mul = scale.astype(cdt) * inv
  sum_dy_xhat = jnp.sum(dy * centered, axis=reduce_axes) * inv
  # Row 2 is d/d epsilon of y = (x - mean) * (var + epsilon)**-0.5 * scale + bias per feature,
  # -0.5 * sum(dy * xhat) * scale * inv**2, weighted on each device by its own scale and statistics.
  local = jnp.stack([jnp.sum(dy, axis=reduce_axes), sum_dy_xhat, sum_dy_xhat * mul * inv * -0.5])
  neg_xhat = (m - xc) * inv.reshape(b)
  sum_dy, sum_dy_xhat = local[0] * mul, local[1] * mul  # of dy * scale * inv, which dx is made of
  everywhere = None
  if axis_name is not None:
    names = set(axis_name) if isinstance(axis_name, tuple) else {axis_name}
    # Where scale may differ between devices (pmap/vmap, which do not say; a per-device scale
    # under shard_map), dx needs the sums of dy * scale, which sum(dy) * scale is not.
    per_device = not varying(x) or bool(varying(scale) & names)
    rows = jnp.concatenate([local, local[:2] * mul[None]]) if per_device else local
    total, everywhere = _sums_across(rows, axis_name, groups, fn)
    sum_dy, sum_dy_xhat = (total[3], total[4]) if per_device else (total[0] * mul, total[1] * mul)
  by_varying = {}

  def sums_for(primal):
    """The rows of sums that ``primal``'s cotangent is made of.

    scale, bias and epsilon can differ in the mesh axes they vary over (a per-device scale next
    to a shared bias); each gets the sums autodiff would give it.
    """
    if axis_name is None:
      return local
    key = varying(primal)
    if key not in by_varying:
      by_varying[key] = _param_cotangent(x, key, local, everywhere, axis_name)
    return by_varying[key]

  k = 1.0 / jnp.maximum(count, 1)
  a = (sum_dy * k).reshape(b)
  c = (sum_dy_xhat * k).reshape(b)
  correction = a - neg_xhat * c
  if mask is not None:
    correction = jnp.where(mask, correction, 0)
  dx = dy * mul.reshape(b) - correction
  dscale = same_sharding(sums_for(scale)[1].astype(scale.dtype), scale)
  dbias = same_sharding(sums_for(bias)[0].astype(bias.dtype), bias)
  deps = same_sharding(jnp.sum(sums_for(epsilon)[2]).astype(epsilon.dtype), epsilon)
  return dx.astype(x.dtype), dscale, dbias, None, deps


_bn_train.defvjp(_bn_train_fwd, _bn_train_bwd)


def batch_norm_train(
  x: jax.Array,
  scale: jax.Array | None,
  bias: jax.Array | None,
  *,
  mask: jax.Array | None,
  epsilon: Any,
  feature_axes: tuple[int, ...],
  axis_name: Hashable | None,
  axis_index_groups: Any,
  out_dtype: Any,
  fn: str,
) -> tuple[jax.Array, Stats]:
  """Normalized output and the (global) batch statistics, with the closed-form backward pass."""
  fshape = tuple(x.shape[a] for a in feature_axes)
  cdt = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
  s = jnp.ones(fshape, cdt) if scale is None else scale
  o = jnp.zeros(fshape, cdt) if bias is None else bias
  groups = None if axis_index_groups is None else tuple(tuple(int(i) for i in g) for g in axis_index_groups)
  eps = jnp.asarray(epsilon, cdt)
  return _bn_train(x, s, o, mask, eps, feature_axes, axis_name, groups, jnp.dtype(out_dtype), fn)
