"""Sufficient statistics of a batch: compute (masked, float32), merge (count-weighted), reduce across devices.

Per feature, a batch is summarised by ``Stats(count, mean, m2)`` with ``m2 = sum((x - mean)**2)``.
Two summaries merge exactly (Chan, Golub & LeVeque, "Algorithms for computing the sample variance",
1983); so do summaries from devices holding different numbers of valid samples, which is what
makes jaxbn's cross-device statistics exact where a mean of per-device means is not.

Local statistics are computed in ONE pass over ``x`` with shifted sums
``S1 = sum(x - K)``, ``S2 = sum((x - K)**2)`` where the shift ``K`` is, per feature, the first valid
element of the batch. Because ``K`` is a sample of the data, ``x - K`` is of the order of the
standard deviation and the variance ``S2/n - (S1/n)**2`` does not cancel catastrophically, even when
``|mean| / std`` is 1e5 in float32 (the textbook ``E[x^2] - E[x]^2`` returns 4.0 for a true 1.0
already at 1e4).

Across devices the per-device summaries are exchanged with ONE collective (a ``psum`` of each
device's ``3 x C`` floats placed in its own row) and merged locally, which is exact for uneven
counts and needs no second round trip.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbn import _checks

__all__ = ["Stats", "all_reduce", "compute_stats", "local_stats", "merge", "merge_stacked", "moments"]


class Stats(NamedTuple):
  """Per-feature sufficient statistics.

  Attributes:
    count: number of valid elements (a float array, exact up to 2**24 in float32).
    mean: mean of the valid elements (0 where ``count == 0``).
    m2: sum of squared deviations from ``mean`` (0 where ``count == 0``).
  """

  count: jax.Array
  mean: jax.Array
  m2: jax.Array

  @property
  def var(self) -> jax.Array:
    """Biased (1/N) variance; 0 where the count is 0."""
    return self.m2 / jnp.maximum(self.count, 1)


def _is_explicitly_sharded(x: jax.Array) -> bool:
  try:
    sharding = jax.typeof(x).sharding
    return any(t == jax.sharding.AxisType.Explicit for t in sharding.mesh.axis_types)
  except AttributeError:
    return False


def _gather(x: jax.Array, index: tuple[Any, ...]) -> jax.Array:
  """``x[index]``, also when ``x`` is sharded with explicit mesh axes (the result is replicated)."""
  if _is_explicitly_sharded(x):
    mesh = jax.typeof(x).sharding.mesh
    return x.at[index].get(out_sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  return x[index]


def _feature_index(x_shape, feature_axes):
  """Open-mesh index arrays selecting every feature position."""
  fshape = tuple(x_shape[a] for a in feature_axes)
  grids = jnp.meshgrid(*[jnp.arange(s) for s in fshape], indexing="ij")
  return dict(zip(feature_axes, grids)), fshape


def _first_valid(x: jax.Array, mask: jax.Array | None, feature_axes: tuple[int, ...]) -> jax.Array:
  """Per feature, the first element of ``x`` (row-major over the reduced axes) where ``mask`` holds."""
  reduce_axes = [a for a in range(x.ndim) if a not in feature_axes]
  fidx, fshape = _feature_index(x.shape, feature_axes)
  if mask is None:
    ridx = {a: 0 for a in reduce_axes}
  else:
    # Flat position along the reduced axes, minimised over valid elements: a reduction, so it works
    # on sharded inputs without reshaping them.
    rshape = [x.shape[a] for a in reduce_axes]
    strides = np.cumprod([1, *rshape[::-1]])[:-1][::-1] if rshape else []
    pos = sum(
      (lax.broadcasted_iota(jnp.int32, x.shape, a) * int(s) for a, s in zip(reduce_axes, strides)),
      jnp.zeros(x.shape, jnp.int32),
    )
    big = jnp.iinfo(jnp.int32).max
    first = jnp.min(jnp.where(mask, pos, big), axis=tuple(reduce_axes)) if reduce_axes else pos
    first = jnp.where(first == big, 0, first)
    ridx = {a: (first // int(s)) % x.shape[a] for a, s in zip(reduce_axes, strides)}
  index = tuple(fidx[a] if a in fidx else ridx[a] for a in range(x.ndim))
  return _gather(x, index).reshape(fshape)


def local_stats(x: jax.Array, feature_axes: tuple[int, ...], mask: jax.Array | None = None) -> Stats:
  """Statistics of the valid elements of ``x`` on this device, reduced over the non-feature axes.

  Args:
    x: floating input.
    feature_axes: sorted, non-negative feature axes.
    mask: optional boolean array broadcastable to ``x``; True marks valid elements.

  Returns:
    ``Stats`` with the feature shape, in float32 (float64 for float64 input).
  """
  cdt = _checks.stats_dtype(x.dtype)
  reduce_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  bshape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
  shift = lax.stop_gradient(_first_valid(x, mask, feature_axes)).astype(cdt)
  xc, k = x.astype(cdt), shift.reshape(bshape)
  # x - K written two ways XLA cannot merge, so that each sum fuses its own subtraction and reads
  # x once; one shared x - K would be written to memory and read back twice (XLA:CPU).
  neg, pos = lax.optimization_barrier(k) - xc, xc - k
  if mask is None:
    count = jnp.full(shift.shape, math.prod(x.shape[a] for a in reduce_axes), cdt)
  else:
    neg, pos = jnp.where(mask, neg, 0), jnp.where(mask, pos, 0)
    count = jnp.sum(jnp.broadcast_to(mask, x.shape), axis=reduce_axes, dtype=cdt)
  s1 = -jnp.sum(neg, axis=reduce_axes)
  s2 = jnp.sum(pos * pos, axis=reduce_axes)
  d = s1 / jnp.maximum(count, 1)
  valid = count > 0
  mean = jnp.where(valid, shift + d, 0)
  m2 = jnp.where(valid, jnp.maximum(s2 - s1 * d, 0), 0)
  return Stats(count, mean, m2)


def merge(a: Stats, b: Stats) -> Stats:
  """Exact count-weighted merge of two summaries (Chan et al. 1983)."""
  return merge_stacked(jax.tree.map(lambda u, v: jnp.stack([u, v]), a, b))


def merge_stacked(stats: Stats, weights: jax.Array | None = None) -> Stats:
  """Merges summaries stacked along axis 0, each optionally weighted 0/1 by ``weights``.

  The merged mean is formed as an offset from the mean of the largest part, so that parts whose
  means are large and nearly equal (|mean| >> std) do not lose the digits that matter.
  """
  count, mean, m2 = stats
  if weights is not None:
    w = weights.reshape((-1,) + (1,) * (count.ndim - 1)).astype(count.dtype)
    count, m2 = count * w, m2 * w
  total = jnp.sum(count, axis=0)
  ref = jnp.take_along_axis(mean, jnp.argmax(count, axis=0)[None], axis=0)[0]
  delta = mean - ref
  dmean = jnp.sum(count * delta, axis=0) / jnp.maximum(total, 1)
  out_mean = ref + dmean
  dev = delta - dmean
  out_m2 = jnp.sum(m2, axis=0) + jnp.sum(count * dev * dev, axis=0)
  valid = total > 0
  return Stats(total, jnp.where(valid, out_mean, 0), jnp.where(valid, out_m2, 0))


def _group_weights(fn: str, axis_name: Hashable, groups: Sequence[Sequence[int]], size: int) -> jax.Array:
  members = sorted(int(i) for g in groups for i in g)
  if members != list(range(size)):
    raise ValueError(
      f"{fn}: axis_index_groups must partition the {size} indices of axis {axis_name!r} "
      f"(each index exactly once), got {groups!r}."
    )
  table = np.zeros((size, size), np.float32)
  for g in groups:
    for i in g:
      table[i, list(g)] = 1
  return jnp.asarray(table)[lax.axis_index(axis_name)]


def gather_rows(
  x: jax.Array,
  axis_name: Hashable | tuple[Hashable, ...],
  *,
  size: int | None = None,
  fn: str = "jaxbn.gather_rows",
) -> jax.Array:
  """Every device's ``x`` stacked along a new leading axis, on every device, with ONE ``psum``.

  Each device writes ``x`` into its own row of a zero array and the rows are summed (adding zeros
  is exact). A ``psum`` rather than an ``all_gather`` keeps the result device-invariant under
  ``jax.shard_map`` (values built from it can leave with ``out_specs=P()``), and its transpose in
  the backward pass is one ``psum`` of the cotangents of whatever the rows are reduced to.
  ``size``, the number of devices along ``axis_name``, is looked up when not given (it must be
  given inside a ``custom_vjp`` backward pass under ``jax.vmap``, where the lookup fails).
  """
  try:
    size = lax.axis_size(axis_name) if size is None else size
    slot = jax.nn.one_hot(lax.axis_index(axis_name), size, dtype=x.dtype)
  except NameError as err:
    raise _checks.unbound_axis(fn, axis_name, err) from None
  return lax.psum(slot.reshape((size,) + (1,) * x.ndim) * x, axis_name)


def all_reduce(
  stats: Stats,
  axis_name: Hashable | tuple[Hashable, ...],
  axis_index_groups: Sequence[Sequence[int]] | None = None,
  *,
  fn: str = "jaxbn.all_reduce",
) -> Stats:
  """Merges per-device summaries over the named axis (or axes) with one collective.

  The ``(count, mean, m2)`` of every device are exchanged with one collective (see
  :func:`gather_rows`) and merged locally and exactly (Chan et al. 1983), so devices with
  different numbers of valid elements give the global statistics.

  With ``axis_index_groups``, each device merges only the summaries of its own group. The grouping
  is applied after the exchange, so it works identically under ``jax.pmap``, ``jax.shard_map`` and
  ``jax.vmap`` (``shard_map`` has no grouped ``psum``).
  """
  gathered = gather_rows(jnp.stack(list(stats)), axis_name, fn=fn)
  weights = None
  if axis_index_groups is not None:
    weights = _group_weights(fn, axis_name, axis_index_groups, gathered.shape[0])
  return merge_stacked(Stats(gathered[:, 0], gathered[:, 1], gathered[:, 2]), weights)


def compute_stats(
  x: jax.Array,
  feature_axes: tuple[int, ...],
  *,
  mask: jax.Array | None = None,
  axis_name: Hashable | None = None,
  axis_index_groups: Sequence[Sequence[int]] | None = None,
  fn: str = "jaxbn.compute_stats",
) -> Stats:
  """Local statistics, merged across ``axis_name`` when it is given."""
  if axis_index_groups is not None and axis_name is None:
    raise ValueError(f"{fn}: axis_index_groups={axis_index_groups!r} needs an axis_name to group over.")
  if axis_name is None:
    sharded = _sharded_stats(x, feature_axes, mask, fn)
    if sharded is not None:
      return sharded
  stats = local_stats(x, feature_axes, mask)
  if axis_name is not None:
    stats = all_reduce(stats, axis_name, axis_index_groups, fn=fn)
  return stats


def _mesh_axis_names(entry: Any) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _sharded_stats(x: jax.Array, feature_axes: tuple[int, ...], mask: jax.Array | None, fn: str) -> Stats | None:
  """Statistics of ``x`` sharded over Explicit mesh axes along reduced dims, with one collective.

  Left to XLA, the partitioned one-pass formula needs a collective to broadcast the shift, then
  one for the sums (and one more under a mask). Computing each shard's statistics locally inside
  ``jax.shard_map`` and merging them with :func:`all_reduce` needs exactly one. Returns None when
  ``x`` is not sharded that way (Auto meshes carry no sharding at trace time; XLA partitions those).
  """
  try:
    sharding = jax.typeof(x).sharding
    mesh = sharding.mesh
  except AttributeError:
    return None
  if mesh.empty:
    return None
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
  reduced = tuple(n for a in range(x.ndim) if a not in feature_axes for n in _mesh_axis_names(spec[a]))
  if not reduced or any(types.get(n) != jax.sharding.AxisType.Explicit for n in reduced):
    return None
  PartitionSpec = jax.sharding.PartitionSpec
  manual = frozenset(n for entry in spec for n in _mesh_axis_names(entry))
  fspec = PartitionSpec(*(spec[a] for a in feature_axes))
  axis = reduced[0] if len(reduced) == 1 else reduced
  out_specs = Stats(fspec, fspec, fspec)
  if mask is None:
    body = lambda xs: all_reduce(local_stats(xs, feature_axes, None), axis, fn=fn)
    return jax.shard_map(body, mesh=mesh, in_specs=PartitionSpec(*spec), out_specs=out_specs, axis_names=manual)(x)
  mask = jnp.broadcast_to(mask, (1,) * (x.ndim - mask.ndim) + mask.shape)
  mspec = PartitionSpec(*(spec[d] if mask.shape[d] == x.shape[d] else None for d in range(x.ndim)))
  mask = jax.sharding.reshard(mask, jax.sharding.NamedSharding(mesh, mspec))
  body = lambda xs, ms: all_reduce(local_stats(xs, feature_axes, ms), axis, fn=fn)
  return jax.shard_map(body, mesh=mesh, in_specs=(PartitionSpec(*spec), mspec), out_specs=out_specs, axis_names=manual)(
    x, mask
  )


def moments(
  x: Any,
  axis: int | Sequence[int] = -1,
  *,
  mask: Any = None,
  axis_name: Hashable | None = None,
  axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mean, biased variance and count of ``x`` per feature, over all non-feature axes.

  Statistics are accumulated in float32 (float64 for float64 input) with a one-pass shifted
  formula that stays accurate when ``|mean|/std`` is large, and merged exactly across devices.

  Args:
    x: floating input.
    axis: the FEATURE axis or axes (as in ``flax.linen.BatchNorm``); statistics reduce over the rest.
    mask: optional boolean array broadcastable to ``x``; only elements where it is True count.
    axis_name: a mapped axis (``jax.shard_map``, ``jax.pmap``, ``jax.vmap``) to merge statistics
      over. Under ``jax.jit`` with sharded inputs leave it None: the statistics are already global.
    axis_index_groups: optional partition of the indices of ``axis_name``; each group gets its own
      statistics.

  Returns:
    ``(mean, var, count)``, each with the feature shape. ``var`` is the biased (1/N) variance and
    ``count`` the number of valid elements per feature (a float array). Where ``count`` is 0 the
    mean and variance are 0.

  Examples:
    >>> import jax.numpy as jnp, jaxbn
    >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
    >>> mean, var, count = jaxbn.moments(x)
    >>> mean, var, count
    (Array([ 2., 20.], dtype=float32), Array([  1., 100.], dtype=float32), Array([2., 2.], dtype=float32))
  """
  fn = "jaxbn.moments"
  x = _checks.floating_input(fn, x)
  axes = _checks.feature_axes(fn, x.ndim, axis)
  mask = _checks.mask_for(fn, mask, x.shape)
  stats = compute_stats(x, axes, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups, fn=fn)
  return stats.mean, stats.var, stats.count
