"""Exact full-data batch norm under micro-batching (``bn_mode="exact"``): statistics, loss and adjoint sweeps.

With ``S_l`` the statistics (mean, variance) of batch-norm layer ``l`` over ALL rows, and ``F`` the
mean loss with every ``S`` held fixed, the objective is ``F(params, S(params))`` where
``S_l = G_l(params, S_1..S_{l-1})``. The forward pass needs one sweep over the micro-batches per
layer (layer ``l``'s statistics depend on the normalized outputs before it); the gradient is
``dF/dparams + sum_l lam_l . dG_l/dparams`` with the adjoints ``lam_l = dF/dS_l +
sum_{m>l} lam_m . dG_m/dS_l``, solved from the last layer down (the system is triangular), one
vector-Jacobian sweep per layer. In all ``L`` statistics sweeps, one loss-and-gradient sweep and
``L`` adjoint sweeps, each holding one micro-batch's activations at a time. The result equals one
ordinary batch-norm pass (Ioffe & Szegedy 2015) over the whole dataset as a single batch.

The statistics reach jaxbn's batch norms through :mod:`jaxbn._hooks`, and the step proves from the
loss's jaxpr (:mod:`jaxbn._rows`) that nothing else mixes the rows of a micro-batch.

References:
  Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing Internal
  Covariate Shift", ICML 2015.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import _checks, _hooks, _rows
from jaxbn import stats as _stats
from jaxbn._sharding import trace_state
from jaxbn.training.loops import Folded
from jaxbn.training.state import LossAux
from jaxbn.training.sweep import (
  GradientFn,
  MicroBatches,
  accumulator_dtype,
  merged_part,
  reduced_aux,
  sum_over_devices,
  summed_part,
  weight_dtype,
  weighted,
  weighted_metrics,
  zeros_like_grads,
)


def objective_gradient(batches: MicroBatches, bn_mode: str) -> GradientFn:
  """The gradient function of the full-batch objective: ghost batches per micro-batch, or batch norm over all rows."""
  if bn_mode == "exact":
    return functools.partial(exact_gradient, batches)
  return batches.gradient


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


def _given(diff: list[Any], counts: list[Any]) -> list[_stats.Stats]:
  """The full-data statistics of the first layers, as the hook hands them out (differentiable in ``diff``)."""
  return [_stats.Stats(c, m, v * c) for (m, v), c in zip(diff, counts, strict=True)]


Base = tuple[Any, Any, Any, Any]
"""``(params, batch_stats, data, key)``: what every sweep of one evaluation reads."""


@dataclasses.dataclass(frozen=True)
class _Sweeps:
  """What every sweep of one exact gradient evaluation shares: the micro-batches and the loss.

  The sweeps' bodies read the arrays from their arguments only (``base`` and what each adds), as the
  loops of :mod:`jaxbn.training.loops` require.
  """

  batches: MicroBatches
  k: int

  def micro(self, base: Base, i: jax.Array) -> tuple[Any, Any, jax.Array]:
    params, _, data, key = base
    return self.batches.slice(data, i, key, weight_dtype(params))

  def run(self, hook: _ExactHook, base: Base, params: Any, batch: Any, mask: Any) -> tuple[jax.Array, LossAux]:
    """The loss on a micro-batch with ``hook`` answering its batch norms."""
    hook.trace = trace_state()
    with _hooks.stats_hook(hook):
      return self.batches.apply(params, base[1], batch, mask)

  def device_sum(self, grads: Any, primals: Any, data: Any) -> Any:
    """Under ``axis_name``, the sum over devices of their contributions to the gradients with respect to ``primals``."""
    axis_name = self.batches.axis_name
    return grads if axis_name is None else sum_over_devices(grads, primals, data, axis_name)


def exact_gradient(
  batches: MicroBatches, params: Any, batch_stats: Any, data: Any, key: Any = None
) -> tuple[jax.Array, Any, Any, Any]:
  """Loss, gradient, full-data statistics and metrics of batch norm over the WHOLE dataset (see the module)."""
  sw = _Sweeps(batches, batches.sizes(data)[3])
  base = (params, batch_stats, data, key)
  num_layers = batches.memo("exact probe", lambda *base: _probe(sw, base), *base)
  diff, counts = _statistics_sweeps(sw, base, num_layers)
  loss, grads, stats, metrics, adjoint = _loss_sweep(sw, base, diff, counts)
  grads = _adjoint_sweeps(sw, base, diff, counts, adjoint, grads)
  return loss, grads, stats, metrics


def _probe(sw: _Sweeps, base: Base) -> int:
  """The number of batch-norm calls, from one traced forward pass; refuses a loss the exact mode cannot serve."""
  fn = sw.batches.fn
  calls, has_stats, problem = _inspect(sw, base)
  if calls == 0 and has_stats > 0:
    raise ValueError(
      f"{fn}: bn_mode='exact' needs the model's batch norms to be jaxbn's (jaxbn.linen.BatchNorm or "
      "jaxbn.nnx.BatchNorm, in training mode); the loss function reports batch statistics but no jaxbn "
      "batch norm was called."
    )
  if problem is not None:
    raise ValueError(
      f"{fn}: bn_mode='exact' differentiates the loss with batch-norm statistics over the whole dataset, but "
      f"{problem}. Consider one of the following options:\n"
      "  1. use jaxbn's batch norms (jaxbn.batch_norm, jaxbn.linen.BatchNorm, jaxbn.nnx.BatchNorm) for every "
      "batch norm of the model;\n"
      "  2. use bn_mode='ghost', which normalizes each micro-batch with its own statistics."
    )
  return calls


def rows_mixed(batches: MicroBatches, params: Any, batch_stats: Any, data: Any, key: Any = None) -> str | None:
  """Why the loss is not a function of each row on its own once jaxbn's batch norms have their statistics
  given, or None when it is (what ``bn_mode="exact"`` requires, and what lets a step run the loss on
  each device's rows alone); ``batches`` without an ``axis_name``."""
  try:
    calls, has_stats, problem = _inspect(_Sweeps(batches, 1), (params, batch_stats, data, key))
  except (ValueError, TypeError) as err:  # a layer that refuses given statistics names itself
    return str(err).split(";")[0]
  if has_stats != calls:
    return f"the loss reports {has_stats} batch statistics where {calls} jaxbn batch norms ran"
  return problem


def _inspect(sw: _Sweeps, base: Base) -> tuple[int, int, str | None]:
  """One traced forward pass with a hook on the batch norms: how many jaxbn batch norms run, how many
  statistics the loss reports, and what mixes rows once those batch norms have their statistics given
  (None: nothing)."""
  probe = _ExactHook([], record_shapes=True)
  batch0, mask0, _ = sw.micro(base, jnp.int32(0))
  aux_shape = jax.eval_shape(lambda p, b, m: sw.run(probe, base, p, b, m)[1], base[0], batch0, mask0)
  run = lambda hook, p, b, m: sw.run(hook, base, p, b, m)
  problem = _rows_problem(run, base[0], batch0, mask0, probe.shapes, sw.batches.loss.takes_key)
  reported = jax.tree.leaves(aux_shape.stats, is_leaf=lambda s: isinstance(s, _stats.Stats))
  return probe.calls, len(reported), problem


def _merged(consts: Any, terms: Any, stacked: _stats.Stats) -> tuple[Any, Any, Any]:
  """A statistics sweep's result: the layer's mean, variance and count over all rows."""
  del consts, terms
  full = _stats.merge_stacked(stacked)
  return full.mean, full.var, full.count


def _statistics_sweeps(sw: _Sweeps, base: Base, num_layers: int) -> tuple[list[Any], list[Any]]:
  """One sweep per layer, first to last: each layer's ``(mean, var)`` and count over all rows."""
  diff: list[Any] = []
  counts: list[Any] = []
  axis_name = sw.batches.axis_name
  for layer in range(num_layers):

    def body(consts, i, layer=layer):
      base, (diff, counts) = consts
      batch, mask, _ = sw.micro(base, i)
      hook = _ExactHook(_given(diff, counts), target=layer, axis_name=axis_name)
      sw.run(hook, base, base[0], batch, mask)
      return None, hook.out

    consts = (base, (diff, counts))
    mean, var, count = sw.batches.loop.sweep(
      f"statistics {layer}", sw.k, body, consts, None, Folded(_merged, merged_part)
    )
    diff.append((mean, var))
    counts.append(count)
  return diff, counts


def _loss_sweep(sw: _Sweeps, base: Base, diff: list[Any], counts: list[Any]) -> tuple[Any, ...]:
  """The loss with every layer's statistics fixed, and its partial gradients with respect to the parameters and
  to every layer's statistics (the adjoints' first terms, summed over devices).

  Returns ``(loss, grads, stats, metrics, adjoint)``.
  """

  def weighted_loss(p, d, counts, base, batch, mask, w):
    loss, aux = sw.run(_ExactHook(_given(d, counts)), base, p, batch, mask)
    return weighted(w, loss, w.dtype), (loss, aux)

  penalty = sw.batches.penalty

  def body(consts, i):
    base, diff, counts = consts
    params, batch_stats, data, _ = base
    batch, mask, w = sw.micro(base, i)
    (_, (loss, aux)), (g_params, g_diff) = jax.value_and_grad(weighted_loss, argnums=(0, 1), has_aux=True)(
      params, diff, counts, base, batch, mask, w
    )
    g_params = jax.tree.map(lambda g, p: g.astype(accumulator_dtype(p)), g_params, params)
    value = None
    if penalty is not None:  # its blocks' losses normalize with their own statistics: no hook answers them
      g_params, value = penalty.add(g_params, sw.batches, params, batch_stats, data, batch, mask, None, w.dtype)
    return g_params, (w, loss.astype(w.dtype), g_diff, aux, value)

  def finish(consts, grads, outputs):
    (_, _, data, _), diff, _ = consts
    weights, losses, g_diff, aux, values = outputs
    adjoint = sw.device_sum([jax.tree.map(lambda a: jnp.sum(a, 0), t) for t in g_diff], diff, data)
    # Every micro-batch reports the same (full-data) statistics; metrics are averaged by row share.
    stats = None if aux.stats is None else jax.tree.map(lambda a: a[0], aux.stats)
    loss = jnp.dot(weights, losses)
    loss = loss if values is None else (loss, jnp.sum(values))  # (mean loss, penalty), as the ghost sweep's
    return loss, grads, stats, weighted_metrics(aux, weights), adjoint

  def reduce(outputs):
    weights, losses, g_diff, aux, values = outputs
    one = jnp.ones((1,), weights.dtype)
    reduced = reduced_aux(aux, weights, first_stats=True)
    return one, jnp.dot(weights, losses)[None], summed_part(g_diff), reduced, summed_part(values)

  init = lambda: zeros_like_grads(base[0])
  return sw.batches.loop.sweep("loss", sw.k, body, (base, diff, counts), init, Folded(finish, reduce))


def _adjoint_sweeps(sw: _Sweeps, base: Base, diff: list[Any], counts: list[Any], adjoint: list[Any], grads: Any) -> Any:
  """Adds ``sum_l lam_l . dG_l/dparams`` to ``grads``, one sweep per layer, last layer first.

  ``lam_m`` is complete once every layer after ``m`` has contributed its ``lam_l . dG_l/dS_m``.
  """
  adjoint = list(adjoint)
  for layer in reversed(range(len(diff))):
    grads, adjoint[:layer] = _adjoint_sweep(sw, base, layer, diff, counts, adjoint, grads)
  return grads


def _adjoint_sweep(
  sw: _Sweeps, base: Base, layer: int, diff: list[Any], counts: list[Any], adjoint: list[Any], grads: Any
) -> tuple[Any, Any]:
  """``grads`` plus ``lam . dG_layer/dparams`` accumulated over the micro-batches, and the adjoints of the
  layers before plus ``lam . dG_layer/dS_m`` (``lam = adjoint[layer]``, complete)."""
  axis_name = sw.batches.axis_name

  def vjp_term(p, d, counts, cotangent, base, batch, mask):
    hook = _ExactHook(_given(d, counts[:layer]), target=layer, cotangent=cotangent, axis_name=axis_name)
    sw.run(hook, base, p, batch, mask)
    return hook.out

  def body(consts, i):
    base, diff, counts, cotangent, _ = consts
    batch, mask, _ = sw.micro(base, i)
    g_params, g_diff = jax.grad(vjp_term, argnums=(0, 1))(base[0], diff, counts, cotangent, base, batch, mask)
    return jax.tree.map(lambda g, p: g.astype(accumulator_dtype(p)), g_params, base[0]), g_diff

  def finish(consts, g_params, g_diff):
    (_, _, data, _), diff, _, _, (grads, before) = consts
    g_diff = sw.device_sum([jax.tree.map(lambda a: jnp.sum(a, 0), t) for t in g_diff], diff, data)
    return jax.tree.map(jnp.add, grads, g_params), jax.tree.map(jnp.add, before, g_diff)

  t_mean, t_var = adjoint[layer]
  cotangent = (t_mean, t_var, diff[layer][0], counts[layer])
  consts = (base, diff[:layer], counts, cotangent, (grads, adjoint[:layer]))
  init = lambda: zeros_like_grads(base[0])
  return sw.batches.loop.sweep(f"adjoint {layer}", sw.k, body, consts, init, Folded(finish, summed_part))


def _rows_problem(run, params, batch, mask, shapes, takes_key) -> str | None:
  """What still mixes rows once every jaxbn batch norm has statistics given (None: nothing).

  Such a loss holds a batch norm that is not jaxbn's (or another operation over the batch), which
  would normalize each micro-batch (or each device's rows) by itself.
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
    return None
  kind, where = found
  if kind == "mixes":
    return (
      f"with every jaxbn batch norm given those statistics, the loss still mixes the rows of a micro-batch at "
      f"{where}: a batch norm that is not jaxbn's (flax.nnx.BatchNorm, haiku.BatchNorm, equinox.nn.BatchNorm, a "
      "hand-written one) or another operation over the batch, which would see one micro-batch at a time"
    )
  return (
    f"the step cannot prove that the loss treats each row on its own once every jaxbn batch norm has "
    f"those statistics: the rows pass through {where}, which its check does not follow"
  )
