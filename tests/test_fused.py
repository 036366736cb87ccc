"""The closed-form backward pass against autodiff of the plain formula, and higher-order derivatives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn


def _loss(fused, **kw):
  def loss(x, scale, bias):
    fshape = scale.shape
    y, state = jaxbn.batch_norm(x, jaxbn.init_state(fshape), scale, bias, training=True, fused=fused, **kw)
    w = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    return jnp.sum(jax.nn.relu(y.astype(jnp.float32)) ** 2 * w), state

  return loss


def _args(shape, axis, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  axes = [a % len(shape) for a in np.atleast_1d(axis)]
  fshape = tuple(shape[a] for a in sorted(axes))
  x = jnp.asarray(rng.normal(2.0, 3.0, shape), dtype)
  return (
    x,
    jnp.asarray(rng.normal(1.0, 0.5, fshape), jnp.float32),
    jnp.asarray(rng.normal(0.0, 0.5, fshape), jnp.float32),
  )


def _assert_same_grads(kw, args, rtol=1e-5, atol=1e-5):
  (gf, sf) = jax.jit(jax.grad(_loss(True, **kw), (0, 1, 2), has_aux=True))(*args)
  (gp, sp) = jax.jit(jax.grad(_loss(False, **kw), (0, 1, 2), has_aux=True))(*args)
  for a, b in zip(gf, gp):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=rtol, atol=atol)
  for a, b in zip(sf, sp):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
  "shape,axis", [((8, 5, 5, 6), -1), ((8, 6, 5, 5), 1), ((64, 7), -1), ((6, 3, 5, 4), (1, 3)), ((5, 4), (0, 1))]
)
@pytest.mark.parametrize("mask_kind", ["none", "rows", "elements"])
def test_fused_gradients_equal_autodiff(shape, axis, mask_kind):
  rng = np.random.default_rng(1)
  mask = None
  if mask_kind == "rows":
    mask = jnp.asarray(rng.random(shape[:1] + (1,) * (len(shape) - 1)) > 0.3)
  elif mask_kind == "elements":
    mask = jnp.asarray(rng.random(shape) > 0.3)
  _assert_same_grads(dict(axis=axis, mask=mask), _args(shape, axis))


def test_fused_gradients_with_empty_mask_are_finite_and_equal():
  args = _args((8, 3), -1)
  _assert_same_grads(dict(mask=jnp.zeros((8, 1), bool)), args)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_fused_gradients_low_precision(dtype):
  # Both paths compute in float32; dx is rounded to the input dtype at the end.
  _assert_same_grads(dict(), _args((64, 8), -1, dtype), rtol=2e-2, atol=2e-2)


def test_fused_gradients_float64():
  with jax.enable_x64(True):
    x, s, b = _args((32, 4), -1)
    _assert_same_grads(dict(), (x.astype(jnp.float64), s.astype(jnp.float64), b.astype(jnp.float64)), rtol=1e-10)


def test_fused_keeps_only_x_and_vectors_as_residuals():
  from jax._src.ad_checkpoint import saved_residuals

  x, s, b = _args((64, 8), -1, jnp.bfloat16)

  def f(x, s, b):
    y, _ = jaxbn.batch_norm(x, jaxbn.init_state(8), s, b, training=True)
    return jnp.sum(y)  # linear in y: nothing of the loss itself needs saving

  big = [r for r in saved_residuals(f, x, s, b) if r[0].size >= x.size]
  assert [(r[0].shape, r[0].dtype) for r in big] == [((64, 8), jnp.bfloat16)], big


@pytest.mark.parametrize("fused", [True, None])
def test_second_order_reverse_over_reverse_and_hvp(fused):
  x, s, b = _args((16, 3), -1)
  v = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32)

  def hvp(fu):
    loss = lambda x: _loss(fu)(x, s, b)[0]
    return jax.jit(jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), v)))(x)

  def grad_of_grad_norm(fu):
    return jax.jit(jax.grad(lambda sc: jnp.sum(jax.grad(lambda x: _loss(fu)(x, sc, b)[0])(x) ** 2)))(s)

  np.testing.assert_allclose(hvp(fused), hvp(False), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(grad_of_grad_norm(fused), grad_of_grad_norm(False), rtol=1e-4, atol=1e-4)


def test_forward_mode_works_by_default():
  x, s, b = _args((16, 3), -1)
  t = jnp.ones_like(x)

  def all_modes(fused):
    jvp = jax.jvp(lambda x: _loss(fused)(x, s, b)[0], (x,), (t,))[1]
    hess = jax.hessian(lambda sc: _loss(fused)(x, sc, b)[0])(s)
    hvp = jax.jvp(jax.grad(lambda x: _loss(fused)(x, s, b)[0]), (x,), (t,))[1]  # forward-over-reverse
    return jvp, hess, hvp

  got = jax.jit(lambda: all_modes(None))()
  want = jax.jit(lambda: all_modes(False))()
  for a, c in zip(got, want):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-4)


def test_forward_mode_with_fused_true_names_the_switch():
  x, s, b = _args((16, 3), -1)
  t = jnp.ones_like(x)
  with pytest.raises(ValueError, match=r"jaxbn.batch_norm: fused=True .* fused=False"):
    jax.jvp(lambda x: _loss(True)(x, s, b)[0], (x,), (t,))
  with pytest.raises(ValueError, match=r"jaxbn.batch_norm: fused=True .* fused=False"):
    jax.jit(lambda x: jax.jvp(jax.grad(lambda x: _loss(True)(x, s, b)[0]), (x,), (t,)))(x)


def _count_collectives(hlo: str) -> int:
  ops = ("all-reduce(", "all-gather(", "reduce-scatter(", "all-to-all(", "collective-permute(")
  return sum(line.count(op) for line in hlo.splitlines() for op in ops if "=" in line)


@pytest.mark.parametrize("groups", [None, [[0, 1, 2, 3], [4, 5, 6, 7]]])
def test_fused_cross_device_equals_plain_with_one_collective_each_way(groups):
  mesh = jax.make_mesh((8,), ("d",))
  x, s, b = _args((64, 5), -1)
  mask = jnp.asarray(np.random.default_rng(3).random((64, 1)) > 0.4)
  x = jax.device_put(x, NamedSharding(mesh, P("d")))
  mask = jax.device_put(mask, NamedSharding(mesh, P("d")))

  def per_device(fused):
    def f(x, mask, s, b):
      def loss(x, s, b):
        y, st = jaxbn.batch_norm(
          x, jaxbn.init_state(5), s, b, training=True, mask=mask, axis_name="d", axis_index_groups=groups, fused=fused
        )
        return jnp.sum(jax.nn.relu(y) ** 2 * jnp.broadcast_to(jnp.arange(1.0, 6.0), y.shape)), st

      g, st = jax.grad(loss, (0, 1, 2), has_aux=True)(x, s, b)
      return g[0], g[1][None], g[2][None], st.mean[None]

    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("d"), P("d"), P(), P()), out_specs=P("d")))

  got = per_device(True)(x, mask, s, b)
  want = per_device(False)(x, mask, s, b)
  for a, c in zip(got, want):
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
  hlo = per_device(True).lower(x, mask, s, b).compile().as_text()
  assert _count_collectives(hlo) == 2, hlo  # one forward (statistics), one backward (two sums)


@pytest.mark.parametrize("style", ["pmap", "vmap"])
def test_fused_under_pmap_and_vmap_equals_plain(style):
  x, s, b = _args((8, 6, 3), -1)
  groups = [[0, 1], [2, 3], [4, 5], [6, 7]]

  def grads(fused):
    def loss(x, s, b):
      y, st = jaxbn.batch_norm(
        x, jaxbn.init_state(3), s, b, training=True, axis_name="d", axis_index_groups=groups, fused=fused
      )
      return jnp.sum(jnp.sin(y) * jnp.broadcast_to(jnp.arange(1.0, 4.0), y.shape)), st.var

    g = jax.grad(loss, (0, 1, 2), has_aux=True)
    mapped = (
      jax.pmap(g, axis_name="d", in_axes=(0, None, None))
      if style == "pmap"
      else jax.vmap(g, axis_name="d", in_axes=(0, None, None))
    )
    return jax.jit(mapped)(x, s, b)

  for a, c in zip(jax.tree.leaves(grads(True)), jax.tree.leaves(grads(False))):
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)


def _max_rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("offset", [1e4, 1e5])
@pytest.mark.parametrize(
  "shape,axis,masked", [((512, 6), -1, False), ((64, 4, 8), -1, True), ((16, 4, 5, 5), 1, False)]
)
def test_fused_gradients_accurate_at_large_mean_float32(offset, shape, axis, masked):
  # |mean| / std = 1e4 and 1e5 in float32. The backward's sum(dy * (x - mean)) expanded as
  # sum(dy * x) - mean * sum(dy) loses about eps * |mean| / std (here 7e-4 to 8e-3 of dscale and 3e-5
  # to 5e-4 of dx; this formulation stays below 1e-6).
  # The data keep the forward exact, so that only the backward's rounding is measured: x lies on the
  # float32 grid around the offset and every deviation comes with its negative (rows i and i + n/2,
  # masked together), so the mean is the offset itself; the first row, the statistics' shift, is the
  # offset too (a shift far from the mean costs the one-pass variance some digits, 1e-5 at 1e5).
  rng = np.random.default_rng(4)
  ulp = float(np.spacing(np.float32(offset)))
  half = shape[0] // 2
  z = np.round(rng.normal(0.0, 1.0, (half, *shape[1:])) / ulp) * ulp
  z[0] = 0.0
  x = (offset + np.concatenate([z, -z])).astype(np.float32)
  mask = None
  if masked:
    keep = np.r_[True, rng.random(half - 1) > 0.3]
    mask = jnp.asarray(np.concatenate([keep, keep]).reshape(shape[:1] + (1,) * (len(shape) - 1)))
  fshape = (shape[axis],)
  s = rng.normal(1.0, 0.5, fshape).astype(np.float32)
  b = rng.normal(0.0, 0.5, fshape).astype(np.float32)
  w = np.cos(np.arange(x.size)).reshape(shape).astype(np.float32)

  def grads(fused, dtype):
    def loss(x, s, b):
      y, _ = jaxbn.batch_norm(x, jaxbn.init_state(fshape), s, b, training=True, axis=axis, mask=mask, fused=fused)
      return jnp.sum(jax.nn.relu(y) ** 2 * w.astype(dtype))

    return jax.jit(jax.grad(loss, (0, 1, 2)))(*(v.astype(dtype) for v in (x, s, b)))

  got = grads(True, np.float32)
  with jax.enable_x64(True):
    want = grads(False, np.float64)
  errors = {name: _max_rel(g, c) for name, g, c in zip(("dx", "dscale", "dbias"), got, want)}
  assert max(errors.values()) < 2e-5, errors


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's fusions and buffer assignment")
@pytest.mark.parametrize("shape,axis", [((64, 16, 8), -1), ((64, 8, 16), 1)])
def test_fused_backward_holds_no_full_size_mean_on_cpu(shape, axis):
  # Two batch norm + relu layers need one activation-sized temporary. A broadcast of the mean shared
  # by the forward pass and the backward's sum is written out full-size and kept from one to the
  # other, one more activation-sized buffer per layer (3x before the backward's sum broadcast -mean).
  def f(x, s, b, w):
    for _ in range(2):
      x = jax.nn.relu(jaxbn.batch_norm(x, jaxbn.init_state(s.shape), s, b, training=True, axis=axis)[0])
    return jnp.sum(x * w)

  x, s, b = _args(shape, axis)
  w = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(shape)
  compiled = jax.jit(jax.grad(f, (0, 1, 2))).lower(x, s, b, w).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < 2 * x.nbytes, f"temporaries {temp / x.nbytes:.2f}x the activation size"


@pytest.mark.parametrize("fused", [True, None, False])
@pytest.mark.parametrize("masked", [False, True])
def test_empty_batch_gives_empty_output_and_unchanged_state(fused, masked):
  # As torch and flax: an empty output. The batch has no valid element, so the state is unchanged.
  x, s, b = jnp.zeros((0, 3)), jnp.ones(3), jnp.zeros(3)
  mask = jnp.ones((0, 1), bool) if masked else None
  state = jaxbn.init_state(3)

  def loss(x, s, b):
    y, new = jaxbn.batch_norm(x, state, s, b, training=True, mask=mask, fused=fused)
    return jnp.sum(y), (y, new)

  (gx, gs, gb), (y, new) = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))(x, s, b)
  assert y.shape == gx.shape == (0, 3)
  for got, want in zip(new, state):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(gs, 0)
  np.testing.assert_array_equal(gb, 0)


@pytest.mark.parametrize("masked", [False, True])
def test_fused_epsilon_gradient_equals_autodiff_and_finite_differences(masked):
  rng = np.random.default_rng(5)
  mask = jnp.asarray(rng.random((16, 1)) > 0.3) if masked else None
  with jax.enable_x64(True):
    x = jnp.asarray(rng.normal(1.0, 0.1, (16, 3)))  # var ~ 1e-2: epsilon matters
    s = jnp.asarray(rng.normal(1.0, 0.5, 3))

    def loss(eps, fused):
      y, _ = jaxbn.batch_norm(
        x, jaxbn.init_state(3, dtype=jnp.float64), s, training=True, epsilon=eps, mask=mask, fused=fused
      )
      return jnp.sum(y**3 + jnp.sin(y))

    eps, h = 1e-2, 1e-6
    got = jax.jit(jax.grad(loss), static_argnums=1)(eps, True)
    want = jax.jit(jax.grad(loss), static_argnums=1)(eps, False)
    fd = (loss(eps + h, False) - loss(eps - h, False)) / (2 * h)
  assert abs(float(want)) > 1.0
  np.testing.assert_allclose(got, want, rtol=1e-10)
  np.testing.assert_allclose(got, fd, rtol=1e-6)


def test_fused_epsilon_gradient_across_devices():
  # Under shard_map an epsilon that is the same on every device gets the sum of all devices'
  # contributions, also next to a per-device scale (whose cotangent stays per device).
  mesh = jax.make_mesh((8,), ("d",))
  x, s, b = _args((64, 5), -1)
  put = lambda v: jax.device_put(v, NamedSharding(mesh, P("d")))
  x = put(x * 0.1)
  scales = put(jnp.stack([s * (1 + 0.1 * i) for i in range(8)]))

  def run(fused):
    def f(x, sc, eps):
      def loss(x, sc, eps):
        y, _ = jaxbn.batch_norm(
          x, jaxbn.init_state(5), sc[0], b, training=True, epsilon=eps, axis_name="d", fused=fused
        )
        return jnp.sum(jnp.sin(y) * jnp.broadcast_to(jnp.arange(1.0, 6.0), y.shape))

      return jax.grad(loss, (0, 1, 2))(x, sc, eps)

    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("d"), P("d"), P()), out_specs=(P("d"), P("d"), P())))(
      x, scales, 1e-2
    )

  got, want = run(True), run(False)
  assert abs(float(want[2])) > 1e-2
  for a, c in zip(got, want):
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale_spec", [None, P(), P("f")])
def test_fused_under_explicit_mesh_sharded_along_batch_and_features(scale_spec):
  # Data x model parallel under jax.jit: the closed-form scale/bias/epsilon cotangents must carry the
  # sharding of the primals (the internal ones/zeros too when scale/bias are None).
  mesh = jax.make_mesh((4, 2), ("b", "f"), axis_types=(AxisType.Explicit,) * 2)
  x, s, b = _args((16, 4), -1)
  x = jax.device_put(x, NamedSharding(mesh, P("b", "f")))
  put = lambda v: None if scale_spec is None else jax.device_put(v, NamedSharding(mesh, scale_spec))
  state = jaxbn.init_state(4)
  per_feature = lambda v: jax.device_put(v, NamedSharding(mesh, P("f")))  # as the batch statistics
  state = state._replace(mean=per_feature(state.mean), var=per_feature(state.var))

  def grads(fused):
    def loss(x, s, b, eps):
      y, _ = jaxbn.batch_norm(x, state, s, b, training=True, epsilon=eps, fused=fused)
      return jnp.sum(jnp.sin(y) * jnp.broadcast_to(jnp.arange(1.0, 5.0), y.shape))

    argnums = (0, 3) if scale_spec is None else (0, 1, 2, 3)
    with jax.set_mesh(mesh):
      return jax.jit(jax.grad(loss, argnums))(x, put(s), put(b), 0.1)

  got, want = grads(True), grads(False)
  for a, c in zip(got, want):
    assert jax.typeof(a).sharding.spec == jax.typeof(c).sharding.spec
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)


def test_fused_under_explicit_mesh_sharded_along_features_only():
  mesh = jax.make_mesh((8,), ("f",), axis_types=(AxisType.Explicit,))
  x, s, b = _args((6, 16), -1)
  x = jax.device_put(x, NamedSharding(mesh, P(None, "f")))
  per_feature = lambda v: jax.device_put(v, NamedSharding(mesh, P("f")))
  state = jaxbn.init_state(16)
  state = state._replace(mean=per_feature(state.mean), var=per_feature(state.var))

  def grads(fused):
    def loss(x, s, b):
      y, new = jaxbn.batch_norm(x, state, s, b, training=True, fused=fused)
      return jnp.sum(jnp.sin(y)), new

    return jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))(x, per_feature(s), per_feature(b))

  (got, got_state), (want, want_state) = grads(True), grads(False)
  assert jax.typeof(got[0]).sharding.spec == P(None, "f")
  for a, c in zip(got + tuple(got_state), want + tuple(want_state)):
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)


def test_fused_with_per_device_scale_under_vmap_equals_plain():
  # Each mapped instance has its own scale: dx needs the sums of dy * scale over all instances.
  x, s, b = _args((4, 8, 3), -1)
  scales = jnp.stack([s * (1.0 + 0.5 * i) for i in range(4)])

  def grads(fused):
    def loss(x, s):
      y, _ = jaxbn.batch_norm(x, jaxbn.init_state(3), s, b, training=True, axis_name="d", fused=fused)
      return jnp.sum(jnp.sin(y) * jnp.broadcast_to(jnp.arange(1.0, 4.0), y.shape))

    return jax.jit(jax.vmap(jax.grad(loss, (0, 1)), axis_name="d"))(x, scales)

  for a, c in zip(grads(True), grads(False)):
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
