"""Batch normalization as pure functions: ``y, new_state = batch_norm(x, state, ...)``.

The running statistics are an explicit ``BatchNormState`` passed in and returned, so the function
works unchanged under ``jax.jit``, ``jax.grad``, ``jax.vmap``, ``lax.scan`` and the parallel
transforms, and a caller decides when a new state is kept.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import _checks, _hooks, _kernel
from jaxbn._fused import batch_norm_train
from jaxbn._kernel import inv_std, scale_shift
from jaxbn._options import RUNNING_AVERAGES as RUNNING_AVERAGES  # re-exported, as before
from jaxbn._options import BatchNormOptions, RunningAverage, feature_shape, options_from
from jaxbn._sharding import forward_mode_active, same_sharding
from jaxbn.stats import Stats, compute_stats

__all__ = ["BatchNormState", "batch_norm", "init_state", "normalize", "update_running_stats"]


class BatchNormState(NamedTuple):
  """Running statistics of a batch norm layer.

  Attributes:
    mean: running mean, with the feature shape (float32, or float64 for float64 models).
    var: running variance, with the feature shape. Biased unless the layer stores the unbiased
      estimate (``unbiased_running_var=True``, PyTorch's convention).
    count: the number of batches that updated the statistics (PyTorch's ``num_batches_tracked``),
      int32. A scalar by default (the layout of the modules' ``batch_stats``): it counts the batches
      in which any feature had a valid element. With ``init_state(..., per_feature_count=True)`` it
      has the feature shape and counts, per feature, the batches in which that feature had a valid
      element, so that ``"cumulative"`` and ``"debiased_ema"`` weight each feature by its own number
      of updates (needed for masks that differ between features; see :func:`update_running_stats`).
      Batches with no valid element are not counted.
  """

  mean: jax.Array
  var: jax.Array
  count: jax.Array


def init_state(
  num_features: int | Sequence[int], *, dtype: Any = jnp.float32, per_feature_count: bool = False
) -> BatchNormState:
  """A fresh ``BatchNormState``: mean 0, variance 1, count 0.

  Args:
    num_features: the feature size, or a tuple of feature dims for several feature axes (Python or
      NumPy ints).
    dtype: dtype of the statistics; float32 (the default) also for bfloat16 and float16 models.
    per_feature_count: give ``count`` the feature shape (one count per feature) instead of a scalar.
      Use it with ``"cumulative"`` or ``"debiased_ema"`` running averages and masks that leave some
      features without valid elements in some batches.

  Returns:
    The state, with ``mean`` and ``var`` of shape ``num_features`` and an int32 ``count``.

  Raises:
    ValueError: ``num_features`` is not a positive int or a sequence of them.
    TypeError: ``dtype`` is not a floating dtype.

  Examples:
    >>> import jaxbn
    >>> jaxbn.init_state(3)
    BatchNormState(mean=Array([0., 0., 0.], dtype=float32), var=Array([1., 1., 1.], dtype=float32), count=Array(0, dtype=int32))
    >>> jaxbn.init_state((2, 3), per_feature_count=True).count.shape
    (2, 3)
  """
  fn = "jaxbn.init_state"
  shape = feature_shape(fn, num_features)
  dtype = _checks.floating_dtype(fn, "dtype", dtype, allow_none=False)
  per_feature_count = _checks.static_bool(fn, "per_feature_count", per_feature_count)
  count = jnp.zeros(shape if per_feature_count else (), jnp.int32)
  return BatchNormState(jnp.zeros(shape, dtype), jnp.ones(shape, dtype), count)


def _update_weights(mode: str, momentum: Any, t: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
  """Weights ``(w_old, w_new)`` of ``new = w_old * old + w_new * batch`` at the ``t``-th update (t >= 1).

  The old weight is computed on its own rather than as ``1 - w_new``, so that it is exactly 0 at the
  first update of ``"cumulative"`` and ``"debiased_ema"`` (and for ``"ema"`` with ``momentum=0``) and
  exactly ``momentum`` for ``"ema"`` (Flax's ``m * old + (1 - m) * new``, bit for bit).
  """
  t = jnp.maximum(t, 1).astype(dtype)
  if mode == "cumulative":
    return (t - 1.0) / t, 1.0 / t
  known = _checks.concrete_number(momentum) if jnp.ndim(momentum) == 0 else None
  if known is not None:  # 1 - m rounded once, from the Python value, as Flax and Keras compute it
    m, one_minus_m = jnp.asarray(known, dtype), jnp.asarray(1.0 - known, dtype)
  else:
    m = jnp.asarray(momentum, dtype)
    one_minus_m = 1.0 - m
  if mode == "ema":
    return m, one_minus_m
  # Debiased EMA of zero-initialised hidden values h_t = m*h_{t-1} + (1-m)*b_t, expressed directly on
  # the debiased estimate h_t / (1 - m^t): old weight m (1 - m^(t-1)) / (1 - m^t), new weight
  # (1 - m) / (1 - m^t); at t = 1 it is the first batch's statistics. m -> 1 gives the cumulative
  # average, its limit. The powers come from 1 - m, as m^k = exp(k log1p(-(1 - m))): a float32 m
  # near 1 is not 1 - (1 - m), and 1 - m^t from it would make the weights sum to 1 + u / (1 - m^t)
  # (6e-6 too much at m = 0.999, t = 2). The log is bounded so that 0 * log(0) at m = 0, t = 1 is 0.
  log_m = jnp.maximum(jnp.log1p(-one_minus_m), jnp.finfo(dtype).min)
  denom = -jnp.expm1(t * log_m)  # 1 - m^t
  ok = denom > 0
  safe = jnp.where(ok, denom, 1.0)
  w_new = jnp.where(ok, one_minus_m / safe, 1.0 / t)
  w_old = jnp.where(ok, m * -jnp.expm1((t - 1.0) * log_m) / safe, (t - 1.0) / t)
  first = t <= 1.0  # m**1 need not round to m exactly: make the first update an exact copy
  return jnp.where(first, 0.0, w_old), jnp.where(first, 1.0, w_new)


def update_running_stats(
  state: BatchNormState,
  stats: Stats,
  *,
  momentum: Any = 0.99,
  running_average: RunningAverage = "ema",
  unbiased_running_var: bool = False,
) -> BatchNormState:
  """Folds a batch's statistics into the running statistics.

  Each feature becomes ``w_old * old + w_new * batch`` with the weights of ``running_average`` (see
  :func:`batch_norm`) at the new count. A weight of 1 for the batch (the first update of
  ``"cumulative"`` and ``"debiased_ema"``, ``"ema"`` with ``momentum=0``) copies the batch's
  statistics exactly. The blend runs in the wider of the state's and the statistics' dtypes and the
  result keeps the state's dtype (a float64 state fed float32 statistics stays float64-accurate).

  Features with no valid element keep their old values, and a batch with no valid element at all
  leaves the whole state, ``count`` included, unchanged.

  Counting with masks that differ between features: a scalar ``state.count`` (the default layout)
  is incremented when any feature has a valid element, and its weight applies to every feature that
  has one. For ``"cumulative"`` and ``"debiased_ema"`` a feature first seen at the ``t``-th counted
  batch is then blended with its initial value (mean 0, variance 1) at weight ``w(t)`` instead of
  being taken whole, and later batches are weighted as if it had been seen ``t`` times. Give the
  state one count per feature (``init_state(..., per_feature_count=True)``) to weight every feature
  by its own number of updates. ``"ema"`` does not depend on the count.

  Args:
    state: the running statistics. ``count`` is a scalar or has the feature shape; a Python int is
      accepted.
    stats: the batch's :class:`jaxbn.Stats` (count, mean, m2 per feature), e.g. from
      ``jaxbn.stats.compute_stats``. No gradient flows through them.
    momentum: decay of the running average, in [0, 1] (ignored by ``"cumulative"``).
    running_average: ``"ema"``, ``"debiased_ema"`` or ``"cumulative"``.
    unbiased_running_var: store the Bessel-corrected batch variance ``m2 / (count - 1)``.

  Returns:
    The new ``BatchNormState``, with the shapes and dtypes of ``state`` (``count`` int32 when given
    as a Python int).

  Raises:
    TypeError: ``state`` is not a ``BatchNormState``, or a bad ``count``.
    ValueError: bad ``momentum`` or ``running_average``, or shapes that do not match.

  Examples:
    >>> import jax.numpy as jnp, jaxbn
    >>> from jaxbn.functional import update_running_stats
    >>> from jaxbn.stats import local_stats
    >>> stats = local_stats(jnp.array([[1.0], [3.0]]), (1,))
    >>> update_running_stats(jaxbn.init_state(1), stats, running_average="cumulative")
    BatchNormState(mean=Array([2.], dtype=float32), var=Array([1.], dtype=float32), count=Array(1, dtype=int32))
  """
  fn = "jaxbn.update_running_stats"
  if not isinstance(state, BatchNormState):
    raise TypeError(f"{fn}: state must be a jaxbn.BatchNormState (see jaxbn.init_state), got {type(state).__name__}.")
  opts = options_from(fn, locals())
  old_mean, old_var = _checks.as_array(fn, "state.mean", state.mean), _checks.as_array(fn, "state.var", state.var)
  fshape = old_mean.shape
  _checks.feature_array(fn, "state.var", old_var, fshape)
  stats = Stats(*_checks.stats(fn, stats))
  for name, value in zip(("count", "mean", "m2"), stats, strict=True):
    shape = jnp.shape(value)
    if len(shape) > len(fshape) or any(d not in (1, f) for d, f in zip(shape[::-1], fshape[::-1])):
      raise ValueError(
        f"{fn}: stats.{name} must have the shape of state.mean {fshape} (one entry per feature), got shape {shape}."
      )
  count = _checks.state_count(fn, state.count, fshape)
  return running_update(opts, BatchNormState(old_mean, old_var, count), stats)


def running_update(opts: BatchNormOptions, state: BatchNormState, stats: Stats) -> BatchNormState:
  """:func:`update_running_stats` with checked options and a state whose ``count`` is an array; unchecked."""
  stats = jax.tree.map(lax.stop_gradient, stats)
  valid = stats.count > 0
  count = state.count
  seen = valid if count.ndim else jnp.any(valid)
  count = count + seen.astype(count.dtype)
  var = stats.var
  if opts.unbiased_running_var:
    var = stats.m2 / jnp.maximum(stats.count - 1, 1)

  def blend(old, new):
    bdt = jnp.promote_types(old.dtype, new.dtype)
    if not jnp.issubdtype(bdt, jnp.inexact):
      bdt = _checks.stats_dtype(new.dtype)
    old_c, new_c = old.astype(bdt), new.astype(bdt)
    old_c = same_sharding(old_c, new_c)  # a replicated state meets feature-sharded statistics
    # Real weights, also for the complex running mean of complex input (jaxbn's Flax modules).
    w_old, w_new = _update_weights(opts.running_average, opts.momentum, count, jnp.finfo(bdt).dtype)
    mixed = w_old * old_c + w_new * new_c
    # Weight 1 for one side copies it exactly, even where the other side is not finite.
    mixed = jnp.where(w_old == 0, new_c, jnp.where(w_new == 0, old_c, mixed))
    return jnp.where(valid, mixed, old_c).astype(old.dtype)

  return BatchNormState(blend(jnp.asarray(state.mean), stats.mean), blend(jnp.asarray(state.var), var), count)


def normalize(
  x: jax.Array,
  mean: jax.Array,
  var: jax.Array,
  scale: jax.Array | None,
  bias: jax.Array | None,
  *,
  feature_axes: int | Sequence[int],
  epsilon: Any,
  dtype: Any = None,
) -> jax.Array:
  """``(x - mean) * rsqrt(var + epsilon) * scale + bias`` in the statistics' precision.

  Args:
    x: the input.
    mean: per-feature mean, with the shape of ``x`` along ``feature_axes``; its dtype is the
      computation dtype.
    var: per-feature variance, the same shape.
    scale: optional per-feature scale.
    bias: optional per-feature offset.
    feature_axes: the feature axis or axes of ``x`` (negative values count from the end).
    epsilon: added to the variance, > 0.
    dtype: output dtype; defaults to the dtype of ``x``.

  Returns:
    The normalized ``x``.

  Raises:
    TypeError: a bad ``feature_axes``, ``epsilon`` or ``dtype``.
    ValueError: ``feature_axes`` out of range, or per-feature arrays of the wrong shape.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbn.functional import normalize
    >>> x = jnp.array([[1.0], [3.0]])
    >>> normalize(x, jnp.array([2.0]), jnp.array([1.0]), None, None, feature_axes=-1, epsilon=0.0001)
    Array([[-0.99995],
           [ 0.99995]], dtype=float32)
  """
  fn = "jaxbn.normalize"
  x = _checks.floating_input(fn, x)
  axes = _checks.feature_axes(fn, x.ndim, feature_axes, arg="feature_axes")
  fshape = tuple(x.shape[a] for a in axes)
  mean = _checks.floating_input(fn, _checks.feature_array(fn, "mean", mean, fshape), arg="mean")
  var = _checks.floating_input(fn, _checks.feature_array(fn, "var", var, fshape), arg="var")
  scale = _checks.feature_array(fn, "scale", scale, fshape)
  bias = _checks.feature_array(fn, "bias", bias, fshape)
  _checks.positive(fn, "epsilon", epsilon)
  dtype = _checks.floating_dtype(fn, "dtype", dtype)
  x = jnp.asarray(x)
  return _kernel.normalize(x, mean, var, scale, bias, axes, epsilon, x.dtype if dtype is None else dtype)


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
    training: use batch statistics and update the state (True) or use the running statistics; a
      Python bool (under ``jax.jit``, mark it static).
    axis: the feature axis or axes; ``-1`` for NHWC and ``(N, C)``, ``1`` for NCHW.
    momentum: decay of the running average, in [0, 1].
    epsilon: added to the variance, > 0.
    mask: optional boolean array broadcastable to ``x``; statistics use only elements where it is
      True. A batch with no valid element leaves the state unchanged. All elements are normalized.
      A feature with no valid element has no batch statistics: it normalizes to 0, so its output is
      ``bias`` (0 without one) and its gradient w.r.t. ``x``, ``scale`` and ``epsilon`` is 0.
      A mask that leaves some features without valid elements in some batches needs a per-feature
      count for ``"cumulative"`` and ``"debiased_ema"`` (``init_state(..., per_feature_count=True)``;
      see :func:`update_running_stats`).
    axis_name: mapped axis to compute global statistics over (``jax.shard_map``, ``jax.pmap``,
      ``jax.vmap``). Under ``jax.jit`` with sharded inputs leave it None.
    axis_index_groups: optional partition of ``axis_name``'s indices into groups with separate
      statistics.
    running_average: ``"ema"``, ``"debiased_ema"`` or ``"cumulative"``.
    unbiased_running_var: store the Bessel-corrected (1/(N-1)) batch variance in the running
      statistics, as PyTorch does; normalization still uses the biased one.
    dtype: output dtype, a floating dtype; defaults to the dtype of ``x``.
    fused: training-mode gradient, None, True or False. ``None`` (default): the closed-form backward pass
      (``dx = scale*inv_std/N * (N*dy - sum(dy) - xhat*sum(dy*xhat))``, one collective across
      devices, only ``x`` and per-feature vectors kept for the backward), switching to the plain
      differentiable formula where forward-mode autodiff traces it (``jax.jvp``, ``jax.hessian``),
      but not under ``jax.linearize`` nor for a ``jax.jit`` function traced before outside forward
      mode (JAX reuses its program): pass ``False`` for functions you differentiate in forward mode.
      ``True``: always the closed form; forward mode raises. ``False``: autodiff of the plain
      formula. All three give the same values and reverse-mode gradients (also reverse-over-reverse).

  Returns:
    ``(y, new_state)``: ``y`` with the shape of ``x``, and the updated (training) or unchanged
    (evaluation) state.

  Raises:
    TypeError: ``x`` is not floating, ``mask`` is not boolean, ``axis`` is not an int or ints,
      ``epsilon``/``momentum`` are not numbers, ``training`` is not a Python bool (e.g. traced),
      ``fused`` is not None/True/False, or ``dtype`` is not a floating dtype.
    ValueError: bad ``axis``, shapes of ``scale``/``bias``/``state`` (``state.count`` must be a
      scalar or have the feature shape), ``momentum``, ``epsilon`` (finite, > 0),
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
  fn = "jaxbn.batch_norm"
  opts = options_from(fn, locals())
  training = _checks.static_bool(fn, "training", training)
  call = check_call(fn, x, state, scale, bias, axis, mask)
  y, new_state, _ = (train if training else evaluate)(opts, call)
  return y, new_state


class Call(NamedTuple):
  """The checked per-call arguments of a batch norm (see :func:`check_call`)."""

  x: jax.Array
  axes: tuple[int, ...]
  state: BatchNormState  # as passed (evaluation returns it unchanged)
  count: jax.Array  # state.count as an array
  scale: jax.Array | None
  bias: jax.Array | None
  mask: jax.Array | None

  @property
  def counted_state(self) -> BatchNormState:
    """The state with its count as an array, which :func:`running_update` takes."""
    return self.state._replace(count=self.count)


def check_call(fn: str, x: Any, state: Any, scale: Any, bias: Any, axis: Any, mask: Any, *, real: bool = True) -> Call:
  """The per-call arguments every batch norm checks, once: input, state, affine parameters, axes and mask.

  ``real``: ``x`` must be a real floating array (the functions); the modules convert their input
  first and pass ``real=False``.
  """
  x = _checks.floating_input(fn, x) if real else x
  axes = _checks.feature_axes(fn, x.ndim, axis)
  fshape = tuple(x.shape[a] for a in axes)
  if not isinstance(state, BatchNormState):
    raise TypeError(f"{fn}: state must be a jaxbn.BatchNormState (see jaxbn.init_state), got {type(state).__name__}.")
  _checks.feature_array(fn, "state.mean", state.mean, fshape)
  _checks.feature_array(fn, "state.var", state.var, fshape)
  scale = _checks.feature_array(fn, "scale", scale, fshape)
  bias = _checks.feature_array(fn, "bias", bias, fshape)
  count = _checks.state_count(fn, state.count, fshape)
  mask = _checks.mask_for(fn, mask, x.shape)
  return Call(x, axes, state, count, scale, bias, mask)


def evaluate(opts: BatchNormOptions, call: Call) -> tuple[jax.Array, BatchNormState, None]:
  """Batch norm with the running statistics: ``(y, the state unchanged, None)``; unchecked."""
  x = call.x
  cdt = _checks.stats_dtype(x.dtype)
  mean, var = jnp.asarray(call.state.mean).astype(cdt), jnp.asarray(call.state.var).astype(cdt)
  out = x.dtype if opts.dtype is None else opts.dtype
  return _kernel.normalize(x, mean, var, call.scale, call.bias, call.axes, opts.epsilon, out), call.state, None


def train(opts: BatchNormOptions, call: Call) -> tuple[jax.Array, BatchNormState, Stats]:
  """Training-mode batch norm: ``(y, new_state, the batch Stats used)``; unchecked.

  The statistics come from an installed statistics hook (:mod:`jaxbn._hooks`) when it supplies them,
  else from the batch, through the closed-form backward pass or the plain formula as ``opts.fused``
  and the autodiff mode decide.
  """
  fn, x, axes, mask = opts.fn, call.x, call.axes, call.mask
  out = x.dtype if opts.dtype is None else opts.dtype
  # A training loop that runs the loss per device names the axes the batch is split over.
  axis_name = opts.axis_name if opts.axis_name is not None else _hooks.batch_axes()
  hook = _hooks.current()
  # A training loop may supply the statistics (jaxbn.training's bn_mode="exact": over the whole dataset).
  given = None if hook is None else hook(x, axes, mask)

  def plain(stats=None):
    if stats is None:
      stats = compute_stats(x, axes, mask=mask, axis_name=axis_name, axis_index_groups=opts.axis_index_groups, fn=fn)
    cdt = _checks.stats_dtype(x.dtype)
    inv = inv_std(stats.var.astype(cdt), stats.count, opts.epsilon)
    return scale_shift(x, stats.mean.astype(cdt), inv, call.scale, call.bias, axes, out), stats

  if given is not None:
    y, stats = plain(given)
  elif opts.fused is True and forward_mode_active():
    raise _fused_forward_mode_error(fn)
  elif opts.fused is False or (opts.fused is None and forward_mode_active()):
    y, stats = plain()
  else:
    try:
      y, stats = batch_norm_train(
        x,
        call.scale,
        call.bias,
        mask=mask,
        epsilon=opts.epsilon,
        feature_axes=axes,
        axis_name=axis_name,
        axis_index_groups=opts.axis_index_groups,
        out_dtype=out,
        fn=fn,
      )
    except TypeError as err:
      if "custom_vjp" not in str(err):
        raise
      if opts.fused:
        raise _fused_forward_mode_error(fn) from None
      y, stats = plain()
  return y, running_update(opts, call.counted_state, stats), stats
