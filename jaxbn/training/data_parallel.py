"""One gradient all-reduce per step under ``jax.jit``: each device sweeps its own rows, the sums meet once.

Under ``jax.jit`` with the data's rows split over mesh axes, XLA partitions every micro-batch's
gradient on its own, and the gradient of replicated parameters is all-reduced once per micro-batch:
a step with ``M`` micro-batches moves ``M`` times the gradient's bytes. :func:`plan` finds when the
step can instead run its sweeps per device, inside ``jax.shard_map`` over the data's axes, exactly as
the ``axis_name`` path does (:func:`jaxbn.training.sweep.device_gradient`): each device accumulates
its partial gradient over all its micro-batches, and the partials meet in one all-reduce per step.

That needs every device to hold whole blocks of rows (the mesh's data axes divide the number of
rows), and a loss that treats each row on its own apart from jaxbn's batch norms, as
``bn_mode="exact"`` requires (proven from the loss's jaxpr, :mod:`jaxbn._rows`): jaxbn's batch
norms are told the data's axes (:func:`jaxbn._hooks.split_batch`) and reduce their statistics over
them with one small collective each way per micro-batch, so they see the same rows as on the global
arrays. Any other batch norm would see one device's rows only; with such a loss the step keeps the
global-array program and warns that it reduces the gradient once per micro-batch.

A loss that draws random numbers gets one key per device (folded with the device's index), as
under ``jax.shard_map``: its draws differ from those of the same step on one device.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.core import Tracer
from jax.sharding import AxisType, NamedSharding, PartitionSpec, SingleDeviceSharding

from jaxbn import _hooks
from jaxbn._sharding import auto_mesh, mesh_axis_names
from jaxbn.training.exact import objective_gradient, rows_mixed
from jaxbn.training.loops import HostLoop
from jaxbn.training.stream import fed
from jaxbn.training.sweep import GradientFn, MicroBatches


@dataclasses.dataclass(frozen=True)
class Plan:
  """How a step runs per device: the mesh, the axes the rows are split over, and the per-device micro-batches.

  Attributes:
    mesh: the data's mesh (abstract under ``jax.jit``).
    axes: the mesh axes the rows are split over, in order.
    batches: the micro-batches of one device's rows (``axis_name`` = ``axes``).
  """

  mesh: Any
  axes: tuple[str, ...]
  batches: MicroBatches

  def run(self, fn: Callable[..., Any], replicated: tuple[Any, ...], data: Any) -> Any:
    """``fn(*replicated, data)`` per device, with jaxbn's batch norms reducing over the data's axes; its
    results must be the same on every device (reduced over the axes)."""

    def per_device(*args: Any) -> Any:
      with _hooks.split_batch(self.axes):
        return fn(*args)

    rows = PartitionSpec(self.axes)
    mapped = jax.shard_map(
      per_device,
      mesh=self.mesh,
      in_specs=(*(PartitionSpec() for _ in replicated), rows),
      out_specs=PartitionSpec(),
      axis_names=frozenset(self.axes),
    )
    return mapped(*replicated, data)


def plan(batches: MicroBatches, bn_mode: str, params: Any, batch_stats: Any, data: Any, key: Any) -> Plan | None:
  """The per-device plan for ``data`` (global arrays being traced under ``jax.jit``), or None.

  None when the rows are not split over devices in whole blocks, or (with a warning when the step
  has several micro-batches) when the loss mixes rows other than through jaxbn's batch norms.
  """
  split = _row_split(data)
  if split is None:
    return None
  mesh, axes = split
  _, g, _, k = batches.sizes(data)
  d = math.prod(mesh.shape[a] for a in axes)
  if d == 1 or g != d:
    return None
  if bn_mode == "ghost":
    problem = rows_mixed(batches, params, batch_stats, data, key)
    if problem is not None:
      if k > 1:
        warnings.warn(
          f"{batches.fn}: the step all-reduces the gradient once per micro-batch ({k} per step), not once per "
          f"step, because it cannot run the loss on each device's rows alone: {problem}. jaxbn's batch norms "
          "(jaxbn.linen.BatchNorm, jaxbn.nnx.BatchNorm, jaxbn.batch_norm) allow it.",
          stacklevel=2,
        )
      return None
  size = batches.micro_batch_size
  penalty = None if batches.penalty is None else batches.penalty.per_device(d)
  per_device = dataclasses.replace(
    batches, micro_batch_size=None if size is None else max(size // d, 1), axis_name=axes, penalty=penalty
  )
  return Plan(mesh, axes, per_device)


def host_gradient(
  batches: MicroBatches, bn_mode: str, params: Any, batch_stats: Any, data: Any, key: Any
) -> GradientFn | None:
  """For the host loop (``batches.loop``): the gradient function that runs its sweeps' programs per device
  over the mesh ``data`` is split on, or None where :func:`plan` finds none (worked out once per
  argument types and shardings)."""
  if _row_split(fed(data, None)) is None:  # the data's leaves alone say so: no need to key the memo on every leaf
    return None
  found = batches.memo("per device", lambda *args: plan(batches, bn_mode, *args), params, batch_stats, data, key)
  if found is None:
    return None
  assert isinstance(batches.loop, HostLoop)
  loop = batches.loop.per_device(found.mesh, found.axes)
  return _PerDeviceGradient(dataclasses.replace(found.batches, loop=loop), bn_mode, loop, found.mesh, found.axes)


@dataclasses.dataclass(frozen=True, eq=False)
class _PerDeviceGradient:
  """``gradient(params, batch_stats, data, key)`` of the host loop's per-device programs (see the module).

  The parameters, statistics and key go to the devices as one copy each, with a leading device axis
  (a local broadcast); every sweep's program then runs per device; the devices' partial losses,
  gradients and metrics are summed in one program at the end, where the gradient crosses devices once.
  """

  batches: MicroBatches
  bn_mode: str
  loop: HostLoop  # the per-device loop batches runs on
  mesh: Any
  axes: tuple[str, ...]

  def __call__(self, params: Any, batch_stats: Any, data: Any, key: Any = None) -> tuple[Any, Any, Any, Any]:
    loop, mesh, axes = self.loop, self.mesh, self.axes
    d = math.prod(mesh.shape[a] for a in axes)
    loop.rows = frozenset(id(a) for a in jax.tree.leaves(data))
    each = NamedSharding(mesh, PartitionSpec(axes))
    spread = lambda tree: jax.tree.map(lambda a: jnp.broadcast_to(a, (d, *jnp.shape(a))), tree)
    params, batch_stats, key = loop.call("to devices", spread, (params, batch_stats, key), out_shardings=each)
    result = objective_gradient(self.batches, self.bn_mode)(params, batch_stats, data, key)
    return loop.call("from devices", _summed, result, out_shardings=NamedSharding(mesh, PartitionSpec()))


def _summed(result: Any) -> Any:
  """The devices' partial losses, gradients and metrics summed; their statistics taken (the same on every device:
  their maximum is any one of them, and needs no slice of a dimension split over Explicit mesh axes)."""
  loss, grads, stats, metrics = result
  total = lambda tree: jax.tree.map(lambda a: jnp.sum(a, 0), tree)
  return total(loss), total(grads), jax.tree.map(lambda a: jnp.max(a, 0), stats), total(metrics)


def _row_split(data: Any) -> tuple[Any, tuple[str, ...]] | None:
  """The mesh and the axes every leaf of ``data`` splits its rows over (and nothing else), or None."""
  found = None
  for leaf in jax.tree.leaves(data):
    split = _leaf_split(leaf)
    if split is None or (found is not None and split != found):
      return None
    found = split
  return found


def _leaf_split(leaf: Any) -> tuple[Any, tuple[str, ...]] | None:
  sharding = None if isinstance(leaf, Tracer) else getattr(leaf, "sharding", None)
  if isinstance(sharding, SingleDeviceSharding) and jax.sharding.get_abstract_mesh().empty:
    return None  # one device's array, no mesh in context (what follows would find the same, more slowly)
  if isinstance(sharding, NamedSharding):  # an array, not a trace: its own layout, on its own devices
    spec = tuple(sharding.spec)
    if not spec or spec[0] is None or any(e is not None for e in spec[1:]):
      return None
    return sharding.mesh, mesh_axis_names(spec[0])
  try:
    sharding = jax.typeof(leaf).sharding
    mesh, spec = sharding.mesh, tuple(sharding.spec)
  except AttributeError:
    return None
  if not mesh.empty and any(t == AxisType.Explicit for t in mesh.axis_types):
    if not spec or spec[0] is None or any(e is not None for e in spec[1:]):
      return None
    return mesh, mesh_axis_names(spec[0])
  mesh, _ = auto_mesh(leaf)  # Auto axes carry no layout: the rows are taken to be split over all of them
  if mesh is None:
    return None
  axes = tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types, strict=True) if t == AxisType.Auto)
  return (mesh, axes) if axes else None
