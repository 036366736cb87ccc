"""``full_batch_step``: the scanned and the host-looped step, and the guarded optimizer update both end with."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import optax
from jax import lax

from jaxbn import _checks, diagnostics
from jaxbn._trees import global_norm
from jaxbn.training import data_parallel
from jaxbn.training._args import (
  check_bn_mode,
  check_optimizer,
  iterations_and_method,
  positive_int_or_none,
)
from jaxbn.training.curvature import top_eigenpair
from jaxbn.training.exact import objective_gradient
from jaxbn.training.loops import HostLoop, named, resolve_loop, types_of
from jaxbn.training.loss import Loss, as_loss
from jaxbn.training.penalty import GradientPenalty
from jaxbn.training.state import LossFn, StepMetrics, TrainState, UpdateStatsFn
from jaxbn.training.stream import HostData, HostDataRouted
from jaxbn.training.sweep import SCAN, MicroBatches, device_gradient, weight_dtype

Step = Callable[[TrainState, Any], tuple[TrainState, StepMetrics]]


def full_batch_step(
  loss_fn: Loss | LossFn,
  optimizer: optax.GradientTransformation,
  *,
  micro_batch_size: int | None = None,
  update_batch_stats: UpdateStatsFn | None = None,
  guard: bool = True,
  donate: bool = True,
  jit: bool = True,
  axis_name: Any = None,
  loop: str = "auto",
  bn_mode: str = "ghost",
  layer_norms: bool = False,
  sharpness_every: int | None = None,
  sharpness_iters: int = 20,
  gradient_penalty: float = 0.0,
  penalty_block_size: int | None = None,
  penalty_method: str = "hvp",
) -> Step:
  """A compiled step that applies one update with the exact mean gradient over all of ``data``.

  Args:
    loss_fn: a :class:`Loss`, or a plain ``loss_fn(params, batch_stats, batch, mask) -> (loss,
      LossAux)``. ``batch`` is a micro-batch (the pytree ``data`` sliced along its leading axis),
      ``mask`` a boolean vector marking its valid rows, or None when all are valid (always so when
      the micro-batch size divides the dataset size); ``loss`` is the mean loss over the valid rows,
      and batch norms must use only valid rows for their statistics. :func:`linen_loss` and
      :func:`nnx_loss` build a ``Loss`` from a Flax model. A loss that draws random numbers
      (dropout) is a ``Loss(..., takes_key=True)`` (or a function with ``loss_fn.takes_key = True``)
      and takes a fifth argument ``key``: a fresh key per micro-batch and step, from
      ``TrainState.key``.
    optimizer: any Optax gradient transformation.
    micro_batch_size: rows per micro-batch; None for the whole dataset at once. With ``data``
      sharded over ``d`` devices under ``jax.jit``, the rows are split into ``g = gcd(n, d)``
      blocks (one per device when ``d`` divides ``n``) and each block puts
      ``micro_batch_size // g`` (at least 1) of its own rows into every micro-batch, so data never
      moves between devices and every device works on every micro-batch; one device reproduces
      the step with the rows in that order. With ``g = 1`` the micro-batches are contiguous and
      XLA gathers them. ``d`` comes from the data's type: its sharding on Explicit meshes, all
      Auto-axis devices of the mesh on Auto meshes (whose types do not say how data is laid out,
      so replicated data is split the same way). With ``g = d`` and a loss that treats rows on
      their own apart from jaxbn's batch norms (checked as for ``bn_mode="exact"``), each device
      sweeps its own rows inside ``jax.shard_map`` and its partial gradient crosses devices once
      per step (``jaxbn.training.data_parallel``); otherwise (flax's ``BatchNorm``, say) the
      gradient is all-reduced once per micro-batch, and the step warns so. A loss that draws
      random numbers then draws them per device.
    update_batch_stats: ``update_batch_stats(batch_stats, merged_stats) -> batch_stats`` folds
      the step's merged statistics into the running ones; required when ``LossAux.stats`` is given.
      Defaults to ``loss_fn.update_batch_stats``, which the ``Loss`` of :func:`linen_loss` and
      :func:`nnx_loss` holds.
    guard: skip a step whose loss, gradient, update or batch statistics are not finite, changing
      nothing but ``skipped``.
    donate: donate the incoming state's buffers to the new state: continue from the returned
      state; a consumed state passed again is refused with a ``ValueError`` saying so.
    jit: return the step compiled with ``jax.jit`` (False to wrap it yourself, e.g. in pmap).
    loop: how the micro-batches run. ``"scan"``: in a ``lax.scan`` inside one compiled step
      (traceable into ``jax.pmap``/``jax.shard_map``). ``"host"``: one compiled program per
      micro-batch (per sweep, in exact mode), called from Python with the accumulators donated,
      then one compiled update. ``"auto"`` (default): ``"scan"`` on every backend (on CPU its
      convolutions are traced in the layout XLA:CPU runs fast inside loops, jax-ml/jax#12868), the
      host loop for a :class:`jaxbn.training.HostData`. The same numbers up to float rounding
      (speed measured by ``benchmarks/full_batch.py``, results in ``benchmarks/RESULTS.md``); every
      option works with both. The step's ``loop`` attribute says which one it runs for in-memory
      data.
    bn_mode: what batch norm means under micro-batching. ``"ghost"`` (default): each micro-batch
      is normalized with its own statistics (ghost batches of the partition above, Hoffer et al.
      2017), one forward and backward sweep over the data. ``"exact"``: every layer normalizes with
      its statistics over the WHOLE dataset (all micro-batches, all devices), and the gradient is
      that objective's exact gradient, equal to one ordinary batch-norm pass over the entire
      dataset as a single batch; memory stays that of one micro-batch. It costs ``2L + 1`` sweeps
      over the data for ``L`` batch-norm layers (one statistics sweep per layer, since a layer's
      statistics depend on the layers before it; one loss sweep; one vector-Jacobian sweep per
      layer for the adjoints of the statistics, last layer first), on either loop. Every jaxbn
      batch norm takes part (``jaxbn.linen.BatchNorm``, ``jaxbn.nnx.BatchNorm``,
      ``jaxbn.batch_norm`` in a hand-written loss); at trace time the step proves from the loss's
      jaxpr that, with their statistics fixed, the loss treats each row on its own, and refuses a
      loss where something else mixes rows (a batch norm that is not jaxbn's, ghost batches, batch
      renormalization after Ioffe 2017), naming the operation. All derivatives (gradient,
      Hessian-vector products, sharpness) are those of one ordinary pass over the whole dataset.
    layer_norms: add per-layer gradient and parameter norms to the metrics.
    sharpness_every: every ``k`` applied steps, add the top Hessian eigenvalue of the same full-batch
      objective (Lanczos 1950 on Hessian-vector products through this accumulated gradient) to the
      metrics (with ``loop="host"``, Lanczos runs from Python before the update, each product a sweep
      of compiled per-micro-batch JVPs).
    sharpness_iters: Lanczos iterations (Hessian-vector products) per sharpness estimate.
    gradient_penalty: ``alpha >= 0``; above 0 the step minimizes the mean loss plus
      ``(alpha / 4) * sum_k (n_k / N) * ||grad L_k||^2``, SGD's implicit regularizer (Smith et al.
      2021) made explicit as in Geiping et al. (2022), where ``L_k`` is the mean loss of block ``k``
      (``n_k`` consecutive rows of the ``N``, the loss called on them alone, its batch norms using the
      block's statistics as SGD's batches would) (``jaxbn.training.penalty``). The step follows that
      objective's gradient, its sharpness (``sharpness_every``) is that objective's, ``StepMetrics.loss``
      stays the mean loss and ``StepMetrics.gradient_penalty`` holds the penalty's value (the guard
      checks it too). With ``bn_mode="exact"`` the mean loss normalizes with all rows' statistics and
      each block still with its own. ``0.0`` (default) is the plain step.
    penalty_block_size: rows per block (over all devices, like ``micro_batch_size``); None for the
      micro-batch size (every micro-batch one block). It must divide ``micro_batch_size``; with
      ``micro_batch_size=None`` any size works (the last block holds the rest).
    penalty_method: how ``H_k g_k``, the Hessian of ``L_k`` times its gradient, is computed:
      ``"hvp"`` (default) exactly, by forward-mode differentiation of the block's gradient (per block a
      gradient and a Hessian-vector product), or ``"finite_difference"`` (Geiping et al.'s form,
      ``(grad L_k(theta + eps g_k) - g_k) / eps``: a second gradient per block instead of the product,
      cheaper in time and memory, about half the digits right; see ``jaxbn.training.penalty``). A
      block that is the whole micro-batch reuses the micro-batch's gradient (ghost batch norm), so blocks
      equal to the micro-batches cost least. ``benchmarks/gradient_penalty.py`` measures both against the plain step
      (results in ``benchmarks/RESULTS.md``). With the rows split over devices, each block's gradient is
      all-reduced once (the mean loss's only once per step).

  Returns:
    ``step(state, data) -> (new_state, StepMetrics)``. ``data`` is a pytree of arrays with a leading
    row axis in device memory, or a :class:`jaxbn.training.HostData`: a data set on the host or on
    disk (NumPy arrays, memory-mapped ``.npy`` files, a sliceable source such as a Grain data source)
    that the step streams to the devices one micro-batch at a time, the next one's transfer
    overlapping the current one's compute, with the numbers of the host loop on the same rows in
    device memory, bit for bit (ghost and exact mode, the sharpness too; the scanned loop's up to
    float rounding). Streaming needs the host loop: ``loop="auto"`` takes it for a ``HostData``.

  Raises:
    ValueError: bad ``micro_batch_size``, ``sharpness_every``, ``bn_mode``, ``loop``, ``gradient_penalty``
      (negative or not finite), ``penalty_block_size`` (not a positive int, or not
      dividing ``micro_batch_size``), ``penalty_method`` or ``data``
      (a ``HostData`` with ``loop="scan"``, ``axis_name`` or ``jit=False``);
      under ``bn_mode="exact"``, a loss that mixes rows other than through jaxbn's batch norms
      (at the first call); a state consumed by an earlier call (``donate=True``);
      ``loop="host"`` with ``axis_name`` or ``jit=False``;
      statistics without ``update_batch_stats``; a loss that needs a key and a state without one;
      data that XLA cannot partition over Explicit mesh axes (at the first call).
    TypeError: ``loss_fn`` or ``update_batch_stats`` not callable, ``optimizer`` no Optax
      transformation, ``guard``, ``donate``, ``jit`` or ``layer_norms`` not a bool; a
      ``flax.linen.BatchNorm`` under ``bn_mode="exact"`` (at the first call).

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

  References:
    Geiping, Goldblum, Pope, Moeller & Goldstein, "Stochastic Training is Not Necessary for
    Generalization", ICLR 2022 (full-batch training with gradient accumulation and ghost batch norm).
    Hoffer, Hubara & Soudry, "Train longer, generalize better: closing the generalization gap in
    large batch training of neural networks", NeurIPS 2017 (ghost batch norm).
    Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized Models",
    NeurIPS 2017.
    Lanczos, "An Iteration Method for the Solution of the Eigenvalue Problem of Linear Differential
    and Integral Operators", Journal of Research of the National Bureau of Standards, 1950.
  """
  fn = "jaxbn.training.full_batch_step"
  loss = as_loss(fn, loss_fn, update_batch_stats)
  check_optimizer(fn, optimizer)
  guard, donate, jit, layer_norms = (
    _checks.static_bool(fn, name, value)
    for name, value in (("guard", guard), ("donate", donate), ("jit", jit), ("layer_norms", layer_norms))
  )
  iterations_and_method(fn, "sharpness_iters", sharpness_iters)
  check_bn_mode(fn, bn_mode)
  micro_batch_size = positive_int_or_none(fn, "micro_batch_size", micro_batch_size)
  sharpness_every = positive_int_or_none(fn, "sharpness_every", sharpness_every)
  penalty = GradientPenalty.from_args(fn, gradient_penalty, penalty_block_size, penalty_method, micro_batch_size)
  traced = axis_name is not None or not jit
  if loop == "host" and traced:
    raise ValueError(
      f"{fn}: loop='host' runs compiled pieces from Python, so it cannot be traced into pmap or "
      "shard_map: use loop='scan' (or 'auto') with axis_name=... and jit=False there."
    )
  requested, loop = loop, resolve_loop(fn, loop)

  update = _GuardedUpdate(fn, optimizer, loss.update_batch_stats, guard=guard, layer_norms=layer_norms)
  host = HostLoop() if loop == "host" else None
  batches = MicroBatches(fn, loss, micro_batch_size, axis_name, host or SCAN, penalty)
  sharpness = None if sharpness_every is None else (sharpness_every, sharpness_iters)
  if host is not None:
    return _host_step(fn, batches, bn_mode, update, host, sharpness=sharpness, donate=donate)
  step = _scan_step(fn, batches, bn_mode, update, sharpness=sharpness)
  if jit:
    step = _DonationChecked(fn, jax.jit(step, donate_argnums=(0,) if donate else ()))

  def streamed() -> Step:  # host data streams on the host loop, whatever the backend
    host = HostLoop()
    on_host = dataclasses.replace(batches, loop=host)
    return _host_step(fn, on_host, bn_mode, update, host, sharpness=sharpness, donate=donate)

  step = HostDataRouted(fn, step, streamed if requested == "auto" and not traced else None, requested)
  step.loop = "scan"
  return step


@dataclasses.dataclass(frozen=True, eq=False)
class _GuardedUpdate:
  """One optimizer update from a step's gradient, mean loss and merged statistics, under the guard.

  With ``guard``, a loss, gradient, update, new parameter or statistic that is not finite keeps the
  parameters, optimizer state and batch statistics as they were, and counts the step as skipped.
  """

  fn: str
  optimizer: optax.GradientTransformation
  update_batch_stats: UpdateStatsFn | None
  guard: bool = True
  layer_norms: bool = False

  def __call__(
    self, state: TrainState, grads: Any, loss: jax.Array, stats: Any, extra: Any
  ) -> tuple[TrainState, StepMetrics]:
    loss, penalty = loss if isinstance(loss, tuple) else (loss, None)  # (mean loss, penalty) with a gradient penalty
    grad_norm = global_norm(grads)  # of the float32 sums: a float16 gradient's norm can overflow float16
    grads = jax.tree.map(lambda g, p: g.astype(jnp.result_type(p)), grads, state.params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if penalty is not None:
      finite &= jnp.isfinite(penalty)
    batch_stats = state.batch_stats
    if stats is not None:
      # Statistics that overflowed (e.g. one huge row) would make the running ones inf for good.
      finite &= jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(stats)]))
      batch_stats = self._running_update(state.batch_stats, stats)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    update_norm = global_norm(updates)
    # The new parameters too: a finite update can still overflow float16 parameters.
    finite &= jnp.isfinite(update_norm) & jnp.isfinite(global_norm(params))
    if self.guard:
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
    metrics = StepMetrics(loss, grad_norm, update_norm, ~applied, extra, gradient_penalty=penalty)
    if self.layer_norms:
      metrics = metrics._replace(
        layer_grad_norms=diagnostics.norms_by_layer(grads), layer_param_norms=diagnostics.norms_by_layer(params)
      )
    return new_state, metrics

  def _running_update(self, batch_stats: Any, stats: Any) -> Any:
    if self.update_batch_stats is None:
      raise ValueError(
        f"{self.fn}: the loss function returns batch statistics (LossAux.stats) but no update_batch_stats "
        "was given to fold them into the running statistics. Pass update_batch_stats=..., or build "
        "the loss with jaxbn.training.linen_loss, which provides it."
      )
    return self.update_batch_stats(batch_stats, stats)


def _scan_step(
  fn: str,
  batches: MicroBatches,
  bn_mode: str,
  update: _GuardedUpdate,
  *,
  sharpness: tuple[int, int] | None = None,
) -> Step:
  """``step(state, data)`` with every micro-batch in one program (a ``lax.scan``), not yet compiled.

  Under ``batches.axis_name`` (pmap-style code), the devices' gradients, losses and metrics are
  summed before the update. Under ``jax.jit`` with the rows split over devices, the same per-device
  program runs inside ``jax.shard_map`` where :func:`jaxbn.training.data_parallel.plan` allows it.
  With ``sharpness = (every, iters)``, the metrics get the top Hessian eigenvalue on every
  ``every``-th applied step.
  """

  def device_part(batches: MicroBatches, params: Any, batch_stats: Any, key: Any, count: Any, data: Any) -> Any:
    axis_name = batches.axis_name
    gradient = objective_gradient(batches, bn_mode)
    loss, grads, stats, extra = device_gradient(gradient, params, batch_stats, data, key, axis_name)
    if axis_name is not None:
      # Each device's contributions are weighted by its share of all rows: their sum is the full-batch value.
      loss = lax.psum(loss, axis_name)
      if extra is not None:
        extra = lax.psum(extra, axis_name)
    value = None
    if sharpness is not None:
      every, iters = sharpness
      value = lax.cond(
        count % every == 0,
        lambda: top_eigenpair(gradient, params, batch_stats, data, axis_name, key=key, num_iters=iters)[0],
        lambda: jnp.full((), jnp.nan, weight_dtype(params)),
      )
    return loss, grads, stats, extra, value

  def step(state: TrainState, data: Any) -> tuple[TrainState, StepMetrics]:
    replicated = (state.params, state.batch_stats, state.step_key(), state.step)
    plan = None
    if batches.axis_name is None:
      plan = data_parallel.plan(batches, bn_mode, state.params, state.batch_stats, data, state.step_key())
    if plan is None:
      loss, grads, stats, extra, value = device_part(batches, *replicated, data)
    else:
      loss, grads, stats, extra, value = plan.run(functools.partial(device_part, plan.batches), replicated, data)
    new_state, metrics = update(state, grads, loss, stats, extra)
    return new_state, metrics if value is None else metrics._replace(sharpness=value)

  return _partition_errors_explained(fn, step)


def _host_step(
  fn: str,
  batches: MicroBatches,
  bn_mode: str,
  update: _GuardedUpdate,
  loop: HostLoop,
  *,
  sharpness: tuple[int, int] | None,
  donate: bool,
) -> Step:
  """``step(state, data)`` running every sweep's compiled program per micro-batch from Python, then one
  compiled update (:class:`jaxbn.training.loops.HostLoop`).

  The sharpness, when due, is estimated before the update (the state's buffers are donated to it) by
  Lanczos iterations run from Python, each Hessian-vector product a sweep of compiled JVPs. The step
  exposes its compiled programs as ``step.programs`` and their argument types as ``step.calls``.
  """
  # The new state takes the incoming one's buffers; without donation, the gradient accumulators' (the step's own).
  finish = jax.jit(named(update, "update"), donate_argnums=(0,) if donate else (1,))

  def host_step(state: TrainState, data: Any) -> tuple[TrainState, StepMetrics]:
    if isinstance(data, HostData):
      data = batches.stream(data)
    gradient = data_parallel.host_gradient(batches, bn_mode, state.params, state.batch_stats, data, state.step_key())
    gradient = gradient or objective_gradient(batches, bn_mode)
    loss, grads, stats, extra = gradient(state.params, state.batch_stats, data, state.step_key())
    value = None
    if sharpness is not None:
      every, iters = sharpness
      if int(state.step) % every == 0:
        value = top_eigenpair(
          gradient, state.params, state.batch_stats, data, None, key=state.step_key(), num_iters=iters, jit=False
        )[0]
      else:
        value = jnp.full((), jnp.nan, weight_dtype(state.params))
    if "update" not in loop.calls:
      loop.calls["update"] = (types_of((state, grads, loss, stats, extra)), 1)
    new_state, metrics = finish(state, grads, loss, stats, extra)
    return new_state, metrics if value is None else metrics._replace(sharpness=value)

  loop.programs["update"] = finish
  step = _DonationChecked(fn, _partition_errors_explained(fn, host_step))
  step.programs, step.calls, step.loop = loop.programs, loop.calls, "host"
  return step


def _partition_errors_explained(fn: str, step: Step) -> Step:
  """``step``, with JAX's error for data it cannot partition over Explicit mesh axes explained."""

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
        "  1. use jaxbn's batch norms (jaxbn.linen.BatchNorm, jaxbn.nnx.BatchNorm, jaxbn.batch_norm): the step "
        "then runs the loss on each device's rows (see the warning it gave, if any, for what stops it);\n"
        "  2. shard the data over a mesh with Auto axes: jax.make_mesh(shape, names, "
        "axis_types=(jax.sharding.AxisType.Auto,) * len(names));\n"
        "  3. run the step per device: full_batch_step(..., axis_name=name, jit=False) inside "
        "jax.shard_map or jax.pmap, with the batch norms' axis_name set to the same name."
      ) from err

  return checked_step


class _DonationChecked:
  """``step``, refusing with a clear message a state whose buffers an earlier call consumed (donated).

  Everything else (``lower``, ``trace``, attributes) is ``step``'s own.
  """

  programs: dict[str, Any]  # the host loop's compiled programs, by label (set by _host_step)
  calls: dict[str, Any]  # the host loop's programs' argument types and calls per sweep (set by _host_step)
  loop: str  # the loop the step runs: "scan" or "host"

  def __init__(self, fn: str, step: Callable[..., Any]):
    self._fn, self._step = fn, step
    functools.update_wrapper(self, step)

  def __call__(self, state: TrainState, *args: Any) -> Any:
    if any(_consumed(leaf) for leaf in jax.tree.leaves(state)):  # the paths only for the message
      path = next(path for path, leaf in jax.tree_util.tree_leaves_with_path(state) if _consumed(leaf))
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


def _consumed(leaf: Any) -> bool:
  """Whether ``leaf`` is an array whose buffer was donated to (consumed by) an earlier call."""
  is_deleted = getattr(leaf, "is_deleted", None)  # concrete arrays only: a tracer's aval has no such method
  return is_deleted is not None and is_deleted()
