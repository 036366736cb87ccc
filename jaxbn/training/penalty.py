"""The gradient penalty of full-batch descent: SGD's implicit regularizer made explicit.

Smith, Dherin, Barrett & De (ICLR 2021) showed that SGD with learning rate ``lr`` and batches
``B_k`` follows, to first order, the gradient flow of the mean loss plus
``(lr / 4) * mean_k ||grad L_k||^2``; Geiping, Goldblum, Pope, Moeller & Goldstein (ICLR 2022)
added that term to full-batch descent and matched SGD's accuracy on CIFAR-10. With
``gradient_penalty=alpha`` a step's objective is

    mean loss + (alpha / 4) * sum_k (n_k / N) * ||grad L_k||^2

over blocks ``k`` of ``n_k`` consecutive rows (``N`` in all), ``L_k`` the mean loss of block ``k``
alone: the loss function called on its rows, so its batch norms normalize with the block's own
statistics, as SGD's would with batches of that size, whether the mean loss's batch norms use each
micro-batch's statistics (``bn_mode="ghost"``) or all rows' (``bn_mode="exact"``). Its gradient is the
mean loss's plus
``(alpha / 2) * sum_k (n_k / N) * H_k g_k`` with ``g_k = grad L_k`` and ``H_k`` its Hessian, which
:class:`GradientPenalty` adds to each micro-batch's term of the step's sweep:

* ``"hvp"``: ``H_k g_k`` exactly, by forward-mode differentiation of ``grad L_k`` in the direction
  ``g_k`` (per block a gradient and a Hessian-vector product).
* ``"finite_difference"``: ``(grad L_k(theta + eps g_k) - g_k) / eps``, as Geiping et al. compute it
  (two gradients per block, no forward mode: less time and memory), with
  ``eps = sqrt(machine epsilon) * (1 + ||theta||) / max(||g_k||, sqrt(machine epsilon))`` in the
  parameters' dtype: the step ``eps * g_k`` has relative size ``sqrt(machine epsilon)``, which
  balances the truncation error (of that relative order) against rounding (machine epsilon
  divided by it), so about half the digits of ``H_k g_k`` are right.

A block that is a whole micro-batch reuses the gradient the micro-batch's loss term already took
(ghost batch norm; under exact batch norm that gradient is another function, so the block takes its own).
Up to ``UNROLL`` blocks of a micro-batch each get their own code in the compiled program; more are
vmapped, which keeps the program's size bounded but on the CPU turns each convolution's kernel
gradient into a grouped convolution, about twice as slow.
``benchmarks/gradient_penalty.py`` measures both methods' time and memory against the plain step.

Blocks are laid out inside each micro-batch: the block size must divide the micro-batch size
unless there is a single micro-batch (then the last block may be shorter). In the last micro-batch
of a data set its size does not divide, the blocks start at its first row not seen before, so that
blocks are always ``b`` consecutive rows of the step's row order. With the rows split over devices
(``g`` shards), a block takes ``b / g`` rows of each shard, as a micro-batch does, and each block's
gradient ``g_k`` is summed over the devices: the penalty, unlike the mean loss, needs one
gradient-sized all-reduce per block (``||g_k||^2`` is not a sum of the devices' parts).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import _checks
from jaxbn._sharding import varying_like
from jaxbn._trees import global_norm

METHODS = ("hvp", "finite_difference")
UNROLL = 8  # blocks per micro-batch up to which each block gets its own code in the program (see GradientPenalty.terms)


@dataclasses.dataclass(frozen=True)
class GradientPenalty:
  """``(alpha / 4) * sum_k (n_k / N) ||grad L_k||^2`` over blocks of ``block_size`` rows (see the module).

  Attributes:
    alpha: the penalty's weight (Smith et al.'s learning rate of the SGD it imitates).
    block_size: rows per block over all shards, or None for the micro-batch size.
    method: ``"hvp"`` or ``"finite_difference"``.
  """

  alpha: float
  block_size: int | None = None
  method: str = "hvp"

  @classmethod
  def from_args(
    cls, fn: str, alpha: Any, block_size: Any, method: Any, micro_batch_size: int | None
  ) -> GradientPenalty | None:
    """The penalty a step's arguments ask for, or None for ``alpha == 0``; a ``ValueError``/``TypeError`` for
    bad values."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha < 0:
      raise ValueError(f"{fn}: gradient_penalty must be a finite number >= 0 (0 turns it off), got {alpha!r}.")
    if block_size is not None and (not _checks.is_int(block_size) or block_size <= 0):
      raise ValueError(f"{fn}: penalty_block_size must be a positive int or None, got {block_size!r}.")
    if method not in METHODS:
      raise ValueError(f"{fn}: penalty_method must be one of {METHODS}, got {method!r}.")
    if alpha == 0:
      return None
    block_size = None if block_size is None else int(block_size)
    if block_size is not None and micro_batch_size is not None and micro_batch_size % block_size:
      raise ValueError(
        f"{fn}: penalty_block_size={block_size} must divide micro_batch_size={micro_batch_size} (blocks are "
        "laid out inside micro-batches), or use micro_batch_size=None (one micro-batch: any block size)."
      )
    return cls(float(alpha), block_size, method)

  def per_device(self, devices: int) -> GradientPenalty:
    """The penalty of one device's rows when ``devices`` share each block (as micro-batches are shared)."""
    size = self.block_size
    return dataclasses.replace(self, block_size=None if size is None else max(size // devices, 1))

  def add(
    self,
    sums: Any,
    batches: Any,
    params: Any,
    batch_stats: Any,
    data: Any,
    batch: Any,
    mask: Any,
    grads: Any,
    dtype: Any,
  ) -> tuple[Any, jax.Array]:
    """``sums`` (a micro-batch's weighted gradient, in the accumulators' dtypes) plus the penalty's gradient
    over the micro-batch's blocks, and the penalty's value there (see :meth:`terms`)."""
    penalty_grads, value = self.terms(batches, params, batch_stats, data, batch, mask, grads, dtype)
    return jax.tree.map(lambda a, h: a + h.astype(a.dtype), sums, penalty_grads), value

  def terms(
    self, batches: Any, params: Any, batch_stats: Any, data: Any, batch: Any, mask: Any, grads: Any, dtype: Any
  ) -> tuple[Any, jax.Array]:
    """The penalty's gradient and value over the blocks of one micro-batch (``batch``, ``mask`` from
    ``batches.slice``; ``grads`` the micro-batch's own mean-loss gradient with its own statistics, reused
    when it is the only block, or None (exact batch norm, whose micro-batch gradient is another);
    ``dtype`` the one weights and values accumulate in, :func:`jaxbn.training.sweep.weight_dtype`).

    Both are this device's parts under ``batches.axis_name``: summed over the devices they are the
    micro-batch's contributions, ``(alpha / 2) * sum_k (n_k / N) H_k g_k`` and
    ``(alpha / 4) * sum_k (n_k / N) ||g_k||^2``.
    """
    n, g, m, k = batches.sizes(data)
    b = m if self.block_size is None else min(max(self.block_size // g, 1), m)
    if k > 1 and m % b:
      raise ValueError(
        f"{batches.fn}: penalty_block_size gives blocks of {b} rows per shard, which do not divide the "
        f"micro-batches' {m} rows per shard: choose a block size that divides the micro-batch size on every shard."
      )
    axis = batches.axis_name
    total = dtype.type(n) if axis is None else lax.psum(dtype.type(n), axis)
    rows, key = batch if batches.loss.takes_key else (batch, None)
    blocks = -(-m // b)
    block_rows, block_masks, counts = _blocks(rows, mask, g, m, b, dtype)
    # One block: the micro-batch itself (its valid rows), whose gradient (and draws) the sweep already has.
    block_grads = jax.tree.map(lambda x: x[None], grads) if blocks == 1 and grads is not None else None

    def one_block(rows_j, mask_j, count_j, j, grads_j):
      everywhere = count_j if axis is None else lax.psum(count_j, axis)
      share = count_j / jnp.maximum(everywhere, 1)  # this device's part of the block's mean loss
      key_j = key if key is None or blocks == 1 else jax.random.fold_in(key, j)
      batch_j = (rows_j, key_j) if batches.loss.takes_key else rows_j

      def local_gradient(p):
        loss = lambda q: batches.apply(q, batch_stats, batch_j, mask_j)[0]
        return jax.tree.map(lambda x: share.astype(x.dtype) * x, jax.grad(loss)(p))

      local = local_gradient(params) if grads_j is None else jax.tree.map(lambda x: share.astype(x.dtype) * x, grads_j)
      block_gradient = local if axis is None else jax.tree.map(lambda x: lax.psum(x, axis), local)
      tangent = jax.tree.map(lambda t, p: varying_like(t.astype(p.dtype), p), block_gradient, params)
      if self.method == "hvp":
        _, product = jax.jvp(local_gradient, (params,), (tangent,))
      else:
        eps = _finite_difference_step(params, block_gradient)
        moved = jax.tree.map(lambda p, t: p + eps.astype(p.dtype) * t, params, tangent)
        product = jax.tree.map(lambda a, b_: (a - b_) / eps.astype(a.dtype), local_gradient(moved), local)
      squared = sum(jnp.sum(jnp.square(x.astype(dtype))) for x in jax.tree.leaves(block_gradient))
      keep = everywhere > 0  # blocks past the last valid row (a short last micro-batch) add nothing
      coef = jnp.where(keep, dtype.type(self.alpha / 2) * everywhere / total, 0)
      penalty_grads = jax.tree.map(lambda h: jnp.where(keep, coef * h, 0), product)  # add() casts the sums
      value = jnp.where(keep, dtype.type(self.alpha / 4) * count_j / total * squared, 0)
      return penalty_grads, value

    args = (block_rows, block_masks, counts, jnp.arange(blocks), block_grads)
    if blocks <= UNROLL:
      # Unrolled: on the CPU a vmap over blocks turns each convolution's kernel gradient into a grouped
      # convolution about twice as slow, and a loop (lax.map) is several times slower still.
      parts = [one_block(*jax.tree.map(lambda a, j=j: a[j], args)) for j in range(blocks)]
      return jax.tree.map(lambda *a: functools.reduce(jnp.add, a), *parts)
    penalty_grads, values = jax.vmap(one_block)(*args)  # many blocks: one program of bounded size
    summed = lambda a: jnp.sum(a, axis=0)
    return jax.tree.map(summed, penalty_grads), summed(values)


def _blocks(rows: Any, mask: Any, g: int, m: int, b: int, dtype: Any) -> tuple[Any, Any, jax.Array]:
  """A micro-batch's ``g * m`` rows (``g`` shards of ``m``) as blocks of ``b`` rows per shard: the blocks' rows
  (a leading block axis), their row masks (None when every row is valid) and their valid rows over all shards.

  Blocks start at the micro-batch's first valid row (rows already seen are masked at its start), the last
  one possibly shorter.
  """
  blocks = -(-m // b)
  if mask is None and m % b == 0:
    cut = lambda a: a.reshape(g, blocks, b, *a.shape[1:]).swapaxes(0, 1).reshape(blocks, g * b, *a.shape[1:])
    return jax.tree.map(cut, rows), None, jnp.full((blocks,), g * b, dtype)
  valid_rows = m if mask is None else jnp.sum(mask[:m])
  offsets = (m - valid_rows) + b * jnp.arange(blocks)
  starts = jnp.minimum(offsets, m - b)
  positions = starts[:, None] + jnp.arange(b)[None, :]
  valid = (positions >= offsets[:, None]) & (positions < offsets[:, None] + b)

  def cut(a):
    shards = a.reshape(g, m, *a.shape[1:])
    pick = lambda s: lax.dynamic_slice_in_dim(shards, s, b, axis=1).reshape(g * b, *a.shape[1:])
    return jax.vmap(pick)(starts)

  return jax.tree.map(cut, rows), jnp.tile(valid, (1, g)), g * jnp.sum(valid, axis=1).astype(dtype)


def _finite_difference_step(params: Any, direction: Any) -> jax.Array:
  """``eps`` with ``||eps * direction|| = sqrt(machine epsilon) * (1 + ||params||)`` (bounded for a tiny direction)."""
  dtype = jnp.result_type(*jax.tree.leaves(params))
  root = jnp.sqrt(jnp.finfo(dtype).eps).astype(jnp.float32)
  norm = jnp.maximum(global_norm(direction).astype(jnp.float32), root)
  return lax.stop_gradient(root * (1 + global_norm(params).astype(jnp.float32)) / norm)
