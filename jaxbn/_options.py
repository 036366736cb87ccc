"""The batch-norm options, one record checked once at the public edge.

Every public batch-norm call (:func:`jaxbn.batch_norm`, the variants, the Flax modules,
:func:`jaxbn.update_running_stats`) builds a :class:`BatchNormOptions` with
:func:`batch_norm_options`, which checks each option and raises the error that names it; every
function below the edge takes the record and re-checks nothing. A new option is a field here, its
check in :func:`batch_norm_options`, and the one function that reads it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

from jaxbn import _checks

__all__ = [
  "RUNNING_AVERAGES",
  "BatchNormOptions",
  "RunningAverage",
  "batch_norm_options",
  "feature_shape",
  "needs_count",
]

RunningAverage = Literal["ema", "debiased_ema", "cumulative"]
RUNNING_AVERAGES = ("ema", "debiased_ema", "cumulative")


@dataclasses.dataclass(frozen=True)
class BatchNormOptions:
  """The checked options of one batch-norm call (see :func:`jaxbn.batch_norm` for their meaning).

  Attributes:
    fn: the public name the call came through, for messages raised below the edge.
    momentum: decay of the running average (a number or an array, in [0, 1]).
    epsilon: added to the variance (finite, > 0).
    running_average: ``"ema"``, ``"debiased_ema"`` or ``"cumulative"``.
    unbiased_running_var: store the Bessel-corrected variance.
    axis_name: the mapped axis the statistics are merged over, or None.
    axis_index_groups: the groups of ``axis_name``'s indices as tuples of ints, or None.
    dtype: the output dtype, or None for the input's.
    fused: the closed-form backward pass: None (where reverse mode traces), True or False.
    ghost_batch_size: rows per ghost batch, or None.
    renorm: batch renormalization in training.
    rmax: renorm limit of ``r``, a number or ``schedule(step)``.
    dmax: renorm limit of ``|d|``, a number or ``schedule(step)``.
  """

  fn: str
  momentum: Any = 0.99
  epsilon: Any = 1e-5
  running_average: RunningAverage = "ema"
  unbiased_running_var: bool = False
  axis_name: Hashable | None = None
  axis_index_groups: tuple[tuple[int, ...], ...] | None = None
  dtype: jnp.dtype | None = None
  fused: bool | None = None
  ghost_batch_size: int | None = None
  renorm: bool = False
  rmax: Any = 1.0
  dmax: Any = 0.0

  @property
  def needs_count(self) -> bool:
    """Whether a layer with these options keeps the update count between calls."""
    return needs_count(self.running_average, self.renorm, self.rmax, self.dmax)

  @property
  def variant(self) -> bool:
    """Whether training runs a variant (ghost batches or renormalization) rather than plain batch norm."""
    return self.ghost_batch_size is not None or self.renorm


def needs_count(running_average: Any, renorm: Any, rmax: Any, dmax: Any) -> bool:
  """Whether a layer with these options keeps the update count between calls (the running average's
  weights or a renorm schedule read it)."""
  return running_average != "ema" or bool(renorm and (callable(rmax) or callable(dmax)))


def batch_norm_options(
  fn: str,
  *,
  momentum: Any = 0.99,
  epsilon: Any = 1e-5,
  running_average: Any = "ema",
  unbiased_running_var: Any = False,
  axis_name: Hashable | None = None,
  axis_index_groups: Sequence[Sequence[int]] | None = None,
  dtype: Any = None,
  fused: Any = None,
  ghost_batch_size: Any = None,
  renorm: Any = False,
  rmax: Any = 1.0,
  dmax: Any = 0.0,
) -> BatchNormOptions:
  """The checked :class:`BatchNormOptions`; raises the error naming ``fn`` and the first bad option.

  Values only known at run time (a traced ``momentum``) pass; they are checked where JAX knows them.
  """
  _checks.in_range(fn, "momentum", momentum, 0.0, 1.0)
  _checks.positive(fn, "epsilon", epsilon, finite=True)
  if not isinstance(running_average, str) or running_average not in RUNNING_AVERAGES:
    raise ValueError(f"{fn}: running_average must be one of {RUNNING_AVERAGES}, got {running_average!r}.")
  unbiased_running_var = _checks.static_bool(fn, "unbiased_running_var", unbiased_running_var)
  if axis_index_groups is not None:
    if axis_name is None:
      raise ValueError(f"{fn}: axis_index_groups={axis_index_groups!r} needs an axis_name to group over.")
    axis_index_groups = tuple(tuple(int(i) for i in g) for g in axis_index_groups)
  dtype = _checks.floating_dtype(fn, "dtype", dtype)
  fused = _checks.static_bool(fn, "fused", fused, allow_none=True)
  if ghost_batch_size is not None:
    if not _checks.is_int(ghost_batch_size) or ghost_batch_size < 1:
      raise ValueError(f"{fn}: ghost_batch_size must be a positive int, got {ghost_batch_size!r}.")
    ghost_batch_size = int(ghost_batch_size)
  renorm = _checks.static_bool(fn, "renorm", renorm)
  for arg, value, lo in (("rmax", rmax, 1.0), ("dmax", dmax, 0.0)):
    if not callable(value):
      _checks.at_least(fn, arg, value, lo)
  return BatchNormOptions(
    fn,
    momentum,
    epsilon,
    running_average,
    unbiased_running_var,
    axis_name,
    axis_index_groups,
    dtype,
    fused,
    ghost_batch_size,
    renorm,
    rmax,
    dmax,
  )


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(BatchNormOptions) if f.name != "fn")
"""The options' names, which are also the keyword names of the public functions that take them."""


def options_from(fn: str, arguments: Mapping[str, Any], **fixed: Any) -> BatchNormOptions:
  """The checked options among a public function's ``arguments`` (its ``locals()``), with ``fixed`` ones.

  A public function names its options in its signature (for users and their tools) and hands
  them over in one piece: ``options_from(fn, locals())`` at its top, before any other local.
  """
  given = {name: value for name, value in arguments.items() if name in OPTION_NAMES}
  return batch_norm_options(fn, **given, **fixed)


def feature_shape(fn: str, num_features: Any) -> tuple[int, ...]:
  """``num_features`` (a positive Python or NumPy int, or a sequence of them) as a shape tuple."""
  if _checks.is_int(num_features):
    shape = (num_features,)
  elif isinstance(num_features, (Sequence, np.ndarray)) and not isinstance(num_features, (str, bytes)):
    shape = tuple(num_features)
  else:
    shape = ()
  if not shape or not all(_checks.is_int(d) and d > 0 for d in shape):
    raise ValueError(f"{fn}: num_features must be a positive int or a tuple of them, got {num_features!r}.")
  return tuple(int(d) for d in shape)
