"""Full-batch (and mini-batch) gradient steps: compiled, accumulated over micro-batches, guarded.

``full_batch_step`` turns a loss function into a jitted ``step(state, data) -> (state, metrics)``
whose update uses the exact mean gradient over ALL of ``data``: micro-batches are scanned with
``lax.scan``, gradients accumulate in float32 (float64 for float64 parameters), and no per-example gradient is ever kept, so memory
is bounded by one micro-batch beyond the data itself.

On one device, micro-batches are the contiguous slices ``data[k*m:(k+1)*m]`` for micro-batch size
``m`` (with ``data`` sharded over devices under ``jax.jit``, each device's block of rows is sliced
the same way, see :func:`full_batch_step`); when ``m`` does not divide the dataset size ``n``, the
last micro-batch is the slice ``data[n-m:n]`` with the rows already seen masked out, so no example is dropped or counted twice and no padded copy of
the data is made. Batch norm inside the loss normalizes each micro-batch with its own statistics
(ghost batches over that partition); the running statistics are updated ONCE per step from the
exact count-weighted merge of every micro-batch's statistics (Chan et al. 1983), not by an EMA per
micro-batch.

With ``bn_mode="exact"`` the batch norms instead normalize with their statistics over the WHOLE
dataset, and the gradient is the exact gradient of that objective (``2L + 1`` sweeps over the
micro-batches for ``L`` batch-norm layers), equal to one batch-norm pass over all the data at once.

A non-finite loss, gradient, update or batch statistic makes the step change nothing: parameters,
optimizer state AND batch statistics keep their values (``optax.apply_if_finite`` cannot protect the batch statistics, and
Flax's ImageNet example keeps the bad step's), and ``state.skipped`` counts it.

References:
  Geiping, Goldblum, Pope, Moeller & Goldstein, "Stochastic Training is Not Necessary for
  Generalization", ICLR 2022 (full-batch training with gradient accumulation and ghost batch norm).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxbn import _checks, _hooks, _rows, diagnostics
from jaxbn import stats as _stats
from jaxbn._sharding import data_shards, trace_state, varying, varying_like
from jaxbn._trees import global_norm
from jaxbn.functional import BatchNormState, update_running_stats
from jaxbn.linen import MOMENTS, record_moments
from jaxbn.linen import BatchNorm as JaxbnBatchNorm

__all__ = [
  "LossAux",
  "StepMetrics",
  "TrainState",
  "full_batch_step",
  "linen_loss",
  "minibatch_epoch",
  "nnx_loss",
  "restore_checkpoint",
  "save_checkpoint",
  "sharpness",
]


class TrainState(NamedTuple):
  """Everything a step reads and writes; a pytree, so it jits, shards and checkpoints as is.

  Attributes:
    params: model parameters.
    batch_stats: running statistics of the model's batch norms (``{}`` for a model without).
    opt_state: the Optax optimizer's state.
    step: int32, number of steps applied (skipped steps not counted).
    skipped: int32, number of steps the guard skipped (a loss, gradient, update or batch statistic
      that was not finite).
    key: the random key of a loss function that draws random numbers (dropout), as raw ``uint32``
      key data, or None. Step ``t`` (counting skipped ones, so a skipped step is not retried with
      the same draws) uses ``fold_in(key, t)``, folded again with the micro-batch index (and the
      device index under ``axis_name``).
  """

  params: Any
  batch_stats: Any
  opt_state: Any
  step: jax.Array
  skipped: jax.Array
  key: Any = None

  @classmethod
  def create(
    cls, params: Any, batch_stats: Any, optimizer: optax.GradientTransformation, *, key: Any = None
  ) -> TrainState:
    """A state at step 0 with a fresh optimizer state.

    Args:
      params: the model parameters.
      batch_stats: the running statistics (None or ``{}`` for a model without batch norm).
      optimizer: the Optax transformation whose state to initialize.
      key: for a loss function that draws random numbers (dropout): a ``jax.random.key(seed)`` or
        raw ``uint32`` key data; stored as raw key data (so checkpoints hold plain arrays).

    Returns:
      The ``TrainState``, with buffers of its own (the step may donate them).

    Raises:
      TypeError: ``key`` is neither a typed PRNG key nor raw ``uint32`` key data, or ``optimizer`` is no
        Optax transformation.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxbn.training import TrainState
      >>> state = TrainState.create({"w": jnp.zeros(3)}, {}, optax.adam(1e-3), key=jax.random.key(0))
      >>> int(state.step), state.key.dtype, state.step_key().shape
      (0, dtype('uint32'), (2,))
    """
    _check_optimizer("jaxbn.training.TrainState.create", optimizer)
    # Distinct buffers throughout: the step donates every leaf of the state.
    copy = lambda tree: jax.tree.map(lambda a: jnp.array(a, copy=True), tree)
    params, batch_stats = copy(params), copy({} if batch_stats is None else batch_stats)
    opt_state = copy(optimizer.init(params))
    if key is not None:
      typed = isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
      if typed and str(jax.random.key_impl(key)) != str(jax.random.key_impl(jax.random.key(0))):
        raise TypeError(
          "jaxbn.training.TrainState.create: key must use the default PRNG implementation "
          f"({jax.random.key_impl(jax.random.key(0))}), which the state's raw key data is read with; got "
          f"{jax.random.key_impl(key)}."
        )
      if not typed and not (hasattr(key, "dtype") and key.dtype == jnp.uint32 and jnp.ndim(key) >= 1):
        raise TypeError(
          f"jaxbn.training.TrainState.create: key must be a jax.random.key(seed) or raw uint32 key data, got {key!r}."
        )
      key = jnp.array(jax.random.key_data(key) if typed else key, copy=True)
    zero = jnp.zeros((), jnp.int32)
    return cls(params, batch_stats, opt_state, zero, jnp.zeros((), jnp.int32), key)

  def step_key(self) -> jax.Array | None:
    """The key of this state's next step (None without a key)."""
    return None if self.key is None else jax.random.fold_in(self.key, self.step + self.skipped)


class LossAux(NamedTuple):
  """What a loss function returns beside the loss.

  Attributes:
    stats: per-layer raw batch statistics (a pytree of :class:`jaxbn.Stats`) of this micro-batch,
      or None for a model without batch norm. A layer called more than once in the forward pass
      (weights shared) reports a tuple with one ``Stats`` per call, in call order, and gets one
      running update per call, as ``model.apply`` applies them.
    metrics: optional pytree of per-micro-batch values to average (count-weighted) into the step's
      metrics, e.g. accuracy.
  """

  stats: Any = None
  metrics: Any = None


class StepMetrics(NamedTuple):
  """Per-step metrics.

  Attributes:
    loss: mean loss over all rows.
    grad_norm: global norm of the full-batch gradient.
    update_norm: global norm of the optimizer's update.
    skipped: whether the guard skipped the step.
    extra: count-weighted means of the loss function's ``LossAux.metrics``.
    layer_grad_norms: with ``layer_norms=True``, the gradient's norm per layer
      (:func:`jaxbn.norms_by_layer`).
    layer_param_norms: with ``layer_norms=True``, the new parameters' norm per layer.
    sharpness: with ``sharpness_every=k``, the top Hessian eigenvalue of the full-batch objective at
      the step's starting parameters on steps where ``state.step % k == 0``, NaN on the others;
      compare it with :func:`jaxbn.stability_threshold`.
  """

  loss: jax.Array
  grad_norm: jax.Array
  update_norm: jax.Array
  skipped: jax.Array
  extra: Any = None
  layer_grad_norms: Any = None
  layer_param_norms: Any = None
  sharpness: Any = None


LossFn = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, LossAux]]
UpdateStatsFn = Callable[[Any, Any], Any]


def _positive_int_or_none(fn: str, arg: str, value: Any) -> int | None:
  """``value`` as a Python int (NumPy integers accepted, bools refused), or None."""
  if value is None:
    return None
  if not _checks.is_int(value) or value <= 0:
    raise ValueError(f"{fn}: {arg} must be a positive int or None, got {value!r}.")
  return int(value)


def _check_optimizer(fn: str, optimizer: Any) -> None:
  if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
    raise TypeError(
      f"{fn}: optimizer must be an optax.GradientTransformation (with init and update), e.g. optax.sgd(0.1), "
      f"got {optimizer!r}."
    )


def _iterations_and_method(fn: str, arg: str, num_iters: Any, method: str = "lanczos") -> None:
  """Checks the Lanczos (or power) options of a sharpness estimate where they are given."""
  if not _checks.is_int(num_iters) or num_iters < 1:
    raise ValueError(f"{fn}: {arg} must be a positive int (Hessian-vector products per estimate), got {num_iters!r}.")
  if method not in ("lanczos", "power"):
    raise ValueError(f"{fn}: method must be 'lanczos' or 'power', got {method!r}.")


def _num_rows(fn: str, data: Any) -> int:
  leaves = jax.tree.leaves(data)
  if not leaves:
    raise ValueError(f"{fn}: data must be a non-empty pytree of arrays with a leading example axis.")
  sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) else -1 for leaf in leaves}
  if len(sizes) != 1 or -1 in sizes:
    raise ValueError(
      f"{fn}: every leaf of data must have the same leading (example) dimension, got sizes {sorted(sizes)}."
    )
  return sizes.pop()


def full_batch_step(
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  *,
  micro_batch_size: int | None = None,
  update_batch_stats: UpdateStatsFn | None = None,
  guard: bool = True,
  donate: bool = True,
  jit: bool = True,
  axis_name: Any = None,
  loop: str = "scan",
  bn_mode: str = "ghost",
  layer_norms: bool = False,
  sharpness_every: int | None = None,
  sharpness_iters: int = 20,
) -> Callable[[TrainState, Any], tuple[TrainState, StepMetrics]]:
  """A compiled step that applies one update with the exact mean gradient over all of ``data``.

  Args:
    loss_fn: ``loss_fn(params, batch_stats, batch, mask) -> (loss, LossAux)``. ``batch`` is a
      micro-batch (the pytree ``data`` sliced along its leading axis), ``mask`` a boolean vector
      marking its valid rows, or None when all are valid (always so when the micro-batch size
      divides the dataset size); ``loss`` is the mean loss over the valid rows, and batch norms must
      use only valid rows for their statistics. :func:`linen_loss` builds one from a Flax model.
      A loss that draws random numbers (dropout) sets ``loss_fn.takes_key = True`` and takes a
      fifth argument ``key``: a fresh key per micro-batch and step, from ``TrainState.key``.
    optimizer: any Optax gradient transformation.
    micro_batch_size: rows per micro-batch; None for the whole dataset at once. With ``data``
      sharded over ``d`` devices under ``jax.jit``, the rows are split into ``g = gcd(n, d)``
      blocks (one per device when ``d`` divides ``n``) and each block puts
      ``micro_batch_size // g`` (at least 1) of its own rows into every micro-batch, so data never
      moves between devices and every device works on every micro-batch (one gradient all-reduce
      per micro-batch); one device reproduces the step with the rows in that order. With
      ``g = 1`` the micro-batches are contiguous and XLA gathers them. ``d`` comes from the data's
      type: its sharding on Explicit meshes, all Auto-axis devices of the mesh on Auto meshes
      (whose types do not say how data is laid out, so replicated data is split the same way).
    update_batch_stats: ``update_batch_stats(batch_stats, merged_stats) -> batch_stats`` folds
      the step's merged statistics into the running ones; required when ``LossAux.stats`` is given.
      Defaults to ``loss_fn.update_batch_stats``, which :func:`linen_loss` and :func:`nnx_loss`
      attach.
    guard: skip a step whose loss, gradient, update or batch statistics are not finite, changing
      nothing but ``skipped``.
    donate: donate the incoming state's buffers to the new state: continue from the returned
      state; a consumed state passed again is refused with a ``ValueError`` saying so.
    jit: return the step compiled with ``jax.jit`` (False to wrap it yourself, e.g. in pmap).
    loop: ``"scan"`` (default) runs the micro-batches in a ``lax.scan`` inside one compiled step;
      ``"host"`` calls one compiled micro-batch program per micro-batch from Python (accumulators
      donated) and one compiled update. Same numbers; ``"host"`` avoids slow convolution layouts
      XLA:CPU picks inside loops (7-8x faster for the benchmark CNN of ``benchmarks/full_batch.py``
      with 8 micro-batches, on a 2-core CPU) but cannot be traced into ``jax.pmap``/``jax.shard_map``.
    bn_mode: what batch norm means under micro-batching. ``"ghost"`` (default): each micro-batch
      is normalized with its own statistics (ghost batches of the partition above), one forward and
      backward sweep over the data. ``"exact"``: every layer normalizes with its statistics over the
      WHOLE dataset (all micro-batches, all devices), and the gradient is that objective's exact
      gradient, equal to one ordinary batch-norm pass over the entire dataset as a single batch;
      memory stays that of one micro-batch. It costs ``2L + 1`` sweeps over the data for ``L``
      batch-norm layers (one statistics sweep per layer, since a layer's statistics depend on the
      layers before it; one loss sweep; one vector-Jacobian sweep per layer for the adjoints of
      the statistics, last layer first) and ``loop="scan"``. Every jaxbn batch norm takes part
      (``jaxbn.linen.BatchNorm``, ``jaxbn.nnx.BatchNorm``, ``jaxbn.batch_norm`` in a hand-written
      loss); at trace time the step proves from the loss's jaxpr that, with their statistics
      fixed, the loss treats each row on its own, and refuses a loss where something else mixes
      rows (a batch norm that is not jaxbn's, ghost batches, renormalization), naming the
      operation. All derivatives (gradient, Hessian-vector products, sharpness) are those of one
      ordinary pass over the whole dataset.
    layer_norms: add per-layer gradient and parameter norms to the metrics.
    sharpness_every: every ``k`` applied steps, add the top Hessian eigenvalue of the same full-batch
      objective (Lanczos on Hessian-vector products through this accumulated gradient) to the
      metrics; ``loop="scan"`` only.
    sharpness_iters: Lanczos iterations (Hessian-vector products) per sharpness estimate.
    axis_name: for pmap-style code (``jax.pmap(step, axis_name=...)`` with ``jit=False``, or
      ``jax.shard_map``): ``data`` is this device's shard, and the loss, gradient and metrics are
      reduced over the named axis so every device applies the same full-batch update. Batch norms
      that should use global statistics need the same ``axis_name`` themselves. The primary
      multi-device path needs none of this: ``jax.jit`` with ``data`` sharded over a mesh.

  Returns:
    ``step(state, data) -> (new_state, StepMetrics)``.

  Raises:
    ValueError: bad ``micro_batch_size``, ``sharpness_every``, ``bn_mode``, ``loop`` or ``data``;
      under ``bn_mode="exact"``, a loss that mixes rows other than through jaxbn's batch norms
      (at the first call); a state consumed by an earlier call (``donate=True``);
      ``loop="host"`` with ``bn_mode="exact"``, ``sharpness_every``, ``axis_name`` or ``jit=False``;
      statistics without ``update_batch_stats``; a loss that needs a key and a state without one;
      data that XLA cannot partition over Explicit mesh axes (at the first call).
    TypeError: a ``flax.linen.BatchNorm`` under ``bn_mode="exact"`` (at the first call).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, jaxbn
    >>> def loss_fn(params, batch_stats, batch, mask):
    ...   err = (batch["x"] @ params["w"] - batch["y"]) ** 2
    ...   valid = jnp.ones(err.shape, bool) if mask is None else mask  # None: every row is valid
    ...   return jnp.sum(jnp.where(valid, err, 0)) / jnp.sum(valid), jaxbn.training.LossAux()
    >>> opt = optax.sgd(0.1)
    >>> step = jaxbn.training.full_batch_step(loss_fn, opt, micro_batch_size=3)
    >>> data = {"x": jnp.arange(20.0).reshape(10, 2) / 10, "y": jnp.ones(10)}
    >>> state = jaxbn.training.TrainState.create({"w": jnp.zeros(2)}, {}, opt)
    >>> state, metrics = step(state, data)
    >>> int(state.step), bool(metrics.skipped)
    (1, False)
  """
  fn = "jaxbn.training.full_batch_step"
  _checks.callable_arg(fn, "loss_fn", loss_fn)
  _check_optimizer(fn, optimizer)
  guard, donate, jit, layer_norms = (
    _checks.static_bool(fn, name, value)
    for name, value in (("guard", guard), ("donate", donate), ("jit", jit), ("layer_norms", layer_norms))
  )
  _iterations_and_method(fn, "sharpness_iters", sharpness_iters)
  if update_batch_stats is not None:
    _checks.callable_arg(fn, "update_batch_stats", update_batch_stats)
  if update_batch_stats is None:
    update_batch_stats = getattr(loss_fn, "update_batch_stats", None)
  if bn_mode not in ("ghost", "exact"):
    raise ValueError(f"{fn}: bn_mode must be 'ghost' or 'exact', got {bn_mode!r}.")
  if loop not in ("scan", "host"):
    raise ValueError(f"{fn}: loop must be 'scan' or 'host', got {loop!r}.")
  if loop == "host" and bn_mode == "exact":
    raise ValueError(
      f"{fn}: bn_mode='exact' runs its statistics, loss and adjoint sweeps inside one compiled step; "
      "use loop='scan' (the default) with it."
    )
  if loop == "host" and (axis_name is not None or not jit):
    raise ValueError(
      f"{fn}: loop='host' runs compiled pieces from Python, so it cannot be traced into pmap or "
      "shard_map: use loop='scan' with axis_name=... and jit=False there."
    )
  micro_batch_size = _positive_int_or_none(fn, "micro_batch_size", micro_batch_size)
  sizes, micro_terms, gradient = _gradient_fns(fn, loss_fn, micro_batch_size, bn_mode, axis_name)
  sharpness_every = _positive_int_or_none(fn, "sharpness_every", sharpness_every)
  if sharpness_every is not None and loop == "host":
    raise ValueError(
      f"{fn}: sharpness_every needs the whole gradient in one compiled program (loop='scan'); with "
      "loop='host', compute it every k steps with jaxbn.training.sharpness(...)."
    )

  def finish(state, data, grads, loss, stats, extra):
    """One optimizer update from the accumulated gradient and merged statistics, under the guard."""
    if axis_name is not None:
      grads, loss = _reduce_over_devices(grads, state.params, loss, data, axis_name)
      if extra is not None:
        extra = lax.psum(extra, axis_name)
    grad_norm = global_norm(grads)  # of the float32 sums: a float16 gradient's norm can overflow float16
    grads = jax.tree.map(lambda g, p: g.astype(jnp.result_type(p)), grads, state.params)
    batch_stats = state.batch_stats
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if stats is not None:
      # Statistics that overflowed (e.g. one huge row) would make the running ones inf for good.
      finite &= jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(stats)]))
      if update_batch_stats is None:
        raise ValueError(
          f"{fn}: the loss function returns batch statistics (LossAux.stats) but no update_batch_stats "
          "was given to fold them into the running statistics. Pass update_batch_stats=..., or build "
          "the loss with jaxbn.training.linen_loss, which provides it."
        )
      batch_stats = update_batch_stats(state.batch_stats, stats)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    update_norm = global_norm(updates)
    # The new parameters too: a finite update can still overflow float16 parameters.
    finite &= jnp.isfinite(update_norm) & jnp.isfinite(global_norm(params))
    if guard:
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      params = keep(params, state.params)
      opt_state = keep(opt_state, state.opt_state)
      batch_stats = keep(batch_stats, state.batch_stats)
      applied = finite
    else:
      applied = jnp.bool_(True)
    new_state = TrainState(
      params,
      batch_stats,
      opt_state,
      state.step + applied.astype(jnp.int32),
      state.skipped + (~applied).astype(jnp.int32),
      state.key,
    )
    metrics = StepMetrics(loss, grad_norm, update_norm, ~applied, extra)
    if layer_norms:
      metrics = metrics._replace(
        layer_grad_norms=diagnostics.norms_by_layer(grads), layer_param_norms=diagnostics.norms_by_layer(params)
      )
    if sharpness_every is not None:
      due = state.step % sharpness_every == 0
      value = lax.cond(
        due,
        lambda: _sharpness(
          gradient, state.params, state.batch_stats, data, axis_name, key=state.step_key(), num_iters=sharpness_iters
        )[0],
        lambda: jnp.full((), jnp.nan, _weight_dtype(state.params)),
      )
      metrics = metrics._replace(sharpness=value)
    return new_state, metrics

  def step(state: TrainState, data: Any) -> tuple[TrainState, StepMetrics]:
    loss, grads, stats, extra = gradient(state.params, state.batch_stats, data, state.step_key())
    return finish(state, data, grads, loss, stats, extra)

  def host_micro(state, data, acc, i):
    grads_acc, loss_acc, stats_acc, extra_acc = acc
    loss, aux, grads, w = micro_terms(state.params, state.batch_stats, data, i, state.step_key())
    grads_acc = jax.tree.map(lambda a, g: a + _weighted(w, g, a.dtype), grads_acc, grads)
    if aux.stats is not None:
      stats_acc = jax.tree.map(_stats.merge, stats_acc, aux.stats, is_leaf=lambda s: isinstance(s, _stats.Stats))
    if aux.metrics is not None:
      extra_acc = jax.tree.map(lambda a, v: a + w * v, extra_acc, aux.metrics)
    return grads_acc, loss_acc + _weighted(w, loss, loss_acc.dtype), stats_acc, extra_acc

  def host_finish(state, data, acc):
    grads, loss, stats, extra = acc
    return finish(state, data, grads, loss, stats, extra)

  def checked_step(state: TrainState, data: Any) -> tuple[TrainState, StepMetrics]:
    try:
      return step(state, data)
    except Exception as err:
      if type(err).__name__ != "ShardingTypeError":
        raise
      raise ValueError(
        f"{fn}: JAX could not partition the step for data sharded over Explicit mesh axes "
        "(jax.make_mesh's default): an operation of the loss contracts over the sharded batch axis "
        "(a matmul with the batch, as in the backward pass of Flax's Dense and Conv layers). "
        "Consider one of the following options:\n"
        "  1. shard the data over a mesh with Auto axes: jax.make_mesh(shape, names, "
        "axis_types=(jax.sharding.AxisType.Auto,) * len(names));\n"
        "  2. run the step per device: full_batch_step(..., axis_name=name, jit=False) inside "
        "jax.shard_map or jax.pmap, with the batch norms' axis_name set to the same name."
      ) from err

  if loop == "scan":
    if not jit:
      return checked_step
    return _DonationChecked(fn, jax.jit(checked_step, donate_argnums=(0,) if donate else ()))

  micro_jit = jax.jit(host_micro, donate_argnums=(2,))
  finish_jit = jax.jit(host_finish, donate_argnums=(0,) if donate else ())
  whole_jit = jax.jit(checked_step, donate_argnums=(0,) if donate else ())
  aux_shapes: dict[Any, Any] = {}

  def host_step(state: TrainState, data: Any) -> tuple[TrainState, StepMetrics]:
    *_, k = sizes(data)
    if k == 1:  # one micro-batch: the single compiled step has no loop to avoid
      return whole_jit(state, data)
    key = jax.tree.structure((state, data)), tuple((a.shape, a.dtype) for a in jax.tree.leaves((state, data)))
    if key not in aux_shapes:
      aux_shapes[key] = jax.eval_shape(
        lambda s, d: micro_terms(s.params, s.batch_stats, d, jnp.int32(0), s.step_key()), state, data
      )[1]
    aux = aux_shapes[key]
    wdt = _weight_dtype(state.params)
    zeros = lambda tree: jax.tree.map(lambda a: jnp.zeros(jnp.shape(a), wdt), tree)
    # Empty statistics (count 0) merge exactly with the first micro-batch's.
    acc = (_zeros_like_grads(state.params), jnp.zeros((), wdt), zeros(aux.stats), zeros(aux.metrics))
    for i in range(k):
      acc = micro_jit(state, data, acc, jnp.int32(i))
    return finish_jit(state, data, acc)

  host_step = _DonationChecked(fn, host_step)
  host_step.programs = {"micro-batch": micro_jit, "update": finish_jit}  # for inspection, e.g. memory
  return host_step


class _DonationChecked:
  """``step``, refusing with a clear message a state whose buffers an earlier call consumed (donated).

  Everything else (``lower``, ``trace``, attributes) is ``step``'s own.
  """

  def __init__(self, fn: str, step: Callable[..., Any]):
    self._fn, self._step = fn, step
    functools.update_wrapper(self, step)

  def __call__(self, state: TrainState, *args: Any) -> Any:
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
      if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer) and leaf.is_deleted():
        raise ValueError(
          f"{self._fn}: the state passed in was already consumed: its buffer state{jax.tree_util.keystr(path)} "
          "was donated to an earlier call, whose returned state holds the values now. Consider one of the "
          "following options:\n"
          "  1. continue from the state the previous call returned: state, metrics = step(state, data);\n"
          "  2. build the step with donate=False, so that every state passed in stays usable (at the cost of "
          "memory for a second copy of the state)."
        )
    return self._step(state, *args)

  def __getattr__(self, name: str) -> Any:
    return getattr(self._step, name)


def _gradient_fns(fn, loss_fn, micro_batch_size, bn_mode, axis_name):
  """``sizes(data)``, ``micro_terms(params, batch_stats, data, i)`` and ``gradient(params, batch_stats, data)``.

  ``gradient`` returns the mean loss, the gradient accumulated in float32 or wider (this device's share under ``axis_name``),
  the merged statistics for the running update and the count-weighted metrics of the full-batch
  objective: ghost batches per micro-batch, or batch norm over the whole dataset (``bn_mode='exact'``).
  """

  takes_key = bool(getattr(loss_fn, "takes_key", False))
  # A loss function that draws random numbers gets its micro-batch's key packed with the batch.
  call = (lambda p, bs, b, m: loss_fn(p, bs, b[0], m, b[1])) if takes_key else loss_fn

  def sizes(data):
    """``(n, g, m, k)``: rows, data shards, rows per shard in each micro-batch, micro-batches."""
    n = _num_rows(fn, data)
    g = 1 if axis_name is not None else math.gcd(n, data_shards(data))
    per = n // g
    m = per if micro_batch_size is None else min(max(micro_batch_size // g, 1), per)
    return n, g, m, math.ceil(per / m)

  def micro_slice(data, i, key=None, wdt=jnp.float32):
    """Micro-batch ``i``: its rows, its row mask (None when all are valid) and its share of all rows.

    With the rows sharded over ``g`` devices under ``jax.jit``, micro-batch ``i`` takes rows
    ``i*m .. i*m + m - 1`` of every device's block of ``n/g`` rows, so that each device works on its
    own rows and nothing is gathered: the same micro-batches as the per-device step of
    ``jax.shard_map``/``jax.pmap`` code.
    """
    n, g, m, _ = sizes(data)
    per = n // g
    wdt = jnp.dtype(wdt)
    total = wdt.type(n) if axis_name is None else lax.psum(wdt.type(n), axis_name)
    start = jnp.minimum(i * m, per - m)
    if per % m:
      valid = start + jnp.arange(m) >= i * m  # the last slice re-reads rows of the one before: mask them
      mask = jnp.tile(valid, g)
      w = g * jnp.sum(valid).astype(wdt) / total
    else:
      mask, w = None, wdt.type(g * m) / total  # every row valid: no mask for the loss or the batch norms

    def cut(a):
      if g == 1:
        return lax.dynamic_slice_in_dim(a, start, m, axis=0)
      blocks = a.reshape(g, per, *a.shape[1:])
      return lax.dynamic_slice_in_dim(blocks, start, m, axis=1).reshape(g * m, *a.shape[1:])

    batch = jax.tree.map(cut, data)
    if takes_key:
      if key is None:
        raise ValueError(
          f"{fn}: the loss function draws random numbers (e.g. dropout) and the state has no key: create it "
          "with TrainState.create(..., key=jax.random.key(0)) (nnx_loss: loss_fn.init_state(optimizer, key=...))."
        )
      key = jax.random.fold_in(key, i)
      if axis_name is not None:
        key = jax.random.fold_in(key, lax.axis_index(axis_name))
      batch = (batch, key)
    return batch, mask, w

  def micro_terms(params, batch_stats, data, i, key=None):
    """Loss, aux, gradient and weight (share of all rows) of micro-batch ``i``."""
    batch, mask, w = micro_slice(data, i, key, _weight_dtype(params))
    (loss, aux), grads = jax.value_and_grad(call, has_aux=True)(params, batch_stats, batch, mask)
    return loss, aux, grads, w

  def gradient(params, batch_stats, data, key=None):
    *_, k = sizes(data)
    if bn_mode == "exact":
      micro = lambda i: micro_slice(data, i, key, _weight_dtype(params))
      return _exact_gradient(call, params, batch_stats, k, micro, axis_name, data, takes_key)

    def body(i):
      loss, aux, grads, w = micro_terms(params, batch_stats, data, i, key)
      terms = (jax.tree.map(lambda g, z: _weighted(w, g, z.dtype), grads, zeros), _weighted(w, loss, wdt))
      return terms, (aux, w)

    wdt = _weight_dtype(params)
    zeros = _zeros_like_grads(params)
    # Under jax.shard_map the accumulated loss varies over the data's axes: so must the loop's initial value.
    init = (zeros, varying_like(jnp.zeros((), wdt), *jax.tree.leaves(data)))
    (grads, loss), (aux, weights) = _sweep(k, body, init)
    stats = None
    if aux.stats is not None:
      stats = jax.tree.map(_stats.merge_stacked, aux.stats, is_leaf=lambda s: isinstance(s, _stats.Stats))
    return loss, grads, stats, _weighted_metrics(aux, weights)

  return sizes, micro_terms, gradient


def _sweep(k, body, init=None):
  """Runs ``body(i) -> (terms, outputs)`` over micro-batches ``0..k-1``.

  Returns the sum of the ``terms`` (accumulated onto ``init``, zeros that type the loop's carry) and
  the ``outputs`` stacked along a new leading axis.
  """
  if k == 1:
    # No loop for one micro-batch: XLA:CPU leaves a convolution's kernel gradient inside a while
    # loop in a slow, uncanonicalized form (30x slower for a Conv1D), even at trip count 1.
    terms, outputs = body(jnp.int32(0))
    return terms, jax.tree.map(lambda a: jnp.expand_dims(a, 0), outputs)

  def step(carry, i):
    terms, outputs = body(i)
    return (None if carry is None else jax.tree.map(jnp.add, carry, terms)), outputs

  return lax.scan(step, init, jnp.arange(k))


def _weight_dtype(params: Any) -> jnp.dtype:
  """The dtype micro-batch weights, losses and statistics accumulate in: float32, float64 with a float64 parameter."""
  dtypes = [_checks.stats_dtype(jnp.result_type(p)) for p in jax.tree.leaves(params)]
  return jnp.dtype(jnp.result_type(jnp.float32, *dtypes))


def _zeros_like_grads(params: Any) -> Any:
  """Accumulators for the gradient: float32 per leaf (float64 for float64 leaves), typed like the leaf under shard_map."""
  return jax.tree.map(
    lambda p: varying_like(jnp.zeros(jnp.shape(p), _checks.stats_dtype(jnp.result_type(p))), p), params
  )


def _weighted(w: jax.Array, value: jax.Array, dtype: Any) -> jax.Array:
  """``w * value`` computed and returned in the accumulator's ``dtype``."""
  return w.astype(dtype) * jnp.asarray(value).astype(dtype)


def _weighted_metrics(aux, weights):
  """The micro-batches' metrics averaged with their shares of all rows (None without metrics)."""
  return None if aux.metrics is None else jax.tree.map(lambda v: jnp.tensordot(weights, v, axes=1), aux.metrics)


def _sharpness(gradient, params, batch_stats, data, axis_name, key=None, **options):
  """Top Hessian eigenvalue (and vector) of the full-batch objective whose gradient ``gradient`` accumulates."""

  def grad_fn(p):
    grads = gradient(p, batch_stats, data, key)[1]
    return grads if axis_name is None else _sum_over_devices(grads, p, data, axis_name)

  return diagnostics.top_hessian_eigenvalue(grad_fn, params, **options)


class _ExactHook:
  """Supplies full-data statistics to the first batch-norm calls; collects or differentiates the next.

  Calls are numbered in order. Calls before ``len(given)`` normalize with ``given[j]``; call
  ``target`` records either its statistics (``cotangent`` None, a statistics sweep) or the scalar
  whose gradient is the vector-Jacobian product of the full-data statistics with ``cotangent``
  (an adjoint sweep); later calls keep their own statistics (their work is dead code).
  """

  def __init__(self, given, target=None, cotangent=None, axis_name=None, record_shapes=False):
    self.given, self.target, self.cotangent, self.axis_name = given, target, cotangent, axis_name
    self.calls = 0
    self.out = None
    self.trace = None  # the loss function's trace, set where the hook is installed
    self.shapes = [] if record_shapes else None  # the types of every call's statistics (the probe's)

  def __call__(self, x, axes, mask):
    if trace_state() != self.trace:
      raise ValueError(
        "jaxbn.training.full_batch_step: bn_mode='exact' numbers the batch-norm calls of one forward pass, "
        "so every jaxbn batch norm must be called at the loss function's own trace level; this one runs "
        "inside a lifted or nested transform (nn.scan, nn.remat, nnx.scan, nnx.remat, jax.checkpoint, ...). "
        "Call the layers without it, or use bn_mode='ghost', which supports them."
      )
    j = self.calls
    self.calls += 1
    if self.shapes is not None:
      self.shapes.append(jax.eval_shape(lambda x, mask: _stats.compute_stats(x, axes, mask=mask), x, mask))
    if j < len(self.given):
      return self.given[j]
    if j != self.target:
      return None
    if self.cotangent is None:
      self.out = _stats.compute_stats(x, axes, mask=mask, axis_name=self.axis_name)
      return self.out
    # d mean / dx_i = 1/N and d var / dx_i = 2 (x_i - mean)/N (the mean's own dependence cancels), so
    # the gradient of this sum over the micro-batch is its share of the VJP with (t_mean, t_var).
    t_mean, t_var, mean, count = self.cotangent
    cdt = _checks.stats_dtype(x.dtype)
    bshape = tuple(x.shape[a] if a in axes else 1 for a in range(x.ndim))
    xc = x.astype(cdt)
    terms = (t_mean.reshape(bshape) * xc + t_var.reshape(bshape) * (xc - mean.reshape(bshape)) ** 2) / jnp.maximum(
      count, 1
    ).reshape(bshape)
    if mask is not None:
      terms = jnp.where(mask, terms, 0)
    self.out = jnp.sum(terms)
    return None


def _exact_gradient(loss_fn, params, batch_stats, k, micro, axis_name, data, takes_key):
  """Loss, gradient, full-data statistics and metrics of batch norm over the WHOLE dataset.

  With ``S_l`` the statistics (mean, variance) of batch-norm layer ``l`` over all rows, and ``F``
  the mean loss with every ``S`` held fixed, the objective is ``F(params, S(params))`` where
  ``S_l = G_l(params, S_1..S_{l-1})``. The forward pass needs one sweep over the micro-batches per
  layer (layer ``l``'s statistics depend on the normalized outputs before it); the gradient is
  ``dF/dparams + sum_l lam_l . dG_l/dparams`` with the adjoints ``lam_l = dF/dS_l +
  sum_{m>l} lam_m . dG_m/dS_l``, solved from the last layer down (the system is triangular), one
  vector-Jacobian sweep per layer. In all ``L`` statistics sweeps, one loss-and-gradient sweep and
  ``L`` adjoint sweeps, each holding one micro-batch's activations at a time.
  """
  fn = "jaxbn.training.full_batch_step"

  def run(hook, p, batch, mask):
    hook.trace = trace_state()
    with _hooks.stats_hook(hook):
      out = loss_fn(p, batch_stats, batch, mask)
    return out

  def given(diff, counts):
    return [_stats.Stats(c, m, v * c) for (m, v), c in zip(diff, counts, strict=True)]

  # Number of batch-norm calls, from one traced forward pass.
  probe = _ExactHook([], record_shapes=True)
  batch0, mask0, _ = micro(jnp.int32(0))
  aux_shape = jax.eval_shape(lambda p, b, m: run(probe, p, b, m)[1], params, batch0, mask0)
  num_layers = probe.calls
  if num_layers == 0 and aux_shape.stats is not None:
    raise ValueError(
      f"{fn}: bn_mode='exact' needs the model's batch norms to be jaxbn's (jaxbn.linen.BatchNorm or "
      "jaxbn.nnx.BatchNorm, in training mode); the loss function reports batch statistics but no jaxbn "
      "batch norm was called."
    )
  _check_rows_separate(fn, run, params, batch0, mask0, probe.shapes, takes_key)

  # Forward: one statistics sweep per layer.
  diff, counts = [], []
  for layer in range(num_layers):

    def stats_body(i, layer=layer):
      batch, mask, _ = micro(i)
      hook = _ExactHook(given(diff, counts), target=layer, axis_name=axis_name)
      run(hook, params, batch, mask)
      return None, hook.out

    _, stacked = _sweep(k, stats_body)
    full = _stats.merge_stacked(stacked)
    diff.append((full.mean, full.var))
    counts.append(full.count)

  # Loss and the partial gradients with respect to the parameters and to every layer's statistics.
  def weighted_loss(p, d, batch, mask, w):
    loss, aux = run(_ExactHook(given(d, counts)), p, batch, mask)
    return _weighted(w, loss, w.dtype), (loss, aux)

  def loss_body(i):
    batch, mask, w = micro(i)
    (_, (loss, aux)), (g_params, g_diff) = jax.value_and_grad(weighted_loss, argnums=(0, 1), has_aux=True)(
      params, diff, batch, mask, w
    )
    g_params = jax.tree.map(lambda g, z: g.astype(z.dtype), g_params, zeros)
    return g_params, (w, loss.astype(w.dtype), g_diff, aux)

  zeros = _zeros_like_grads(params)
  grads, (weights, losses, g_diff, aux) = _sweep(k, loss_body, zeros)
  loss = jnp.dot(weights, losses)
  adjoint = [jax.tree.map(lambda a: jnp.sum(a, 0), t) for t in g_diff]
  if axis_name is not None:
    adjoint = _sum_over_devices(adjoint, diff, data, axis_name)

  # Adjoint sweeps, last layer first: lam_m is complete once every layer after m has contributed.
  for layer in reversed(range(num_layers)):
    t_mean, t_var = adjoint[layer]
    cotangent = (t_mean, t_var, diff[layer][0], counts[layer])

    def vjp_term(p, d, batch, mask, layer=layer, cotangent=cotangent):
      hook = _ExactHook(given(d, counts[:layer]), target=layer, cotangent=cotangent, axis_name=axis_name)
      run(hook, p, batch, mask)
      return hook.out

    def adjoint_body(i, vjp_term=vjp_term, layer=layer):
      batch, mask, _ = micro(i)
      g_params, g_diff = jax.grad(vjp_term, argnums=(0, 1))(params, diff[:layer], batch, mask)
      return jax.tree.map(lambda g, z: g.astype(z.dtype), g_params, zeros), g_diff

    g_params, g_diff = _sweep(k, adjoint_body, zeros)
    grads = jax.tree.map(jnp.add, grads, g_params)
    if layer:
      g_diff = [jax.tree.map(lambda a: jnp.sum(a, 0), t) for t in g_diff]
      if axis_name is not None:
        g_diff = _sum_over_devices(g_diff, diff[:layer], data, axis_name)
      adjoint[:layer] = jax.tree.map(jnp.add, adjoint[:layer], g_diff)

  # Every micro-batch reports the same (full-data) statistics; metrics are averaged by row share.
  stats = None if aux.stats is None else jax.tree.map(lambda a: a[0], aux.stats)
  return loss, grads, stats, _weighted_metrics(aux, weights)


def _check_rows_separate(fn, run, params, batch, mask, shapes, takes_key):
  """Refuses a loss that still mixes rows once every jaxbn batch norm has whole-data statistics.

  Such a loss holds a batch norm that is not jaxbn's (or another operation over the batch), which
  would normalize each micro-batch by itself: the result would not be the exact objective.
  """
  fixed = [
    _stats.Stats(
      jnp.ones(s.count.shape, s.count.dtype), jnp.zeros(s.mean.shape, s.mean.dtype), jnp.ones(s.m2.shape, s.m2.dtype)
    )
    for s in shapes
  ]

  def loss(p, rows, key, m):
    return run(_ExactHook(fixed), p, (rows, key) if takes_key else rows, m)[0]

  rows, key = batch if takes_key else (batch, None)
  if all(np.shape(a)[0] == 1 for a in jax.tree.leaves((rows, mask))):
    # With one row there is nothing to mix, and a row axis of size 1 is ambiguous: check two rows.
    rows, mask = jax.tree.map(lambda a: jax.ShapeDtypeStruct((2, *np.shape(a)[1:]), a.dtype), (rows, mask))
  found = _rows.mixing_of_rows(loss, (params, rows, key, mask), (False, True, False, True))
  if found is None:
    return
  kind, where = found
  if kind == "mixes":
    problem = (
      f"with every jaxbn batch norm given those statistics, the loss still mixes the rows of a micro-batch at "
      f"{where}: a batch norm that is not jaxbn's (flax.nnx.BatchNorm, haiku.BatchNorm, equinox.nn.BatchNorm, a "
      "hand-written one) or another operation over the batch, which would see one micro-batch at a time"
    )
  else:
    problem = (
      f"the step cannot prove that the loss treats each row on its own once every jaxbn batch norm has "
      f"those statistics: the rows pass through {where}, which its check does not follow"
    )
  raise ValueError(
    f"{fn}: bn_mode='exact' differentiates the loss with batch-norm statistics over the whole dataset, but "
    f"{problem}. Consider one of the following options:\n"
    "  1. use jaxbn's batch norms (jaxbn.batch_norm, jaxbn.linen.BatchNorm, jaxbn.nnx.BatchNorm) for every "
    "batch norm of the model;\n"
    "  2. use bn_mode='ghost', which normalizes each micro-batch with its own statistics."
  )


def _sum_over_devices(grads, primals, data, axis_name):
  """Sums the devices' contributions to the gradients with respect to ``primals``.

  Under ``jax.shard_map``, autodiff already sums the gradient of a value that is the same on
  every device over the axes the data varies over; under ``jax.pmap`` it does not.
  """
  data_axes = frozenset().union(*(varying(leaf) for leaf in jax.tree.leaves(data)))
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)

  def reduce(g, p):
    missing = tuple(a for a in names if not (a in data_axes and a not in varying(p)))
    return lax.psum(g, missing) if missing else g

  return jax.tree.map(reduce, grads, primals)


def _reduce_over_devices(grads, params, loss, data, axis_name):
  """Sums the devices' weighted contributions (each device's weights are its share of all rows)."""
  return _sum_over_devices(grads, params, data, axis_name), lax.psum(loss, axis_name)


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


# ---- Flax linen adapter ---------------------------------------------------------------------


def _check_adapter(fn: str, model: Any, module_type: type, type_name: str, loss: Any, metrics: Any) -> None:
  """The arguments every loss adapter takes: a model of its kind, a loss and optional metrics functions."""
  if not isinstance(model, module_type):
    raise TypeError(f"{fn}: model must be a {type_name}, got {type(model).__name__}.")
  _checks.callable_arg(fn, "loss", loss)
  if metrics is not None:
    _checks.callable_arg(fn, "metrics", metrics)


def _is_batch_norm(module: Any) -> bool:
  return isinstance(module, (nn.BatchNorm, JaxbnBatchNorm))


def linen_loss(
  model: nn.Module,
  loss: Callable[[Any, Any], jax.Array],
  *,
  inputs: str = "x",
  targets: str = "y",
  metrics: Callable[[Any, Any], Any] | None = None,
  rng_streams: Sequence[str] = (),
  **apply_kwargs: Any,
) -> LossFn:
  """A :func:`full_batch_step` loss function for a ``flax.linen`` model with batch norm.

  Every ``flax.linen.BatchNorm`` / ``jaxbn.linen.BatchNorm`` called in training mode receives the
  micro-batch's row mask (combined with any mask the model passes), and its exact statistics are
  reported so that the step updates the running statistics once, from all micro-batches, with
  the layer's own momentum and running-average convention.

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
    The loss function, with ``update_batch_stats`` attached as an attribute, which
    :func:`full_batch_step` picks up.

  Raises:
    ValueError: ``rngs`` among ``apply_kwargs``, or a bad ``rng_streams``.
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
  rng_streams = tuple(rng_streams)
  layers: dict[tuple[str, ...], Any] = {}

  def loss_fn(params, batch_stats, batch, mask, key=None):
    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      if context.method_name != "__call__" or not _is_batch_norm(module):
        return next_fun(*args, **kwargs)
      use_ra = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
      use_ra = module.use_running_average if use_ra is None else use_ra
      if use_ra or module.is_initializing():
        return next_fun(*args, **kwargs)
      x = jnp.asarray(args[0])
      given = kwargs.get("mask")
      full = None if given is None else jnp.asarray(given) != 0
      if mask is not None:
        _checks.leading_rows("jaxbn.training.linen_loss", x, mask, f"the batch norm at {'/'.join(module.path)}")
        rows = mask.reshape(mask.shape + (1,) * (x.ndim - 1))
        full = rows if full is None else jnp.logical_and(rows, full)
        kwargs = {**kwargs, "mask": full}
      path = tuple(module.path)
      layers[path] = module
      if isinstance(module, JaxbnBatchNorm):
        return next_fun(*args, **kwargs)  # reports the statistics it used in the MOMENTS collection
      if _hooks.current() is not None:
        raise TypeError(
          f"jaxbn.training.linen_loss: the batch norm at {'/'.join(path)} is flax.linen.BatchNorm, which "
          "cannot normalize with statistics over the whole dataset (bn_mode='exact'); replace it with "
          "jaxbn.linen.BatchNorm (same arguments and variables)."
        )
      # Flax's layer computes its statistics its own way; the exact ones go where jaxbn's layers put
      # theirs, the MOMENTS collection, which lifted transforms (nn.scan, nn.remat) carry like any other.
      if not module.is_mutable_collection(MOMENTS):
        return next_fun(*args, **kwargs)  # a lift that does not carry MOMENTS: reported as missing below
      axes = tuple(sorted(a % x.ndim for a in np.atleast_1d(module.axis)))
      stats = _stats.compute_stats(
        x, axes, mask=full, axis_name=module.axis_name, axis_index_groups=module.axis_index_groups
      )
      record_moments(module, stats)
      return next_fun(*args, **kwargs)

    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    layers.clear()
    kwargs = dict(apply_kwargs)
    if rng_streams:
      kwargs["rngs"] = {name: jax.random.fold_in(key, j) for j, name in enumerate(rng_streams)}
    with nn.intercept_methods(interceptor):
      out, updates = model.apply(variables, batch[inputs], mutable=["batch_stats", MOMENTS], **kwargs)
    moments = flax.core.unfreeze(updates.get(MOMENTS, {}))
    collected: dict[tuple[str, ...], _stats.Stats] = {}
    missing = []
    for path in layers:  # in call order
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
    value, extra = _masked_means(loss, metrics, out, batch[targets], mask)
    return value, LossAux(stats=collected or None, metrics=extra)

  def update_batch_stats(batch_stats, merged):
    frozen = isinstance(batch_stats, flax.core.FrozenDict)
    new = flax.core.unfreeze(batch_stats)  # a copy we can assign into (also of a FrozenDict)
    for path, stats in merged.items():
      module = layers[path]
      node = new
      for name in path:
        node = node[name]
      state = BatchNormState(node["mean"], node["var"], node.get("count", jnp.zeros((), jnp.int32)))
      for call in (stats,) if isinstance(stats, _stats.Stats) else stats:
        state = update_running_stats(
          state,
          call,
          momentum=module.momentum,
          running_average=getattr(module, "running_average", "ema"),
          unbiased_running_var=getattr(module, "unbiased_running_var", False),
        )
      node["mean"], node["var"] = state.mean, state.var
      if "count" in node:
        node["count"] = state.count
    return flax.core.freeze(new) if frozen else new

  loss_fn.update_batch_stats = update_batch_stats
  loss_fn.takes_key = bool(rng_streams)
  return loss_fn


def sharpness(
  loss_fn: LossFn,
  *,
  micro_batch_size: int | None = None,
  bn_mode: str = "ghost",
  axis_name: Any = None,
  num_iters: int = 20,
  method: str = "lanczos",
  jit: bool = True,
) -> Callable[..., tuple[jax.Array, Any]]:
  """The sharpness of the full-batch objective that :func:`full_batch_step` minimizes.

  The top Hessian eigenvalue of the mean loss over all of ``data``, by
  :func:`jaxbn.top_hessian_eigenvalue` on Hessian-vector products of the same accumulated gradient
  (micro-batches, devices and ``bn_mode`` as in the step). Full-batch gradient descent with
  learning rate ``lr`` is stable on a quadratic while it stays below ``2 / lr``
  (:func:`jaxbn.stability_threshold`); Cohen et al. (ICLR 2021) show networks rise to that edge.

  Args:
    loss_fn: the step's loss function (e.g. from :func:`linen_loss`).
    micro_batch_size: as in :func:`full_batch_step`.
    bn_mode: ``"ghost"`` or ``"exact"``, as in :func:`full_batch_step`.
    axis_name: as in :func:`full_batch_step`, for pmap-style use (then pass ``jit=False``).
    num_iters: Lanczos iterations (Hessian-vector products).
    method: ``"lanczos"`` or ``"power"``.
    jit: return the function compiled with ``jax.jit``.

  Returns:
    ``fn(state, data, init=None) -> (eigenvalue, eigenvector)``; ``init`` warm-starts from a
    previous eigenvector.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, jaxbn
    >>> def loss_fn(params, batch_stats, batch, mask):  # 3 rows in micro-batches of 2: a mask
    ...   err = (batch["x"] @ params["w"]) ** 2
    ...   return jnp.sum(jnp.where(mask, err, 0)) / jnp.sum(mask), jaxbn.training.LossAux()
    >>> data = {"x": jnp.diag(jnp.array([1.0, 2.0, 3.0]))}
    >>> state = jaxbn.training.TrainState.create({"w": jnp.ones(3)}, {}, optax.sgd(0.1))
    >>> value, _ = jaxbn.training.sharpness(loss_fn, micro_batch_size=2)(state, data)
    >>> round(float(value), 4)  # Hessian 2/3 * diag(1, 4, 9)
    6.0
  """
  fn = "jaxbn.training.sharpness"
  _checks.callable_arg(fn, "loss_fn", loss_fn)
  _iterations_and_method(fn, "num_iters", num_iters, method)
  jit = _checks.static_bool(fn, "jit", jit)
  if bn_mode not in ("ghost", "exact"):
    raise ValueError(f"{fn}: bn_mode must be 'ghost' or 'exact', got {bn_mode!r}.")
  micro_batch_size = _positive_int_or_none(fn, "micro_batch_size", micro_batch_size)
  _, _, gradient = _gradient_fns(fn, loss_fn, micro_batch_size, bn_mode, axis_name)

  def run(state: TrainState, data: Any, init: Any = None) -> tuple[jax.Array, Any]:
    return _sharpness(
      gradient,
      state.params,
      state.batch_stats,
      data,
      axis_name,
      key=state.step_key(),
      num_iters=num_iters,
      method=method,
      init=init,
    )

  return jax.jit(run) if jit else run


def minibatch_epoch(
  step: Callable[[TrainState, Any], tuple[TrainState, StepMetrics]],
  state: TrainState,
  data: Any,
  *,
  batch_size: int,
  key: jax.Array,
  start: int = 0,
  on_update: Callable[[int, TrainState, StepMetrics], None] | None = None,
) -> tuple[TrainState, list[StepMetrics]]:
  """One epoch of mini-batch SGD with the same step: shuffle, then one update per batch.

  The last batch holds the remainder (never dropped); it has another size, so it compiles once.
  Use a step built with ``micro_batch_size=None`` (or >= ``batch_size``) for plain mini-batch SGD.

  The epoch is fixed by ``key`` (the order of the rows) and ``batch_size``; ``start`` and
  ``on_update`` resume it in the middle. Checkpoint the state and the position ``on_update`` is given
  (with the epoch's key, or the epoch number it is derived from); after a kill, call again with the
  restored state and ``start=position``: the epoch ends bit for bit as the uninterrupted one.

  Args:
    step: a step from :func:`full_batch_step`.
    state: the state to start from.
    data: the pytree of examples, with a leading example axis.
    batch_size: rows per mini-batch, a positive int.
    key: PRNG key of the shuffle.
    start: number of this epoch's batches already applied (0 to ``ceil(n / batch_size)``): the call
      applies the rest.
    on_update: optional ``on_update(position, state, metrics)``, called after each update with the
      number of this epoch's batches applied so far, e.g. to checkpoint; it must be done reading
      ``state`` when it returns (the next step may donate its buffers).

  Returns:
    ``(state, history)``: the state after the epoch and the metrics of this call's updates, in order.

  Raises:
    ValueError: a bad ``batch_size``, ``start`` or ``data``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, jaxbn
    >>> def loss_fn(params, batch_stats, batch, mask):
    ...   return jnp.mean((batch["x"] @ params["w"] - 1.0) ** 2), jaxbn.training.LossAux()
    >>> opt, data = optax.sgd(0.1), {"x": jnp.arange(20.0).reshape(10, 2) / 10}
    >>> step = jaxbn.training.full_batch_step(loss_fn, opt, donate=False)
    >>> fresh = jaxbn.training.TrainState.create({"w": jnp.zeros(2)}, {}, opt)
    >>> saved = {}
    >>> def checkpoint(position, state, metrics):
    ...   saved.update(position=position, state=state) if position == 2 else None
    >>> whole, _ = jaxbn.training.minibatch_epoch(
    ...   step, fresh, data, batch_size=3, key=jax.random.key(0), on_update=checkpoint)
    >>> resumed, history = jaxbn.training.minibatch_epoch(
    ...   step, saved["state"], data, batch_size=3, key=jax.random.key(0), start=saved["position"])
    >>> len(history), bool(jnp.array_equal(resumed.params["w"], whole.params["w"]))
    (2, True)
  """
  fn = "jaxbn.training.minibatch_epoch"
  _checks.callable_arg(fn, "step", step)
  typed = isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  if not typed and not (hasattr(key, "dtype") and key.dtype == jnp.uint32 and np.shape(key)[-1:] == (2,)):
    raise TypeError(f"{fn}: key must be a jax.random.key(seed) (or raw uint32 key data), got {key!r}.")
  n = _num_rows(fn, data)
  batch_size = _positive_int_or_none(fn, "batch_size", batch_size)
  if batch_size is None:
    raise ValueError(f"{fn}: batch_size must be a positive int, got None.")
  num_batches = -(-n // batch_size)
  if not _checks.is_int(start) or not 0 <= start <= num_batches:
    raise ValueError(
      f"{fn}: start must be an int from 0 to the epoch's {num_batches} batches ({n} rows in batches of "
      f"{batch_size}), got {start!r}."
    )
  if on_update is not None and not callable(on_update):
    raise TypeError(f"{fn}: on_update must be callable as on_update(position, state, metrics), got {on_update!r}.")
  order = jax.random.permutation(key, n)
  history = []
  for b in range(int(start), num_batches):
    batch = jax.tree.map(lambda a, idx=order[b * batch_size : (b + 1) * batch_size]: a[idx], data)
    state, metrics = step(state, batch)
    history.append(metrics)
    if on_update is not None:
      on_update(b + 1, state, metrics)
  return state, history


# ---- Flax NNX adapter -----------------------------------------------------------------------


def nnx_loss(
  model: Any,
  loss: Callable[[Any, Any], jax.Array],
  *,
  inputs: str = "x",
  targets: str = "y",
  metrics: Callable[[Any, Any], Any] | None = None,
) -> LossFn:
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
    The loss function, with ``update_batch_stats`` and ``init_state(optimizer)`` attached.

  Raises:
    TypeError: the model holds a ``flax.nnx.BatchNorm``, whose statistics cannot be merged exactly.
  """
  from flax import nnx

  from jaxbn.nnx import batch_norm_layers as nnx_layers
  from jaxbn.nnx import collect_moments

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

  def fresh(*states):
    # Rebuild the variables at the current trace level: NNX forbids mutating a variable created
    # at another one (the state arrives from the jitted step, the mutation happens under grad).
    return [jax.tree.map(lambda a: a, st) for st in states]

  streams = sorted({node.tag for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)})

  def loss_fn(params, batch_stats, batch, mask, key=None):
    m = nnx.merge(graphdef, *fresh(params, batch_stats, rest))
    m.train()
    if streams:
      # match_shape: streams of layers stacked with nnx.vmap hold one key per layer.
      keys = {name: jax.random.fold_in(key, j) for j, name in enumerate(streams)}
      nnx.reseed(m, policy="match_shape", **keys)
    with collect_moments(m, row_mask=mask) as read:
      out = m(batch[inputs])
      collected = read(per_call=True)
    value, extra = _masked_means(loss, metrics, out, batch[targets], mask)
    return value, LossAux(stats=collected or None, metrics=extra)

  def update_batch_stats(batch_stats, merged):
    m = nnx.merge(graphdef, *fresh(params, batch_stats, rest))
    for path, node in nnx_layers(m):
      if path not in merged:
        continue
      count = node.count[...] if isinstance(getattr(node, "count", None), nnx.BatchStat) else jnp.zeros((), jnp.int32)
      state = BatchNormState(node.mean[...], node.var[...], count)
      for call in (merged[path],) if isinstance(merged[path], _stats.Stats) else merged[path]:
        state = update_running_stats(
          state,
          call,
          momentum=node.momentum,
          running_average=node.running_average,
          unbiased_running_var=node.unbiased_running_var,
        )
      node.mean[...], node.var[...] = state.mean, state.var
      if isinstance(getattr(node, "count", None), nnx.BatchStat):
        node.count[...] = state.count
    return nnx.state(m, nnx.BatchStat)

  loss_fn.update_batch_stats = update_batch_stats
  loss_fn.takes_key = bool(streams)
  loss_fn.init_state = lambda optimizer, key=None: TrainState.create(params, batch_stats, optimizer, key=key)
  return loss_fn


# ---- checkpoints ----------------------------------------------------------------------------


def _orbax() -> Any:
  try:
    import orbax.checkpoint as ocp
  except ImportError as err:
    raise ImportError(
      "jaxbn.training checkpoints need Orbax: pip install 'jaxbn[checkpoint]' (or orbax-checkpoint)."
    ) from err
  return ocp


def _check_path(fn: str, path: Any) -> None:
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"{fn}: path must be a str or os.PathLike directory path, got {type(path).__name__}.")


def save_checkpoint(path: str, state: TrainState) -> None:
  """Saves the whole ``TrainState`` (params, batch statistics, optimizer state, counters) with Orbax.

  ``path`` must not exist yet; the call returns once the checkpoint is on disk.

  Args:
    path: a directory path that does not exist yet.
    state: the state to save.

  Raises:
    ImportError: Orbax is not installed (``pip install 'jaxbn[checkpoint]'``).
    TypeError: ``path`` is not a path, or ``state`` not a ``TrainState``.
  """
  fn = "jaxbn.training.save_checkpoint"
  _check_path(fn, path)
  if not isinstance(state, TrainState):
    raise TypeError(f"{fn}: state must be a jaxbn.training.TrainState, got {type(state).__name__}.")
  ocp = _orbax()

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path), state)
  checkpointer.wait_until_finished()


def restore_checkpoint(path: str, like: TrainState) -> TrainState:
  """Restores a ``TrainState`` saved by :func:`save_checkpoint`.

  Args:
    path: the checkpoint's directory.
    like: a state with the same structure, shapes and dtypes (e.g. a fresh ``TrainState.create``);
      its values are not used, its shardings are.

  Returns:
    The saved state, bit for bit, with the tree structure (NamedTuples included) of ``like``.

  Raises:
    TypeError: ``path`` is not a path.
    ValueError: no checkpoint directory at ``path``.
  """
  fn = "jaxbn.training.restore_checkpoint"
  _check_path(fn, path)
  if not os.path.isdir(path):
    raise ValueError(f"{fn}: path {os.fspath(path)!r} holds no checkpoint (no such directory).")
  ocp = _orbax()

  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  restored = ocp.StandardCheckpointer().restore(os.path.abspath(path), target)
  return jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(restored))
