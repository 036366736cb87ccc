"""The micro-batch sweep: how a step cuts its data into micro-batches, runs the loss on each and accumulates.

Micro-batch ``i`` of ``data`` with micro-batch size ``m`` is the slice ``data[i*m:(i+1)*m]``; when
``m`` does not divide the number of rows ``n``, the last one is ``data[n-m:n]`` with the rows already
seen masked out, so that no row is dropped or counted twice and no padded copy of the data is made.
With the rows sharded over ``g`` devices under ``jax.jit``, each device's block of ``n/g`` rows is
sliced the same way (see :class:`MicroBatches`). Gradients, losses and metrics accumulate weighted by
each micro-batch's share of all rows, in float32 (float64 for float64 parameters); batch statistics
merge exactly, count-weighted (:func:`jaxbn.stats.merge`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import _checks
from jaxbn import stats as _stats
from jaxbn._sharding import data_shards, varying, varying_like, varying_over
from jaxbn.training._args import num_rows
from jaxbn.training.loops import Folded, HostLoop, ScanLoop
from jaxbn.training.loss import Loss
from jaxbn.training.penalty import GradientPenalty
from jaxbn.training.state import LossAux
from jaxbn.training.stream import HostData, Rows, Stream

SCAN = ScanLoop()

GradientFn = Callable[..., tuple[jax.Array, Any, Any, Any]]
"""``gradient(params, batch_stats, data, key=None) -> (loss, grads, stats, metrics)`` of a full-batch objective."""


@dataclasses.dataclass(frozen=True)
class MicroBatches:
  """The micro-batches of a step's data and the loss on each.

  With the rows sharded over ``g`` devices under ``jax.jit``, micro-batch ``i`` takes rows
  ``i*m .. i*m + m - 1`` of every device's block of ``n/g`` rows, so that each device works on its
  own rows and nothing is gathered: the same micro-batches as the per-device step of
  ``jax.shard_map``/``jax.pmap`` code, where ``axis_name`` names the devices and ``data`` is one
  device's rows.

  Attributes:
    fn: the public call, for error messages.
    loss: the loss.
    micro_batch_size: rows per micro-batch (over all devices under ``jax.jit``); None for all rows.
    axis_name: the devices' axis name in pmap-style code, or None.
    loop: how sweeps over the micro-batches run (:mod:`jaxbn.training.loops`).
    penalty: the gradient penalty added to the objective (ghost or exact batch norm)
      (:class:`jaxbn.training.penalty.GradientPenalty`), or None.
  """

  fn: str
  loss: Loss
  micro_batch_size: int | None = None
  axis_name: Any = None
  loop: ScanLoop | HostLoop = SCAN
  penalty: GradientPenalty | None = None

  def sizes(self, data: Any) -> tuple[int, int, int, int]:
    """``(n, g, m, k)``: rows, data shards, rows per shard in each micro-batch, micro-batches.

    Streamed data (:mod:`jaxbn.training.stream`) states its rows and blocks; under ``axis_name`` (the
    per-device programs) one block is this device's rows.
    """
    if isinstance(data, (HostData, Stream, Rows)):
      n, g = data.rows, data.blocks
      if self.axis_name is not None:
        n, g = n // g, 1
    else:
      n = self.loop.local_rows(data, num_rows(self.fn, data))
      g = 1 if self.axis_name is not None else math.gcd(n, data_shards(data))
    per = n // g
    m = per if self.micro_batch_size is None else min(max(self.micro_batch_size // g, 1), per)
    return n, g, m, math.ceil(per / m)

  def stream(self, data: HostData) -> Stream:
    """``data`` as this step's sweeps read it (its micro-batch layout fixed)."""
    *_, m, k = self.sizes(data)
    return Stream(data, m, k)

  def slice(self, data: Any, i: jax.Array, key: Any = None, dtype: Any = jnp.float32) -> tuple[Any, Any, jax.Array]:
    """Micro-batch ``i``: its rows, its row mask (None when all are valid) and its share of all rows.

    The share is in ``dtype``. For a loss that takes a key, the rows come packed with the
    micro-batch's key, ``(rows, key)``, as :meth:`apply` expects them. Streamed data arrives as
    micro-batch ``i``'s rows already cut (:class:`jaxbn.training.stream.Rows`).
    """
    n, g, m, _ = self.sizes(data)
    per = n // g
    dtype = jnp.dtype(dtype)
    total = dtype.type(n) if self.axis_name is None else lax.psum(dtype.type(n), self.axis_name)
    start = jnp.minimum(i * m, per - m)
    if per % m:
      valid = start + jnp.arange(m) >= i * m  # the last slice re-reads rows of the one before: mask them
      mask = jnp.tile(valid, g)
      w = g * jnp.sum(valid).astype(dtype) / total
    else:
      mask, w = None, dtype.type(g * m) / total  # every row valid: no mask for the loss or the batch norms

    def cut(a):
      if g == 1:
        return lax.dynamic_slice_in_dim(a, start, m, axis=0)
      blocks = a.reshape(g, per, *a.shape[1:])
      return lax.dynamic_slice_in_dim(blocks, start, m, axis=1).reshape(g * m, *a.shape[1:])

    batch = data.batch if isinstance(data, Rows) else jax.tree.map(cut, data)
    if self.loss.takes_key:
      batch = (batch, self._key(key, i))
    return batch, mask, w

  def _key(self, key: Any, i: jax.Array) -> jax.Array:
    """The key of micro-batch ``i`` (and of this device under ``axis_name``) from the step's key."""
    if key is None:
      raise ValueError(
        f"{self.fn}: the loss function draws random numbers (e.g. dropout) and the state has no key: create it "
        "with TrainState.create(..., key=jax.random.key(0)) (nnx_loss: loss_fn.init_state(optimizer, key=...))."
      )
    key = jax.random.fold_in(key, i)
    if self.axis_name is not None:
      key = jax.random.fold_in(key, lax.axis_index(self.axis_name))
    return key

  def apply(self, params: Any, batch_stats: Any, batch: Any, mask: Any) -> tuple[jax.Array, LossAux]:
    """The loss on a micro-batch from :meth:`slice` (whose key, for a loss that takes one, travels with the rows)."""
    if self.loss.takes_key:
      rows, key = batch
      return self.loss(params, batch_stats, rows, mask, key)
    return self.loss(params, batch_stats, batch, mask)

  def gradient(self, params: Any, batch_stats: Any, data: Any, key: Any = None) -> tuple[Any, Any, Any, Any]:
    """The ghost-batch objective: mean loss, gradient, merged statistics and metrics over every micro-batch.

    Each micro-batch's batch norms use its own statistics. The gradient accumulates in float32 or
    wider (this device's share under ``axis_name``); the statistics are the exact merge of every
    micro-batch's, for one running update; the metrics are averaged with the micro-batches' shares.
    With a :attr:`penalty`, the gradient is the penalized objective's and the loss is the pair
    ``(mean loss, penalty)``.
    """
    *_, k = self.sizes(data)
    # Under jax.shard_map the accumulated loss varies over the data's axes: so must the loop's initial value.
    zero = lambda: varying_like(jnp.zeros((), weight_dtype(params)), *jax.tree.leaves(data))
    init = lambda: (zeros_like_grads(params), zero()) + (() if self.penalty is None else (zero(),))
    consts = (params, batch_stats, data, key)
    return self.loop.sweep("ghost", k, self._ghost_terms, consts, init, Folded(_ghost_result, _ghost_reduce))

  def _ghost_terms(self, consts: Any, i: jax.Array) -> tuple[Any, Any]:
    """Micro-batch ``i``'s weighted gradient and loss (and penalty: the sweep's terms), its aux and weight (outputs)."""
    params, batch_stats, data, key = consts
    dtype = weight_dtype(params)
    batch, mask, w = self.slice(data, i, key, dtype)
    (loss, aux), grads = jax.value_and_grad(self.apply, has_aux=True)(params, batch_stats, batch, mask)
    terms = (jax.tree.map(lambda g, p: weighted(w, g, accumulator_dtype(p)), grads, params), weighted(w, loss, dtype))
    if self.penalty is not None:
      summed, value = self.penalty.add(terms[0], self, params, batch_stats, data, batch, mask, grads, dtype)
      terms = (summed, terms[1], varying_like(value, *jax.tree.leaves(data)))
    return terms, (aux, w)

  def memo(self, label: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, worked out once per ``label`` and argument types where the loop runs from Python
    (:meth:`jaxbn.training.loops.HostLoop.memo`); inside a compiled step, once per compilation anyway."""
    return self.loop.memo(label, fn, *args)


def _ghost_result(consts: Any, terms: Any, outputs: Any) -> tuple[Any, Any, Any, Any]:
  """The ghost sweep's ``(loss, grads, stats, metrics)``: the merged statistics, the weighted metrics."""
  del consts
  (grads, loss, *penalty), (aux, weights) = terms, outputs
  stats = None
  if aux.stats is not None:
    stats = jax.tree.map(_stats.merge_stacked, aux.stats, is_leaf=lambda s: isinstance(s, _stats.Stats))
  return (loss, *penalty) if penalty else loss, grads, stats, weighted_metrics(aux, weights)


def _ghost_reduce(outputs: Any) -> Any:
  """The ghost sweep's outputs of several micro-batches as one part: statistics merged, metrics weighted."""
  aux, weights = outputs
  return reduced_aux(aux, weights, first_stats=False), jnp.ones((1,), weights.dtype)


def reduced_aux(aux: LossAux, weights: jax.Array, *, first_stats: bool) -> LossAux:
  """Stacked micro-batches' ``aux`` as one part (a leading axis of 1): their statistics merged exactly (or, with
  ``first_stats``, the first one's: the same in every micro-batch), their metrics summed with ``weights``."""
  stats = aux.stats
  if stats is not None and first_stats:
    stats = jax.tree.map(lambda a: a[:1], stats)
  elif stats is not None:
    stats = jax.tree.map(merged_part, stats, is_leaf=lambda s: isinstance(s, _stats.Stats))
  metrics = weighted_metrics(aux, weights)
  return aux._replace(stats=stats, metrics=None if metrics is None else jax.tree.map(lambda v: v[None], metrics))


def merged_part(stacked: _stats.Stats) -> _stats.Stats:
  """Statistics stacked along a leading axis of parts, merged exactly into one part (a leading axis of 1)."""
  return jax.tree.map(lambda a: a[None], _stats.merge_stacked(stacked))


def summed_part(stacked: Any) -> Any:
  """Values stacked along a leading axis of parts, summed into one part."""
  return jax.tree.map(lambda a: jnp.sum(a, 0, keepdims=True), stacked)


def weight_dtype(params: Any) -> jnp.dtype:
  """The dtype micro-batch weights, losses and statistics accumulate in: float32, or float64 for float64 parameters."""
  dtypes = [_checks.stats_dtype(jnp.result_type(p)) for p in jax.tree.leaves(params)]
  return jnp.dtype(jnp.result_type(jnp.float32, *dtypes))


def accumulator_dtype(p: Any) -> jnp.dtype:
  """The dtype a gradient with respect to ``p`` accumulates in: float32, or float64 for float64 ``p``."""
  return _checks.stats_dtype(jnp.result_type(p))


def zeros_like_grads(params: Any) -> Any:
  """Gradient accumulators: float32 per leaf (float64 for float64 leaves), typed like the leaf under shard_map."""
  return jax.tree.map(lambda p: varying_like(jnp.zeros(jnp.shape(p), accumulator_dtype(p)), p), params)


def weighted(w: jax.Array, value: jax.Array, dtype: Any) -> jax.Array:
  """``w * value`` computed and returned in the accumulator's ``dtype``."""
  return w.astype(dtype) * jnp.asarray(value).astype(dtype)


def weighted_metrics(aux: LossAux, weights: jax.Array) -> Any:
  """The micro-batches' metrics averaged with their shares of all rows (None without metrics)."""
  return None if aux.metrics is None else jax.tree.map(lambda v: jnp.tensordot(weights, v, axes=1), aux.metrics)


def device_gradient(
  gradient: GradientFn, params: Any, batch_stats: Any, data: Any, key: Any, axis_name: Any
) -> tuple[jax.Array, Any, Any, Any]:
  """``gradient(params, batch_stats, data, key)`` with, under ``axis_name``, the gradient summed over devices once.

  Each device differentiates with respect to its own (varying) copy of the parameters, so its
  partial gradient accumulates over all its micro-batches without crossing devices, and the
  partials meet in one all-reduce at the end: the traffic does not grow with the micro-batch count.
  """
  if axis_name is None:
    return gradient(params, batch_stats, data, key)
  local = varying_over(params, axis_name)
  loss, grads, stats, metrics = gradient(local, batch_stats, data, key)
  return loss, sum_over_devices(grads, local, data, axis_name), stats, metrics


def sum_over_devices(grads: Any, primals: Any, data: Any, axis_name: Any) -> Any:
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
