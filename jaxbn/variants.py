"""Batch norm variants as pure functions: ghost batch norm and batch renormalization.

Both return ``(y, new_state)`` like :func:`jaxbn.batch_norm` and share its running statistics
(``BatchNormState``), its argument checks and its evaluation path: in evaluation they ARE batch norm
with the running statistics, for any batch size.

* Ghost batch norm (Hoffer, Hubara & Soudry, "Train longer, generalize better: closing the
  generalization gap in large batch training of neural networks", 2017) normalizes fixed contiguous
  sub-batches ("ghost" or virtual batches) of the local batch with their own statistics. The
  running statistics are updated once per call, from the exact count-weighted merge of all
  sub-batches (and of all devices when ``axis_name`` is given), so they estimate the same
  population statistics as plain batch norm.
* Batch renormalization (Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
  Batch-Normalized Models", 2017) corrects the batch statistics towards the running ones:
  ``xhat = (x - mu_B) / sigma_B * r + d`` with ``r = clip(sigma_B / sigma, 1/rmax, rmax)`` and
  ``d = clip((mu_B - mu) / sigma, -dmax, dmax)`` held constant for the gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import _checks, _hooks
from jaxbn._kernel import inv_std, scale_shift
from jaxbn._options import BatchNormOptions, RunningAverage, options_from
from jaxbn.functional import BatchNormState, Call, check_call, evaluate, running_update
from jaxbn.stats import Stats, all_reduce, compute_stats, local_stats, merge_stacked

__all__ = [
  "RenormSchedule",
  "batch_renorm",
  "ghost_batch_norm",
  "paper_dmax",
  "paper_rmax",
  "renorm_schedule",
]

Schedule = Callable[[jax.Array], Any]


@dataclasses.dataclass(frozen=True)
class RenormSchedule:
  """A renorm limit that is ``start_value`` up to ``start_step``, then moves linearly to ``end_value``.

  A frozen dataclass rather than a closure, so that modules holding one pickle and compare (and
  hash) equal when built with the same arguments, as Flax's module attributes are expected to.
  Build one with :func:`renorm_schedule`.
  """

  start_value: float
  end_value: float
  start_step: int
  end_step: int

  def __post_init__(self):
    _check_schedule("jaxbn.RenormSchedule", self.start_value, self.end_value, self.start_step, self.end_step)

  def __call__(self, step: Any) -> jax.Array:
    """The limit at ``step`` (float32)."""
    _checks.finite("jaxbn.RenormSchedule", "step", step)
    frac = jnp.clip((jnp.asarray(step, jnp.float32) - self.start_step) / (self.end_step - self.start_step), 0.0, 1.0)
    return self.start_value + frac * (self.end_value - self.start_value)


def renorm_schedule(
  *, start_value: float, end_value: float, start_step: int = 5000, end_step: int = 40000
) -> RenormSchedule:
  """A clipping limit that stays at ``start_value`` until ``start_step``, then moves linearly to ``end_value``.

  The result is a function of the step (the number of running-statistics updates so far, the
  ``count`` of a ``BatchNormState``), usable as ``rmax`` or ``dmax`` of :func:`batch_renorm`. It
  pickles, and two schedules with the same arguments are equal.

  Args:
    start_value: the limit up to ``start_step``.
    end_value: the limit from ``end_step`` on.
    start_step: last step at ``start_value``.
    end_step: first step at ``end_value``; must be > ``start_step``.

  Returns:
    ``schedule(step) -> float32 array``.

  Raises:
    ValueError: ``end_step <= start_step``.

  Examples:
    >>> from jaxbn.variants import renorm_schedule
    >>> rmax = renorm_schedule(start_value=1.0, end_value=3.0, start_step=10, end_step=30)
    >>> [float(rmax(s)) for s in (0, 10, 20, 30, 99)]
    [1.0, 1.0, 2.0, 3.0, 3.0]
    >>> rmax == renorm_schedule(start_value=1.0, end_value=3.0, start_step=10, end_step=30)
    True
  """
  _check_schedule("jaxbn.renorm_schedule", start_value, end_value, start_step, end_step)
  return RenormSchedule(float(start_value), float(end_value), int(start_step), int(end_step))


def _check_schedule(fn: str, start_value: Any, end_value: Any, start_step: Any, end_step: Any) -> None:
  for arg, value in (("start_value", start_value), ("end_value", end_value)):
    if isinstance(value, (str, bytes)) or _checks.concrete_number(value) is None or jnp.ndim(value):
      raise TypeError(f"{fn}: {arg} must be a Python number, got {value!r}.")
    _checks.finite(fn, arg, value)
  for arg, value in (("start_step", start_step), ("end_step", end_step)):
    if not _checks.is_int(value):
      raise TypeError(f"{fn}: {arg} must be an int, got {value!r}.")
  if not end_step > start_step:
    raise ValueError(f"{fn}: end_step must be > start_step, got start_step={start_step}, end_step={end_step}.")


paper_rmax = renorm_schedule(start_value=1.0, end_value=3.0, start_step=5000, end_step=40000)
"""Ioffe (2017)'s ``rmax``: 1 for the first 5k steps, then linearly to 3 at 40k steps."""
paper_dmax = renorm_schedule(start_value=0.0, end_value=5.0, start_step=5000, end_step=25000)
"""Ioffe (2017)'s ``dmax``: 0 for the first 5k steps, then linearly to 5 at 25k steps."""


def check_ghost_rows(opts: BatchNormOptions, call: Call) -> None:
  """Ghost batches split the leading non-feature axis: ``x`` must have one."""
  if opts.ghost_batch_size is not None and len(call.axes) == call.x.ndim:
    raise ValueError(
      f"{opts.fn}: ghost batches split the leading non-feature axis, but every axis of x (shape {call.x.shape}) "
      f"is a feature axis (axis={call.axes})."
    )


def _limit(fn: str, arg: str, value: Any, step: jax.Array, lo: float) -> jax.Array:
  """``value`` or ``value(step)``, checked against its lower bound when known at trace time."""
  if callable(value):
    value = value(step)
  _checks.at_least(fn, arg, value, lo)
  return jnp.asarray(value)


def _chunk(x: jax.Array, mask: jax.Array | None, axes: tuple[int, ...], size: int):
  """Splits the leading non-feature axis into ``k`` contiguous chunks of ``size`` rows.

  Returns ``(xr, mask_r, chunk_axes, pos, pad)``: ``xr`` has the batch axis ``b`` replaced by
  ``(k, size)``; ``chunk_axes`` are the feature axes of ``xr`` with the chunk axis ``b`` added, so
  that statistics over ``chunk_axes`` are per chunk; ``pos`` is where the chunk axis sits among
  ``chunk_axes``. A last partial chunk is padded with rows that the mask marks invalid.
  """
  b = next(a for a in range(x.ndim) if a not in axes)
  n = x.shape[b]
  size = min(size, n)
  k = -(-n // size)
  pad = k * size - n
  if pad:
    widths = [(0, 0)] * x.ndim
    widths[b] = (0, pad)
    x = jnp.pad(x, widths)
    m = jnp.ones((1,) * x.ndim, bool) if mask is None else mask.reshape((1,) * (x.ndim - mask.ndim) + mask.shape)
    m = jnp.broadcast_to(m, (*m.shape[:b], n, *m.shape[b + 1 :]))
    mask = jnp.pad(m, widths, constant_values=False)
  elif mask is not None:
    mask = mask.reshape((1,) * (x.ndim - mask.ndim) + mask.shape)
  xr = x.reshape((*x.shape[:b], k, size, *x.shape[b + 1 :]))
  if mask is not None:
    mb = mask.shape[b]
    mask = mask.reshape(mask.shape[:b] + ((k, size) if mb != 1 else (1, 1)) + mask.shape[b + 1 :])
  chunk_axes = tuple(sorted([b] + [a if a < b else a + 1 for a in axes]))
  return xr, mask, chunk_axes, chunk_axes.index(b), (b, pad)


def train_variant(opts: BatchNormOptions, call: Call) -> tuple[jax.Array, BatchNormState, Stats]:
  """Training step of ghost batch norm and batch renormalization; also returns the merged batch statistics."""
  fn, x, state = opts.fn, call.x, call.state
  ghost_batch_size, renorm, epsilon = opts.ghost_batch_size, opts.renorm, opts.epsilon
  if _hooks.current() is not None:
    setting = f"ghost_batch_size={ghost_batch_size!r}" if ghost_batch_size is not None else "renorm=True"
    raise ValueError(
      f"{fn}: the training loop supplies statistics over the whole dataset (bn_mode='exact'), which this "
      f"layer's {setting} would redefine; use plain batch norm (ghost_batch_size=None, renorm=False) with "
      "bn_mode='exact', or bn_mode='ghost'."
    )
  cdt = _checks.stats_dtype(x.dtype)
  axis_name, groups = opts.axis_name, opts.axis_index_groups
  if ghost_batch_size is None:
    xr, mask, norm_axes, pos = x, call.mask, call.axes, None
    stats = compute_stats(x, call.axes, mask=mask, axis_name=axis_name, axis_index_groups=groups, fn=fn)
    chunk_stats = stats
  else:
    xr, mask, norm_axes, pos, (b, pad) = _chunk(x, call.mask, call.axes, ghost_batch_size)
    chunk_stats = local_stats(xr, norm_axes, mask)
    stats = merge_stacked(Stats(*(jnp.moveaxis(s, pos, 0) for s in chunk_stats)))
    if axis_name is not None:
      stats = all_reduce(stats, axis_name, groups, fn=fn)

  sshape = chunk_stats.mean.shape

  def per_chunk(v: jax.Array) -> jax.Array:
    """A feature-shaped array broadcast to the shape of the (per-chunk) statistics."""
    v = v.astype(cdt)
    return jnp.broadcast_to(v if pos is None else jnp.expand_dims(v, pos), sshape)

  scale = None if call.scale is None else per_chunk(call.scale)
  bias = None if call.bias is None else per_chunk(call.bias)
  if renorm:
    step = jnp.max(call.count)  # the schedule's step (a per-feature count: its most advanced feature)
    r_lim = _limit(fn, "rmax", opts.rmax, step, 1.0).astype(cdt)
    d_lim = _limit(fn, "dmax", opts.dmax, step, 0.0).astype(cdt)
    eps = jnp.asarray(epsilon, cdt)
    mu = per_chunk(lax.stop_gradient(state.mean))
    sigma = jnp.sqrt(per_chunk(lax.stop_gradient(state.var)) + eps)
    mean_b = lax.stop_gradient(chunk_stats.mean)
    sigma_b = jnp.sqrt(lax.stop_gradient(chunk_stats.var) + eps)
    r = lax.stop_gradient(jnp.clip(sigma_b / sigma, 1.0 / r_lim, r_lim))
    # A feature with no valid element has no batch mean to correct: it normalizes to 0, y = bias.
    d = lax.stop_gradient(jnp.where(chunk_stats.count > 0, jnp.clip((mean_b - mu) / sigma, -d_lim, d_lim), 0))
    # scale * (xhat * r + d) + bias, folded into the affine part so that the normalization is one pass.
    shift = d if scale is None else d * scale
    scale = r if scale is None else r * scale
    bias = shift if bias is None else shift + bias

  inv = inv_std(chunk_stats.var, chunk_stats.count, epsilon)
  y = scale_shift(xr, chunk_stats.mean, inv, scale, bias, norm_axes, x.dtype if opts.dtype is None else opts.dtype)
  if ghost_batch_size is not None:
    y = y.reshape((*y.shape[:b], y.shape[b] * y.shape[b + 1], *y.shape[b + 2 :]))
    if pad:
      y = lax.slice_in_dim(y, 0, y.shape[b] - pad, axis=b)
  return y, running_update(opts, call.counted_state, stats), stats


def ghost_batch_norm(
  x: Any,
  state: BatchNormState,
  scale: Any = None,
  bias: Any = None,
  *,
  ghost_batch_size: int,
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
) -> tuple[jax.Array, BatchNormState]:
  """Ghost batch norm: each contiguous sub-batch of ``ghost_batch_size`` rows is normalized with its own statistics.

  In training, the leading non-feature axis of ``x`` (the batch axis: axis 0 for NHWC and NCHW
  with ``axis=1``) is cut into contiguous chunks of ``ghost_batch_size`` rows, and each chunk is
  normalized exactly as :func:`jaxbn.batch_norm` would normalize it alone (masked elements do not
  count). When the batch size is not a multiple of ``ghost_batch_size``, the last, shorter chunk
  is normalized with its own statistics too; a batch no larger than ``ghost_batch_size`` is one
  chunk, i.e. plain batch norm.

  The running statistics are updated ONCE per call, from the exact count-weighted merge of the
  statistics of all chunks (and, with ``axis_name``, of all chunks on all devices, so that
  replicas keep identical running statistics); they therefore estimate the same population
  statistics as plain batch norm. The chunks themselves stay local to each device.

  In evaluation the running statistics are used, as in :func:`jaxbn.batch_norm`, for any batch
  size (``ghost_batch_size`` plays no role).

  Args:
    x: floating input.
    state: running statistics (:func:`jaxbn.init_state`).
    scale: optional learned scale with the feature shape.
    bias: optional learned offset with the feature shape.
    ghost_batch_size: rows per ghost batch, a positive int.
    training: normalize with ghost-batch statistics and update the state (True), or use the
      running statistics.
    axis: the feature axis or axes.
    momentum: decay of the running average, in [0, 1].
    epsilon: added to the variance, > 0.
    mask: optional boolean array broadcastable to ``x``; True marks elements that count in the
      statistics. A feature with no valid element in a ghost batch outputs ``bias`` there, as in
      :func:`jaxbn.batch_norm`.
    axis_name: mapped axis over which the running-statistics update is merged.
    axis_index_groups: optional partition of ``axis_name``'s indices for that merge.
    running_average: ``"ema"``, ``"debiased_ema"`` or ``"cumulative"`` (see :func:`jaxbn.batch_norm`).
    unbiased_running_var: store the Bessel-corrected variance of the merged batch.
    dtype: output dtype; defaults to the dtype of ``x``.

  Returns:
    ``(y, new_state)``.

  Raises:
    TypeError: as :func:`jaxbn.batch_norm`.
    ValueError: as :func:`jaxbn.batch_norm`, or ``ghost_batch_size`` is not a positive int, or
      ``x`` has no non-feature axis to split.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> x = jax.random.normal(jax.random.key(0), (8, 3))
    >>> from jaxbn.variants import ghost_batch_norm
    >>> y, state = ghost_batch_norm(x, jaxbn.init_state(3), ghost_batch_size=4, training=True)
    >>> y_first, _ = jaxbn.batch_norm(x[:4], jaxbn.init_state(3), training=True)
    >>> bool(jnp.allclose(y[:4], y_first, atol=1e-6))
    True
    >>> mean, var, _ = jaxbn.moments(x)  # the running update sees the whole batch
    >>> bool(jnp.allclose(state.mean, 0.01 * mean, atol=1e-7))
    True

  References:
    Hoffer, Hubara & Soudry, "Train longer, generalize better: closing the generalization gap in
    large batch training of neural networks", 2017.
  """
  fn = "jaxbn.ghost_batch_norm"
  opts = options_from(fn, locals())
  if ghost_batch_size is None:
    raise ValueError(f"{fn}: ghost_batch_size must be a positive int, got None.")

  return _variant(opts, x, state, scale, bias, training, axis, mask)


def _variant(
  opts: BatchNormOptions, x: Any, state: Any, scale: Any, bias: Any, training: Any, axis: Any, mask: Any
) -> tuple[jax.Array, BatchNormState]:
  """The public variants after their options are checked: the call's checks, then training or evaluation."""
  call = check_call(opts.fn, x, state, scale, bias, axis, mask)
  check_ghost_rows(opts, call)
  training = _checks.static_bool(opts.fn, "training", training)
  y, new_state, _ = (train_variant if training else evaluate)(opts, call)
  return y, new_state


def batch_renorm(
  x: Any,
  state: BatchNormState,
  scale: Any = None,
  bias: Any = None,
  *,
  training: bool,
  rmax: float | Schedule = paper_rmax,
  dmax: float | Schedule = paper_dmax,
  axis: int | Sequence[int] = -1,
  momentum: Any = 0.99,
  epsilon: Any = 1e-5,
  mask: Any = None,
  axis_name: Hashable | None = None,
  axis_index_groups: Sequence[Sequence[int]] | None = None,
  running_average: RunningAverage = "ema",
  unbiased_running_var: bool = False,
  ghost_batch_size: int | None = None,
  dtype: Any = None,
) -> tuple[jax.Array, BatchNormState]:
  r"""Batch renormalization (Ioffe 2017).

  In training, with batch statistics :math:`\mu_B, \sigma_B = \sqrt{\sigma_B^2 + \epsilon}` and the
  running ones :math:`\mu, \sigma = \sqrt{\sigma^2 + \epsilon}` from ``state``:

  .. math::
     r = \mathrm{clip}(\sigma_B / \sigma, 1/r_{max}, r_{max}), \quad
     d = \mathrm{clip}((\mu_B - \mu) / \sigma, -d_{max}, d_{max}), \quad
     y = \text{scale} \cdot \left(\frac{x - \mu_B}{\sigma_B} r + d\right) + \text{bias}

  with ``r`` and ``d`` under ``stop_gradient``; gradients flow through :math:`\mu_B, \sigma_B` as
  in batch norm. ``rmax=1, dmax=0`` is plain batch norm. The running statistics are updated from
  the batch statistics exactly as by :func:`jaxbn.batch_norm`; evaluation uses them unchanged.

  ``rmax`` and ``dmax`` are numbers or schedules: functions of the step, here ``state.count``
  (the number of updates so far). The default is the paper's schedule (:data:`paper_rmax`,
  :data:`paper_dmax`): plain batch norm for 5k steps, then ``rmax`` linearly to 3 at 40k steps and
  ``dmax`` to 5 at 25k; :func:`renorm_schedule` builds others.

  Args:
    x: floating input.
    state: running statistics (:func:`jaxbn.init_state`).
    scale: optional learned scale with the feature shape.
    bias: optional learned offset with the feature shape.
    training: renormalize with batch statistics and update the state (True), or use the running
      statistics.
    rmax: limit of ``r``, >= 1, a number or ``schedule(step)``.
    dmax: limit of ``|d|``, >= 0, a number or ``schedule(step)``.
    axis: the feature axis or axes.
    momentum: decay of the running average, in [0, 1].
    epsilon: added to both variances, > 0.
    mask: optional boolean array broadcastable to ``x``; True marks elements that count. A feature
      with no valid element outputs ``bias``, as in :func:`jaxbn.batch_norm` (``d`` is 0 for it).
    axis_name: mapped axis to compute global batch statistics over.
    axis_index_groups: optional partition of ``axis_name``'s indices.
    running_average: ``"ema"``, ``"debiased_ema"`` or ``"cumulative"``.
    unbiased_running_var: store the Bessel-corrected batch variance in the running statistics.
    ghost_batch_size: also use ghost batches (see :func:`ghost_batch_norm`); each ghost batch gets
      its own ``r`` and ``d``.
    dtype: output dtype; defaults to the dtype of ``x``.

  Returns:
    ``(y, new_state)``.

  Raises:
    TypeError: as :func:`jaxbn.batch_norm`.
    ValueError: as :func:`jaxbn.batch_norm`, or ``rmax < 1`` or ``dmax < 0`` (when known at trace
      time), or a bad ``ghost_batch_size``.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> x = jax.random.normal(jax.random.key(0), (16, 3)) * 2.0 + 1.0
    >>> state = jaxbn.init_state(3)
    >>> from jaxbn.variants import batch_renorm
    >>> y, new_state = batch_renorm(x, state, training=True, rmax=1.0, dmax=0.0)
    >>> y_bn, _ = jaxbn.batch_norm(x, state, training=True)
    >>> bool(jnp.allclose(y, y_bn, atol=1e-6))
    True
    >>> y, _ = batch_renorm(x, state, training=True, rmax=1.5, dmax=0.5)
    >>> bool(jnp.allclose(y.std(0), 1.5, atol=1e-3))  # r = clip(sigma_B / 1, 1/1.5, 1.5) = 1.5
    True

  References:
    Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized
    Models", 2017.
  """
  fn = "jaxbn.batch_renorm"
  opts = options_from(fn, locals(), renorm=True)
  return _variant(opts, x, state, scale, bias, training, axis, mask)
