"""The one layer dispatcher the Flax modules share.

:class:`jaxbn.linen.BatchNorm` and :class:`jaxbn.nnx.BatchNorm` hold the same options under the same
attribute names (:data:`OPTION_ATTRIBUTES`); each builds a :class:`jaxbn._options.BatchNormOptions`
from itself with :func:`module_options` and runs :func:`layer_forward`, which takes input of any
kind Flax's layers take and picks plain batch norm, a variant or evaluation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxbn import _checks, _hooks
from jaxbn._kernel import inv_std, normalize, scale_shift
from jaxbn._options import OPTION_NAMES, BatchNormOptions, batch_norm_options
from jaxbn.functional import BatchNormState, check_call, evaluate, running_update, train
from jaxbn.stats import Stats, compute_complex_stats
from jaxbn.variants import check_ghost_rows, train_variant

__all__ = ["OPTION_ATTRIBUTES", "layer_forward", "module_options"]

OPTION_ATTRIBUTES = tuple(name for name in OPTION_NAMES if name not in ("dtype", "fused"))
"""The modules' attributes that are batch-norm options, named as the fields of ``BatchNormOptions``.

A module's ``dtype`` is its output dtype, resolved with Flax's promotion rules at each call and
passed to :func:`layer_forward`; the modules always take the closed-form backward pass where it applies.
"""


def module_options(fn: str, module: Any, *, bound: bool = True) -> BatchNormOptions:
  """The checked options of a module (``fn`` its public name); ``bound=False`` drops its axis name (Flax's init)."""
  values = {name: getattr(module, name) for name in OPTION_ATTRIBUTES}
  if not bound or values["axis_name"] is None:
    values["axis_name"] = values["axis_index_groups"] = None
  return batch_norm_options(fn, **values)


def layer_forward(
  opts: BatchNormOptions,
  x: Any,
  state: BatchNormState,
  scale: jax.Array | None,
  bias: jax.Array | None,
  *,
  training: bool,
  axis: int | Sequence[int],
  mask: jax.Array | None,
  dtype: Any,
  want_stats: bool = False,
) -> tuple[jax.Array, BatchNormState, Stats | None]:
  """What the Flax modules run: plain batch norm, or a variant when one is configured.

  Returns ``(y, new_state, stats)``; ``stats`` are the merged batch statistics that fed the
  running update (for recalibration) when ``want_stats`` and ``training``, else None. ``dtype`` is
  the module's output dtype.

  As Flax's modules do (and :func:`jaxbn.batch_norm` does not), it takes integer and boolean input,
  normalized in float32, and complex input (see :func:`_complex_forward`).
  """
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  training = _checks.static_bool(opts.fn, "training", training)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    call = check_call(opts.fn, x, state, scale, bias, axis, mask, real=False)
    return _complex_forward(opts, call, training=training, dtype=dtype, want_stats=want_stats)
  opts = dataclasses.replace(opts, dtype=_checks.floating_dtype(opts.fn, "dtype", dtype))
  call = check_call(opts.fn, x, state, scale, bias, axis, mask)
  if not training:
    return evaluate(opts, call)
  check_ghost_rows(opts, call)
  y, new_state, stats = (train_variant if opts.variant else train)(opts, call)
  return y, new_state, stats if want_stats else None


def _complex_forward(
  opts: BatchNormOptions, call: Any, *, training: bool, dtype: Any, want_stats: bool
) -> tuple[jax.Array, BatchNormState, None]:
  """Flax's batch norm of complex ``x``: complex mean, real variance ``mean(|x - mean|**2)``, real scale and bias.

  The statistics are jaxbn's (see :func:`jaxbn.stats.compute_complex_stats`: shifted sums, masks,
  count-weighted across ``axis_name``); the gradient is autodiff of the plain formula. The running
  mean becomes complex, as Flax's does (its dtype promoted with the statistics'), the running
  variance stays real.
  """
  fn, x = opts.fn, call.x
  if dtype is not None and not jnp.issubdtype(dtype, jnp.complexfloating):
    raise TypeError(
      f"{fn}: dtype={jnp.dtype(dtype)} is real but x is complex ({x.dtype}), so the output would lose its "
      "imaginary part. Consider one of the following options:\n"
      "  1. dtype=None or a complex dtype, for a complex output;\n"
      "  2. normalize a real input, e.g. jnp.real(x) or jnp.abs(x)."
    )
  if opts.ghost_batch_size is not None:
    raise ValueError(
      f"{fn}: ghost_batch_size={opts.ghost_batch_size!r} is not supported for complex input (x is {x.dtype}); "
      "use ghost_batch_size=None, or a real input."
    )
  if opts.renorm:
    raise ValueError(
      f"{fn}: renorm=True is not supported for complex input (x is {x.dtype}); use renorm=False, or a real input."
    )
  cdt = _checks.stats_dtype(jnp.finfo(x.dtype).dtype)
  out = x.dtype if dtype is None else dtype
  state = call.state
  if not training:
    mean = jnp.asarray(state.mean).astype(jnp.promote_types(cdt, jnp.complex64))
    var = jnp.asarray(state.var).astype(cdt)
    return normalize(x, mean, var, call.scale, call.bias, call.axes, opts.epsilon, out), state, None
  if want_stats or _hooks.current() is not None:
    raise ValueError(
      f"{fn}: x is complex ({x.dtype}), and the batch statistics that jaxbn.recalibrate and jaxbn.training "
      "collect or supply are for real input; normalize a real input in such a model."
    )
  stats = compute_complex_stats(
    x, call.axes, mask=call.mask, axis_name=opts.axis_name, axis_index_groups=opts.axis_index_groups, fn=fn
  )
  y = scale_shift(x, stats.mean, inv_std(stats.var, stats.count, opts.epsilon), call.scale, call.bias, call.axes, out)
  old_mean = jnp.asarray(state.mean)
  mean = old_mean.astype(jnp.promote_types(old_mean.dtype, stats.mean.dtype))
  return y, running_update(opts, call.counted_state._replace(mean=mean), stats), None
