"""A context through which a training loop supplies the batch statistics of jaxbn's batch-norm layers.

While a hook is installed, every training-mode call of a jaxbn module (``jaxbn.linen.BatchNorm``,
``jaxbn.nnx.BatchNorm``) asks it, in call order, for the statistics to normalize with:
``hook(x, feature_axes, mask) -> Stats | None``. ``None`` keeps the layer's own batch statistics;
a ``Stats`` replaces them (differentiably: gradients flow into its ``mean`` and ``m2``) and feeds
the running update. :mod:`jaxbn.training` uses it for batch norm with statistics over a whole
dataset that is processed in micro-batches.

A second context names the mesh axes that a training loop split the batch over when it runs the
loss per device (inside ``jax.shard_map``): training-mode batch norms without an ``axis_name`` of
their own reduce their statistics over those axes (:func:`batch_axes`), so that they see the same
batch as under ``jax.jit`` on the global arrays.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import jax

from jaxbn.stats import Stats

StatsHook = Callable[[jax.Array, tuple[int, ...], Any], Stats | None]

_HOOK: contextvars.ContextVar[StatsHook | None] = contextvars.ContextVar("jaxbn_stats_hook", default=None)
_AXES: contextvars.ContextVar[Any] = contextvars.ContextVar("jaxbn_batch_axes", default=None)


def current() -> StatsHook | None:
  """The installed hook, or None."""
  return _HOOK.get()


@contextlib.contextmanager
def _set(var: contextvars.ContextVar[Any], value: Any) -> Iterator[Any]:
  token = var.set(value)
  try:
    yield value
  finally:
    var.reset(token)


def stats_hook(hook: StatsHook) -> contextlib.AbstractContextManager[StatsHook]:
  """Installs ``hook`` for the training-mode batch-norm calls traced within the block."""
  return _set(_HOOK, hook)


def batch_axes() -> Any:
  """The mesh axes a training loop split the batch over (the default ``axis_name`` of batch norms), or None."""
  return _AXES.get()


def split_batch(axes: Any) -> contextlib.AbstractContextManager[Any]:
  """Within the block, training-mode batch norms without an ``axis_name`` reduce their statistics over ``axes``."""
  return _set(_AXES, axes)
