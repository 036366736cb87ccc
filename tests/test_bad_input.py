"""Malformed input to every public callable: a ValueError or TypeError that names the call and the argument.

One row per (public callable, malformed argument): wrong ranks and shapes, mismatched states,
non-arrays, wrong dtypes, negative sizes, NaN hyperparameters, unknown keywords. Each row must raise
the row's error type, with a message that names the public call (``jaxbn.batch_norm: ...``, or
Python's own ``batch_norm() got an unexpected keyword argument ...``) and the argument; an
XLA-internal error, an AttributeError, a result (NaN or not) or a hang fails the row.
:func:`test_every_public_callable_has_a_row` keeps the table complete: a new public callable
without a row fails it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import signal
import types
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import jaxbn
from jaxbn import diagnostics, inference, parallel, training, transforms

NAN = float("nan")
PUBLIC_MODULES = (jaxbn, jaxbn.linen, jaxbn.nnx, training, transforms, diagnostics, parallel, inference)


def public_callables() -> dict[str, Any]:
  """``{qualified name: object}`` for every callable in the ``__all__`` of the public modules."""
  out = {}
  for module in PUBLIC_MODULES:
    for name in module.__all__:
      obj = getattr(module, name)
      if callable(obj) and not isinstance(obj, types.ModuleType):
        out[f"{module.__name__}.{name}"] = obj
  return out


PUBLIC = public_callables()


def _same(name: str) -> set[str]:
  """Every public name of the object ``name`` refers to (``jaxbn.sync_state`` is ``jaxbn.parallel.sync_state``)."""
  return {n for n, o in PUBLIC.items() if o is PUBLIC[name]}


def _aliases(name: str) -> set[str]:
  """The names a message may call ``name`` by: its own, and its class's for an instance (a schedule)."""
  obj = PUBLIC[name]
  if isinstance(obj, (type, types.FunctionType)):
    return _same(name)
  return _same(name) | {n for n, o in PUBLIC.items() if o is type(obj)}


@dataclasses.dataclass(frozen=True)
class Row:
  """``call()`` must raise ``error`` naming the call and ``arg``.

  The call is ``target`` (a public name, or an alias of it), or ``via`` where the malformed input is a
  record (a state, statistics) that ``target`` builds and the public function ``via`` consumes.
  """

  target: str
  arg: str
  what: str
  call: Callable[[], Any]
  error: type[Exception] = ValueError
  via: str | None = None

  @property
  def id(self) -> str:
    return f"{self.target.removeprefix('jaxbn.')}-{self.arg}-{self.what}"


# ---- inputs ------------------------------------------------------------------------------------------


def _x(shape=(8, 3), dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(0).normal(size=shape), dtype)


def _state(c=3, **kw):
  return jaxbn.init_state(c, **kw)


def _stats(c=3):
  return jaxbn.stats.local_stats(_x((8, c)), (1,))


class _Net(nn.Module):
  """Dense then jaxbn's linen batch norm."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    return jaxbn.linen.BatchNorm(use_running_average=not train, name="bn")(nn.Dense(3, name="dense")(x))


@functools.cache
def _net_variables():
  return _Net().init(jax.random.key(0), _x((8, 2)), train=False)


def _nnx_net():
  rngs = nnx.Rngs(0)
  return nnx.Sequential(nnx.Linear(2, 3, rngs=rngs), jaxbn.nnx.BatchNorm(3, rngs=rngs))


def _with_moments(model, row_mask=None):
  with jaxbn.nnx.collect_moments(model, row_mask) as read:
    model(_x((4, 2)))
    return read()


def _linen_apply(module, x=None, **kwargs):
  x = _x() if x is None else x
  return module.init(jax.random.key(0), x, **kwargs)


def _record_moments(module_arg, stats):
  class Recorder(nn.Module):
    @nn.compact
    def __call__(self, x):
      jaxbn.linen.record_moments(self if module_arg is None else module_arg, stats)
      return x

  return Recorder().apply({}, _x(), mutable=[jaxbn.linen.MOMENTS])


def _quadratic_grad(p):
  return jax.tree.map(lambda v: 2.0 * v, p)


P = {"w": jnp.ones(3)}


def _loss(params, batch_stats, batch, mask):
  err = (batch["x"] @ params["w"] - batch["y"]) ** 2
  return jnp.mean(err), training.LossAux()


def _data(n=6):
  return {"x": _x((n, 3)), "y": jnp.ones(n)}


def _train_state():
  return training.TrainState.create({"w": jnp.zeros(3)}, {}, optax.sgd(0.1))


def _step(**kw):
  return training.full_batch_step(_loss, optax.sgd(0.1), **kw)


def _update(tx, grads=None, params=None, state=None):
  grads = {"w": jnp.ones((3, 2))} if grads is None else grads
  params = {"w": jnp.ones((3, 2))} if params is None else params
  return tx.update(grads, tx.init(params) if state is None else state, params)


def _bn(**kw):
  return jaxbn.batch_norm(_x(), _state(), training=True, **kw)


def _ghost(**kw):
  return jaxbn.ghost_batch_norm(_x(), _state(), **{"ghost_batch_size": 4, "training": True, **kw})


def _renorm(**kw):
  return jaxbn.batch_renorm(_x(), _state(), **{"training": True, **kw})


def _norm(x=None, mean=None, var=None, **kw):
  x = _x() if x is None else x
  mean = jnp.zeros(3) if mean is None else mean
  var = jnp.ones(3) if var is None else var
  return jaxbn.normalize(x, mean, var, None, None, **{"feature_axes": -1, "epsilon": 1e-5, **kw})


def _fold(kernel=None, bias=None, params=None, stats=None, **kw):
  kernel = _x((4, 3)) if kernel is None else kernel
  stats = {"mean": jnp.zeros(3), "var": jnp.ones(3)} if stats is None else stats
  return jaxbn.fold_batch_norm(kernel, bias, params, stats, **kw)


def _folds(variables=None, pairs=(("dense", "bn"),), **kw):
  return jaxbn.fold_batch_norms(_net_variables() if variables is None else variables, pairs, **kw)


def _recalibrate(model=None, batches=None, variables=None, **kw):
  model = _Net() if model is None else model
  batches = [_x((8, 2))] if batches is None else batches
  variables = _net_variables() if variables is None else variables
  return jaxbn.recalibrate(model, batches, variables, **{"train": True, **kw})


def _sync(state=None, axis_name="r", **kw):
  state = _state() if state is None else state
  return jax.vmap(lambda i: jaxbn.sync_state(state, axis_name, **kw), axis_name="r")(jnp.arange(4))


def _batch_map(mesh="default", **kw):
  mesh = jax.make_mesh((8,), ("d",)) if mesh == "default" else mesh
  return jaxbn.batch_map(lambda v: v * 2, mesh, **kw)(_x((8, 3)))


def _global_batch(local_data=None, mesh="default", **kw):
  local_data = {"x": np.ones((16, 3), np.float32)} if local_data is None else local_data
  mesh = jax.make_mesh((8,), ("d",)) if mesh == "default" else mesh
  return jaxbn.parallel.global_batch(local_data, mesh, **kw)


def _host_data(**kw):
  return training.HostData(**{"source": {"x": np.ones((4, 3), np.float32)}, **kw})


def _vmap_bn(**kw):
  return jax.vmap(lambda v: jaxbn.batch_norm(v, _state(), training=True, **kw), axis_name="b")(_x((2, 8, 3)))


def _schedule(**kw):
  return jaxbn.renorm_schedule(**{"start_value": 1.0, "end_value": 3.0, "start_step": 5, "end_step": 10, **kw})


def _linen_loss(**kw):
  return training.linen_loss(**{"model": _Net(), "loss": optax.l2_loss, **kw})


def _nnx_loss(**kw):
  return training.nnx_loss(**{"model": _nnx_net(), "loss": optax.l2_loss, **kw})


def _sharpness(**kw):
  return training.sharpness(_loss, **kw)


def _minibatch(**kw):
  args = {"step": _step(), "state": _train_state(), "data": _data(), "batch_size": 2, "key": jax.random.key(0)}
  return training.minibatch_epoch(**{**args, **kw})


# ---- the table ---------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
  """A row's label from its malformed value."""
  if isinstance(value, str):
    return "string"
  if value is None or isinstance(value, bool):
    return repr(value)
  if isinstance(value, float) and np.isnan(value):
    return "NaN"
  if isinstance(value, (int, float)):
    return "negative" if value < 0 else "zero" if value == 0 else type(value).__name__
  return type(value).__name__


def kw(target: str, call: Callable[..., Any], error: type[Exception] = ValueError, *, what: str = "", **bad):
  """The row for ``call(**bad)``, one malformed keyword argument: its name is the argument to name."""
  ((arg, value),) = bad.items()
  return Row(target, arg, what or _describe(value), functools.partial(call, **bad), error)


def unknown(target: str, call: Callable[..., Any]) -> Row:
  """``call(bogus=1)``: Python's (or jaxbn's) TypeError names the call and ``bogus``."""
  return Row(target, "bogus", "unknown keyword", functools.partial(call, bogus=1), TypeError)


BN, GHOST, RENORM = "jaxbn.batch_norm", "jaxbn.ghost_batch_norm", "jaxbn.batch_renorm"
LBN, NBN, TX = "jaxbn.linen.BatchNorm", "jaxbn.nnx.BatchNorm", "jaxbn.transforms"
STEP, SHARP, EPOCH = "jaxbn.training.full_batch_step", "jaxbn.training.sharpness", "jaxbn.training.minibatch_epoch"
LLOSS, NLOSS = "jaxbn.training.linen_loss", "jaxbn.training.nnx_loss"
bad_state = lambda **fields: lambda: jaxbn.batch_norm(_x(), _state()._replace(**fields), training=True)
linen_bn = lambda **attrs: lambda: _linen_apply(jaxbn.linen.BatchNorm(**attrs), use_running_average=False)
nnx_bn = lambda **attrs: lambda: jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0), **attrs)(_x())
hvp = lambda **kw: jaxbn.hessian_vector_product(**{"grad_fn": _quadratic_grad, "params": P, "vector": P, **kw})
top = lambda **kw: jaxbn.top_hessian_eigenvalue(**{"grad_fn": _quadratic_grad, "params": P, **kw})
threshold = lambda **kw: jaxbn.stability_threshold(**{"learning_rate": 0.1, **kw})
urs = lambda **kw: jaxbn.update_running_stats(**{"state": _state(), "stats": _stats(), **kw})
clip, damp = transforms.clip_by_running_norm, transforms.scale_by_norm_damping
project, sgdp = transforms.project_scale_invariant, functools.partial(transforms.sgdp, 0.1)

ROWS = [
  # jaxbn.batch_norm: the full set of argument classes.
  Row(BN, "x", "string", lambda: jaxbn.batch_norm("abc", _state(), training=True), TypeError),
  Row(BN, "x", "None", lambda: jaxbn.batch_norm(None, _state(), training=True), TypeError),
  Row(BN, "x", "int dtype", lambda: jaxbn.batch_norm(_x().astype(jnp.int32), _state(), training=True), TypeError),
  Row(BN, "axis", "rank 0 input", lambda: jaxbn.batch_norm(jnp.float32(1.0), _state(1), training=True)),
  kw(BN, _bn, what="out of range", axis=(0, 2)),
  kw(BN, _bn, what="repeated", axis=(1, -1)),
  kw(BN, _bn, TypeError, axis=1.0),
  Row(BN, "state", "tuple", lambda: jaxbn.batch_norm(_x(), tuple(_state()), training=True), TypeError),
  Row(BN, "state.mean", "other features", lambda: jaxbn.batch_norm(_x(), _state(4), training=True)),
  Row(BN, "state.mean", "string", bad_state(mean="abc"), TypeError),
  Row(BN, "state.var", "wrong rank", bad_state(var=jnp.ones((3, 1)))),
  Row(BN, "state.count", "string", bad_state(count="0"), TypeError),
  Row(BN, "state.count", "wrong shape", bad_state(count=jnp.zeros(2, jnp.int32))),
  kw(BN, _bn, what="wrong shape", scale=jnp.ones(4)),
  kw(BN, _bn, TypeError, scale="abc"),
  kw(BN, _bn, what="wrong rank", bias=jnp.ones((1, 3))),
  kw(BN, _bn, momentum=NAN),
  kw(BN, _bn, momentum=-0.1),
  kw(BN, _bn, TypeError, momentum="0.9"),
  kw(BN, _bn, what="NaN in an array", momentum=np.array([0.9, NAN, 0.9])),
  kw(BN, _bn, epsilon=NAN),
  kw(BN, _bn, epsilon=-1e-5),
  kw(BN, _bn, TypeError, epsilon=object()),
  kw(BN, _bn, TypeError, what="float dtype", mask=jnp.ones((8, 1))),
  kw(BN, _bn, what="wrong shape", mask=jnp.ones((3, 1), bool)),
  kw(BN, _bn, TypeError, mask="abc"),
  Row(BN, "training", "string", lambda: jaxbn.batch_norm(_x(), _state(), training="yes"), TypeError),
  kw(BN, _bn, what="unknown", running_average="EMA"),
  kw(BN, _bn, what="list", running_average=["ema"]),
  kw(BN, _bn, TypeError, unbiased_running_var="yes"),
  kw(BN, _bn, TypeError, what="int", dtype=jnp.int32),
  kw(BN, _bn, TypeError, fused="yes"),
  kw(BN, _bn, what="unbound", axis_name="nope"),
  kw(BN, _bn, what="without axis_name", axis_index_groups=[[0]]),
  Row(BN, "axis_index_groups", "not a partition", lambda: _vmap_bn(axis_name="b", axis_index_groups=[[0, 0]])),
  unknown(BN, _bn),
  # jaxbn.init_state
  kw("jaxbn.init_state", jaxbn.init_state, num_features=-3),
  kw("jaxbn.init_state", jaxbn.init_state, what="zero in a tuple", num_features=(3, 0)),
  kw("jaxbn.init_state", jaxbn.init_state, num_features=3.0),
  kw("jaxbn.init_state", jaxbn.init_state, num_features="3"),
  Row("jaxbn.init_state", "dtype", "int", lambda: jaxbn.init_state(3, dtype=jnp.int32), TypeError),
  Row(
    "jaxbn.init_state", "per_feature_count", "string", lambda: jaxbn.init_state(3, per_feature_count="yes"), TypeError
  ),
  unknown("jaxbn.init_state", functools.partial(jaxbn.init_state, 3)),
  # jaxbn.normalize
  kw("jaxbn.normalize", _norm, TypeError, x="abc"),
  kw("jaxbn.normalize", _norm, TypeError, what="int dtype", x=_x().astype(jnp.int32)),
  kw("jaxbn.normalize", _norm, what="wrong shape", mean=jnp.zeros(4)),
  kw("jaxbn.normalize", _norm, TypeError, what="int dtype", mean=jnp.zeros(3, jnp.int32)),
  kw("jaxbn.normalize", _norm, TypeError, var="abc"),
  kw("jaxbn.normalize", _norm, what="out of range", feature_axes=2),
  kw("jaxbn.normalize", _norm, epsilon=NAN),
  kw("jaxbn.normalize", _norm, TypeError, dtype="bad"),
  unknown("jaxbn.normalize", _norm),
  # jaxbn.update_running_stats
  kw("jaxbn.update_running_stats", urs, TypeError, what="dict", state={"mean": 0}),
  kw("jaxbn.update_running_stats", urs, TypeError, stats=None),
  kw("jaxbn.update_running_stats", urs, TypeError, what="strings", stats=jaxbn.Stats("a", "b", "c")),
  Row("jaxbn.update_running_stats", "stats.count", "other features", lambda: urs(state=_state(4))),
  kw("jaxbn.update_running_stats", urs, momentum=NAN),
  kw("jaxbn.update_running_stats", urs, what="unknown", running_average="x"),
  unknown("jaxbn.update_running_stats", urs),
  # jaxbn.moments
  kw("jaxbn.moments", jaxbn.moments, TypeError, x="abc"),
  kw("jaxbn.moments", jaxbn.moments, TypeError, what="bool dtype", x=jnp.ones((4, 3), bool)),
  Row("jaxbn.moments", "axis", "rank 0 input", lambda: jaxbn.moments(jnp.float32(2.0))),
  Row("jaxbn.moments", "mask", "wrong shape", lambda: jaxbn.moments(_x(), mask=jnp.ones((8, 2), bool))),
  Row("jaxbn.moments", "axis_name", "unbound", lambda: jaxbn.moments(_x(), axis_name="nope")),
  Row("jaxbn.moments", "axis_index_groups", "without axis_name", lambda: jaxbn.moments(_x(), axis_index_groups=[[0]])),
  unknown("jaxbn.moments", functools.partial(jaxbn.moments, _x())),
  # State and statistics records: unknown fields, and malformed records fed to their consumers.
  unknown("jaxbn.BatchNormState", jaxbn.BatchNormState),
  Row(
    "jaxbn.BatchNormState",
    "state.mean",
    "scalars fed to batch_norm",
    lambda: jaxbn.batch_norm(_x(), jaxbn.BatchNormState(0.0, 1.0, 0), training=True),
    via=BN,
  ),
  unknown("jaxbn.Stats", jaxbn.Stats),
  Row(
    "jaxbn.Stats",
    "stats.mean",
    "other features fed to update_running_stats",
    lambda: urs(stats=jaxbn.Stats(jnp.ones(3), jnp.ones(4), jnp.ones(3))),
    via="jaxbn.update_running_stats",
  ),
  # jaxbn.ghost_batch_norm
  kw(GHOST, _ghost, ghost_batch_size=-4),
  kw(GHOST, _ghost, ghost_batch_size=0),
  kw(GHOST, _ghost, ghost_batch_size=2.5),
  Row(
    GHOST,
    "axis",
    "no axis left to split",
    lambda: jaxbn.ghost_batch_norm(_x(), jaxbn.init_state((8, 3)), ghost_batch_size=2, training=True, axis=(0, 1)),
  ),
  Row(
    GHOST, "x", "string", lambda: jaxbn.ghost_batch_norm("abc", _state(), ghost_batch_size=2, training=True), TypeError
  ),
  Row(
    GHOST,
    "state.mean",
    "other features",
    lambda: jaxbn.ghost_batch_norm(_x(), _state(5), ghost_batch_size=2, training=True),
  ),
  kw(GHOST, _ghost, momentum=NAN),
  kw(GHOST, _ghost, epsilon=NAN),
  kw(GHOST, _ghost, what="unknown", running_average="x"),
  kw(GHOST, _ghost, TypeError, unbiased_running_var="yes"),
  kw(GHOST, _ghost, TypeError, dtype="bad"),
  kw(GHOST, _ghost, TypeError, training="yes"),
  unknown(GHOST, _ghost),
  # jaxbn.batch_renorm
  kw(RENORM, _renorm, what="below 1", rmax=0.5),
  kw(RENORM, _renorm, rmax=NAN),
  kw(RENORM, _renorm, TypeError, rmax="abc"),
  kw(RENORM, _renorm, dmax=-1.0),
  kw(RENORM, _renorm, TypeError, dmax=None),
  kw(RENORM, _renorm, ghost_batch_size=-2),
  kw(RENORM, _renorm, momentum=NAN),
  kw(RENORM, _renorm, TypeError, what="int", dtype=jnp.int32),
  kw(RENORM, _renorm, TypeError, unbiased_running_var="yes"),
  unknown(RENORM, _renorm),
  # Renorm schedules
  kw("jaxbn.renorm_schedule", _schedule, start_value=NAN),
  kw("jaxbn.renorm_schedule", _schedule, TypeError, end_value="3"),
  kw("jaxbn.renorm_schedule", _schedule, TypeError, start_step=5.5),
  kw("jaxbn.renorm_schedule", _schedule, what="not after start_step", end_step=5),
  unknown("jaxbn.renorm_schedule", _schedule),
  Row("jaxbn.RenormSchedule", "start_value", "string", lambda: jaxbn.RenormSchedule("a", 3.0, 0, 10), TypeError),
  Row("jaxbn.RenormSchedule", "end_value", "NaN", lambda: jaxbn.RenormSchedule(1.0, NAN, 0, 10)),
  Row("jaxbn.RenormSchedule", "end_step", "float", lambda: jaxbn.RenormSchedule(1.0, 3.0, 0, 10.5), TypeError),
  kw("jaxbn.paper_rmax", jaxbn.paper_rmax, TypeError, step="abc"),
  kw("jaxbn.paper_rmax", jaxbn.paper_rmax, step=NAN),
  kw("jaxbn.paper_dmax", jaxbn.paper_dmax, TypeError, step=None),
  unknown("jaxbn.paper_dmax", functools.partial(jaxbn.paper_dmax, 3)),
  # jaxbn.parallel
  kw("jaxbn.batch_map", jaxbn.batch_map, TypeError, what="not callable", fn=5),
  kw("jaxbn.batch_map", _batch_map, TypeError, mesh="abc"),
  kw("jaxbn.batch_map", _batch_map, what="none in context", mesh=None),
  kw("jaxbn.batch_map", _batch_map, what="unknown axis", mesh_axes="nope"),
  kw("jaxbn.batch_map", _batch_map, in_axes=-1),
  kw("jaxbn.batch_map", _batch_map, what="past the rank", in_axes=2),
  kw("jaxbn.batch_map", _batch_map, what="too many entries", in_axes=(0, 0)),
  Row("jaxbn.batch_map", "out_axes", "float", lambda: jaxbn.batch_map(lambda v: v, out_axes=0.5)),
  unknown("jaxbn.batch_map", functools.partial(jaxbn.batch_map, lambda v: v)),
  kw("jaxbn.parallel.global_batch", _global_batch, TypeError, what="string", mesh="abc"),
  kw("jaxbn.parallel.global_batch", _global_batch, what="unknown axis", mesh_axes="nope"),
  kw("jaxbn.parallel.global_batch", _global_batch, what="empty", local_data={}),
  kw(
    "jaxbn.parallel.global_batch",
    _global_batch,
    what="other leading sizes",
    local_data={"x": np.ones((8, 3)), "y": np.ones(4)},
  ),
  kw("jaxbn.parallel.global_batch", _global_batch, what="no rows", local_data={"x": np.ones((0, 3))}),
  kw("jaxbn.parallel.global_batch", _global_batch, what="uneven over devices", local_data={"x": np.ones((12, 3))}),
  unknown("jaxbn.parallel.global_batch", functools.partial(jaxbn.parallel.global_batch, {}, None)),
  kw("jaxbn.training.HostData", _host_data, TypeError, source="abc"),
  kw("jaxbn.training.HostData", _host_data, TypeError, what="JAX array", source={"x": jnp.ones((4, 3))}),
  kw("jaxbn.training.HostData", _host_data, what="no rows", source={"x": np.ones((0, 3))}),
  kw("jaxbn.training.HostData", _host_data, what="scalar leaf", source={"x": np.ones((4, 3)), "y": np.array(1.0)}),
  kw("jaxbn.training.HostData", _host_data, what="other leading sizes", source={"x": np.ones((4, 3)), "y": np.ones(5)}),
  kw("jaxbn.training.HostData", _host_data, TypeError, sharding="abc"),
  kw(
    "jaxbn.training.HostData",
    _host_data,
    what="uneven over devices",
    sharding=NamedSharding(jax.make_mesh((8,), ("d",)), PartitionSpec("d")),
  ),
  unknown("jaxbn.training.HostData", functools.partial(training.HostData, {"x": np.ones((4, 3))})),
  kw("jaxbn.sync_state", _sync, TypeError, what="array", state=jnp.ones(3)),
  Row("jaxbn.sync_state", "state.var", "other shape", lambda: _sync(state=_state()._replace(var=jnp.ones(4)))),
  Row(
    "jaxbn.sync_state",
    "state.count",
    "wrong shape",
    lambda: _sync(state=_state()._replace(count=jnp.zeros(2, jnp.int32))),
  ),
  kw("jaxbn.sync_state", _sync, axis_name=None),
  kw("jaxbn.sync_state", _sync, what="unbound", axis_name="nope"),
  kw("jaxbn.sync_state", _sync, what="not a partition", axis_index_groups=[[0, 1]]),
  unknown("jaxbn.sync_state", _sync),
  # jaxbn.inference
  kw("jaxbn.fold_batch_norm", _fold, TypeError, kernel="abc"),
  kw("jaxbn.fold_batch_norm", _fold, TypeError, what="int dtype", kernel=jnp.ones((4, 3), jnp.int32)),
  Row("jaxbn.fold_batch_norm", "bn_stats", "not a mapping", lambda: _fold(stats=5), TypeError),
  Row("jaxbn.fold_batch_norm", "bn_stats", "no var", lambda: _fold(stats={"mean": jnp.zeros(3)})),
  Row(
    "jaxbn.fold_batch_norm",
    "bn_stats['mean']",
    "string",
    lambda: _fold(stats={"mean": "abc", "var": jnp.ones(3)}),
    TypeError,
  ),
  Row(
    "jaxbn.fold_batch_norm",
    "kernel",
    "other channels than bn_stats",
    lambda: _fold(stats={"mean": jnp.zeros(5), "var": jnp.ones(5)}),
  ),
  Row("jaxbn.fold_batch_norm", "bn_params", "list", lambda: _fold(params=[1.0]), TypeError),
  kw("jaxbn.fold_batch_norm", _fold, what="wrong shape", bias=jnp.zeros(4)),
  kw("jaxbn.fold_batch_norm", _fold, epsilon=NAN),
  kw("jaxbn.fold_batch_norm", _fold, stack_axes=-1),
  kw("jaxbn.fold_batch_norm", _fold, what="out of range", axis=5),
  unknown("jaxbn.fold_batch_norm", _fold),
  kw("jaxbn.fold_batch_norms", _folds, TypeError, variables=5),
  kw("jaxbn.fold_batch_norms", _folds, TypeError, pairs=5),
  kw("jaxbn.fold_batch_norms", _folds, what="a pair of one", pairs=[("dense",)]),
  Row("jaxbn.fold_batch_norms", "layer", "path not found", lambda: _folds(pairs=[("nope", "bn")])),
  kw("jaxbn.fold_batch_norms", _folds, epsilon=-1.0),
  unknown("jaxbn.fold_batch_norms", _folds),
  kw("jaxbn.recalibrate", _recalibrate, TypeError, model=5),
  Row("jaxbn.recalibrate", "variables", "missing", lambda: jaxbn.recalibrate(_Net(), [_x((8, 2))], train=True)),
  kw("jaxbn.recalibrate", _recalibrate, TypeError, variables="abc"),
  kw("jaxbn.recalibrate", _recalibrate, TypeError, batches=5),
  kw("jaxbn.recalibrate", _recalibrate, what="empty", batches=[]),
  kw("jaxbn.recalibrate", _recalibrate, TypeError, unbiased_var="yes"),
  kw("jaxbn.recalibrate", _recalibrate, TypeError, strict="yes"),
  unknown("jaxbn.recalibrate", _recalibrate),  # passed on to the model, whose signature refuses it
  # jaxbn.diagnostics
  kw("jaxbn.norms_by_layer", jaxbn.norms_by_layer, what="no leaves", tree={}),
  kw("jaxbn.norms_by_layer", jaxbn.norms_by_layer, TypeError, what="string leaf", tree={"a": "abc"}),
  kw("jaxbn.norms_by_layer", jaxbn.norms_by_layer, TypeError, what="bool leaf", tree={"a": jnp.ones(2, bool)}),
  Row("jaxbn.norms_by_layer", "per_leaf", "string", lambda: jaxbn.norms_by_layer(P, per_leaf="yes"), TypeError),
  unknown("jaxbn.norms_by_layer", functools.partial(jaxbn.norms_by_layer, P)),
  kw("jaxbn.hessian_vector_product", hvp, TypeError, what="not callable", grad_fn=5),
  kw("jaxbn.hessian_vector_product", hvp, TypeError, what="int leaves", params={"w": jnp.ones(3, jnp.int32)}),
  kw("jaxbn.hessian_vector_product", hvp, TypeError, what="string leaf", params={"w": "abc"}),
  kw("jaxbn.hessian_vector_product", hvp, what="other structure", vector={"v": jnp.ones(3)}),
  kw("jaxbn.hessian_vector_product", hvp, what="other shape", vector={"w": jnp.ones(4)}),
  Row("jaxbn.hessian_vector_product", "grad_fn(params)", "other structure", lambda: hvp(grad_fn=lambda p: (p["w"],))),
  kw("jaxbn.hessian_vector_product", hvp, what="unknown", mode="x"),
  unknown("jaxbn.hessian_vector_product", hvp),
  kw("jaxbn.top_hessian_eigenvalue", top, TypeError, what="not callable", grad_fn=5),
  kw("jaxbn.top_hessian_eigenvalue", top, num_iters=-1),
  kw("jaxbn.top_hessian_eigenvalue", top, TypeError, num_iters=2.5),
  kw("jaxbn.top_hessian_eigenvalue", top, tol=NAN),
  kw("jaxbn.top_hessian_eigenvalue", top, TypeError, tol="a"),
  kw("jaxbn.top_hessian_eigenvalue", top, what="unknown", method="x"),
  kw("jaxbn.top_hessian_eigenvalue", top, TypeError, key=0),
  kw("jaxbn.top_hessian_eigenvalue", top, what="other shape", init={"w": jnp.ones(2)}),
  kw("jaxbn.top_hessian_eigenvalue", top, what="empty", params={}),
  unknown("jaxbn.top_hessian_eigenvalue", top),
  kw("jaxbn.stability_threshold", threshold, learning_rate=NAN),
  kw("jaxbn.stability_threshold", threshold, learning_rate=0.0),
  kw("jaxbn.stability_threshold", threshold, TypeError, learning_rate="a"),
  kw("jaxbn.stability_threshold", threshold, what="NaN in an array", learning_rate=np.array([0.1, NAN])),
  kw("jaxbn.stability_threshold", threshold, what="one", momentum=1.0),
  kw("jaxbn.stability_threshold", threshold, momentum=NAN),
  kw("jaxbn.stability_threshold", threshold, TypeError, nesterov="yes"),
  unknown("jaxbn.stability_threshold", threshold),
  # jaxbn.linen
  Row(LBN, "x", "string", lambda: _linen_apply(jaxbn.linen.BatchNorm(), "abc", use_running_average=False), TypeError),
  Row(LBN, "axis", "out of range", linen_bn(axis=2)),
  Row(LBN, "momentum", "NaN", linen_bn(momentum=NAN)),
  Row(LBN, "epsilon", "negative", linen_bn(epsilon=-1.0)),
  Row(LBN, "running_average", "unknown", linen_bn(running_average="x")),
  Row(LBN, "ghost_batch_size", "negative", linen_bn(ghost_batch_size=-1)),
  Row(
    LBN,
    "unbiased_running_var",
    "string with ghost batches",
    linen_bn(ghost_batch_size=4, unbiased_running_var="yes"),
    TypeError,
  ),
  Row(
    LBN,
    "mask",
    "wrong shape",
    lambda: _linen_apply(jaxbn.linen.BatchNorm(), use_running_average=False, mask=jnp.ones((3, 1))),
  ),
  Row(LBN, "use_running_average", "missing", lambda: _linen_apply(jaxbn.linen.BatchNorm())),
  unknown(LBN, jaxbn.linen.BatchNorm),
  Row("jaxbn.linen.record_moments", "module", "int", lambda: _record_moments(5, _stats()), TypeError),
  Row(
    "jaxbn.linen.record_moments", "stats", "tuple of two", lambda: _record_moments(None, (jnp.ones(3),) * 2), TypeError
  ),
  unknown("jaxbn.linen.record_moments", functools.partial(jaxbn.linen.record_moments, None, None)),
  # jaxbn.nnx
  Row(NBN, "num_features", "negative", lambda: jaxbn.nnx.BatchNorm(-3, rngs=nnx.Rngs(0))),
  Row(NBN, "num_features", "string", lambda: jaxbn.nnx.BatchNorm("3", rngs=nnx.Rngs(0))),
  Row(NBN, "rngs", "missing", lambda: jaxbn.nnx.BatchNorm(3), TypeError),
  Row(NBN, "x", "string", lambda: jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))("abc"), TypeError),
  Row(NBN, "state.mean", "other features", lambda: jaxbn.nnx.BatchNorm(4, rngs=nnx.Rngs(0))(_x())),
  Row(NBN, "momentum", "NaN", nnx_bn(momentum=NAN)),
  Row(NBN, "epsilon", "NaN", nnx_bn(epsilon=NAN)),
  unknown(NBN, functools.partial(jaxbn.nnx.BatchNorm, 3, rngs=nnx.Rngs(0))),
  Row("jaxbn.nnx.collect_moments", "model", "int", lambda: _with_moments(5), TypeError),
  Row(
    "jaxbn.nnx.collect_moments", "row_mask", "float dtype", lambda: _with_moments(_nnx_net(), jnp.ones(4)), TypeError
  ),
  Row("jaxbn.nnx.collect_moments", "row_mask", "wrong rank", lambda: _with_moments(_nnx_net(), jnp.ones((4, 1), bool))),
  unknown("jaxbn.nnx.collect_moments", lambda **kw: jaxbn.nnx.collect_moments(_nnx_net(), **kw)),
  Row("jaxbn.nnx.BatchMoments", "model", "left on a layer", lambda: _stray_moments()),
  # jaxbn.transforms
  kw(f"{TX}.clip_by_running_norm", clip, decay=NAN),
  kw(f"{TX}.clip_by_running_norm", clip, what="above 1", decay=1.5),
  kw(f"{TX}.clip_by_running_norm", clip, z_threshold=0.0),
  kw(f"{TX}.clip_by_running_norm", clip, warmup_steps=-1),
  kw(f"{TX}.clip_by_running_norm", clip, TypeError, warmup_steps="a"),
  kw(f"{TX}.clip_by_running_norm", clip, TypeError, warmup_steps=2.5),
  kw(f"{TX}.clip_by_running_norm", clip, eps=NAN),
  kw(f"{TX}.clip_by_running_norm", clip, what="unknown", mode="x"),
  unknown(f"{TX}.clip_by_running_norm", clip),
  unknown(f"{TX}.ClipByRunningNormState", transforms.ClipByRunningNormState),
  kw(f"{TX}.scale_by_norm_damping", damp, beta=-1.0),
  kw(f"{TX}.scale_by_norm_damping", damp, beta=NAN),
  kw(f"{TX}.scale_by_norm_damping", damp, TypeError, beta="a"),
  kw(f"{TX}.scale_by_norm_damping", damp, TypeError, beta=None),
  unknown(f"{TX}.scale_by_norm_damping", functools.partial(damp, 1.0)),
  kw(f"{TX}.project_scale_invariant", project, delta=NAN),
  kw(f"{TX}.project_scale_invariant", project, TypeError, delta="a"),
  kw(f"{TX}.project_scale_invariant", project, wd_ratio=-1.0),
  kw(f"{TX}.project_scale_invariant", project, eps=0.0),
  kw(f"{TX}.project_scale_invariant", project, TypeError, channel_axis=0.5),
  kw(f"{TX}.project_scale_invariant", project, TypeError, what="a function", inner=optax.sgd),
  Row(
    f"{TX}.project_scale_invariant", "params", "None at update", lambda: project().update(P, project().init(P), None)
  ),
  Row(
    f"{TX}.project_scale_invariant", "channel_axis", "out of range at update", lambda: _update(project(channel_axis=3))
  ),
  unknown(f"{TX}.project_scale_invariant", project),
  unknown(f"{TX}.ProjectScaleInvariantState", transforms.ProjectScaleInvariantState),
  kw(f"{TX}.adamp", transforms.adamp, learning_rate=NAN),
  kw(f"{TX}.adamp", transforms.adamp, TypeError, learning_rate="a"),
  kw(f"{TX}.adamp", transforms.adamp, b1=NAN),
  kw(f"{TX}.adamp", transforms.adamp, what="one", b2=1.0),
  kw(f"{TX}.adamp", transforms.adamp, eps=-1.0),
  kw(f"{TX}.adamp", transforms.adamp, weight_decay=NAN),
  kw(f"{TX}.adamp", transforms.adamp, TypeError, nesterov="yes"),
  unknown(f"{TX}.adamp", transforms.adamp),
  kw(f"{TX}.sgdp", transforms.sgdp, learning_rate=NAN),
  kw(f"{TX}.sgdp", sgdp, what="one", momentum=1.0),
  kw(f"{TX}.sgdp", sgdp, dampening=NAN),
  kw(f"{TX}.sgdp", sgdp, weight_decay=-1.0),
  kw(f"{TX}.sgdp", sgdp, eps=0.0),
  kw(f"{TX}.sgdp", sgdp, delta=NAN),
  kw(f"{TX}.sgdp", sgdp, TypeError, nesterov="yes"),
  Row(f"{TX}.sgdp", "params", "None at update", lambda: sgdp().update(P, sgdp().init(P), None)),
  unknown(f"{TX}.sgdp", sgdp),
  kw(f"{TX}.register_batch_norm", transforms.register_batch_norm, TypeError, what="instance", cls=5),
  unknown(f"{TX}.register_batch_norm", functools.partial(transforms.register_batch_norm, _Net)),
  kw(f"{TX}.batch_norm_mask", transforms.batch_norm_mask, TypeError, params=5),
  Row(
    f"{TX}.batch_norm_mask",
    "batch_stats",
    "params alone",
    lambda: transforms.batch_norm_mask(_net_variables()["params"]),
  ),
  Row(
    f"{TX}.batch_norm_mask",
    "batch_stats",
    "int",
    lambda: transforms.batch_norm_mask(_net_variables()["params"], 5),
    TypeError,
  ),
  Row(
    f"{TX}.batch_norm_mask",
    "batch_norm_types",
    "instance",
    lambda: transforms.batch_norm_mask(_nnx_net(), batch_norm_types=[5]),
    TypeError,
  ),
  unknown(f"{TX}.batch_norm_mask", lambda **kw: transforms.batch_norm_mask(_net_variables(), **kw)),
  Row(f"{TX}.scale_invariant_mask", "model", "int", lambda: transforms.scale_invariant_mask(5, _x()), TypeError),
  Row(
    f"{TX}.scale_invariant_mask",
    "variables",
    "missing",
    lambda: transforms.scale_invariant_mask(_Net(), _x((8, 2))),
    TypeError,
  ),
  Row(
    f"{TX}.scale_invariant_mask",
    "batch_norm_types",
    "empty",
    lambda: transforms.scale_invariant_mask(_Net(), _net_variables(), _x((8, 2)), batch_norm_types=()),
    TypeError,
  ),
  # Passed on to the model, whose signature refuses it.
  unknown(
    f"{TX}.scale_invariant_mask",
    lambda **kw: transforms.scale_invariant_mask(_Net(), _net_variables(), _x((8, 2)), **kw),
  ),
  # jaxbn.training
  kw(STEP, _step, micro_batch_size=-1),
  kw(STEP, _step, micro_batch_size=2.5),
  kw(STEP, _step, what="unknown", bn_mode="x"),
  kw(STEP, _step, what="unknown", loop="x"),
  kw(STEP, _step, sharpness_every=0),
  kw(STEP, _step, what="negative", gradient_penalty=-1.0),
  kw(STEP, _step, what="NaN", gradient_penalty=float("nan")),
  Row(STEP, "penalty_block_size", "zero", lambda: _step(gradient_penalty=0.1, penalty_block_size=0)),
  Row(STEP, "penalty_method", "unknown", lambda: _step(gradient_penalty=0.1, penalty_method="x")),
  Row(
    STEP,
    "sharpness_iters",
    "zero",
    lambda: _step(sharpness_every=1, sharpness_iters=0),
  ),
  Row(
    STEP,
    "loss_fn",
    "not callable",
    lambda: training.full_batch_step(5, optax.sgd(0.1)),
    TypeError,
  ),
  Row(
    STEP,
    "optimizer",
    "string",
    lambda: training.full_batch_step(_loss, "sgd"),
    TypeError,
  ),
  kw(STEP, _step, TypeError, guard="yes"),
  Row(
    STEP,
    "data",
    "leading sizes differ",
    lambda: _step()(_train_state(), {"x": _x((6, 3)), "y": jnp.ones(5)}),
  ),
  unknown(STEP, _step),
  kw(SHARP, _sharpness, micro_batch_size=0),
  kw(SHARP, _sharpness, what="unknown", bn_mode="x"),
  kw(SHARP, _sharpness, what="negative", gradient_penalty=-1.0),
  Row(SHARP, "penalty_block_size", "zero", lambda: _sharpness(gradient_penalty=0.1, penalty_block_size=0)),
  Row(SHARP, "penalty_method", "unknown", lambda: _sharpness(gradient_penalty=0.1, penalty_method="x")),
  kw(
    SHARP,
    _sharpness,
    num_iters=0,
  ),
  kw(
    SHARP,
    _sharpness,
    what="unknown",
    method="x",
  ),
  unknown(SHARP, _sharpness),
  kw(EPOCH, _minibatch, batch_size=-2),
  kw(EPOCH, _minibatch, what="empty", data={}),
  kw(EPOCH, _minibatch, TypeError, key="k"),
  kw(EPOCH, _minibatch, TypeError, what="not callable", step=5),
  unknown(EPOCH, _minibatch),
  kw(LLOSS, _linen_loss, rng_streams="dropout"),
  kw(LLOSS, _linen_loss, what="fixed keys", rngs={"dropout": jax.random.key(0)}),
  kw(LLOSS, _linen_loss, TypeError, model=5),
  kw(LLOSS, _linen_loss, TypeError, what="not callable", loss=5),
  kw(NLOSS, _nnx_loss, TypeError, model=5),
  kw(NLOSS, _nnx_loss, TypeError, what="not callable", loss=5),
  unknown(NLOSS, _nnx_loss),
  Row(
    "jaxbn.training.TrainState",
    "key",
    "string at create",
    lambda: training.TrainState.create(P, {}, optax.sgd(0.1), key="k"),
    TypeError,
  ),
  Row(
    "jaxbn.training.TrainState",
    "optimizer",
    "string at create",
    lambda: training.TrainState.create(P, {}, "sgd"),
    TypeError,
  ),
  unknown("jaxbn.training.TrainState", training.TrainState),
  unknown("jaxbn.training.LossAux", training.LossAux),
  Row("jaxbn.training.Loss", "loss", "not callable", lambda: training.Loss(5), TypeError),
  Row("jaxbn.training.Loss", "takes_key", "string", lambda: training.Loss(_loss, takes_key="yes"), TypeError),
  unknown("jaxbn.training.Loss", training.Loss),
  unknown("jaxbn.training.StepMetrics", training.StepMetrics),
  Row(
    "jaxbn.training.save_checkpoint",
    "path",
    "int",
    lambda: training.save_checkpoint(5, _train_state()),
    TypeError,
  ),
  Row(
    "jaxbn.training.save_checkpoint",
    "state",
    "not a TrainState",
    lambda: training.save_checkpoint("/tmp/jaxbn-bad-input-never-written", 5),
    TypeError,
  ),
  unknown("jaxbn.training.save_checkpoint", functools.partial(training.save_checkpoint, "x", None)),
  Row(
    "jaxbn.training.restore_checkpoint",
    "path",
    "missing",
    lambda: training.restore_checkpoint("/nonexistent/jaxbn-checkpoint", _train_state()),
  ),
  unknown("jaxbn.training.restore_checkpoint", functools.partial(training.restore_checkpoint, "x", None)),
]


def _stray_moments():
  """A layer holding a BatchMoments outside collect_moments (a nested block, or one set by hand)."""
  model = _nnx_net()
  model.layers[1].batch_moments = jaxbn.nnx.BatchMoments(jnp.zeros((3, 3)))
  return _with_moments(model)


# ---- the checks ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _deadline(seconds: int):
  """Fails a call that does not return within ``seconds`` (a hang) instead of blocking the suite."""

  def expired(signum, frame):
    raise TimeoutError(f"no answer within {seconds} s: the call hangs")

  previous = signal.signal(signal.SIGALRM, expired)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _names_call(message: str, target: str) -> bool:
  """Whether ``message`` names the public call: one of its public names, or Python's ``name()``."""
  for alias in _aliases(target):
    if re.search(rf"(?<![\w.]){re.escape(alias)}(?!\w)", message):
      return True
    short = alias.rsplit(".", 1)[-1]
    if re.search(rf"(?<![\w.]){re.escape(short)}(\.__\w+__)?\(\)", message):
      return True
  return False


def _summary(result: Any) -> str:
  """What a call returned instead of raising, and whether it holds NaN."""
  leaves = [v for v in jax.tree.leaves(result) if hasattr(v, "dtype")]
  nan = any(jnp.issubdtype(v.dtype, jnp.inexact) and bool(jnp.any(jnp.isnan(v))) for v in leaves)
  return f"{type(result).__name__}{' holding NaN' if nan else ''}"


@pytest.mark.parametrize(
  "row",
  [pytest.param(r, id=r.id) for r in ROWS],
)
def test_bad_input_raises_a_named_error(row):
  with _deadline(120):
    try:
      result = row.call()
    except (TypeError, ValueError) as err:
      error = err
    else:
      pytest.fail(f"{row.target} returned {_summary(result)} for a malformed {row.arg} ({row.what}) instead of raising")
  message = str(error)
  assert isinstance(error, row.error), f"{type(error).__name__} instead of {row.error.__name__}: {message}"
  named = row.via or row.target
  assert _names_call(message, named), f"the message does not name {named}: {message}"
  assert re.search(rf"(?<![\w.]){re.escape(row.arg)}(?!\w)", message), f"the message does not name {row.arg}: {message}"


def test_every_public_callable_has_a_row():
  assert len({r.id for r in ROWS}) == len(ROWS), "two rows share an id"
  covered = set().union(*(_same(r.target) for r in ROWS if r.target in PUBLIC))
  assert {r.target for r in ROWS} <= set(PUBLIC), (
    f"rows for non-public names: {sorted({r.target for r in ROWS} - set(PUBLIC))}"
  )
  assert covered == set(PUBLIC), f"public callables without a bad-input row: {sorted(set(PUBLIC) - covered)}"


def test_the_table_checks_each_argument_class():
  # Every class of malformed input the sweep promises appears somewhere in the table.
  what = " ".join(r.what for r in ROWS)
  for word in ("rank", "other features", "string", "int dtype", "negative", "NaN", "unknown keyword", "None"):
    assert word in what, word
