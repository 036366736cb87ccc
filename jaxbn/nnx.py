"""``flax.nnx`` batch norm that drops into existing models: same constructor, call, variables and modes.

``jaxbn.nnx.BatchNorm`` takes the arguments of ``flax.nnx.BatchNorm`` (``num_features``, ``rngs``,
...), holds the same ``nnx.Param`` (``scale``, ``bias``) and ``nnx.BatchStat`` (``mean``, ``var``)
variables, and follows ``model.train()`` / ``model.eval()`` / ``nnx.view`` like Flax's. The
statistics are jaxbn's: accurate, float32, exact across devices and masks. The extras of
:class:`jaxbn.linen.BatchNorm` are available with the same names.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes, initializers

from jaxbn import _checks, variants
from jaxbn._layer import layer_forward, module_options
from jaxbn._options import RunningAverage, needs_count
from jaxbn._options import feature_shape as _feature_shape
from jaxbn.functional import BatchNormState
from jaxbn.stats import Stats, merge

__all__ = ["BatchMoments", "BatchNorm", "collect_moments"]

# Set by jaxbn.recalibrate and jaxbn.training while they trace a model: training-mode calls restrict
# their statistics to the valid rows of the micro-batch (a boolean vector over the leading axis).
_ROW_MASK: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("jaxbn_row_mask", default=None)
# Within collect_moments: how often each layer object has recorded (a layer called twice shares weights).
_CALLS: contextvars.ContextVar[dict[int, int] | None] = contextvars.ContextVar("jaxbn_calls", default=None)


_ZEROS = initializers.zeros_init()
_ONES = initializers.ones_init()


class BatchMoments(nnx.BatchStat):
  """The batch statistics a :class:`BatchNorm` reports while jaxbn collects them.

  The value is shaped like the layer's ``mean`` plus a last axis of 3 holding ``count``, ``mean``
  and ``m2`` (sum of squared deviations) of the training-mode call of one forward pass, 3 more for
  each further call of the same layer (weights shared), in call order. It is float32, widened to
  float64 by a call with float64 input (the dtype jaxbn computes the statistics of such input in).
  :func:`collect_moments` attaches one to every jaxbn batch norm of a model for the length of a
  block; models never hold one otherwise. Being a ``BatchStat``, it travels wherever the running
  statistics travel: through ``nnx.remat``, ``nnx.jit``, and ``nnx.scan`` / ``nnx.vmap`` over
  stacked layers (the layer axis leads, as it does for ``mean``), so layers called inside lifted
  transforms report their statistics too.
  """


def _unstack(value: jax.Array) -> Stats:
  """The ``Stats`` held by a :class:`BatchMoments` value (``count, mean, m2`` on the last axis)."""
  return Stats(value[..., 0], value[..., 1], value[..., 2])


def batch_norm_layers(model: Any) -> list[tuple[tuple[Any, ...], BatchNorm]]:
  """Every jaxbn :class:`BatchNorm` in ``model``'s graph, with its path, in graph order."""
  return [(tuple(path), node) for path, node in nnx.iter_graph(model) if isinstance(node, BatchNorm)]


@contextlib.contextmanager
def collect_moments(
  model: Any, row_mask: jax.Array | None = None
) -> Iterator[Callable[..., dict[tuple[Any, ...], Any]]]:
  """Within the block, training-mode calls of ``model``'s jaxbn batch norms record their statistics.

  Every :class:`BatchNorm` in ``model`` gets a zeroed :class:`BatchMoments` for the block (removed
  on exit); the block's value, ``read()``, returns ``{path: Stats}`` for every such layer, with
  count 0 for a layer that was not called in training mode, merged over the calls of a layer called
  more than once; ``read(per_call=True)`` gives such a layer a tuple of each call's ``Stats`` in call
  order instead (one running update per call, as the layer itself applies them). Call ``read()`` after the forward
  pass, at the same trace level as the model (e.g. inside the same ``jax.jit``/``jax.grad``).

  Args:
    model: the ``nnx`` module (a graph of them); changed in place for the block only.
    row_mask: optional boolean vector over the leading axis of the inputs: training-mode calls
      then use only the marked rows for their statistics, combined with any ``mask`` they get.

  Yields:
    ``read(per_call=False) -> {path: Stats or tuple of Stats}``.
  """
  fn = "jaxbn.nnx.collect_moments"
  if not isinstance(model, nnx.Module):
    raise TypeError(f"{fn}: model must be a flax.nnx.Module, got {type(model).__name__}.")
  if row_mask is not None:
    row_mask = _checks.as_array(fn, "row_mask", row_mask)
    if row_mask.dtype != jnp.bool_:
      raise TypeError(f"{fn}: row_mask must be a boolean vector (True marks valid rows), got dtype {row_mask.dtype}.")
    if row_mask.ndim != 1:
      raise ValueError(
        f"{fn}: row_mask must be a vector over the leading axis of the inputs, got shape {row_mask.shape}."
      )
  layers = batch_norm_layers(model)
  if any(isinstance(getattr(bn, "batch_moments", None), BatchMoments) for _, bn in layers):
    raise ValueError(
      f"{fn}: the model already holds jaxbn.nnx.BatchMoments: it is already collecting "
      "(collect_moments blocks do not nest)."
    )
  for _, bn in layers:
    bn.batch_moments = BatchMoments(jnp.zeros((*jnp.shape(bn.mean[...]), 3), jnp.float32))
  token = _ROW_MASK.set(row_mask)
  calls_token = _CALLS.set({})

  def read(per_call: bool = False):
    out = {}
    for path, bn in layers:
      value = bn.batch_moments[...]
      calls = [_unstack(value[..., j : j + 3]) for j in range(0, value.shape[-1], 3)]
      if per_call and len(calls) > 1:
        out[path] = tuple(calls)
      else:
        merged = calls[0]
        for later in calls[1:]:
          merged = merge(merged, later)
        out[path] = merged
    return out

  try:
    yield read
  finally:
    _ROW_MASK.reset(token)
    _CALLS.reset(calls_token)
    for _, bn in layers:
      if hasattr(bn, "batch_moments"):
        del bn.batch_moments


class BatchNorm(nnx.Module):
  """Batch norm with the interface and variables of ``flax.nnx.BatchNorm``, and exact statistics.

  Call ``model.train()`` (or pass ``use_running_average=False``) to normalize with batch
  statistics and update the running ones, ``model.eval()`` (or ``use_running_average=True``) to
  use the running statistics. The call-time flag takes precedence over the attribute.

  Differences from Flax, all towards accuracy: statistics use jaxbn's accurate one-pass formula in
  float32 (``use_fast_variance`` is accepted and ignored); the running statistics stay float32
  whatever ``dtype`` is (Flax casts them to ``dtype`` before normalizing); ``axis_name`` merges
  count-weighted; a mask may be boolean or 0/1; features with no valid element keep their running
  statistics and normalize to 0 (output ``bias``, gradient 0 w.r.t. ``x``), where Flax's are NaN.

  Inputs as in Flax: integer and boolean ``x`` is normalized in float32; complex ``x`` gets a
  complex mean, the real variance ``mean(|x - mean|**2)`` and a complex output. The variables keep
  their real dtype, so, as in ``flax.nnx``, the running mean keeps the real part of the complex
  batch means (``jaxbn.linen.BatchNorm``'s running mean becomes complex). Complex input takes the
  plain differentiable formula, with masks and ``axis_name``; it does not combine with
  ``ghost_batch_size``, ``renorm``, a real ``dtype``, or the statistics that
  :func:`jaxbn.recalibrate` and :mod:`jaxbn.training` collect.

  Args:
    num_features: the feature size (a Python or NumPy int), or a tuple of sizes when ``axis`` names
      several axes.
    use_running_average: use the stored statistics (True) or the batch's (False).
    axis: the feature axis or axes.
    momentum: decay of the running average: ``new = momentum * old + (1 - momentum) * batch``.
    epsilon: added to the variance.
    dtype: output dtype; by default the promotion of input, statistics and parameters (as in Flax).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: learn ``bias``.
    use_scale: learn ``scale``.
    bias_init: initializer of ``bias``.
    scale_init: initializer of ``scale``.
    axis_name: mapped axis (``jax.shard_map``, ``jax.pmap``) to merge statistics over.
    axis_index_groups: partition of ``axis_name``'s indices into groups with their own statistics.
    use_fast_variance: accepted for compatibility, no effect (statistics are always accurate).
    promote_dtype: Flax's dtype promotion hook, called with ``(x, mean, var, scale, bias)``; the
      promoted ``x``, ``scale`` and ``bias`` are used (the statistics stay float32). With the
      default, ``x`` is not cast; only the output dtype follows the promotion.
    rngs: random keys for the initializers.
    bias_metadata: metadata of the ``bias`` parameter.
    scale_metadata: metadata of the ``scale`` parameter.
    running_average: ``"ema"``, ``"debiased_ema"`` or ``"cumulative"``; the last two add a
      ``count`` BatchStat.
    unbiased_running_var: store the Bessel-corrected batch variance in the running variance.
    per_feature_count: give the ``count`` BatchStat the feature shape (see
      :class:`jaxbn.linen.BatchNorm`).
    ghost_batch_size: rows per ghost batch (see :func:`jaxbn.ghost_batch_norm`).
    renorm: use batch renormalization in training (see :func:`jaxbn.batch_renorm`).
    rmax: renorm limit of ``r``, a number or ``schedule(step)``; schedules add a ``count`` BatchStat.
    dmax: renorm limit of ``|d|``, a number or ``schedule(step)``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbn.nnx import BatchNorm
    >>> x = jax.random.normal(jax.random.key(0), (8, 3)) * 2.0 + 1.0
    >>> bn = BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    >>> sorted(nnx.to_pure_dict(nnx.state(bn, nnx.BatchStat)))
    ['mean', 'var']
    >>> y = bn(x)  # training mode by default, as in Flax
    >>> bool(jnp.allclose(bn.mean[...], 0.1 * x.mean(0), atol=1e-6))
    True
    >>> bn.eval()
    >>> y_eval = bn(x)
    >>> bool(jnp.allclose(bn.mean[...], 0.1 * x.mean(0), atol=1e-6))  # unchanged in eval
    True
  """

  if TYPE_CHECKING:  # for the checker only: Flax's class setup reads the annotations a class holds at run time
    batch_moments: BatchMoments  # attached by collect_moments for the length of its block

  def __init__(
    self,
    num_features: int | Sequence[int],
    *,
    use_running_average: bool | None = False,
    axis: int | Sequence[int] = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Any = _ZEROS,
    scale_init: Any = _ONES,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = True,
    promote_dtype: Any = dtypes.promote_dtype,
    rngs: nnx.Rngs,
    bias_metadata: Mapping[str, Any] = MappingProxyType({}),
    scale_metadata: Mapping[str, Any] = MappingProxyType({}),
    running_average: RunningAverage = "ema",
    unbiased_running_var: bool = False,
    per_feature_count: bool = False,
    ghost_batch_size: int | None = None,
    renorm: bool = False,
    rmax: Any = variants.paper_rmax,
    dmax: Any = variants.paper_dmax,
  ):
    feature_shape = _feature_shape("jaxbn.nnx.BatchNorm", num_features)
    self.mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
    if needs_count(running_average, renorm, rmax, dmax):
      self.count = nnx.BatchStat(jnp.zeros(feature_shape if per_feature_count else (), jnp.int32))

    self.scale: nnx.Param[jax.Array] | None
    if use_scale:
      self.scale = nnx.Param(scale_init(rngs.params(), feature_shape, param_dtype), **scale_metadata)
    else:
      self.scale = nnx.data(None)
    self.bias: nnx.Param[jax.Array] | None
    if use_bias:
      self.bias = nnx.Param(bias_init(rngs.params(), feature_shape, param_dtype), **bias_metadata)
    else:
      self.bias = nnx.data(None)

    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.running_average = running_average
    self.unbiased_running_var = unbiased_running_var
    self.per_feature_count = per_feature_count
    self.ghost_batch_size = ghost_batch_size
    self.renorm = renorm
    self.rmax = rmax
    self.dmax = dmax

  def __call__(self, x: Any, use_running_average: bool | None = None, *, mask: Any = None) -> jax.Array:
    """Normalizes ``x`` with batch statistics (training) or the running statistics.

    Args:
      x: the input: floating, integer or boolean (normalized in float32), or complex.
      use_running_average: overrides the attribute when given.
      mask: optional array broadcastable to ``x``; nonzero marks the elements the statistics use.

    Returns:
      The normalized input, with the shape of ``x``.
    """
    fn = "jaxbn.nnx.BatchNorm"
    use_running_average = first_from(
      use_running_average,
      self.use_running_average,
      error_msg=(
        f"{fn}: no use_running_average was given. Consider one of the following options:\n"
        "  1. pass it to the constructor: BatchNorm(..., use_running_average=True/False);\n"
        "  2. pass it at call time: bn(x, use_running_average=True/False);\n"
        "  3. switch the whole model with model.train() / model.eval() or "
        "nnx.view(model, use_running_average=True/False)."
      ),
    )
    x = _checks.as_array(fn, "x", x)
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    mean, var = self.mean[...], self.var[...]
    if self.promote_dtype is dtypes.promote_dtype:
      out_dtype = dtypes.canonicalize_dtype(x, mean, var, scale, bias, dtype=self.dtype)
    else:
      x, _, _, scale, bias = self.promote_dtype((x, mean, var, scale, bias), dtype=self.dtype)
      out_dtype = dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    if mask is not None:
      mask = jnp.asarray(mask, bool)
    has_count = isinstance(getattr(self, "count", None), nnx.BatchStat)
    count = self.count[...] if has_count else jnp.zeros((), jnp.int32)
    moments = getattr(self, "batch_moments", None)
    record = isinstance(moments, BatchMoments) and not use_running_average
    row_mask = _ROW_MASK.get()
    if row_mask is not None and not use_running_average:
      _checks.leading_rows(fn, x, row_mask, "the layer")
      rows = row_mask.reshape(row_mask.shape + (1,) * (x.ndim - 1))
      mask = rows if mask is None else jnp.logical_and(mask, rows)
    y, new_state, stats = layer_forward(
      module_options(fn, self),
      x,
      BatchNormState(mean, var, count),
      scale,
      bias,
      training=not use_running_average,
      axis=self.axis,
      mask=mask,
      dtype=out_dtype,
      want_stats=record,
    )
    if not use_running_average:
      new_mean = new_state.mean
      if jnp.iscomplexobj(new_mean) and not jnp.iscomplexobj(mean):
        new_mean = jnp.real(new_mean)  # as in flax.nnx, the running mean keeps its real dtype
      self.mean[...] = jax.lax.stop_gradient(new_mean)
      self.var[...] = jax.lax.stop_gradient(new_state.var)
      if has_count:
        self.count[...] = new_state.count
      if stats is not None and isinstance(moments, BatchMoments):  # exactly when record (want_stats in training)
        # float64 for float64 input; a later call of the same layer (weights shared) appends its own.
        value = jnp.stack([jax.lax.stop_gradient(a) for a in stats], axis=-1)
        calls = _CALLS.get()
        if calls is not None and calls.get(id(self)):
          before = moments[...]
          wide = jnp.promote_types(before.dtype, value.dtype)
          value = jnp.concatenate([before.astype(wide), value.astype(wide)], axis=-1)
        if calls is not None:
          calls[id(self)] = calls.get(id(self), 0) + 1
        moments.set_value(value)
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Used by ``nnx.view``: sets ``use_running_average`` when given.

    Args:
      use_running_average: use the stored statistics (True) or the batch's (False).
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average
