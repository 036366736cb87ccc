"""Batch normalization as pure functions: ``y, new_state = batch_norm(x, state, ...)``.

The running statistics are an explicit ``BatchNormState`` passed in and returned, so the function
works unchanged under ``jax.jit``, ``jax.grad``, ``jax.vmap``, ``lax.scan`` and the parallel
transforms, and a caller decides when a new state is kept.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import _checks
from jaxbn._fused import batch_norm_train, forward_mode_active
from jaxbn.stats import Stats, compute_stats

__all__ = ["BatchNormState", "batch_norm", "init_state", "normalize", "update_running_stats"]

RunningAverage = Literal["ema", "debiased_ema", "cumulative"]
RUNNING_AVERAGES = ("ema", "debiased_ema", "cumulative")


class BatchNormState(NamedTuple):
  """Running statistics of a batch norm layer.

  Attributes:
    mean: running mean, with the feature shape (float32, or float64 for float64 models).
    var: running variance, with the feature shape. Biased unless the layer stores the unbiased
      estimate (``unbiased_running_var=True``, PyTorch's convention).
    count: int32 scalar, the number of batches that updated the statistics (PyTorch's
      ``num_batches_tracked``). Batches with no valid element are not counted.
  """

  mean: jax.Array
  var: jax.Array
  count: jax.Array


def init_state(num_features: int | Sequence[int], *, dtype: Any = jnp.float32) -> BatchNormState:
  """A fresh ``BatchNormState``: mean 0, variance 1, count 0.

  Args:
    num_features: the feature size, or a tuple of feature dims for several feature axes.
    dtype: dtype of the statistics; float32 (the default) also for bfloat16 and float16 models.

  Examples:
    >>> import jaxbn
    >>> jaxbn.init_state(3)
    BatchNormState(mean=Array([0., 0., 0.], dtype=float32), var=Array([1., 1., 1.], dtype=float32), count=Array(0, dtype=int32))
  """
  shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
  if not all(isinstance(d, int) and d > 0 for d in shape):
    raise ValueError(f"jaxbn.init_state: num_features must be a positive int or a tuple of them, got {num_features!r}.")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"jaxbn.init_state: dtype must be a floating dtype, got {dtype!r}.")
  return BatchNormState(jnp.zeros(shape, dtype), jnp.ones(shape, dtype), jnp.zeros((), jnp.int32))


def _update_weight(mode: str, momentum: Any, t: jax.Array, dtype: Any) -> jax.Array:
  """Weight of the new batch in ``new = old + w * (batch - old)`` after ``t`` updates (t >= 1)."""
  t = jnp.maximum(t, 1).astype(dtype)
  if mode == "cumulative":
    return 1.0 / t
  m = jnp.asarray(momentum, dtype)
  if mode == "ema":
    return 1.0 - m
  # Debiased EMA of zero-initialised hidden values h_t = m*h_{t-1} + (1-m)*b_t, expressed directly on
  # the debiased estimate h_t / (1 - m^t); at t = 1 it is the first batch's statistics. m -> 1 gives
  # the cumulative average, its limit.
  denom = 1.0 - m**t
  return jnp.where(denom > 0, (1.0 - m) / jnp.where(denom > 0, denom, 1.0), 1.0 / t)


def update_running_stats(
  state: BatchNormState,
  stats: Stats,
  *,
  momentum: Any = 0.99,
  running_average: RunningAverage = "ema",
  unbiased_running_var: bool = False,
) -> BatchNormState:
  """Folds a batch's statistics into the running statistics.

  Features with no valid element keep their old values, and a batch with no valid element at all
  leaves the whole state, ``count`` included, unchanged.
  """
  stats = jax.tree.map(lax.stop_gradient, stats)
  valid = stats.count > 0
  seen = jnp.any(valid)
  count = state.count + seen.astype(state.count.dtype)
  w = _update_weight(running_average, momentum, count, stats.mean.dtype)
  var = stats.var
  if unbiased_running_var:
    var = stats.m2 / jnp.maximum(stats.count - 1, 1)

  def blend(old, new):
    old_c = old.astype(new.dtype)
    return jnp.where(valid, old_c + w * (new - old_c), old_c).astype(old.dtype)

  return BatchNormState(blend(state.mean, stats.mean), blend(state.var, var), count)


def normalize(
  x: jax.Array,
  mean: jax.Array,
  var: jax.Array,
  scale: jax.Array | None,
  bias: jax.Array | None,
  *,
  feature_axes: tuple[int, ...],
  epsilon: Any,
  dtype: Any = None,
) -> jax.Array:
  """``(x - mean) * rsqrt(var + epsilon) * scale + bias`` in the statistics' precision."""
  cdt = mean.dtype
  bshape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
  mul = lax.rsqrt(var + jnp.asarray(epsilon, cdt))
  if scale is not None:
    mul = mul * scale.astype(cdt)
  y = (x.astype(cdt) - mean.reshape(bshape)) * mul.reshape(bshape)
  if bias is not None:
    y = y + bias.astype(cdt).reshape(bshape)
  return y.astype(x.dtype if dtype is None else dtype)


def _fused_forward_mode_error(fn: str) -> ValueError:
  return ValueError(
    f"{fn}: fused=True has a closed-form reverse-mode gradient only; forward-mode autodiff "
    "(jax.jvp, jax.jacfwd, jax.hessian, forward-over-reverse Hessian-vector products) needs "
    "fused=None (the default: the fused path, switching to the plain formula under forward "
    "mode) or fused=False (always the plain formula)."
  )


def batch_norm(
  x: Any,
  state: BatchNormState,
  scale: Any = None,
  bias: Any = None,
  *,
  training: bool,
  axis: int | Sequence[int] = -1,
  momentum: Any = 0.99,
  epsilon: Any = 1e-5,
  mask: Any = None,
  axis_name: Hashable | None = None,
  axis_index_groups: Sequence[Sequence[int]] | None = None,
  running_average: RunningAverage = "ema",
  unbiased_running_var: bool = False,
  dtype: Any = None,
  fused: bool | None = None,
) -> tuple[jax.Array, BatchNormState]:
  r"""Batch normalization with explicit running statistics.

  .. math::
     y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \cdot \text{scale} + \text{bias}

  In training, :math:`\mu, \sigma^2` are the (biased) statistics of the current batch over every
  axis except ``axis``, computed in float32 (float64 for float64 input) with a formula that stays
  accurate at large means, over valid elements only when ``mask`` is given, and merged exactly
  across devices when ``axis_name`` is given; the returned state folds them into the running
  statistics. In evaluation (``training=False``) the running statistics are used and the state is
  returned unchanged.

  Running averages, with ``m = momentum`` and ``t`` the number of updates so far:

  * ``"ema"`` (Flax, Keras): ``new = m * old + (1 - m) * batch``.
  * ``"debiased_ema"`` (Haiku): an EMA of zero-initialised values divided by ``1 - m**t``, as in
    Adam; the first batch's statistics are taken whole.
  * ``"cumulative"`` (PyTorch ``momentum=None``): the equal-weight average of all batches seen;
    ``momentum`` is ignored.

  PyTorch's ``momentum=p`` is ``momentum=1 - p`` here, with ``unbiased_running_var=True``.

  Args:
    x: floating input (float16, bfloat16, float32 or float64).
    state: the running statistics, a ``BatchNormState`` with the feature shape
      (see :func:`init_state`).
    scale: optional learned scale with the feature shape (``gamma``).
    bias: optional learned offset with the feature shape (``beta``).
    training: use batch statistics and update the state (True) or use the running statistics.
    axis: the feature axis or axes; ``-1`` for NHWC and ``(N, C)``, ``1`` for NCHW.
    momentum: decay of the running average, in [0, 1].
    epsilon: added to the variance, > 0.
    mask: optional boolean array broadcastable to ``x``; statistics use only elements where it is
      True. A batch with no valid element leaves the state unchanged. All elements are normalized.
    axis_name: mapped axis to compute global statistics over (``jax.shard_map``, ``jax.pmap``,
      ``jax.vmap``). Under ``jax.jit`` with sharded inputs leave it None.
    axis_index_groups: optional partition of ``axis_name``'s indices into groups with separate
      statistics.
    running_average: ``"ema"``, ``"debiased_ema"`` or ``"cumulative"``.
    unbiased_running_var: store the Bessel-corrected (1/(N-1)) batch variance in the running
      statistics, as PyTorch does; normalization still uses the biased one.
    dtype: output dtype; defaults to the dtype of ``x``.
    fused: training-mode gradient. ``None`` (default): the closed-form backward pass
      (``dx = scale*inv_std/N * (N*dy - sum(dy) - xhat*sum(dy*xhat))``, one collective across
      devices, only ``x`` and per-feature vectors kept for the backward), switching to the plain
      differentiable formula where forward-mode autodiff reaches it (``jax.jvp``, ``jax.hessian``).
      ``True``: always the closed form; forward mode raises. ``False``: autodiff of the plain
      formula. All three give the same values and reverse-mode gradients (also reverse-over-reverse).

  Returns:
    ``(y, new_state)``: ``y`` with the shape of ``x``, and the updated (training) or unchanged
    (evaluation) state.

  Raises:
    TypeError: ``x`` is not floating, or ``mask`` is not boolean.
    ValueError: bad ``axis``, shapes of ``scale``/``bias``/``state``, ``momentum``, ``epsilon``,
      ``running_average`` or ``mask``, or an ``axis_name`` that is not bound.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> x = jax.random.normal(jax.random.key(0), (32, 4)) * 3.0 + 5.0
    >>> state = jaxbn.init_state(4)
    >>> y, state = jaxbn.batch_norm(x, state, training=True)
    >>> bool(jnp.allclose(y.mean(0), 0.0, atol=1e-5)), bool(jnp.allclose(y.std(0), 1.0, atol=1e-3))
    (True, True)
    >>> int(state.count)
    1
    >>> y_eval, same = jaxbn.batch_norm(x, state, training=False)
    >>> same is state
    True

  References:
    Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing Internal
    Covariate Shift", 2015.
  """
  return _batch_norm(
    "jaxbn.batch_norm",
    x,
    state,
    scale,
    bias,
    training=training,
    axis=axis,
    momentum=momentum,
    epsilon=epsilon,
    mask=mask,
    axis_name=axis_name,
    axis_index_groups=axis_index_groups,
    running_average=running_average,
    unbiased_running_var=unbiased_running_var,
    dtype=dtype,
    fused=fused,
  )[:2]


def _batch_norm(
  fn: str,
  x: Any,
  state: BatchNormState,
  scale: Any,
  bias: Any,
  *,
  training: bool,
  axis: int | Sequence[int],
  momentum: Any,
  epsilon: Any,
  mask: Any,
  axis_name: Hashable | None,
  axis_index_groups: Sequence[Sequence[int]] | None,
  running_average: RunningAverage,
  unbiased_running_var: bool,
  dtype: Any,
  fused: bool | None = None,
) -> tuple[jax.Array, BatchNormState, Stats | None]:
  """:func:`batch_norm`, also returning the batch ``Stats`` it used (None in evaluation)."""
  x = _checks.floating_input(fn, x)
  axes = _checks.feature_axes(fn, x.ndim, axis)
  fshape = tuple(x.shape[a] for a in axes)
  if not isinstance(state, BatchNormState):
    raise TypeError(f"{fn}: state must be a jaxbn.BatchNormState (see jaxbn.init_state), got {type(state).__name__}.")
  _checks.feature_array(fn, "state.mean", state.mean, fshape)
  _checks.feature_array(fn, "state.var", state.var, fshape)
  scale = _checks.feature_array(fn, "scale", scale, fshape)
  bias = _checks.feature_array(fn, "bias", bias, fshape)
  _checks.in_range(fn, "momentum", momentum, 0.0, 1.0)
  _checks.positive(fn, "epsilon", epsilon)
  if running_average not in RUNNING_AVERAGES:
    raise ValueError(f"{fn}: running_average must be one of {RUNNING_AVERAGES}, got {running_average!r}.")
  mask = _checks.mask_for(fn, mask, x.shape)
  cdt = _checks.stats_dtype(x.dtype)

  if not training:
    mean, var = state.mean.astype(cdt), state.var.astype(cdt)
    return normalize(x, mean, var, scale, bias, feature_axes=axes, epsilon=epsilon, dtype=dtype), state, None

  def plain():
    stats = compute_stats(x, axes, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups, fn=fn)
    return normalize(x, stats.mean, stats.var, scale, bias, feature_axes=axes, epsilon=epsilon, dtype=dtype), stats

  if fused is True and forward_mode_active():
    raise _fused_forward_mode_error(fn)
  if fused is False or (fused is None and forward_mode_active()):
    y, stats = plain()
  else:
    try:
      y, stats = batch_norm_train(
        x,
        scale,
        bias,
        mask=mask,
        epsilon=epsilon,
        feature_axes=axes,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        out_dtype=x.dtype if dtype is None else dtype,
        fn=fn,
      )
    except TypeError as err:
      if "custom_vjp" not in str(err):
        raise
      if fused:
        raise _fused_forward_mode_error(fn) from None
      y, stats = plain()
  new_state = update_running_stats(
    state, stats, momentum=momentum, running_average=running_average, unbiased_running_var=unbiased_running_var
  )
  return y, new_state, stats
