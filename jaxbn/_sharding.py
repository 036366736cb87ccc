"""What JAX's types and trace context say about meshes, shardings, varying axes and traces.

Every question jaxbn asks about where data lives is answered here, and this is the only module that
reads JAX internals (``jax._src``), each read guarded and explained where it happens: a JAX upgrade
has one file to check. Nothing here depends on the rest of jaxbn.

* Varying axes (``jax.shard_map``'s type system): :func:`varying`, :func:`varying_like`.
* Explicit meshes (``jax.make_mesh``'s default): :func:`is_explicitly_sharded`,
  :func:`same_sharding`, :func:`gather_features`, :func:`explicit_reduction`.
* Auto meshes, whose types name a mesh but not a layout: :func:`auto_mesh`.
* How many blocks the rows of a training batch are split into: :func:`data_shards`.
* Trace context: :func:`forward_mode_active`, :func:`trace_state`, :func:`source_location`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.extend
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

try:
  # The concrete mesh in context, read by JAX's own with_sharding_constraint; JAX has no public
  # query that works inside a trace (jax.sharding.get_mesh refuses there). See context_mesh_has_devices.
  from jax._src.mesh import get_concrete_mesh as _get_concrete_mesh
except ImportError:  # pragma: no cover - a JAX that moved it: assume a mesh, as before the query existed
  _get_concrete_mesh = None

__all__ = [
  "ExplicitReduction",
  "auto_mesh",
  "context_mesh_has_devices",
  "data_shards",
  "explicit_reduction",
  "forward_mode_active",
  "gather_features",
  "is_explicitly_sharded",
  "mesh_axis_names",
  "same_sharding",
  "source_location",
  "trace_state",
  "varying",
  "varying_like",
  "varying_over",
]


# ---- varying axes (jax.shard_map) ---------------------------------------------------------------


def varying(v: Any) -> frozenset:
  """Mesh axes over which ``v`` differs between devices (``jax.shard_map``'s type system)."""
  return getattr(getattr(jax.typeof(v), "manual_axis_type", None), "varying", frozenset())


def varying_like(x: jax.Array, *like: Any) -> jax.Array:
  """``x`` marked as varying over the mesh axes any of ``like`` varies over (``jax.shard_map`` types)."""
  axes = tuple(sorted(frozenset().union(*(varying(v) for v in like)) - varying(x), key=str))
  return lax.pcast(x, axes, to="varying") if axes else x


def varying_over(tree: Any, axis_name: Any) -> Any:
  """``tree``'s arrays marked as varying over the named axes (a no-op where nothing checks it, as in pmap).

  A gradient with respect to such a copy of replicated parameters stays each device's own partial
  sum, where one with respect to the parameters themselves is summed over devices by autodiff
  (``jax.shard_map``), once per use.
  """
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)

  def cast(x: Any) -> Any:
    axes = tuple(a for a in names if a not in varying(x))
    return lax.pcast(x, axes, to="varying") if axes else x

  return jax.tree.map(cast, tree)


# ---- Explicit meshes ----------------------------------------------------------------------------


def mesh_axis_names(entry: Any) -> tuple[str, ...]:
  """The mesh axes one entry of a ``PartitionSpec`` names (None, a name, or a tuple of names)."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def is_explicitly_sharded(x: Any) -> bool:
  """Whether ``x``'s type carries a mesh with an Explicit axis (its sharding is then part of the type)."""
  try:
    sharding = jax.typeof(x).sharding
    return any(t == AxisType.Explicit for t in sharding.mesh.axis_types)
  except AttributeError:
    return False


def same_sharding(v: jax.Array, like: jax.Array) -> jax.Array:
  """``v`` resharded as ``like`` where ``like`` is sharded with explicit mesh axes and ``v`` is not alike.

  ``jnp.stack`` of per-feature rows needs one sharding: a count or shift built without reference to
  ``x`` is replicated, while sums over an ``x`` sharded along its feature axes are sharded.
  """
  if not is_explicitly_sharded(like):
    return v
  want = jax.typeof(like).sharding
  if jax.typeof(v).sharding.spec == want.spec:
    return v
  return jax.sharding.reshard(v, want)


def gather_features(x: jax.Array, index: tuple[Any, ...], feature_axes: tuple[int, ...]) -> jax.Array:
  """``x[index]`` (index arrays with the feature shape) when ``x`` is sharded with explicit mesh axes.

  The result is sharded as ``x`` is along its feature axes, so that each device gathers its own
  features and nothing moves when only the feature axes are sharded.
  """
  sharding = jax.typeof(x).sharding
  spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
  out = NamedSharding(sharding.mesh, PartitionSpec(*(spec[a] for a in feature_axes)))
  return x.at[index].get(out_sharding=out)


class ExplicitReduction(NamedTuple):
  """How ``x`` is split over Explicit mesh axes along the axes a reduction removes.

  Attributes:
    mesh: the mesh of ``x``'s type.
    spec: ``x``'s partition spec, one entry per dimension.
    reduced: the mesh axes the reduced dimensions are split over (the statistics' collective axes).
    manual: every mesh axis ``x`` is split over (the ``axis_names`` of a ``jax.shard_map`` over it).
  """

  mesh: Any
  spec: tuple[Any, ...]
  reduced: tuple[str, ...]
  manual: frozenset


def explicit_reduction(x: jax.Array, feature_axes: tuple[int, ...]) -> ExplicitReduction | None:
  """How a reduction of ``x`` over its non-feature axes crosses devices, when ``x`` is Explicit-sharded there.

  None when ``x`` has no mesh, or its reduced dimensions are not split, or are split over an axis
  that is not Explicit (Auto axes carry no layout at trace time: see :func:`auto_mesh`).
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
  reduced = tuple(n for a in range(x.ndim) if a not in feature_axes for n in mesh_axis_names(spec[a]))
  if not reduced or any(types.get(n) != AxisType.Explicit for n in reduced):
    return None
  manual = frozenset(n for entry in spec for n in mesh_axis_names(entry))
  return ExplicitReduction(mesh, spec, reduced, manual)


# ---- Auto meshes --------------------------------------------------------------------------------


def context_mesh_has_devices(abstract: Any) -> bool:
  """Whether a concrete mesh of the same shape backs the context's abstract mesh.

  ``jax.set_mesh`` sets both (and ``jax.jit`` carries both into its trace); an abstract mesh alone
  (``jax.sharding.use_abstract_mesh``) names no devices that arrays evaluated outside ``jax.jit``
  (eager ``jax.checkpoint``, for one) could be constrained to. This reads the context that JAX's own
  ``with_sharding_constraint`` reads, and assumes a mesh where that is not available.
  """
  if _get_concrete_mesh is None:
    return True
  concrete = _get_concrete_mesh()
  return not concrete.empty and (concrete.axis_names, concrete.axis_sizes) == (abstract.axis_names, abstract.axis_sizes)


def auto_mesh(x: Any) -> tuple[Any, int]:
  """The mesh ``x`` is typed with (or the context mesh, see :func:`context_mesh_has_devices`) and
  the number of devices along its Auto axes; ``(None, 1)`` without a mesh."""
  try:
    mesh = jax.typeof(x).sharding.mesh
  except AttributeError:
    mesh = None
  if mesh is None or mesh.empty:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not context_mesh_has_devices(mesh):
      return None, 1
  sizes = [s for s, t in zip(mesh.axis_sizes, mesh.axis_types) if t == AxisType.Auto]
  return mesh, math.prod(sizes)


def data_shards(data: Any) -> int:
  """Number of blocks the leading (row) axis of ``data`` is split into across devices under ``jax.jit``.

  Explicit meshes say it in the type; on Auto meshes (where the type names the mesh only) the rows
  are taken to be split over every device of the Auto axes, as the batch of data parallelism is.
  """
  leaves = jax.tree.leaves(data)
  if not leaves:
    return 1
  first = leaves[0]
  try:
    sharding = jax.typeof(first).sharding
    spec, mesh = sharding.spec, sharding.mesh
  except AttributeError:
    return 1
  if spec and spec[0] is not None and not mesh.empty:
    return math.prod(mesh.shape[a] for a in mesh_axis_names(spec[0]))
  return auto_mesh(first)[1]


# ---- trace context ------------------------------------------------------------------------------


def forward_mode_active() -> bool:
  """Whether forward-mode autodiff (``jax.jvp``, ``jax.jacfwd``) is tracing the current call.

  ``jax.custom_vjp`` functions have no forward mode, and under ``jax.jit`` JAX reports that only
  after the caller's frame is gone, so the dispatch in ``batch_norm`` looks at the trace stack
  first. This reads JAX internals (the trace context has no public API); where they differ the
  answer is False and the error JAX raises is translated instead.

  What this cannot see: ``jax.linearize`` traces with the same ``LinearizeTrace`` as ``jax.grad``
  and ``jax.vjp``, so it gets the fused path and its linear function fails when called; and a
  ``jax.jit`` function traced outside forward mode (called, or differentiated in reverse mode)
  keeps its jaxpr, which ``jax.jvp``/``jax.jacfwd`` then transform without tracing it again.
  ``fused=False`` serves both.
  """
  try:
    from jax._src import core

    trace = core.trace_ctx.trace
    while trace is not None:
      if type(trace).__name__ == "JVPTrace":
        return True
      trace = getattr(trace, "parent_trace", None)
  except Exception:
    return False
  return False


def trace_state() -> Any:
  """An opaque token of the current JAX trace (equal tokens: the same trace level)."""
  return jax.extend.core.get_opaque_trace_state(convention="flax")


def source_location(eqn: Any) -> str:
  """The user's source line of a jaxpr equation, e.g. ``"model.py:12 (__call__)"``, or ``""``.

  JAX's own summary of an equation's source (``jax._src.source_info_util``, no public API); an
  error message that uses it only loses the location where it is unavailable.
  """
  try:
    from jax._src import source_info_util

    return source_info_util.summarize(eqn.source_info)
  except Exception:
    return ""
