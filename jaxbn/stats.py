"""Sufficient statistics of a batch: compute (masked, float32), merge (count-weighted), reduce across devices.

Per feature, a batch is summarised by ``Stats(count, mean, m2)`` with ``m2 = sum((x - mean)**2)``.
Two summaries merge exactly (Chan, Golub & LeVeque, "Algorithms for computing the sample variance",
1983); so do summaries from devices holding different numbers of valid samples, which is what
makes jaxbn's cross-device statistics exact where a mean of per-device means is not.

Local statistics are computed in ONE pass over ``x`` with shifted sums
``S1 = sum(x - K)``, ``S2 = sum((x - K)**2)`` where the shift ``K`` is, per feature, the first valid
element of the batch. Because ``K`` is a sample of the data, ``x - K`` is of the order of the
standard deviation and the variance ``S2/n - (S1/n)**2`` does not cancel catastrophically, even when
``|mean| / std`` is 1e5 in float32 (the textbook ``E[x^2] - E[x]^2`` returns 0 or 8 for a true 1.0
already at 1e4). Parts that are merged keep their mean as ``K + S1/n`` until the merge, which
subtracts the shifts of two parts exactly: rounding each part's mean to float32 first would cost
1e-3 of the variance at ``|mean| / std = 1e5``.

Across devices, every style needs ONE collective per call:

* ``axis_name`` (``jax.shard_map``, ``jax.pmap``, ``jax.vmap``): each device writes its ``4 x C``
  summary into its own row and the rows are summed with one ``psum``; every device then merges
  all rows locally, exactly for uneven counts and with no second round trip.
* ``jax.jit``, no ``axis_name``, reduced dimensions sharded over Explicit mesh axes: the same,
  inside a ``jax.shard_map`` built from the sharding in the array's type.
* ``jax.jit``, no ``axis_name``, a mesh with Auto axes (``jax.make_mesh(..., axis_types=Auto)``,
  ``jax.sharding.Mesh(devices, names)``): the type names the mesh but not the sharding, which XLA
  chooses later. The leading reduced axis is split into ``G`` chunks (``G`` the number of devices
  along Auto axes, or the largest divisor of it that divides the axis), each chunk summarised
  around its own first valid element, and the ``G x 4 x C`` summaries are constrained to be
  replicated along the chunk axis before the merge: one all-gather when the batch is block-sharded
  over any subset of the mesh axes, none when it is replicated. A single global shift cannot do
  this: it must reach every device before the sums start, a second round trip (and a third under a
  mask, to find the first valid element), which is what XLA's own partitioning of the one-pass
  formula costs.

Where nothing at trace time names a mesh (``jax.jit(in_shardings=...)`` called on host arrays
without ``jax.set_mesh``), or where the sharded reduced axis is not the leading one (spatial
partitioning), XLA partitions the one-pass formula itself: still exact, with two collectives (the
shift, then the sums). On one device there is no chunking and no extra pass over ``x``.
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
from jaxbn._sharding import auto_mesh, explicit_reduction, gather_features, is_explicitly_sharded, same_sharding

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


def _first_valid(x: jax.Array, mask: jax.Array | None, feature_axes: tuple[int, ...]) -> jax.Array:
  """Per feature, the first element of ``x`` (row-major over the reduced axes) where ``mask`` holds.

  A gather whose feature axes are batch dimensions: XLA's partitioner keeps it local wherever ``x``
  is sharded along the feature axes (the chunk axis of :func:`_chunked_stats` is one), and where
  ``x`` is sharded along a reduced axis it moves the C values in one all-reduce (a plain slice
  ``x[0]`` takes two there, one per use of the shift).
  """
  reduce_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  fshape = tuple(x.shape[a] for a in feature_axes)
  if x.size == 0:  # no element to take (an empty batch: the count is 0 and the shift unused)
    return jnp.zeros(fshape, x.dtype)
  if mask is None:
    index = [jnp.zeros(fshape, jnp.int32)] * len(reduce_axes)
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
    first = jnp.min(jnp.where(mask, pos, big), axis=reduce_axes) if reduce_axes else pos
    first = jnp.where(first == big, 0, first)
    index = [(first // int(s)) % x.shape[a] for a, s in zip(reduce_axes, strides)]
  if is_explicitly_sharded(x):
    fidx = jnp.meshgrid(*[jnp.arange(n) for n in fshape], indexing="ij")
    full = dict(zip(reduce_axes, index)) | dict(zip(feature_axes, fidx))
    return gather_features(x, tuple(full[a] for a in range(x.ndim)), feature_axes)
  dnums = lax.GatherDimensionNumbers(
    offset_dims=(),
    collapsed_slice_dims=reduce_axes,
    start_index_map=reduce_axes,
    operand_batching_dims=tuple(feature_axes),
    start_indices_batching_dims=tuple(range(len(feature_axes))),
  )
  indices = jnp.stack(index, axis=-1) if index else jnp.zeros((*fshape, 0), jnp.int32)
  return lax.gather(x, indices, dnums, (1,) * x.ndim, mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def valid_count(shape: tuple[int, ...], feature_axes: tuple[int, ...], mask: Any, dtype: Any) -> jax.Array:
  """Per feature, the valid elements of an input of ``shape`` under ``mask`` (broadcastable; None: all), in
  ``dtype``: the mask's own entries summed, times the input's extent along the axes the mask broadcasts over
  (a row mask is a few hundred numbers, the input many more)."""
  feature_shape = tuple(shape[a] for a in feature_axes)
  reduced = tuple(a for a in range(len(shape)) if a not in feature_axes)
  if mask is None:
    return jnp.full(feature_shape, math.prod(shape[a] for a in reduced), dtype)
  mask = jnp.asarray(mask, bool)
  mask = mask.reshape((1,) * (len(shape) - mask.ndim) + mask.shape)
  repeats = math.prod(shape[a] for a in reduced if mask.shape[a] == 1)
  return jnp.broadcast_to(jnp.sum(mask, axis=reduced, dtype=dtype) * repeats, feature_shape)


def _parts(x: jax.Array, feature_axes: tuple[int, ...], mask: jax.Array | None) -> jax.Array:
  """Rows ``(count, shift, offset, m2)`` stacked on a new axis 0; the mean is ``shift + offset``.

  The mean is kept as two numbers until the end: ``shift`` is a sample of the data and ``offset`` is
  small, so merging parts whose means are far from 0 subtracts their shifts exactly instead of losing
  the low digits of each mean to float32 rounding (1e-3 of a unit variance at ``|mean| = 1e5``).
  All four are 0 where the count is 0.
  """
  cdt = _checks.stats_dtype(x.dtype)
  reduce_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  bshape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
  shift = lax.stop_gradient(_first_valid(x, mask, feature_axes)).astype(cdt)
  xc, k = x.astype(cdt), shift.reshape(bshape)
  # x - K written two ways XLA cannot merge, so that each sum fuses its own subtraction and reads
  # x once; one shared x - K would be written to memory and read back twice (XLA:CPU).
  neg, pos = lax.optimization_barrier(k) - xc, xc - k
  count = valid_count(x.shape, feature_axes, mask, cdt)
  if mask is not None:
    neg, pos = jnp.where(mask, neg, 0), jnp.where(mask, pos, 0)
  s1 = -jnp.sum(neg, axis=reduce_axes)
  s2 = jnp.sum(pos * pos, axis=reduce_axes)
  d = s1 / jnp.maximum(count, 1)
  m2 = jnp.maximum(s2 - s1 * d, 0)
  count, shift = same_sharding(count, s1), same_sharding(shift, s1)
  valid = count > 0
  return jnp.stack([count, *(jnp.where(valid, v, 0) for v in (shift, d, m2))])


def local_stats(x: jax.Array, feature_axes: tuple[int, ...], mask: jax.Array | None = None) -> Stats:
  """Statistics of the valid elements of ``x`` on this device, reduced over the non-feature axes.

  Args:
    x: floating input.
    feature_axes: sorted, non-negative feature axes.
    mask: optional boolean array broadcastable to ``x``; True marks valid elements.

  Returns:
    ``Stats`` with the feature shape, in float32 (float64 for float64 input).
  """
  count, shift, offset, m2 = _parts(x, feature_axes, mask)
  return Stats(count, shift + offset, m2)


def merge(a: Stats, b: Stats) -> Stats:
  """Exact count-weighted merge of two summaries (Chan et al. 1983).

  Args:
    a: one part's statistics.
    b: the other's, with the same shapes.

  Returns:
    The statistics of the union of both parts; a part with count 0 does not enter.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbn.stats import local_stats, merge
    >>> x = jnp.arange(10.0).reshape(10, 1)
    >>> both = merge(local_stats(x[:3], (1,)), local_stats(x[3:], (1,)))
    >>> float(both.mean[0]), float(both.var[0])
    (4.5, 8.25)
  """
  return merge_stacked(jax.tree.map(lambda u, v: jnp.stack([u, v]), a, b))


def merge_stacked(stats: Stats, weights: jax.Array | None = None) -> Stats:
  """Merges summaries stacked along axis 0, each optionally weighted 0/1 by ``weights``.

  The merged mean is formed as an offset from the mean of the largest part, so that parts whose
  means are large and nearly equal (|mean| >> std) do not lose the digits that matter.

  Args:
    stats: ``Stats`` whose fields have a leading axis of parts.
    weights: optional 0/1 vector over the parts; parts with weight 0 do not enter.

  Returns:
    The statistics of the union of the (selected) parts, without the leading axis.
  """
  count, mean, m2 = stats
  return _merge_rows(jnp.stack([count, mean, jnp.zeros_like(mean), m2], axis=1), weights)


def _merge_rows(rows: jax.Array, weights: jax.Array | None = None) -> Stats:
  """Exact merge of the parts ``rows[i] = (count, shift, offset, m2)`` (see :func:`_parts`).

  Deviations are taken from the mean of the largest part, shifts and offsets subtracted separately
  (Chan et al. 1983, with the mean carried as ``shift + offset``). Parts with weight or count 0 do
  not enter, whatever their other rows hold.
  """
  count, hi, lo, m2 = (rows[:, i] for i in range(4))
  if weights is not None:
    count = count * weights.reshape((-1,) + (1,) * (count.ndim - 1)).astype(count.dtype)
  part = count > 0
  total = jnp.sum(count, axis=0)
  largest = jnp.argmax(count, axis=0)[None]
  ref_hi = jnp.take_along_axis(hi, largest, axis=0)  # the leading axis kept: it broadcasts over the parts
  ref_lo = jnp.take_along_axis(lo, largest, axis=0)
  delta = (hi - ref_hi) + (lo - ref_lo)
  dmean = jnp.sum(jnp.where(part, count * delta, 0), axis=0) / jnp.maximum(total, 1)
  dev = delta - dmean[None]
  out_m2 = jnp.sum(jnp.where(part, m2 + count * dev * dev, 0), axis=0)
  valid = total > 0
  return Stats(total, jnp.where(valid, ref_hi[0] + (ref_lo[0] + dmean), 0), jnp.where(valid, out_m2, 0))


def group_weights(fn: str, axis_name: Hashable, groups: Sequence[Sequence[int]], size: int) -> jax.Array:
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
  fn: str = "jaxbn.stats.gather_rows",
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
  return lax.psum(slot.reshape((size,) + (1,) * x.ndim) * x[None], axis_name)


def all_reduce(
  stats: Stats,
  axis_name: Hashable | tuple[Hashable, ...],
  axis_index_groups: Sequence[Sequence[int]] | None = None,
  *,
  fn: str = "jaxbn.stats.all_reduce",
) -> Stats:
  """Merges per-device summaries over the named axis (or axes) with one collective.

  The ``(count, mean, m2)`` of every device are exchanged with one collective (see
  :func:`gather_rows`) and merged locally and exactly (Chan et al. 1983), so devices with
  different numbers of valid elements give the global statistics.

  With ``axis_index_groups``, each device merges only the summaries of its own group. The grouping
  is applied after the exchange, so it works identically under ``jax.pmap``, ``jax.shard_map`` and
  ``jax.vmap`` (``shard_map`` has no grouped ``psum``).

  Args:
    stats: this device's statistics.
    axis_name: the mapped axis (or tuple of axes) to merge over.
    axis_index_groups: optional partition of the axis indices into groups merged separately.
    fn: the public function named in error messages.

  Returns:
    The merged statistics (of the device's group), identical on every device of the group.
  """
  count, mean, m2 = stats
  return _all_reduce_rows(jnp.stack([count, mean, jnp.zeros_like(mean), m2]), axis_name, axis_index_groups, fn)


def _all_reduce_rows(
  rows: jax.Array,
  axis_name: Hashable | tuple[Hashable, ...],
  axis_index_groups: Sequence[Sequence[int]] | None,
  fn: str,
) -> Stats:
  """:func:`all_reduce` of this device's :func:`_parts`."""
  gathered = gather_rows(rows, axis_name, fn=fn)
  weights = None
  if axis_index_groups is not None:
    weights = group_weights(fn, axis_name, axis_index_groups, gathered.shape[0])
  return _merge_rows(gathered, weights)


def compute_stats(
  x: jax.Array,
  feature_axes: tuple[int, ...],
  *,
  mask: jax.Array | None = None,
  axis_name: Hashable | None = None,
  axis_index_groups: Sequence[Sequence[int]] | None = None,
  fn: str = "jaxbn.stats.compute_stats",
) -> Stats:
  """Statistics of ``x`` over its non-feature axes, merged across ``axis_name`` when it is given.

  Without ``axis_name``, inputs sharded under ``jax.jit`` give global statistics with one
  collective (see the module docstring).

  Args:
    x: floating input.
    feature_axes: sorted, non-negative feature axes.
    mask: optional boolean array broadcastable to ``x``; True marks valid elements.
    axis_name: mapped axis to merge over (``jax.shard_map``, ``jax.pmap``, ``jax.vmap``).
    axis_index_groups: optional partition of ``axis_name``'s indices into groups.
    fn: the public function named in error messages.

  Returns:
    ``Stats`` with the feature shape, in float32 (float64 for float64 input).

  Raises:
    ValueError: ``axis_index_groups`` without ``axis_name``.
  """
  if axis_index_groups is not None and axis_name is None:
    raise ValueError(f"{fn}: axis_index_groups={axis_index_groups!r} needs an axis_name to group over.")
  if axis_name is not None:
    return _all_reduce_rows(_parts(x, feature_axes, mask), axis_name, axis_index_groups, fn)
  stats = _sharded_stats(x, feature_axes, mask, fn)
  if stats is None:
    stats = _chunked_stats(x, feature_axes, mask)
  return local_stats(x, feature_axes, mask) if stats is None else stats


def compute_complex_stats(
  x: jax.Array,
  feature_axes: tuple[int, ...],
  *,
  mask: jax.Array | None = None,
  axis_name: Hashable | None = None,
  axis_index_groups: Sequence[Sequence[int]] | None = None,
  fn: str = "jaxbn.stats.compute_complex_stats",
) -> Stats:
  """:func:`compute_stats` of complex ``x``: a complex ``mean`` and the real ``m2 = sum(|x - mean|**2)``.

  These are Flax's statistics of complex input (its variance is ``mean(|x|**2) - |mean(x)|**2``,
  real), computed as jaxbn computes real ones: the real and imaginary parts are two real inputs
  with the same valid elements, summarised together (stacked on a new leading feature axis, so
  across devices it is still ONE collective), and ``|x - mean|**2`` is the sum of their squared
  deviations.

  Args:
    x: complex input.
    feature_axes: sorted, non-negative feature axes.
    mask: optional boolean array broadcastable to ``x``; True marks valid elements.
    axis_name: mapped axis to merge over.
    axis_index_groups: optional partition of ``axis_name``'s indices into groups.
    fn: the public function named in error messages.

  Returns:
    ``Stats`` with the feature shape: a real count and ``m2`` (float32, float64 for complex128) and
    a complex ``mean`` (complex64, complex128).
  """
  parts = jnp.stack([jnp.real(x), jnp.imag(x)])
  if mask is not None:
    mask = jnp.asarray(mask)
    mask = mask.reshape((1,) * (parts.ndim - mask.ndim) + mask.shape)
  axes = (0, *(a + 1 for a in feature_axes))
  both = compute_stats(parts, axes, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups, fn=fn)
  return Stats(both.count[0], lax.complex(both.mean[0], both.mean[1]), both.m2[0] + both.m2[1])


def _sharded_stats(x: jax.Array, feature_axes: tuple[int, ...], mask: jax.Array | None, fn: str) -> Stats | None:
  """Statistics of ``x`` sharded over Explicit mesh axes along reduced dims, with one collective.

  Left to XLA, the partitioned one-pass formula needs a collective to broadcast the shift, then
  one for the sums (and one more under a mask). Computing each shard's statistics locally inside
  ``jax.shard_map`` and merging them as :func:`all_reduce` does needs exactly one. Returns None when
  ``x`` is not sharded that way (Auto axes carry no sharding at trace time: see :func:`_chunked_stats`).
  """
  split = explicit_reduction(x, feature_axes)
  if split is None:
    return None
  mesh, spec, reduced, manual = split
  PartitionSpec = jax.sharding.PartitionSpec
  fspec = PartitionSpec(*(spec[a] for a in feature_axes))
  axis = reduced[0] if len(reduced) == 1 else reduced
  out_specs = Stats._make((fspec,) * 3)  # a Stats of PartitionSpecs, the structure of the output
  if mask is None:
    body = lambda xs: _all_reduce_rows(_parts(xs, feature_axes, None), axis, None, fn)
    return jax.shard_map(body, mesh=mesh, in_specs=PartitionSpec(*spec), out_specs=out_specs, axis_names=manual)(x)
  mask = jnp.broadcast_to(mask, (1,) * (x.ndim - mask.ndim) + mask.shape)
  mspec = PartitionSpec(*(spec[d] if mask.shape[d] == x.shape[d] else None for d in range(x.ndim)))
  mask = jax.sharding.reshard(mask, jax.sharding.NamedSharding(mesh, mspec))
  body = lambda xs, ms: _all_reduce_rows(_parts(xs, feature_axes, ms), axis, None, fn)
  return jax.shard_map(body, mesh=mesh, in_specs=(PartitionSpec(*spec), mspec), out_specs=out_specs, axis_names=manual)(
    x, mask
  )


def _chunked_stats(x: jax.Array, feature_axes: tuple[int, ...], mask: jax.Array | None) -> Stats | None:
  """Statistics of ``x`` on a mesh with Auto axes, with one collective whatever XLA's sharding of ``x``.

  The leading reduced axis is split into ``G`` chunks, ``G`` the number of devices along the Auto
  axes (or its largest divisor that divides the axis). Each chunk gets its own shifted sums, with its
  own first valid element as shift, so a chunk held by one device needs nothing from the others.
  The ``G`` small summaries are then made replicated along the chunk axis (one all-gather where they
  were sharded, nothing where they were not) and merged exactly on every device. Returns None when
  there is nothing to split.
  """
  mesh, devices = auto_mesh(x)
  reduce_axes = [a for a in range(x.ndim) if a not in feature_axes]
  if devices <= 1 or not reduce_axes:
    return None
  r = reduce_axes[0]
  g = math.gcd(x.shape[r], devices)
  if g <= 1:
    return None
  split = lambda shape: shape[:r] + ((g, shape[r] // g) if shape[r] > 1 else (1, 1)) + shape[r + 1 :]
  xs = x.reshape(split(x.shape))
  if mask is not None:
    mask = jnp.broadcast_to(mask, (1,) * (x.ndim - mask.ndim) + mask.shape)
    mask = mask.reshape(split(mask.shape))
  chunk_features = tuple(sorted([a + (a > r) for a in feature_axes] + [r]))
  rows = jnp.moveaxis(_parts(xs, chunk_features, mask), 1 + chunk_features.index(r), 0)  # (g, 4, *features)
  PartitionSpec = jax.sharding.PartitionSpec
  spec = PartitionSpec(None, None, *(PartitionSpec.UNCONSTRAINED,) * len(feature_axes))
  rows = lax.with_sharding_constraint(rows, jax.sharding.NamedSharding(mesh, spec))
  return _merge_rows(rows)


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
