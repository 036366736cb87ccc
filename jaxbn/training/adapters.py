"""Loss adapters: a :class:`Loss` for a ``flax.linen`` or ``flax.nnx`` model whose batch norms report their statistics.

Every batch norm called in training mode normalizes over the micro-batch's valid rows only, and the
statistics it normalized with come back in ``LossAux.stats``, so that the step updates the running statistics once per
step, from the exact merge of all micro-batches, with each layer's own momentum and convention.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import FrozenDict, freeze, unfreeze
from flax.linen.normalization import _compute_stats as _flax_stats

from jaxbn import _checks, _hooks
from jaxbn import stats as _stats
from jaxbn.functional import BatchNormState, update_running_stats
from jaxbn.linen import MOMENTS, record_moments
from jaxbn.linen import BatchNorm as JaxbnBatchNorm
from jaxbn.nnx import batch_norm_layers, collect_moments
from jaxbn.training.loss import Loss
from jaxbn.training.state import LossAux, TrainState


def _check_adapter(fn: str, model: Any, module_type: type, type_name: str, loss: Any, metrics: Any) -> None:
  """The arguments every loss adapter takes: a model of its kind, a loss and optional metrics functions."""
  if not isinstance(model, module_type):
    raise TypeError(f"{fn}: model must be a {type_name}, got {type(model).__name__}.")
  _checks.callable_arg(fn, "loss", loss)
  if metrics is not None:
    _checks.callable_arg(fn, "metrics", metrics)


def _masked_means(loss, metrics, out, targets, mask):
  """Mean loss (and metrics) over the valid rows; every row when ``mask`` is None."""

  def mean(v):
    if mask is None:
      return jnp.mean(v)
    valid = mask.reshape(mask.shape + (1,) * (v.ndim - 1))
    per_row = v.size // v.shape[0]
    return jnp.sum(jnp.where(valid, v, 0)) / (jnp.maximum(jnp.sum(mask), 1) * per_row)

  extra = None if metrics is None else jax.tree.map(mean, metrics(out, targets))
  return mean(loss(out, targets)), extra


def _fold_calls(state: BatchNormState, stats: Any, **options: Any) -> BatchNormState:
  """``state`` after one running update per call: ``stats`` is a layer's ``Stats``, or a tuple of one per call."""
  for call in (stats,) if isinstance(stats, _stats.Stats) else stats:
    state = update_running_stats(state, call, **options)
  return state


# ---- Flax linen ---------------------------------------------------------------------------------


def linen_loss(
  model: nn.Module,
  loss: Callable[[Any, Any], jax.Array],
  *,
  inputs: str = "x",
  targets: str = "y",
  metrics: Callable[[Any, Any], Any] | None = None,
  rng_streams: Sequence[str] = (),
  **apply_kwargs: Any,
) -> Loss:
  """A :func:`full_batch_step` loss function for a ``flax.linen`` model with batch norm.

  Every ``flax.linen.BatchNorm`` / ``jaxbn.linen.BatchNorm`` called in training mode receives the
  micro-batch's row mask (combined with any mask the model passes), and the statistics it normalizes
  with are reported so that the step updates the running statistics once, from the exact merge of
  all micro-batches', with the layer's own momentum and running-average convention. Those of a
  ``flax.linen.BatchNorm`` are Flax's own (its ``use_fast_variance`` formula, which loses digits
  where ``|mean| >> std``); ``jaxbn.linen.BatchNorm``'s variance stays accurate there.

  Args:
    model: the linen module; called as ``model.apply(variables, batch[inputs], **apply_kwargs)``.
    loss: ``loss(outputs, batch[targets]) -> per-example losses`` with a leading example axis,
      e.g. ``optax.softmax_cross_entropy_with_integer_labels``.
    inputs: key of the inputs in each batch.
    targets: key of the targets in each batch.
    metrics: optional ``metrics(outputs, batch[targets]) -> pytree of per-example values``,
      averaged over valid rows into ``StepMetrics.extra`` (e.g. accuracy).
    rng_streams: names of the random streams the model draws from in training, e.g.
      ``("dropout",)``. Each micro-batch of each step then gets fresh keys, derived from the
      state's key (``TrainState.create(..., key=...)``); give ``rngs=`` to ``model.apply`` this
      way, never as a fixed keyword, which would repeat the same dropout masks every step.
    **apply_kwargs: passed to ``model.apply`` for training, e.g. ``train=True``.

  Returns:
    A :class:`Loss`: the loss function, called like a plain one, with its ``update_batch_stats``
    (which :func:`full_batch_step` picks up) and ``takes_key`` (True with ``rng_streams``).

  Raises:
    ValueError: ``rngs`` among ``apply_kwargs``, or a bad ``rng_streams``.
    TypeError: ``model`` is no ``flax.linen.Module``, or ``loss`` or ``metrics`` not callable.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax, jaxbn
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train=True):
    ...     return nn.Dense(1)(jaxbn.linen.BatchNorm(use_running_average=not train)(x))[:, 0]
    >>> model, opt = Net(), optax.sgd(0.1)
    >>> data = {"x": jnp.arange(20.0).reshape(10, 2), "y": jnp.ones(10)}
    >>> variables = model.init(jax.random.key(0), data["x"], train=False)
    >>> loss_fn = jaxbn.training.linen_loss(model, optax.l2_loss, train=True)
    >>> state = jaxbn.training.TrainState.create(variables["params"], variables["batch_stats"], opt)
    >>> state, metrics = jaxbn.training.full_batch_step(loss_fn, opt, micro_batch_size=4)(state, data)
    >>> isinstance(loss_fn, jaxbn.training.Loss), int(state.step)
    (True, 1)
  """
  fn = "jaxbn.training.linen_loss"
  _check_adapter(fn, model, nn.Module, "flax.linen.Module", loss, metrics)
  if "rngs" in apply_kwargs:
    raise ValueError(
      f"{fn}: rngs=... would give model.apply the same keys on every step and micro-batch "
      "(the same dropout masks throughout); name the streams instead, linen_loss(..., rng_streams=('dropout',)), "
      "and give the state a key: TrainState.create(..., key=jax.random.key(0))."
    )
  if (
    rng_streams is None
    or isinstance(rng_streams, str)
    or not isinstance(rng_streams, (tuple, list))
    or not all(isinstance(name, str) for name in rng_streams)
  ):
    raise ValueError(f"{fn}: rng_streams must be a sequence of stream names, e.g. ('dropout',), got {rng_streams!r}.")
  layers = _TracedLayers()
  forward = _LinenForward(model, loss, inputs, targets, metrics, tuple(rng_streams), dict(apply_kwargs), layers)
  return Loss(forward, functools.partial(_linen_update, layers), takes_key=bool(rng_streams))


class _TracedLayers:
  """The batch norms a linen loss called in training mode on its latest trace, by path, in call order.

  The loss records them as it traces; its ``update_batch_stats`` reads each layer's momentum and
  running-average convention from them, so it serves statistics from that loss only.
  """

  def __init__(self) -> None:
    self._modules: dict[tuple[str, ...], nn.Module] = {}

  def start(self) -> None:
    """Forgets the layers of the previous trace: a new trace of the loss begins."""
    self._modules.clear()

  def add(self, module: nn.Module) -> None:
    self._modules[tuple(module.path)] = module

  def paths(self) -> list[tuple[str, ...]]:
    return list(self._modules)

  def module(self, path: tuple[str, ...]) -> nn.Module:
    """The layer at ``path``, which the loss must have called on its latest trace."""
    if path not in self._modules:
      known = ", ".join("/".join(p) for p in self._modules) or "none"
      raise ValueError(
        f"jaxbn.training.linen_loss: update_batch_stats got statistics for the batch norm at {'/'.join(path)}, "
        f"which the loss function did not call in training mode on its latest trace (it called: {known}). "
        "Pass it the statistics (LossAux.stats) of the same loss function, after that function has run."
      )
    return self._modules[path]


@dataclasses.dataclass(frozen=True, eq=False)
class _LinenForward:
  """The loss function of :func:`linen_loss`: ``(params, batch_stats, batch, mask, key=None) -> (loss, LossAux)``."""

  model: nn.Module
  loss: Callable[[Any, Any], jax.Array]
  inputs: str
  targets: str
  metrics: Callable[[Any, Any], Any] | None
  rng_streams: tuple[str, ...]
  apply_kwargs: dict[str, Any]
  layers: _TracedLayers

  def __call__(self, params: Any, batch_stats: Any, batch: Any, mask: Any, key: Any = None) -> tuple[Any, LossAux]:
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    self.layers.start()
    kwargs = dict(self.apply_kwargs)
    if self.rng_streams:
      kwargs["rngs"] = {name: jax.random.fold_in(key, j) for j, name in enumerate(self.rng_streams)}
    with nn.intercept_methods(functools.partial(_intercept, self.layers, mask)):
      out, updates = self.model.apply(variables, batch[self.inputs], mutable=["batch_stats", MOMENTS], **kwargs)
    collected = _collected_moments(updates, self.layers.paths())
    value, extra = _masked_means(self.loss, self.metrics, out, batch[self.targets], mask)
    return value, LossAux(stats=collected or None, metrics=extra)


def _intercept(layers: _TracedLayers, mask: Any, next_fun, args, kwargs, context):
  """Gives a training-mode batch norm the micro-batch's row mask, records it, and has it report its statistics."""
  module = context.module
  if context.method_name != "__call__" or not _in_training(module, args, kwargs):
    return next_fun(*args, **kwargs)
  x = jnp.asarray(args[0])
  given = kwargs.get("mask")
  full = None if given is None else jnp.asarray(given) != 0
  if mask is not None:
    _checks.leading_rows("jaxbn.training.linen_loss", x, mask, f"the batch norm at {'/'.join(module.path)}")
    rows = mask.reshape(mask.shape + (1,) * (x.ndim - 1))
    full = rows if full is None else jnp.logical_and(rows, full)
    kwargs = {**kwargs, "mask": full}
  layers.add(module)
  if not isinstance(module, JaxbnBatchNorm):  # jaxbn's layer reports the statistics it used in MOMENTS itself
    _record_flax_stats(module, x, full)
  return next_fun(*args, **kwargs)


def _in_training(module: nn.Module, args: tuple, kwargs: dict) -> bool:
  """Whether a call of ``module`` is a batch norm normalizing with batch statistics (not running ones, not init)."""
  if not isinstance(module, (nn.BatchNorm, JaxbnBatchNorm)):
    return False
  use_ra = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
  use_ra = module.use_running_average if use_ra is None else use_ra
  return not (use_ra or module.is_initializing())


def _record_flax_stats(module: nn.BatchNorm, x: jax.Array, mask: Any) -> None:
  """Records in MOMENTS, where jaxbn's layers put theirs, the statistics a ``flax.linen.BatchNorm`` call
  normalizes with.

  They are Flax's own (:func:`flax.linen.normalization._compute_stats` with the layer's settings and
  mask, e.g. its ``use_fast_variance``), so XLA computes them once for both uses (its common
  subexpressions are merged) and the running statistics are those of the statistics the layer used,
  as in Flax. Across devices (``axis_name``) Flax averages the devices' means with equal weights, wrong
  where their valid counts differ; there jaxbn's exact merge is recorded instead
  (:func:`jaxbn.stats.compute_stats`). The MOMENTS collection is carried by lifted transforms
  (nn.scan, nn.remat) like any other, so the statistics come back from inside them too.
  """
  if _hooks.current() is not None:
    raise TypeError(
      f"jaxbn.training.linen_loss: the batch norm at {'/'.join(module.path)} is flax.linen.BatchNorm, which "
      "computes its statistics itself and cannot be given others (those of all rows for bn_mode='exact', "
      "or of one device's rows); replace it with jaxbn.linen.BatchNorm (same arguments and variables)."
    )
  if not module.is_mutable_collection(MOMENTS):
    return  # a lift that does not carry MOMENTS: reported as missing by _collected_moments
  features = tuple(sorted(a % x.ndim for a in np.atleast_1d(module.axis)))
  if module.axis_name is not None:
    stats = _stats.compute_stats(
      x, features, mask=mask, axis_name=module.axis_name, axis_index_groups=module.axis_index_groups
    )
  else:
    reduced = tuple(a for a in range(x.ndim) if a not in features)
    mean, var = map(
      jnp.asarray,
      _flax_stats(
        x,
        reduced,
        module.dtype,
        use_fast_variance=module.use_fast_variance,
        mask=mask,
        force_float32_reductions=module.force_float32_reductions,
      ),
    )
    dtype = _checks.stats_dtype(jnp.result_type(x))  # float32 at least; a complex mean stays complex
    count = _stats.valid_count(x.shape, features, mask, dtype)
    valid = count > 0  # no valid element: Flax's mean is 0 / 0, the statistics' convention 0
    mean = jnp.where(valid, mean, 0).astype(jnp.promote_types(dtype, mean.dtype))
    stats = _stats.Stats(count, mean, jnp.where(valid, var * count, 0).astype(dtype))
  record_moments(module, stats)


def _collected_moments(updates: Any, paths: list[tuple[str, ...]]) -> dict[tuple[str, ...], Any]:
  """``{path: Stats}`` (a tuple of ``Stats``, one per call, for a layer called more than once) from MOMENTS."""
  moments = unfreeze(updates.get(MOMENTS, {}))
  collected: dict[tuple[str, ...], Any] = {}
  missing = []
  for path in paths:  # in call order
    node = moments
    for name in path:
      node = node.get(name, {}) if isinstance(node, dict) else {}
    if "calls" in node:  # a layer called more than once: one running update per call, in order
      collected[path] = tuple(_stats.Stats(*call) for call in node["calls"])
    elif "count" in node:
      collected[path] = _stats.Stats(node["count"], node["mean"], node["m2"])
    else:
      missing.append("/".join(path))
  if missing:
    raise ValueError(
      f"jaxbn.training.linen_loss: the batch norms at {', '.join(missing)} reported no statistics: they run "
      f"inside a lifted transform that does not carry the {MOMENTS!r} collection (jaxbn.linen.MOMENTS). Add "
      f"it where 'batch_stats' is, e.g. nn.scan(..., variable_axes={{'params': 0, 'batch_stats': 0, "
      f"jaxbn.linen.MOMENTS: 0}}), or nn.vmap(..., variable_axes={{..., jaxbn.linen.MOMENTS: 0}})."
    )
  return collected


def _linen_update(layers: _TracedLayers, batch_stats: Any, merged: Any) -> Any:
  """The ``update_batch_stats`` of :func:`linen_loss`: each layer's running update with its own settings."""
  frozen = isinstance(batch_stats, FrozenDict)
  new = unfreeze(batch_stats)  # a copy we can assign into (also of a FrozenDict)
  for path, stats in merged.items():
    module = layers.module(path)
    node = new
    for name in path:
      node = node[name]
    state = BatchNormState(node["mean"], node["var"], node.get("count", jnp.zeros((), jnp.int32)))
    state = _fold_calls(
      state,
      stats,
      momentum=module.momentum,
      running_average=getattr(module, "running_average", "ema"),
      unbiased_running_var=getattr(module, "unbiased_running_var", False),
    )
    node["mean"], node["var"] = state.mean, state.var
    if "count" in node:
      node["count"] = state.count
  return freeze(new) if frozen else new


# ---- Flax NNX -----------------------------------------------------------------------------------


def nnx_loss(
  model: Any,
  loss: Callable[[Any, Any], jax.Array],
  *,
  inputs: str = "x",
  targets: str = "y",
  metrics: Callable[[Any, Any], Any] | None = None,
) -> Loss:
  """A :func:`full_batch_step` loss function for a ``flax.nnx`` model whose batch norms are jaxbn's.

  The step works on the model's state as pure pytrees: ``params = nnx.state(model, nnx.Param)`` and
  ``batch_stats = nnx.state(model, nnx.BatchStat)`` (``loss_fn.init_state(optimizer)`` builds the
  ``TrainState``); write a trained state back with ``nnx.update(model, state.params,
  state.batch_stats)``. Every :class:`jaxbn.nnx.BatchNorm` runs in training mode on the micro-batch's
  valid rows and reports its exact statistics, so the running statistics are updated once per step,
  also from inside ``nnx.remat`` and ``nnx.scan``/``nnx.vmap`` over stacked layers. A model with
  random streams (``nnx.Rngs``, e.g. for ``nnx.Dropout``) has them reseeded for every micro-batch
  of every step from the state's key (``loss_fn.init_state(optimizer, key=...)``); other state of
  the model is held fixed.

  Args:
    model: the ``nnx.Module``; called as ``model(batch[inputs])``.
    loss: ``loss(outputs, batch[targets]) -> per-example losses``.
    inputs: key of the inputs in each batch.
    targets: key of the targets in each batch.
    metrics: optional ``metrics(outputs, batch[targets]) -> pytree of per-example values``.

  Returns:
    A :class:`Loss` with its ``update_batch_stats``, ``takes_key`` (True for a model with random
    streams) and ``init_state(optimizer, key=None)``.

  Raises:
    TypeError: the model holds a ``flax.nnx.BatchNorm``, whose statistics cannot be merged exactly; or
      ``model`` is no ``flax.nnx.Module``, or ``loss`` or ``metrics`` not callable.
  """
  fn = "jaxbn.training.nnx_loss"
  _check_adapter(fn, model, nnx.Module, "flax.nnx.Module", loss, metrics)
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.BatchNorm):
      raise TypeError(
        f"jaxbn.training.nnx_loss: the model's batch norm at {'/'.join(map(str, path))} is flax.nnx.BatchNorm; "
        "replace it with jaxbn.nnx.BatchNorm (same arguments and variables) so that its statistics can be "
        "merged exactly over micro-batches."
      )
  graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  streams = tuple(sorted({node.tag for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)}))
  return Loss(
    _NnxForward(graphdef, rest, streams, loss, inputs, targets, metrics),
    functools.partial(_nnx_update, graphdef, params, rest),
    takes_key=bool(streams),
    init_state=functools.partial(_nnx_init_state, params, batch_stats),
  )


def _fresh(*states: Any) -> list[Any]:
  """The states rebuilt at the current trace level.

  NNX forbids mutating a variable created at another one (the state arrives from the jitted step,
  the mutation happens under grad).
  """
  return [jax.tree.map(lambda a: a, st) for st in states]


@dataclasses.dataclass(frozen=True, eq=False)
class _NnxForward:
  """The loss function of :func:`nnx_loss`: ``(params, batch_stats, batch, mask, key=None) -> (loss, LossAux)``."""

  graphdef: Any
  rest: Any
  streams: tuple[str, ...]
  loss: Callable[[Any, Any], jax.Array]
  inputs: str
  targets: str
  metrics: Callable[[Any, Any], Any] | None

  def __call__(self, params: Any, batch_stats: Any, batch: Any, mask: Any, key: Any = None) -> tuple[Any, LossAux]:
    m = nnx.merge(self.graphdef, *_fresh(params, batch_stats, self.rest))
    m.train()
    if self.streams:
      # match_shape: streams of layers stacked with nnx.vmap hold one key per layer.
      keys: dict[str, Any] = {name: jax.random.fold_in(key, j) for j, name in enumerate(self.streams)}
      nnx.reseed(m, policy="match_shape", **keys)
    with collect_moments(m, row_mask=mask) as read:
      out = m(batch[self.inputs])
      collected = read(per_call=True)
    value, extra = _masked_means(self.loss, self.metrics, out, batch[self.targets], mask)
    return value, LossAux(stats=collected or None, metrics=extra)


def _nnx_update(graphdef: Any, params: Any, rest: Any, batch_stats: Any, merged: Any) -> Any:
  """The ``update_batch_stats`` of :func:`nnx_loss`: each layer's running update with its own settings."""
  m = nnx.merge(graphdef, *_fresh(params, batch_stats, rest))
  for path, node in batch_norm_layers(m):
    if path not in merged:
      continue
    has_count = isinstance(getattr(node, "count", None), nnx.BatchStat)
    count = node.count[...] if has_count else jnp.zeros((), jnp.int32)
    state = _fold_calls(
      BatchNormState(node.mean[...], node.var[...], count),
      merged[path],
      momentum=node.momentum,
      running_average=node.running_average,
      unbiased_running_var=node.unbiased_running_var,
    )
    node.mean[...], node.var[...] = state.mean, state.var
    if has_count:
      node.count[...] = state.count
  return nnx.state(m, nnx.BatchStat)


def _nnx_init_state(params: Any, batch_stats: Any, optimizer: Any, key: Any = None) -> TrainState:
  """The ``init_state(optimizer, key=None)`` of :func:`nnx_loss`: a ``TrainState`` of the model's variables."""
  return TrainState.create(params, batch_stats, optimizer, key=key)
