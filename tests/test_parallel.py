"""Cross-device batch statistics: every parallel style against one device running the global batch.

Styles: ``jax.shard_map``, ``jax.pmap`` and ``jax.vmap`` with ``axis_name``; ``jax.jit`` with
NamedSharding-sharded inputs and no ``axis_name`` (Explicit and Auto meshes); ``jaxbn.parallel.batch_map``.
Each is checked on outputs, gradients (x, scale, bias) and new running statistics, with and
without masks that leave the devices with different numbers of valid rows (one with none).
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn.parallel import batch_map, sync_state

D = 8  # devices
R = 6  # rows per device
C = 3  # features
TOL = {"rtol": 1e-5, "atol": 1e-5}
ROWS_VALID = (6, 0, 1, 3, 6, 2, 5, 4)  # valid rows per device in the masked cases
KW = {"momentum": 0.9, "epsilon": 1e-5}


def _data(seed=0, rows=D * R):
  k = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(k[0], (rows, C)) * jnp.array([[2.0, 0.5, 4.0]]) + jnp.array([[3.0, -1.0, 20.0]])
  w = jax.random.normal(k[1], (rows, C))  # cotangent of y: loss = sum(y * w)
  scale = 1.0 + 0.1 * jax.random.normal(k[2], (C,))
  bias = 0.1 * jax.random.normal(k[3], (C,))
  return x, w, scale, bias


def _mask(rows_valid=ROWS_VALID, rows=R):
  return jnp.asarray(np.concatenate([np.arange(rows) < v for v in rows_valid])[:, None])


STATE0 = jaxbn.BatchNormState(jnp.array([0.5, -0.5, 1.0]), jnp.array([2.0, 1.0, 0.5]), jnp.array(3, jnp.int32))


def _value_and_grads(run, x, w, scale, bias, mask):
  """Output, new state and gradients of sum(y * w) w.r.t. (x, scale, bias), through ``run``."""

  def loss(x, s, b):
    y, state = run(x, mask, s, b)
    return jnp.sum(y * w), (y, state)

  (_, (y, state)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, scale, bias)
  return y, state, grads


@jax.jit
def _reference_jit(x, w, scale, bias, mask):
  def loss(x, s, b):
    y, state = jaxbn.batch_norm(x, STATE0, s, b, training=True, mask=mask, **KW)
    return jnp.sum(y * w), (y, state)

  (_, (y, state)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)
  return y, state, grads


def _reference(x, w, scale, bias, mask):
  """One device, the global batch, no axis_name."""
  return _reference_jit(
    *(None if a is None else jax.device_put(a, jax.devices()[0]) for a in (x, w, scale, bias, mask))
  )


def _check(got, want, per_device_state=False):
  (y, state, grads), (ry, rstate, rgrads) = got, want
  np.testing.assert_allclose(y, ry, **TOL)
  for g, r in zip(grads, rgrads, strict=True):
    np.testing.assert_allclose(g, r, **TOL)
  for s, r in zip(state, rstate, strict=True):
    s = np.asarray(s)
    if per_device_state:  # one row per device, all equal to the reference
      assert s.shape[0] == D
      for row in s:
        np.testing.assert_allclose(row, r, **TOL)
    else:
      np.testing.assert_allclose(s, r, **TOL)


def _mesh(axis_type, shape=(D,), names=("d",)):
  return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))


def _local(axis_name, groups=None, state=STATE0):
  def f(x, m, s, b):
    return jaxbn.batch_norm(x, state, s, b, training=True, mask=m, axis_name=axis_name, axis_index_groups=groups, **KW)

  return f


def _run_shard_map(axis_type):
  mesh = _mesh(axis_type)
  put = lambda a: None if a is None else jax.device_put(a, NamedSharding(mesh, P("d")))

  def run(x, m, s, b):
    f = jax.shard_map(
      lambda x, m, s, b: _local("d")(x, m, s, b),
      mesh=mesh,
      in_specs=(P("d"), P() if m is None else P("d"), P(), P()),
      out_specs=(P("d"), P()),
    )
    return f(x, m, s, b)

  return run, put


def _run_mapped(transform):
  def run(x, m, s, b):
    xs = x.reshape(D, R, C)
    ms = None if m is None else m.reshape(D, R, 1)
    f = transform(_local("d"), axis_name="d", in_axes=(0, None if m is None else 0, None, None))
    y, state = f(xs, ms, s, b)
    return y.reshape(D * R, C), state

  return run, lambda a: a


def _run_jit(axis_type, shape=(D,), names=("d",)):
  return _run_jit_on(_mesh(axis_type, shape, names))


def _run_jit_on(mesh):
  """No axis_name: inputs sharded along the batch over every mesh axis, XLA partitions the rest."""
  names = mesh.axis_names
  batch = names[0] if len(names) == 1 else names
  put = lambda a: None if a is None else jax.device_put(a, NamedSharding(mesh, P(batch)))
  return _local(None), put


def _run_batch_map(axis_type):
  mesh = _mesh(axis_type)
  put = lambda a: None if a is None else jax.device_put(a, NamedSharding(mesh, P("d")))

  def run(x, m, s, b):
    in_axes = (0, None if m is None else 0, None, None)
    return batch_map(_local("d"), mesh, in_axes=in_axes, out_axes=(0, None))(x, m, s, b)

  return run, put


STYLES = {
  "shard_map-explicit": lambda: _run_shard_map(AxisType.Explicit),
  "shard_map-auto": lambda: _run_shard_map(AxisType.Auto),
  "pmap": lambda: _run_mapped(jax.pmap),
  "vmap": lambda: _run_mapped(jax.vmap),
  "jit-explicit": lambda: _run_jit(AxisType.Explicit),
  "jit-auto": lambda: _run_jit(AxisType.Auto),
  "jit-explicit-2d": lambda: _run_jit(AxisType.Explicit, (2, 4), ("a", "b")),
  "jit-auto-2d": lambda: _run_jit(AxisType.Auto, (2, 4), ("a", "b")),
  "jit-auto-Mesh": lambda: _run_jit_on(jax.sharding.Mesh(np.array(jax.devices()), ("d",))),
  "batch_map-explicit": lambda: _run_batch_map(AxisType.Explicit),
  "batch_map-auto": lambda: _run_batch_map(AxisType.Auto),
}


FULL = ("shard_map-explicit", "pmap", "jit-explicit", "jit-auto", "batch_map-auto")
CASES = [(style, True) for style in STYLES] + [(style, False) for style in FULL]


@pytest.mark.parametrize(("style", "masked"), CASES, ids=[f"{s}-{'uneven-mask' if m else 'full'}" for s, m in CASES])
def test_every_style_matches_one_device(style, masked):
  x, w, scale, bias = _data()
  mask = _mask() if masked else None
  want = _reference(x, w, scale, bias, mask)
  run, put = STYLES[style]()
  got = _value_and_grads(run, put(x), put(w), scale, bias, put(mask))
  _check(got, want, per_device_state=style in ("pmap", "vmap"))
  if style.startswith("jit"):  # the statistics were computed on the sharded batch, not on a gathered copy
    assert not got[0].sharding.is_fully_replicated


@pytest.mark.parametrize("axis", [-1, 1], ids=["NHWC", "NCHW"])
def test_shard_map_image_layouts(axis):
  x = jax.random.normal(jax.random.key(1), (16, 4, 5, 4)) * 3.0 + 7.0
  w = jax.random.normal(jax.random.key(2), x.shape)
  fshape = (x.shape[axis],)
  scale, bias = jnp.linspace(0.5, 1.5, fshape[0]), jnp.linspace(-1.0, 1.0, fshape[0])
  state = jaxbn.init_state(fshape[0])
  kw = {"training": True, "axis": axis, **KW}

  def ref(x, s, b):
    return jaxbn.batch_norm(x, state, s, b, **kw)

  mesh = _mesh(AxisType.Explicit)
  f = jax.shard_map(
    lambda x, s, b: jaxbn.batch_norm(x, state, s, b, axis_name="d", **kw),
    mesh=mesh,
    in_specs=(P("d"), P(), P()),
    out_specs=(P("d"), P()),
  )
  want = _value_and_grads(lambda x, m, s, b: ref(x, s, b), x, w, scale, bias, None)
  xs, ws = (jax.device_put(a, NamedSharding(mesh, P("d"))) for a in (x, w))
  got = _value_and_grads(lambda x, m, s, b: f(x, s, b), xs, ws, scale, bias, None)
  _check(got, want)


def test_moments_every_style_matches_one_device():
  x, _, _, _ = _data(3)
  mask = _mask()
  want = jax.jit(lambda x, m: jaxbn.moments(x, mask=m))(x, mask)
  mesh = _mesh(AxisType.Explicit)
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("d")))
  local = lambda x, m: jaxbn.moments(x, mask=m, axis_name="d")
  auto = _mesh(AxisType.Auto)
  put_auto = lambda a: jax.device_put(a, NamedSharding(auto, P("d")))
  got = {
    "shard_map": jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("d"), out_specs=P()))(put(x), put(mask)),
    "jit-auto": jax.jit(lambda x, m: jaxbn.moments(x, mask=m))(put_auto(x), put_auto(mask)),
    "pmap": [a[0] for a in jax.pmap(local, axis_name="d")(x.reshape(D, R, C), mask.reshape(D, R, 1))],
    "vmap": [a[3] for a in jax.jit(jax.vmap(local, axis_name="d"))(x.reshape(D, R, C), mask.reshape(D, R, 1))],
    "jit": jax.jit(lambda x, m: jaxbn.moments(x, mask=m))(put(x), put(mask)),
    "batch_map": jax.jit(batch_map(local, mesh, out_axes=None))(put(x), put(mask)),
  }
  for style, values in got.items():
    for g, r in zip(values, want, strict=True):
      np.testing.assert_allclose(g, r, **TOL, err_msg=style)


# --- Uneven counts: the case flax gets wrong ------------------------------------------------------


def test_uneven_counts_two_devices_exact_where_flax_averages_means():
  """Two devices with 2 and 8 valid rows: jaxbn gives the global statistics, flax the mean of means."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 8, 3)).astype(np.float32) + np.array([[[4.0, 3.0, 5.0]], [[0.5, 0.5, 1.0]]], np.float32)
  mask = np.zeros((2, 8, 1), bool)
  mask[0, :2] = True
  mask[1, :8] = True
  valid = np.concatenate([x[0, :2], x[1, :8]])
  true_mean, true_var = valid.mean(0), valid.var(0)
  mean_of_means = (x[0, :2].mean(0) + x[1].mean(0)) / 2
  assert np.abs(true_mean - mean_of_means).min() > 0.3  # the two answers are far apart
  devices = jax.devices()[:2]

  mean, var, count = jax.pmap(lambda x, m: jaxbn.moments(x, mask=m, axis_name="d"), axis_name="d", devices=devices)(
    x, mask
  )
  np.testing.assert_allclose(mean, np.stack([true_mean] * 2), **TOL)
  np.testing.assert_allclose(var, np.stack([true_var] * 2), **TOL)
  np.testing.assert_array_equal(count, 10.0)

  def bn(x, m):
    _, state = jaxbn.batch_norm(x, jaxbn.init_state(3), training=True, mask=m, axis_name="d", momentum=0.0)
    return state.mean

  np.testing.assert_allclose(jax.pmap(bn, axis_name="d", devices=devices)(x, mask)[0], true_mean, **TOL)

  layer = nn.BatchNorm(use_running_average=False, axis_name="d", momentum=0.0)
  variables = layer.init(jax.random.key(0), x[0])

  def flax_bn(x, m):
    _, updates = layer.apply(variables, x, mask=m, mutable=["batch_stats"])
    return updates["batch_stats"]["mean"]

  flax_mean = jax.pmap(flax_bn, axis_name="d", devices=devices)(x, mask)[0]
  np.testing.assert_allclose(flax_mean, mean_of_means, rtol=1e-5)  # flax: mean of per-device means


# --- Groups ---------------------------------------------------------------------------------------


def _group_reference(x, w, scale, bias, mask, groups):
  """batch_norm run separately on each group's concatenated batch; per-device rows of the state."""
  rows = lambda dev: np.arange(dev * R, (dev + 1) * R)
  y = np.zeros(x.shape, np.float32)
  dx = np.zeros(x.shape, np.float32)
  dscale, dbias = np.zeros(C, np.float32), np.zeros(C, np.float32)
  states = [None] * D
  for g in groups:
    idx = np.concatenate([rows(d) for d in g])
    gy, gstate, (gx, gs, gb) = _reference(x[idx], w[idx], scale, bias, mask[idx])
    y[idx], dx[idx] = gy, gx
    dscale, dbias = dscale + gs, dbias + gb
    for d in g:
      states[d] = gstate
  return y, jax.tree.map(lambda *r: np.stack(r), *states), (dx, dscale, dbias)


def _check_groups(got, want):
  (y, state, grads), (ry, rstate, rgrads) = got, want
  np.testing.assert_allclose(y, ry, **TOL)
  for g, r in zip(grads, rgrads, strict=True):
    np.testing.assert_allclose(g, r, **TOL)
  for s, r in zip(state, rstate, strict=True):
    np.testing.assert_allclose(np.asarray(s).reshape(r.shape), r, **TOL)


GROUPINGS = {
  "pairs": [[0, 1], [2, 3], [4, 5], [6, 7]],
  "quads": [[0, 1, 2, 3], [4, 5, 6, 7]],
  "strided-pairs": [[0, 4], [1, 5], [2, 6], [3, 7]],
}


GROUP_CASES = [
  ("pairs", "shard_map"),
  ("quads", "shard_map"),
  ("strided-pairs", "shard_map"),
  ("quads", "pmap"),
  ("pairs", "vmap"),
]


@pytest.mark.parametrize(("grouping", "style"), GROUP_CASES)
def test_axis_index_groups_equal_separate_batch_norms(grouping, style):
  groups = GROUPINGS[grouping]
  x, w, scale, bias = _data(4)
  mask = _mask()
  want = _group_reference(x, w, scale, bias, mask, groups)
  local = _local("d", groups)
  if style == "shard_map":
    mesh = _mesh(AxisType.Explicit)
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("d")))

    def one_row(x, m, s, b):
      y, state = local(x, m, s, b)
      return y, jax.tree.map(lambda a: a[None], state)

    f = jax.shard_map(one_row, mesh=mesh, in_specs=(P("d"), P("d"), P(), P()), out_specs=P("d"))
    got = _value_and_grads(f, put(x), put(w), scale, bias, put(mask))
  else:
    run = lambda x, m, s, b: _grouped_mapped(style, local, x, m, s, b)
    got = _value_and_grads(run, x, w, scale, bias, mask)
  _check_groups(got, want)


def _grouped_mapped(style, local, x, m, s, b):
  transform = jax.pmap if style == "pmap" else jax.vmap
  f = transform(local, axis_name="d", in_axes=(0, 0, None, None))
  y, state = f(x.reshape(D, R, C), m.reshape(D, R, 1), s, b)
  return y.reshape(D * R, C), state


@pytest.mark.parametrize(
  ("grouping", "axis_type"),
  [("pairs", AxisType.Explicit), ("quads", AxisType.Auto), ("strided-pairs", AxisType.Explicit)],
  ids=["pairs-explicit", "quads-auto", "strided-pairs-explicit"],
)
def test_groups_under_jit_with_a_mesh_axis(grouping, axis_type):
  """batch_map on a 2-D mesh: axis_name="member" gives the same groups as axis_index_groups."""
  groups = GROUPINGS[grouping]
  size = len(groups[0])
  if grouping == "strided-pairs":  # device d = member * 4 + group: members of a group are 4 apart
    mesh, batch_axes = _mesh(axis_type, (size, D // size), ("member", "group")), ("member", "group")
  else:  # device d = group * size + member
    mesh, batch_axes = _mesh(axis_type, (D // size, size), ("group", "member")), ("group", "member")
  x, w, scale, bias = _data(4)
  mask = _mask()
  want = _group_reference(x, w, scale, bias, mask, groups)

  def one_row(x, m, s, b):
    y, state = _local("member")(x, m, s, b)
    return y, jax.tree.map(lambda a: a[None], state)

  run = batch_map(one_row, mesh, mesh_axes=batch_axes, in_axes=(0, 0, None, None))
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P(batch_axes)))
  _check_groups(_value_and_grads(run, put(x), put(w), scale, bias, put(mask)), want)


def test_bad_groups_are_rejected():
  x = jnp.ones((D, R, C))
  with pytest.raises(ValueError, match=r"jaxbn.moments: axis_index_groups must partition the 8 indices"):
    jax.vmap(lambda x: jaxbn.moments(x, axis_name="d", axis_index_groups=[[0, 1], [2, 3]]), axis_name="d")(x)


# --- Collectives per layer ------------------------------------------------------------------------

_COLLECTIVE = re.compile(
  r"(?<![\w.%-])(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all|collective-broadcast|ragged-all-to-all)"
  r"(-start)?\("
)


def _collectives(compiled) -> int:
  """Cross-device collective ops in a compiled HLO module (a tuple all-reduce is one op)."""
  return len(_COLLECTIVE.findall(compiled.as_text()))


def _two_layers(axis_name, groups=None, fused=None):
  state = jaxbn.init_state(C)

  def f(x, s, b, m):
    for _ in range(2):
      x, _ = jaxbn.batch_norm(
        x, state, s, b, training=True, mask=m, axis_name=axis_name, axis_index_groups=groups, fused=fused
      )
      x = jnp.tanh(x)
    return x

  return f


@pytest.mark.parametrize(
  ("style", "masked"),
  [("shard_map", True), ("shard_map-groups", False), ("pmap", False)],
  ids=["shard_map-mask", "shard_map-groups", "pmap"],
)
def test_one_collective_per_layer_forward_at_most_one_backward(style, masked):
  layers = 2
  x, _, scale, bias = _data()
  mask = _mask() if masked else None
  if style == "pmap":
    mapped = jax.pmap(_two_layers("d"), axis_name="d", in_axes=(0, None, None, 0 if masked else None))
    args = (x.reshape(D, R, C), scale, bias, None if mask is None else mask.reshape(D, R, 1))
  else:
    groups = GROUPINGS["pairs"] if style.endswith("groups") else None
    mesh = _mesh(AxisType.Explicit)
    mspec = P() if mask is None else P("d")
    mapped = jax.shard_map(_two_layers("d", groups), mesh=mesh, in_specs=(P("d"), P(), P(), mspec), out_specs=P("d"))
    put = lambda a: None if a is None else jax.device_put(a, NamedSharding(mesh, P("d")))
    args = (put(x), scale, bias, put(mask))
  _assert_one_collective_per_layer_each_way(mapped, args, layers)


def _assert_one_collective_per_layer_each_way(f, args, layers):
  """``layers`` collectives in the compiled forward pass, between 1 and ``layers`` more with the backward."""
  forward = _collectives(jax.jit(f).lower(*args).compile())
  assert forward == layers
  loss = lambda x, s, b, m: jnp.sum(f(x, s, b, m) ** 2)
  both = _collectives(jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile())
  assert 1 <= both - forward <= layers


JIT_MESHES = {
  "explicit": lambda: _mesh(AxisType.Explicit),
  "auto": lambda: _mesh(AxisType.Auto),
  "auto-Mesh": lambda: jax.sharding.Mesh(np.array(jax.devices()), ("d",)),
  "auto-2d": lambda: _mesh(AxisType.Auto, (2, 4), ("a", "b")),
}
JIT_CASES = [
  ("explicit", False, None),
  ("explicit", True, None),
  ("auto", False, None),
  ("auto", True, None),
  ("auto", True, False),
  ("auto-Mesh", True, None),
  ("auto-2d", True, False),
]


@pytest.mark.parametrize(
  ("mesh", "masked", "fused"), JIT_CASES, ids=[f"{m}-{'mask' if k else 'full'}-fused={f}" for m, k, f in JIT_CASES]
)
def test_jit_sharded_one_collective_per_layer_forward_at_most_one_backward(mesh, masked, fused):
  """No axis_name, batch sharded over the mesh: Explicit axes via shard_map, Auto axes via chunked statistics."""
  layers = 2
  mesh = JIT_MESHES[mesh]()
  x, _, scale, bias = _data()
  put = lambda a: None if a is None else jax.device_put(a, NamedSharding(mesh, P(mesh.axis_names)))
  args = (put(x), scale, bias, put(_mask() if masked else None))
  f = _two_layers(None, fused=fused)
  _assert_one_collective_per_layer_each_way(f, args, layers)


AUTO_LAYOUTS = {
  # name: (shape, feature axis, spec over a (4, 2) Auto mesh ("data", "model"), collectives expected)
  "batch-on-data": ((12, 4), -1, P("data"), 1),  # 12 rows: chunks of 3, one per "data" shard
  "batch-on-data-features-on-model": ((16, 4), -1, P("data", "model"), 1),
  "NCHW-batch-on-both": ((16, 4, 5, 3), 1, P(("data", "model")), 1),
  "replicated": ((16, 4), -1, P(), 0),
  "height-on-both": ((3, 16, 5, 4), -1, P(None, ("data", "model")), None),  # not the leading axis: XLA's way
}


@pytest.mark.parametrize("layout", list(AUTO_LAYOUTS))
def test_jit_auto_mesh_layouts_exact(layout):
  shape, axis, spec, expected = AUTO_LAYOUTS[layout]
  mesh = _mesh(AxisType.Auto, (4, 2), ("data", "model"))
  rng = np.random.default_rng(11)
  x = (1e4 + rng.normal(size=shape)).astype(np.float32)
  mask = rng.random(shape[:1] + (1,) * (len(shape) - 1)) > 0.3
  mask[:1] = False  # the first chunk's shift must come from a later row
  f = jax.jit(lambda x, m: jaxbn.moments(x, axis=axis, mask=m))
  args = (jax.device_put(x, NamedSharding(mesh, spec)), jax.device_put(mask, NamedSharding(mesh, P(*spec[:1]))))
  want = f(*(jax.device_put(a, jax.devices()[0]) for a in (x, mask)))
  for g, r in zip(f(*args), want, strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-5)
  if expected is not None:
    assert _collectives(f.lower(*args).compile()) == expected


def test_context_mesh_chunking_only_where_the_mesh_has_devices():
  """Eager jax.checkpoint under an abstract mesh alone used to pin single-device arrays to that mesh."""
  mesh = _mesh(AxisType.Auto, (8,), ("data",))
  x = jnp.asarray(np.random.default_rng(3).normal(5.0, 2.0, (16, 4)), jnp.float32)
  f = jax.checkpoint(lambda x: jaxbn.batch_norm(x, jaxbn.init_state(4), training=True)[0])
  want = f(x)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    np.testing.assert_allclose(f(x), want, **TOL)
  with jax.set_mesh(mesh):  # a concrete mesh: the chunked statistics, eager and under jit
    np.testing.assert_allclose(f(x), want, **TOL)
    np.testing.assert_allclose(jax.jit(f)(x), want, **TOL)


# --- sync_state -----------------------------------------------------------------------------------


def _replica_states(seed=5, counts=(3, 0, 1, 4, 2, 2, 7, 1)):
  rng = np.random.default_rng(seed)
  mean = rng.normal(size=(D, C)).astype(np.float32) * 2
  var = rng.uniform(0.5, 2.0, size=(D, C)).astype(np.float32)
  return jaxbn.BatchNormState(jnp.asarray(mean), jnp.asarray(var), jnp.asarray(counts, jnp.int32))


def _synced_reference(states, members):
  c = np.asarray(states.count, np.float64)[members]
  mean, var = np.asarray(states.mean, np.float64)[members], np.asarray(states.var, np.float64)[members]
  if c.sum() == 0:
    c = np.ones_like(c)
  m = (c[:, None] * mean).sum(0) / c.sum()
  v = (c[:, None] * (var + (mean - m) ** 2)).sum(0) / c.sum()
  total = np.asarray(states.count)[members].sum()
  # The mean count rounded half up, at least 1 once any replica has counted a batch.
  return m, v, max(np.floor(total / len(members) + 0.5), 1) if total > 0 else 0


SYNC_CASES = [
  (style, grouping)
  for style in ("vmap", "pmap", "shard_map", "batch_map-2d")
  for grouping in (None, "pairs", "strided-pairs")
  if style != "batch_map-2d" or grouping is not None
]


@pytest.mark.parametrize(("style", "grouping"), SYNC_CASES)
def test_sync_state_count_weighted(style, grouping):
  states = _replica_states()
  groups = None if grouping is None else GROUPINGS[grouping]
  if style == "batch_map-2d":  # groups as a mesh axis: devices 4 apart ("strided") or adjacent
    names = ("member", "group") if grouping == "strided-pairs" else ("group", "member")
    shape = (2, 4) if grouping == "strided-pairs" else (4, 2)
    mesh = _mesh(AxisType.Explicit, shape, names)
    f = batch_map(
      lambda s: jax.tree.map(lambda a: a[None], sync_state(jax.tree.map(lambda a: a[0], s), "member")), mesh
    )
    got = jax.jit(f)(jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P(names))), states))
  elif style == "shard_map":
    mesh = _mesh(AxisType.Explicit)
    one = lambda s: jax.tree.map(
      lambda a: a[None], sync_state(jax.tree.map(lambda a: a[0], s), "d", axis_index_groups=groups)
    )
    sharded = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P("d"))), states)
    got = jax.jit(jax.shard_map(one, mesh=mesh, in_specs=P("d"), out_specs=P("d")))(sharded)
  else:
    transform = jax.pmap if style == "pmap" else jax.vmap
    got = jax.jit(transform(lambda s: sync_state(s, "d", axis_index_groups=groups), axis_name="d"))(states)
  got = jax.tree.map(np.asarray, got)
  for g in groups or [list(range(D))]:
    m, v, c = _synced_reference(states, g)
    for d in g:
      np.testing.assert_allclose(got.mean[d], m, **TOL)
      np.testing.assert_allclose(got.var[d], v, **TOL)
      assert int(got.count[d]) == c
      assert got.count.dtype == jnp.int32


def test_sync_state_after_local_batch_norm_gives_global_statistics():
  """Replicas normalizing locally, synced: the running statistics of the global batch (equal shards)."""
  x, _, _, _ = _data(6)
  mesh = _mesh(AxisType.Explicit)

  def step(x):
    _, state = jaxbn.batch_norm(x, jaxbn.init_state(C), training=True, momentum=0.0)
    local = jax.tree.map(lambda a: a[None], state)
    return local, sync_state(state, "d")

  local, synced = jax.jit(batch_map(step, mesh, out_axes=(0, None)))(jax.device_put(x, NamedSharding(mesh, P("d"))))
  mean, var, _ = jaxbn.moments(x)
  assert np.abs(np.asarray(local.mean) - np.asarray(mean)).max() > 0.1  # replicas did disagree
  np.testing.assert_allclose(synced.mean, mean, **TOL)
  np.testing.assert_allclose(synced.var, var, **TOL)
  assert int(synced.count) == 1


def test_sync_state_fresh_states_equal_weights_and_pytrees():
  states = _replica_states(counts=(0,) * D)
  model = {"bn1": states, "bn2": jaxbn.BatchNormState(states.mean[:, :2], states.var[:, :2], states.count)}
  got = jax.jit(jax.vmap(lambda s: sync_state(s, "d"), axis_name="d"))(model)
  np.testing.assert_allclose(got["bn1"].mean[5], np.mean(np.asarray(states.mean), 0), **TOL)
  np.testing.assert_allclose(got["bn2"].var[0], _synced_reference(states, list(range(D)))[1][:2], **TOL)
  np.testing.assert_array_equal(got["bn1"].count, 0)


def test_sync_state_count_is_at_least_one_once_any_replica_has_a_batch():
  """Counts 0 and 1 sync to 1, not round(0.5) = 0: the next cumulative update keeps the synced statistics."""
  states = jaxbn.BatchNormState(jnp.array([[0.0], [5.0]]), jnp.array([[1.0], [2.0]]), jnp.array([0, 1], jnp.int32))
  x = jnp.array([[100.0], [102.0]])

  def step(s):
    synced = sync_state(s, "r")
    return synced, jaxbn.batch_norm(x, synced, training=True, running_average="cumulative")[1]

  synced, after = jax.jit(jax.vmap(step, axis_name="r"))(states)
  np.testing.assert_array_equal(synced.count, [1, 1])
  np.testing.assert_array_equal(synced.mean[:, 0], [5.0, 5.0])  # replica 0 saw no batch: weight 0
  np.testing.assert_array_equal(synced.var[:, 0], [2.0, 2.0])
  np.testing.assert_allclose(after.mean[:, 0], (5.0 + 101.0) / 2, rtol=1e-6)  # equal weights: 2 batches
  np.testing.assert_allclose(after.var[:, 0], (2.0 + 1.0) / 2, rtol=1e-6)
  np.testing.assert_array_equal(after.count, [2, 2])


def test_sync_state_merges_per_feature_counts_per_feature():
  states = _replica_states()
  counts = np.random.default_rng(9).integers(0, 4, (D, C)).astype(np.int32)
  counts[:, 1] = 0  # a feature no replica has seen: equal weights, count 0
  counts[3, 2] = 1  # one replica has seen feature 2 once
  counts[np.arange(D) != 3, 2] = 0
  states = states._replace(count=jnp.asarray(counts))
  got = jax.jit(jax.vmap(lambda s: sync_state(s, "d"), axis_name="d"))(states)
  assert got.count.shape == (D, C) and got.count.dtype == jnp.int32
  for f in range(C):
    per_feature = jaxbn.BatchNormState(states.mean[:, f : f + 1], states.var[:, f : f + 1], states.count[:, f])
    m, v, c = _synced_reference(per_feature, list(range(D)))
    np.testing.assert_allclose(got.mean[:, f], np.broadcast_to(m, (D,)), **TOL)
    np.testing.assert_allclose(got.var[:, f], np.broadcast_to(v, (D,)), **TOL)
    np.testing.assert_array_equal(got.count[:, f], c)
  np.testing.assert_array_equal(got.count[:, 1:], [[0, 1]] * D)


def test_sync_state_is_replicated_under_shard_map():
  """Ungrouped, the synced state is device-invariant: it may leave shard_map with out_specs=P()."""
  states = _replica_states()
  mesh = _mesh(AxisType.Explicit)
  f = jax.shard_map(
    lambda s: sync_state(jax.tree.map(lambda a: a[0], s), "d"), mesh=mesh, in_specs=P("d"), out_specs=P()
  )
  got = jax.jit(f)(jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P("d"))), states))
  m, v, c = _synced_reference(states, list(range(D)))
  np.testing.assert_allclose(got.mean, m, **TOL)
  np.testing.assert_allclose(got.var, v, **TOL)
  assert int(got.count) == c


def test_sync_state_errors():
  state = jaxbn.init_state(C)
  with pytest.raises(TypeError, match=r"jaxbn.sync_state: state must be a jaxbn.BatchNormState"):
    sync_state({"mean": jnp.zeros(C)}, "d")
  with pytest.raises(ValueError, match=r"jaxbn.sync_state: axis_name must name the mapped axis"):
    sync_state(state, None)
  with pytest.raises(ValueError, match=r"jaxbn.sync_state: axis_name='q' is not bound"):
    sync_state(state, "q")
  with pytest.raises(ValueError, match=r"jaxbn.sync_state: axis_index_groups must partition"):
    jax.vmap(lambda s: sync_state(s, "d", axis_index_groups=[[0], [1]]), axis_name="d")(_replica_states())


# --- batch_map ------------------------------------------------------------------------------------


def test_batch_map_under_set_mesh_and_leaves_other_axes_automatic():
  """mesh=None takes the mesh from jax.set_mesh; a mesh axis outside mesh_axes stays automatic."""
  x, _, _, _ = _data(7)
  mesh = _mesh(AxisType.Explicit, (4, 2), ("data", "model"))
  f = batch_map(lambda x: jaxbn.moments(x, axis_name="data"), mesh_axes="data", out_axes=None)
  with jax.set_mesh(mesh):
    got = jax.jit(f)(jax.device_put(x, NamedSharding(mesh, P("data"))))
  for g, r in zip(got, jaxbn.moments(x), strict=True):
    np.testing.assert_allclose(g, r, **TOL)


@pytest.mark.parametrize("in_axes", [0, np.int64(0)], ids=["int", "numpy-int"])
def test_batch_map_reshards_explicit_inputs(in_axes):
  x, _, _, _ = _data(8)
  mesh = _mesh(AxisType.Explicit)
  f = batch_map(lambda x: jaxbn.moments(x, axis_name="d"), mesh, in_axes=in_axes, out_axes=None)
  for g, r in zip(jax.jit(f)(x), jaxbn.moments(x), strict=True):  # x arrives unsharded
    np.testing.assert_allclose(g, r, **TOL)


def test_batch_map_errors():
  x = jnp.ones((D, C))
  mesh = _mesh(AxisType.Explicit)
  with pytest.raises(ValueError, match=r"batch_map: no mesh"):
    batch_map(lambda x: x)(x)
  with pytest.raises(ValueError, match=r"batch_map: mesh_axes must be distinct axes of the mesh \('d',\), got 'q'"):
    batch_map(lambda x: x, mesh, mesh_axes="q")(x)
  for bad in (-1, True):
    with pytest.raises(ValueError, match=r"batch_map: in_axes entries must be a non-negative int"):
      batch_map(lambda x: x, mesh, in_axes=bad)(x)
  with pytest.raises(ValueError, match=r"batch_map: in_axes splits dimension 2 of an argument with shape \(8, 3\)"):
    batch_map(lambda x: x, mesh, in_axes=2)(x)
  with pytest.raises(ValueError, match=r"batch_map: out_axes entries must be"):
    batch_map(lambda x: x, mesh, out_axes="0")
  with pytest.raises(ValueError, match=r"batch_map: in_axes has 2 entries but the function was called with 1"):
    batch_map(lambda x: x, mesh, in_axes=(0, None))(x)
  with pytest.raises(ValueError, match=r"out_specs"):  # grouped statistics are not the same on every device
    jax.jit(
      batch_map(lambda x: jaxbn.moments(x, axis_name="d", axis_index_groups=GROUPINGS["pairs"]), mesh, out_axes=None)
    )(jax.device_put(x, NamedSharding(mesh, P("d"))))


def test_unbound_axis_name_explains_the_options():
  with pytest.raises(ValueError, match=r"(?s)axis_name='d' is not bound.*jax.shard_map.*axis_name=None"):
    jax.jit(lambda x: jaxbn.batch_norm(x, jaxbn.init_state(C), training=True, axis_name="d"))(jnp.ones((4, C)))


def test_axis_index_of_nested_axes_matches_device_order():
  """Sanity check the device order the group references assume for a 2-D mesh."""
  mesh = _mesh(AxisType.Explicit, (4, 2), ("group", "member"))
  f = jax.shard_map(
    lambda x: x + lax.axis_index(("group", "member")),
    mesh=mesh,
    in_specs=P(("group", "member")),
    out_specs=P(("group", "member")),
  )
  np.testing.assert_array_equal(
    f(jax.device_put(jnp.zeros(D, jnp.int32), NamedSharding(mesh, P(("group", "member"))))), np.arange(D)
  )


def test_global_batch_one_process_is_the_rows_sharded_over_the_axes():
  rows = {"x": np.arange(48.0, dtype=np.float32).reshape(16, 3), "y": np.arange(16)}
  mesh = _mesh(AxisType.Auto, (4, 2), ("data", "model"))
  for axes, spec in ((None, P(("data", "model"))), ("data", P("data")), (("model", "data"), P(("model", "data")))):
    batch = jaxbn.parallel.global_batch(rows, mesh, mesh_axes=axes)
    assert batch["x"].sharding == NamedSharding(mesh, spec), axes
    np.testing.assert_array_equal(batch["x"], rows["x"])
    np.testing.assert_array_equal(batch["y"], rows["y"])
  # Two processes of these sizes are checked by tests/test_multihost.py.


def test_global_batch_errors():
  mesh = _mesh(AxisType.Auto)
  fn = "jaxbn.parallel.global_batch"
  with pytest.raises(TypeError, match=rf"{fn}: mesh must be a jax.sharding.Mesh .* got AbstractMesh"):
    jaxbn.parallel.global_batch({"x": np.ones((8, 2))}, mesh.abstract_mesh)
  for axes in ("q", (), ("d", "d")):
    with pytest.raises(ValueError, match=rf"{fn}: mesh_axes must be distinct axes of the mesh \('d',\)"):
      jaxbn.parallel.global_batch({"x": np.ones((8, 2))}, mesh, mesh_axes=axes)
  for data, sizes in (
    ({}, r"\[\]"),
    ({"x": np.ones((8, 2)), "y": np.ones(4)}, r"\[4, 8\]"),
    ([1.0], r"\[-1\] \(-1: a scalar\)"),
  ):
    with pytest.raises(ValueError, match=rf"{fn}: local_data must be a non-empty pytree .* leading sizes {sizes}"):
      jaxbn.parallel.global_batch(data, mesh)
  with pytest.raises(
    ValueError, match=rf"{fn}: process\(es\) \[0\] passed no rows in local_data \(rows per process: \[0\]\)"
  ):
    jaxbn.parallel.global_batch({"x": np.ones((0, 2))}, mesh)
  with pytest.raises(
    ValueError, match=rf"{fn}: process 0 passed 12 rows in local_data, which its devices' 8 positions .* multiple of 8"
  ):
    jaxbn.parallel.global_batch({"x": np.ones((12, 2))}, mesh)
