"""Batch statistics across devices and processes: a sharded-batch map and running-state sync.

jaxbn computes global batch statistics in three styles, and they agree to float32 rounding:

* ``jax.jit`` with a batch sharded by a ``NamedSharding`` and ``axis_name=None``: XLA's SPMD
  partitioner makes every reduction global, so the statistics are those of the global batch.
* ``jax.shard_map``, ``jax.pmap`` or ``jax.vmap`` with ``axis_name``: each device summarises its
  shard as ``(count, mean, M2)`` and one collective exchanges the summaries, which are merged
  exactly; ``axis_index_groups`` splits the devices into groups with separate statistics.
* :func:`batch_map`: a ``jax.shard_map`` over the batch axes of a mesh, built from vmap-style
  ``in_axes``/``out_axes``, so that ``jax.jit`` code can name mesh axes as ``axis_name``. On a mesh
  ``("group", "member")``, ``axis_name="member"`` gives each group its own statistics: grouping
  under ``jax.jit`` without ``jax.pmap``.

Several processes (``jax.distributed.initialize``) change nothing: every style above runs on the
global mesh of all processes' devices.

What works where (global statistics / groups of devices / several processes):

* ``jax.jit`` + NamedSharding: ``axis_name=None`` / no, use :func:`batch_map` / yes.
* :func:`batch_map` and ``jax.shard_map``: ``axis_name`` / a mesh sub-axis as ``axis_name``, or
  ``axis_index_groups`` / yes.
* ``jax.pmap``: ``axis_name`` / ``axis_index_groups`` / as far as JAX's multi-host ``pmap`` goes
  (in maintenance mode: prefer the styles above for new code).
* ``jax.vmap``: ``axis_name`` / ``axis_index_groups`` / no (one device).

Per-replica running statistics (from local or grouped statistics) are made to agree with
:func:`sync_state`.

References:
  Chan, Golub & LeVeque, "Algorithms for computing the sample variance: analysis and
  recommendations", The American Statistician, 1983 (the exact merge of summaries).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbn import _checks
from jaxbn.functional import BatchNormState
from jaxbn.stats import Stats, gather_rows, group_weights, merge_stacked

__all__ = ["batch_map", "global_batch", "sync_state"]


def sync_state(
  state: BatchNormState,
  axis_name: Hashable | tuple[Hashable, ...],
  *,
  axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> BatchNormState:
  r"""Makes per-replica running statistics agree: their count-weighted merge, on every replica.

  Replicas that normalize with local statistics (no ``axis_name``) or with group statistics
  (``axis_index_groups``, or ``axis_name`` naming one axis of a larger mesh) end up with different
  running statistics. Call this before evaluation (or checkpointing) to give every replica the
  statistics of all of them. Replica :math:`i` contributes with weight :math:`c_i`, its
  ``state.count`` (the number of batches it has averaged), so a replica that saw no batch does not
  count; the result is the exact merge of the replicas' summaries (Chan et al. 1983):

  .. math::
     \mu = \frac{\sum_i c_i \mu_i}{\sum_i c_i}, \qquad
     \sigma^2 = \frac{\sum_i c_i \left(\sigma_i^2 + (\mu_i - \mu)^2\right)}{\sum_i c_i}

  (the variance of the union includes the spread of the replicas' means). Where no replica of a
  group has a count, the replicas are weighted equally.

  The new ``count`` is the group's mean count :math:`\bar c = \frac{1}{R}\sum_i c_i` over its
  :math:`R` replicas, rounded half up, and at least 1 when any replica has a count. The mean (not
  the total) is what a ``"cumulative"`` running average continued from the merged state needs: if
  every replica then folds in one batch with weight :math:`1 / (\bar c + 1)`, the replicas'
  states, merged again, are the equal-weight average of all :math:`\sum_i c_i + R` batches. The
  floor of 1 keeps merged statistics that hold data from being treated as a fresh state: with
  count 0 the next ``"cumulative"`` or ``"debiased_ema"`` update (weight 1 at the first batch) would
  discard them (e.g. two replicas with counts 0 and 1 merge to count 1, not round(0.5) = 0). A
  ``count`` with the feature shape (``init_state(..., per_feature_count=True)``) is merged per
  feature in the same way. One collective of ``3 x C`` floats per replica; states that already
  agree are returned unchanged (up to rounding).

  Args:
    state: this replica's ``BatchNormState`` (or a pytree whose leaves are ``BatchNormState``, e.g.
      the running statistics of a whole model; each layer is merged on its own).
    axis_name: the mapped axis (or tuple of axes) that indexes replicas: the ``axis_name`` of
      ``jax.pmap`` / ``jax.vmap``, mesh axes under ``jax.shard_map`` or :func:`batch_map`.
    axis_index_groups: optional partition of the indices of ``axis_name``; replicas then agree
      within their group only.

  Returns:
    The merged state, with the structure, shapes and dtypes of ``state``. Under ``jax.shard_map``
    it is device-invariant over ``axis_name`` (when ungrouped), so it may leave with ``P()``.

  Raises:
    TypeError: ``state`` holds no ``BatchNormState``.
    ValueError: ``axis_name`` is not bound, ``axis_index_groups`` is not a partition, or a
      ``count`` that is neither a scalar nor of the feature shape.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxbn, jaxbn.parallel
    >>> x = jnp.arange(16.0).reshape(4, 4, 1)  # 4 replicas, 4 rows each, 1 feature
    >>> def step(x):
    ...   _, state = jaxbn.batch_norm(x, jaxbn.init_state(1), training=True, momentum=0.0)
    ...   return state, jaxbn.parallel.sync_state(state, "r")
    >>> local, synced = jax.jit(jax.vmap(step, axis_name="r"))(x)
    >>> local.mean[:, 0], synced.mean[:, 0]
    (Array([ 1.5,  5.5,  9.5, 13.5], dtype=float32), Array([7.5, 7.5, 7.5, 7.5], dtype=float32))
    >>> synced.var[0], jnp.var(x)
    (Array([21.25], dtype=float32), Array(21.25, dtype=float32))
  """
  fn = "jaxbn.sync_state"
  leaves = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, BatchNormState))
  if not leaves or not all(isinstance(v, BatchNormState) for v in leaves):
    raise TypeError(
      f"{fn}: state must be a jaxbn.BatchNormState or a pytree of them (see jaxbn.init_state), "
      f"got {type(state).__name__}."
    )
  if axis_name is None:
    raise ValueError(
      f"{fn}: axis_name must name the mapped axis that indexes replicas, got None. Under jax.jit with "
      "sharded inputs and axis_name=None the running statistics are already global and need no sync."
    )
  return jax.tree.map(
    lambda s: _sync_one(fn, s, axis_name, axis_index_groups),
    state,
    is_leaf=lambda v: isinstance(v, BatchNormState),
  )


def _sync_one(fn: str, state: BatchNormState, axis_name: Any, groups: Sequence[Sequence[int]] | None) -> BatchNormState:
  mean, var = jnp.asarray(state.mean), jnp.asarray(state.var)
  if mean.shape != var.shape:
    raise ValueError(f"{fn}: state.mean and state.var must have the same shape, got {mean.shape} and {var.shape}.")
  cdt = _checks.stats_dtype(mean.dtype)
  state_count = _checks.state_count(fn, state.count, mean.shape)
  count = jnp.broadcast_to(state_count.astype(cdt), mean.shape)
  rows = gather_rows(jnp.stack([count, mean.astype(cdt), var.astype(cdt)]), axis_name, fn=fn)
  counts, means, variances = rows[:, 0], rows[:, 1], rows[:, 2]
  member = jnp.ones(rows.shape[0], cdt)
  if groups is not None:
    member = group_weights(fn, axis_name, groups, rows.shape[0]).astype(cdt)
  member = member.reshape((-1,) + (1,) * mean.ndim)
  counts = counts * member
  # A group in which no replica has averaged a batch (fresh states) is merged with equal weights,
  # which keeps the result the same on every replica of the group.
  weights = jnp.where(jnp.sum(counts, axis=0) > 0, counts, member)
  merged = merge_stacked(Stats(weights, means, variances * weights))
  total = jnp.sum(weights, axis=0)
  total_count = jnp.sum(counts, axis=0)
  mean_count = total_count / jnp.sum(member)
  # Rounded half up, and at least 1 where any replica has counted a batch: the merged statistics
  # then hold data, and a count of 0 would make the next "cumulative"/"debiased_ema" update (weight 1
  # at the first batch) throw them away.
  new_count = jnp.where(total_count > 0, jnp.maximum(jnp.floor(mean_count + 0.5), 1.0), 0.0)
  if state_count.ndim == 0:  # one count per replica, broadcast over the features: any position holds it
    new_count = new_count.reshape(-1)[0]
  new_count = new_count.astype(state_count.dtype)
  return BatchNormState(merged.mean.astype(mean.dtype), (merged.m2 / total).astype(var.dtype), new_count)


def _entry(mesh_axes: tuple[Hashable, ...]) -> Any:
  return mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes


def _spec_tree(fn: str, what: str, axes_prefix: Any, tree: Any, entry: Any, *, known_ndim: bool) -> Any:
  """PartitionSpecs for ``tree`` from a vmap-style prefix of ints (the split dimension) or None."""

  def check(ax: Any) -> None:
    if ax is not None and (not _checks.is_int(ax) or ax < 0):
      raise ValueError(
        f"{fn}: {what} entries must be a non-negative int (the dimension split over the mesh axes) or "
        f"None (the same whole value on every device), got {ax!r}."
      )

  def spec(ax: Any, leaf: Any = None) -> P:
    check(ax)
    if ax is None:
      return P()
    if known_ndim and ax >= jnp.ndim(leaf):
      raise ValueError(
        f"{fn}: {what} splits dimension {ax} of an argument with shape {jnp.shape(leaf)}; "
        f"use an {what} entry below {jnp.ndim(leaf)}, or None to pass it whole to every device."
      )
    return P(*([None] * ax), entry)

  if not known_ndim:
    return jax.tree.map(spec, axes_prefix, is_leaf=lambda v: v is None)
  return jax.tree.map(
    lambda ax, sub: jax.tree.map(lambda leaf: spec(ax, leaf), sub), axes_prefix, tree, is_leaf=lambda v: v is None
  )


def batch_map(
  fn: Callable[..., Any],
  mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
  *,
  mesh_axes: str | Sequence[Hashable] | None = None,
  in_axes: Any = 0,
  out_axes: Any = 0,
) -> Callable[..., Any]:
  """Runs ``fn`` once per device on its shard of the batch, with the mesh axes bound as axis names.

  A ``jax.shard_map`` written with ``jax.vmap``-style ``in_axes``/``out_axes``: each argument with
  an int in ``in_axes`` is split along that dimension over ``mesh_axes``, each with None is passed
  whole to every device; outputs with an int in ``out_axes`` are concatenated along that dimension
  and outputs with None must be the same on every device (checked at trace time). Inside ``fn``
  every name in ``mesh_axes`` (or a tuple of them) can be an ``axis_name`` of
  :func:`jaxbn.batch_norm`, :func:`jaxbn.moments` or :func:`sync_state`. Mesh axes not in
  ``mesh_axes`` stay automatic (model parallelism keeps working).

  This gives ``jax.jit`` users what ``axis_index_groups`` gives ``jax.pmap`` users: on a mesh
  ``("group", "member")`` with the batch split over both axes, ``axis_name="member"`` computes
  statistics per group of devices, ``axis_name=("group", "member")`` over all of them. Both
  ``Explicit`` (the ``jax.make_mesh`` default) and ``Auto`` mesh axes work; with Explicit axes
  arguments are resharded to the expected layout when they are not in it already.

  Args:
    fn: the per-device function.
    mesh: the mesh; None uses the mesh set with ``jax.set_mesh``.
    mesh_axes: the mesh axis (or axes, major first) the batch is split over; default: every axis of
      the mesh.
    in_axes: an int or None per positional argument (a pytree prefix of the arguments, or one
      value for all of them), as in ``jax.vmap``.
    out_axes: the same for the outputs. Running statistics merged over every axis in
      ``mesh_axes`` are identical on all devices and can use None; grouped ones differ between
      groups: merge them with :func:`sync_state` inside ``fn``, or return them with a leading
      axis of size 1 and ``out_axes=0`` to get one row per device, as ``jax.pmap`` does.

  Returns:
    A function of the same arguments as ``fn``, traceable by ``jax.jit`` and ``jax.grad``.

  Raises:
    TypeError: ``fn`` is not callable, or ``mesh`` is not a mesh.
    ValueError: no mesh, a ``mesh_axes`` entry that is not a mesh axis, or a bad ``in_axes`` /
      ``out_axes`` entry.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxbn, jaxbn.parallel
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((4, 2), ("group", "member"))
    >>> x = jnp.repeat(jnp.arange(4.0), 4)[:, None]  # group g holds only the value g
    >>> x = jax.device_put(x, NamedSharding(mesh, P(("group", "member"))))
    >>> def f(x):
    ...   mean, var, count = jaxbn.moments(x, axis_name="member")
    ...   return mean[None], count[None]
    >>> mean, count = jax.jit(jaxbn.parallel.batch_map(f, mesh))(x)
    >>> mean[:, 0], count[:, 0]  # one row per device: each group has its own statistics
    (Array([0., 0., 1., 1., 2., 2., 3., 3.], dtype=float32), Array([4., 4., 4., 4., 4., 4., 4., 4.], dtype=float32))
  """
  name = "jaxbn.parallel.batch_map"
  if not callable(fn):
    raise TypeError(f"{name}: fn must be callable, got {type(fn).__name__}.")
  if mesh is not None and not isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
    raise TypeError(
      f"{name}: mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh(...)), an AbstractMesh or None, "
      f"got {type(mesh).__name__}."
    )
  _spec_tree(name, "out_axes", out_axes, None, None, known_ndim=False)

  def mapped(*args: Any) -> Any:
    m = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if m is None or m.empty:
      raise ValueError(
        f"{name}: no mesh: pass mesh=jax.make_mesh(...), or call it under jax.set_mesh(mesh) "
        "(jax.sharding.use_mesh in older JAX)."
      )
    names = tuple(m.axis_names)
    axes = names if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    bad = [a for a in axes if a not in names]
    if bad or not axes or len(set(axes)) != len(axes):
      raise ValueError(f"{name}: mesh_axes must be distinct axes of the mesh {names}, got {mesh_axes!r}.")
    entry = _entry(axes)
    prefix = tuple(in_axes) if isinstance(in_axes, (list, tuple)) else (in_axes,) * len(args)
    if len(prefix) != len(args):
      raise ValueError(
        f"{name}: in_axes has {len(prefix)} entries but the function was called with {len(args)} positional arguments."
      )
    in_specs = _spec_tree(name, "in_axes", prefix, args, entry, known_ndim=True)
    out_specs = _spec_tree(name, "out_axes", out_axes, None, entry, known_ndim=False)
    explicit = {a for a, t in zip(names, m.axis_types) if t == AxisType.Explicit}
    if explicit & set(axes):
      # shard_map on Explicit axes checks the inputs' layout instead of changing it.
      args = jax.tree.map(
        lambda leaf, spec: _reshard(leaf, m, spec), args, in_specs, is_leaf=lambda v: isinstance(v, P)
      )
    return jax.shard_map(fn, mesh=m, in_specs=in_specs, out_specs=out_specs, axis_names=frozenset(axes))(*args)

  return mapped


def _reshard(leaf: Any, mesh: Any, spec: P) -> Any:
  leaf = jnp.asarray(leaf)
  try:
    current = jax.typeof(leaf).sharding.spec
  except AttributeError:
    current = None
  if current is not None and tuple(current) + (None,) * (leaf.ndim - len(current)) == tuple(spec) + (None,) * (
    leaf.ndim - len(spec)
  ):
    return leaf
  return jax.sharding.reshard(leaf, NamedSharding(mesh, spec) if isinstance(mesh, jax.sharding.Mesh) else spec)


def global_batch(local_data: Any, mesh: jax.sharding.Mesh, *, mesh_axes: str | Sequence[Hashable] | None = None) -> Any:
  """The batch of several processes as global arrays, each process giving only the rows it loaded itself.

  Every process calls it with its own rows (a pytree of arrays with a leading row axis) and gets the
  same pytree of ``jax.Array``: the rows of all processes, split along the leading axis over
  ``mesh_axes``, this process's devices holding this process's rows, so no row crosses the network.
  The result goes into ``jax.jit`` code, e.g. :func:`jaxbn.training.full_batch_step`, as one
  batch. It is ``jax.make_array_from_process_local_data`` per leaf, after one small all-gather of
  the processes' row counts (with several processes): a process that holds no rows, or another
  number than the others, stops every process with the same ``ValueError``, where it would
  otherwise leave the others waiting in the first collective of the step. Every process must call
  it, in the same order as its other multi-process calls.

  The global row order follows the mesh's devices: with ``jax.make_mesh`` over ``jax.devices()``
  (devices ordered by process) process ``p``'s rows follow those of processes ``0 .. p-1``. Where
  processes share the same devices' positions along ``mesh_axes`` (replicas over another mesh
  axis), they must give identical rows. With one process the rows are the whole batch.

  Args:
    local_data: this process's rows: a pytree of arrays (NumPy or JAX) sharing their leading
      dimension, the same number of rows in every process and a multiple of the number of
      positions its devices take along ``mesh_axes``.
    mesh: a ``jax.sharding.Mesh`` over the devices of all processes (``jax.make_mesh``).
    mesh_axes: the mesh axis (or axes, major first) the rows are split over; default: every axis.

  Returns:
    The global batch: ``local_data``'s structure, each leaf a ``jax.Array`` of ``R`` rows in all
    sharded as ``NamedSharding(mesh, P(mesh_axes))``.

  Raises:
    TypeError: ``mesh`` is not a ``jax.sharding.Mesh``.
    ValueError: a ``mesh_axes`` entry that is not a mesh axis; ``local_data`` empty, or leaves
      without a shared leading dimension; and, in every process alike, a process with no device in
      ``mesh``, a process with no rows, processes with different numbers of rows, or rows that the
      process's devices cannot split evenly.

  Examples:
    >>> import jax, numpy as np, jaxbn.parallel
    >>> mesh = jax.make_mesh((8,), ("batch",))
    >>> rows = {"x": np.ones((16, 3), np.float32), "y": np.arange(16)}  # this process's rows
    >>> batch = jaxbn.parallel.global_batch(rows, mesh)
    >>> batch["x"].shape, batch["x"].sharding.spec  # 16 rows in each of jax.process_count() processes
    ((16, 3), P('batch',))
  """
  fn = "jaxbn.parallel.global_batch"
  if not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(
      f"{fn}: mesh must be a jax.sharding.Mesh over the devices of all processes (jax.make_mesh(...)), "
      f"got {type(mesh).__name__}."
    )
  names = tuple(mesh.axis_names)
  axes = names if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
  if not axes or len(set(axes)) != len(axes) or any(a not in names for a in axes):
    raise ValueError(f"{fn}: mesh_axes must be distinct axes of the mesh {names}, got {mesh_axes!r}.")
  leaves, tree = jax.tree.flatten(local_data)
  sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) else -1 for leaf in leaves}
  if not leaves or len(sizes) != 1 or -1 in sizes:
    raise ValueError(
      f"{fn}: local_data must be a non-empty pytree of arrays sharing their leading (row) dimension, got "
      f"leading sizes {sorted(sizes)} (-1: a scalar)."
    )
  rows = sizes.pop()
  positions = _process_positions(mesh, axes)
  counts = _per_process(np.array([rows, positions], np.int64))
  _check_counts(fn, counts, axes)
  blocks = math.prod(mesh.shape[a] for a in axes)
  sharding = NamedSharding(mesh, P(_entry(axes)))
  total = rows // positions * blocks
  return tree.unflatten(
    [jax.make_array_from_process_local_data(sharding, leaf, (total, *np.shape(leaf)[1:])) for leaf in leaves]
  )


def _process_positions(mesh: jax.sharding.Mesh, axes: tuple[Hashable, ...]) -> int:
  """How many distinct positions along ``axes`` this process's devices take in ``mesh`` (0 for none)."""
  picked = [mesh.axis_names.index(a) for a in axes]
  index = np.argwhere(np.vectorize(lambda d: d.process_index == jax.process_index())(mesh.devices))
  return len({tuple(i[picked]) for i in index})


def _per_process(values: np.ndarray) -> np.ndarray:
  """``values`` of every process, stacked in process order (one all-gather where there are several)."""
  if jax.process_count() == 1:
    return values[None]
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(values))


def _check_counts(fn: str, counts: np.ndarray, axes: tuple[Hashable, ...]) -> None:
  """Refuses, in every process alike, per-process ``(rows, positions)`` that make no global batch."""
  rows, positions = counts[:, 0], counts[:, 1]
  per_process = f"rows per process: {rows.tolist()}"
  if not positions.all():
    absent = np.flatnonzero(positions == 0).tolist()
    raise ValueError(
      f"{fn}: process(es) {absent} have no device in the mesh; build the mesh over the devices of every "
      "process, e.g. jax.make_mesh(shape, names) (which takes jax.devices()) after jax.distributed.initialize()."
    )
  if not rows.all():
    empty = np.flatnonzero(rows == 0).tolist()
    raise ValueError(
      f"{fn}: process(es) {empty} passed no rows in local_data ({per_process}). Every process must load "
      "its own share of the data set, e.g. rows p * k .. (p + 1) * k - 1 for process p of P, with k = n // P."
    )
  uneven = np.flatnonzero(rows % positions).tolist()
  if uneven:
    p = uneven[0]
    raise ValueError(
      f"{fn}: process {p} passed {rows[p]} rows in local_data, which its devices' {positions[p]} positions "
      f"along mesh axes {axes} cannot split evenly: give each process a multiple of {positions[p]} rows."
    )
  if len(set((rows // positions).tolist())) != 1:
    raise ValueError(
      f"{fn}: the processes passed different numbers of rows in local_data ({per_process}); a global array "
      "gives every device the same number, so each of the P processes must hold the same number: load "
      "k = n // P rows in each (dropping at most P - 1 of the n rows)."
    )
