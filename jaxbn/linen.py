"""``flax.linen`` batch norm that drops into existing models: same constructor, call and variables.

Swap ``nn.BatchNorm`` for ``jaxbn.linen.BatchNorm`` and a model keeps its checkpoint structure
(``params``: ``scale``, ``bias``; ``batch_stats``: ``mean``, ``var``) and its results up to float
rounding, while its statistics become exact: accurate at large means, count-weighted across
devices with masks, accumulated in float32. Options that Flax lacks (running-average modes,
unbiased running variance, ghost batches, batch renormalization) are off by default, and only the
ones that need it add a variable (``batch_stats/count``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import dtypes
from jax.nn import initializers

from jaxbn import _checks, variants
from jaxbn._layer import layer_forward, module_options
from jaxbn._options import RunningAverage
from jaxbn.functional import BatchNormState
from jaxbn.stats import Stats, merge

__all__ = ["MOMENTS", "BatchNorm", "record_moments"]

MOMENTS = "batch_moments"
"""Collection into which training-mode calls write their batch statistics when it is named mutable.

:func:`jaxbn.recalibrate` and :func:`jaxbn.training.linen_loss` make it mutable to collect exact
per-layer statistics; each layer stores ``count``, ``mean`` and ``m2`` (sum of squared
deviations), merged over repeated calls. Lifted transforms that list their collections
(``nn.scan``, ``nn.vmap``) must carry it where they carry ``batch_stats``, e.g.
``variable_axes={"params": 0, "batch_stats": 0, MOMENTS: 0}``.
"""


class BatchNorm(nn.Module):
  """Batch norm with the interface and variables of ``flax.linen.BatchNorm``, and exact statistics.

  Every attribute of ``flax.linen.BatchNorm`` is accepted with the same default and meaning, and
  the variables have the same names, shapes, dtypes and initial values; as in Flax, the running
  statistics are not updated during ``init``, and ``axis_name`` is ignored there.

  Differences, all towards accuracy:

  * Statistics are computed with jaxbn's one-pass shifted formula in float32 (float64 for float64
    input), accurate where ``E[x^2] - E[x]^2`` cancels; ``use_fast_variance`` is accepted and
    ignored, since the accurate formula is also a single pass.
  * ``force_float32_reductions=False`` keeps Flax's storage of the running statistics in
    ``param_dtype``; the reductions themselves stay in float32.
  * With ``axis_name`` the statistics are merged count-weighted (exact with masks and uneven
    devices) where Flax averages per-device means.
  * ``mask`` may be boolean or 0/1 (converted with ``mask != 0``); where no element of a feature is
    valid the running statistics keep their values instead of becoming NaN, and the feature
    normalizes to 0: its output is ``bias`` (0 without one), its gradient w.r.t. ``x`` 0.

  Inputs as in Flax: integer and boolean ``x`` is normalized in float32; complex ``x`` gets a
  complex mean, the real variance ``mean(|x - mean|**2)`` and a complex output, and the running
  mean becomes complex (the running variance stays real). Complex input takes the plain
  differentiable formula, with masks and ``axis_name``; it does not combine with
  ``ghost_batch_size``, ``renorm``, a real ``dtype``, or the statistics that
  :func:`jaxbn.recalibrate` and :mod:`jaxbn.training` collect.

  Extras (defaults reproduce Flax):

  * ``running_average``: ``"ema"`` (Flax), ``"debiased_ema"`` (Haiku) or ``"cumulative"``
    (PyTorch ``momentum=None``); the last two add ``batch_stats/count``.
  * ``unbiased_running_var``: store the 1/(N-1) variance, as PyTorch does.
  * ``ghost_batch_size``: normalize contiguous sub-batches of the leading non-feature axis with
    their own statistics; the running statistics see the whole batch
    (see :func:`jaxbn.ghost_batch_norm`).
  * ``renorm``, ``rmax``, ``dmax``: batch renormalization (see :func:`jaxbn.batch_renorm`);
    schedules (the default is the paper's) add ``batch_stats/count``, the step they read.

  Attributes:
    use_running_average: use the stored statistics (True) or the batch's (False); pass it here or
      at call time, exactly once.
    axis: the feature axis or axes.
    momentum: decay of the running average: ``new = momentum * old + (1 - momentum) * batch``.
    epsilon: added to the variance.
    dtype: output dtype; by default the promotion of the input with the parameters (as in Flax).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: learn ``bias``.
    use_scale: learn ``scale``.
    bias_init: initializer of ``bias``.
    scale_init: initializer of ``scale``.
    axis_name: mapped axis (``jax.shard_map``, ``jax.pmap``) to merge statistics over. Under
      ``jax.jit`` with sharded inputs leave it None: statistics are then global already.
    axis_index_groups: partition of ``axis_name``'s indices into groups with their own statistics.
    use_fast_variance: accepted for compatibility, no effect (statistics are always accurate).
    force_float32_reductions: False stores the running statistics in ``param_dtype`` (Flax's
      layout); reductions are float32 either way.
    running_average: ``"ema"``, ``"debiased_ema"`` or ``"cumulative"``.
    unbiased_running_var: store the Bessel-corrected batch variance in the running variance.
    per_feature_count: give ``batch_stats/count`` the feature shape, so that ``"cumulative"`` and
      ``"debiased_ema"`` average each feature over the batches in which it had a valid element
      (for masks that leave some features empty; see :func:`jaxbn.update_running_stats`).
    ghost_batch_size: rows per ghost batch, or None for ordinary batch norm.
    renorm: use batch renormalization in training.
    rmax: renorm limit of ``r`` (>= 1), a number or ``schedule(step)``.
    dmax: renorm limit of ``|d|`` (>= 0), a number or ``schedule(step)``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxbn.linen import BatchNorm
    >>> x = jax.random.normal(jax.random.key(0), (8, 3)) * 2.0 + 1.0
    >>> bn = BatchNorm(momentum=0.9)
    >>> variables = bn.init(jax.random.key(1), x, use_running_average=False)
    >>> jax.tree.map(jnp.shape, variables)
    {'batch_stats': {'mean': (3,), 'var': (3,)}, 'params': {'bias': (3,), 'scale': (3,)}}
    >>> y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    >>> bool(jnp.allclose(updates["batch_stats"]["mean"], 0.1 * x.mean(0), atol=1e-6))
    True
    >>> y_eval = bn.apply({**variables, **updates}, x, use_running_average=True)

    Extras add variables only when they need them:

    >>> bn = BatchNorm(use_running_average=False, running_average="cumulative", ghost_batch_size=4)
    >>> sorted(bn.init(jax.random.key(1), x)["batch_stats"])
    ['count', 'mean', 'var']
  """

  use_running_average: bool | None = None
  axis: int | Sequence[int] = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Any = initializers.zeros
  scale_init: Any = initializers.ones
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  running_average: RunningAverage = "ema"
  unbiased_running_var: bool = False
  per_feature_count: bool = False
  ghost_batch_size: int | None = None
  renorm: bool = False
  rmax: Any = variants.paper_rmax
  dmax: Any = variants.paper_dmax

  @nn.compact
  def __call__(self, x: Any, use_running_average: bool | None = None, *, mask: Any = None) -> jax.Array:
    """Normalizes ``x`` with batch statistics (training) or the running statistics.

    Args:
      x: the input: floating, integer or boolean (normalized in float32), or complex.
      use_running_average: use the stored statistics (True) or the batch's (False); give it here
        exactly when the attribute is None.
      mask: optional array broadcastable to ``x``; nonzero marks the elements the statistics use.

    Returns:
      The normalized input, with the shape of ``x``.
    """
    fn = "jaxbn.linen.BatchNorm"
    if self.use_running_average is None and use_running_average is None:
      raise ValueError(f"{fn}: use_running_average must be passed to the constructor or at call time, exactly once.")
    if self.use_running_average is not None and use_running_average is not None:
      raise ValueError(
        f"{fn}: use_running_average was passed to the constructor and at call time "
        f"({self.use_running_average!r}, {use_running_average!r}); pass it exactly once."
      )
    use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
    x = _checks.as_array(fn, "x", x)
    initializing = self.is_initializing()
    opts = module_options(fn, self, bound=not initializing)  # Flax ignores axis_name in init
    axes = _checks.feature_axes(fn, x.ndim, self.axis)
    fshape = tuple(x.shape[a] for a in axes)
    stat_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, stat_dtype), fshape)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, stat_dtype), fshape)
    ra_count = None
    if opts.needs_count:
      cshape = fshape if self.per_feature_count else ()
      ra_count = self.variable("batch_stats", "count", lambda: jnp.zeros(cshape, jnp.int32))
    scale = self.param("scale", self.scale_init, fshape, self.param_dtype) if self.use_scale else None
    bias = self.param("bias", self.bias_init, fshape, self.param_dtype) if self.use_bias else None
    out_dtype = dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    if mask is not None:
      mask = jnp.asarray(mask, bool)

    count = ra_count.value if ra_count is not None else jnp.zeros((), jnp.int32)
    state = BatchNormState(ra_mean.value, ra_var.value, count)
    # Record only when MOMENTS is asked for by name: `mutable=True` (every collection) must not
    # add a collection to the user's variables.
    record = (
      not use_running_average
      and not initializing
      and self.is_mutable_collection(MOMENTS)
      and not self.is_mutable_collection("jaxbn: any other collection")
    )
    y, new_state, stats = layer_forward(
      opts,
      x,
      state,
      scale,
      bias,
      training=not use_running_average,
      axis=axes,
      mask=mask,
      dtype=out_dtype,
      want_stats=record,
    )
    if not use_running_average and not initializing:
      ra_mean.value = new_state.mean
      ra_var.value = new_state.var
      if ra_count is not None:
        ra_count.value = new_state.count
    if stats is not None:  # exactly when record: layer_forward returns them for want_stats in training
      record_moments(self, stats)
    return y


def record_moments(module: nn.Module, stats: Stats) -> None:
  """Records one call's ``stats`` in ``module``'s entry of the :data:`MOMENTS` collection (which must be mutable).

  ``count``, ``mean`` and ``m2`` hold the statistics merged over every call of the forward pass (what
  :func:`jaxbn.recalibrate` uses). A layer called more than once (weights shared) also gets
  ``calls``, a tuple with each call's own ``Stats`` in call order, from which
  :func:`jaxbn.training.linen_loss` applies one running update per call, as ``model.apply`` does.
  """
  fn = "jaxbn.linen.record_moments"
  if not isinstance(module, nn.Module):
    raise TypeError(f"{fn}: module must be a flax.linen.Module (inside its apply), got {type(module).__name__}.")
  stats = Stats(*(jax.lax.stop_gradient(v) for v in _checks.stats(fn, stats)))
  if module.has_variable(MOMENTS, "count"):
    before = Stats(*(module.get_variable(MOMENTS, k) for k in ("count", "mean", "m2")))
    calls = module.get_variable(MOMENTS, "calls") if module.has_variable(MOMENTS, "calls") else (before,)
    module.put_variable(MOMENTS, "calls", (*calls, stats))
    stats = merge(before, stats)
  for k, v in zip(("count", "mean", "m2"), stats, strict=True):
    module.put_variable(MOMENTS, k, v)
