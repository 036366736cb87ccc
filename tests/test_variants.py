"""Ghost batch norm and batch renormalization against exact references.

Ghost batch norm is checked against jaxbn.batch_norm run on each sub-batch separately (outputs and
gradients) and against batch norm on the whole batch (running statistics); batch renormalization
against plain batch norm at rmax=1, dmax=0 and against a float64 NumPy transcription of Ioffe
(2017) otherwise.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn.variants import batch_renorm, ghost_batch_norm, paper_dmax, paper_rmax, renorm_schedule

TOL = {"rtol": 1e-5, "atol": 1e-5}
KW = {"momentum": 0.9, "epsilon": 1e-5}


def _data(shape, axis, seed=0):
  rng = np.random.default_rng(seed)
  axes = tuple(sorted(a % len(shape) for a in np.atleast_1d(axis)))
  fshape = tuple(shape[a] for a in axes)
  x = jnp.asarray(rng.normal(2.0, 3.0, shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=shape), jnp.float32)
  scale = jnp.asarray(rng.normal(1.0, 0.2, fshape), jnp.float32)
  bias = jnp.asarray(rng.normal(0.0, 0.2, fshape), jnp.float32)
  return x, w, scale, bias, fshape


CASES = [
  pytest.param((12, 5), -1, 4, False, id="2D-divisible"),
  pytest.param((10, 5), -1, 4, True, id="2D-partial-last-masked"),
  pytest.param((6, 4, 3, 3), 1, 4, False, id="NCHW-partial"),
  pytest.param((3, 8, 4), 0, 3, True, id="feature-axis-first-masked"),  # the batch axis is then axis 1
]


@pytest.mark.parametrize("shape,axis,size,masked", CASES)
def test_ghost_equals_batch_norm_on_each_sub_batch(shape, axis, size, masked):
  x, w, scale, bias, fshape = _data(shape, axis)
  axes = tuple(sorted(a % len(shape) for a in np.atleast_1d(axis)))
  b = next(a for a in range(len(shape)) if a not in axes)
  mask = None
  if masked:
    mshape = tuple(s if a <= b else 1 for a, s in enumerate(shape))
    mask = jnp.asarray(np.random.default_rng(1).random(mshape) > 0.3)
  state = jaxbn.init_state(fshape)._replace(mean=jnp.full(fshape, 0.5), var=jnp.full(fshape, 2.0))

  def ghost(x, scale, bias):
    y, new = ghost_batch_norm(x, state, scale, bias, ghost_batch_size=size, training=True, axis=axis, mask=mask, **KW)
    return jnp.sum(y * w), (y, new)

  def reference(x, scale, bias):
    ys = []
    for start in range(0, shape[b], size):
      sl = (slice(None),) * b + (slice(start, start + size),)
      m = None if mask is None else mask[sl]
      y, _ = jaxbn.batch_norm(x[sl], state, scale, bias, training=True, axis=axis, mask=m, **KW)
      ys.append(y)
    y = jnp.concatenate(ys, axis=b)
    return jnp.sum(y * w), y

  (g, (y, new)) = jax.jit(jax.grad(ghost, (0, 1, 2), has_aux=True))(x, scale, bias)
  (rg, ry) = jax.jit(jax.grad(reference, (0, 1, 2), has_aux=True))(x, scale, bias)
  np.testing.assert_allclose(y, ry, **TOL)
  for a, r in zip(g, rg, strict=True):
    np.testing.assert_allclose(a, r, **TOL)
  # Running statistics: one update from the whole batch, as plain batch norm.
  _, full = jaxbn.batch_norm(x, state, training=True, axis=axis, mask=mask, **KW)
  np.testing.assert_allclose(new.mean, full.mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(new.var, full.var, rtol=1e-6, atol=1e-6)
  assert int(new.count) == 1


def test_ghost_running_stats_match_float64_reference():
  x, _, _, _, _ = _data((10, 3), -1)
  _, new = ghost_batch_norm(x, jaxbn.init_state(3), ghost_batch_size=3, training=True, momentum=0.0)
  x64 = np.asarray(x, np.float64)
  np.testing.assert_allclose(new.mean, x64.mean(0), rtol=1e-6)
  np.testing.assert_allclose(new.var, x64.var(0), rtol=1e-6)
  _, unbiased = ghost_batch_norm(
    x, jaxbn.init_state(3), ghost_batch_size=3, training=True, momentum=0.0, unbiased_running_var=True
  )
  np.testing.assert_allclose(unbiased.var, x64.var(0, ddof=1), rtol=1e-6)


@pytest.mark.parametrize("rows", [1, 7])
def test_ghost_eval_works_for_any_batch_size(rows):
  x, _, scale, bias, _ = _data((rows, 3), -1)
  state = jaxbn.BatchNormState(jnp.array([1.0, 2.0, 3.0]), jnp.array([4.0, 1.0, 0.25]), jnp.array(7))
  y, same = jax.jit(functools.partial(ghost_batch_norm, ghost_batch_size=4, training=False))(x, state, scale, bias)
  ref, _ = jaxbn.batch_norm(x, state, scale, bias, training=False)
  np.testing.assert_allclose(y, ref, **TOL)
  assert same is not None and int(same.count) == 7


def test_ghost_larger_than_batch_is_batch_norm():
  x, _, scale, bias, _ = _data((6, 3), -1)
  state = jaxbn.init_state(3)
  y, new = ghost_batch_norm(x, state, scale, bias, ghost_batch_size=64, training=True)
  ry, rnew = jaxbn.batch_norm(x, state, scale, bias, training=True)
  np.testing.assert_allclose(y, ry, **TOL)
  np.testing.assert_allclose(new.var, rnew.var, rtol=1e-6)


def test_ghost_with_axis_name_keeps_chunks_local_and_merges_running_stats():
  devices, rows, size = 8, 6, 4
  x, _, scale, bias, _ = _data((devices * rows, 3), -1, seed=5)
  mesh = jax.make_mesh((devices,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  state = jaxbn.init_state(3)

  def body(x):
    return ghost_batch_norm(x, state, scale, bias, ghost_batch_size=size, training=True, axis_name="d", **KW)

  y, new = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=(P("d"), P())))(x)
  ref = [
    ghost_batch_norm(x[i * rows : (i + 1) * rows], state, scale, bias, ghost_batch_size=size, training=True, **KW)[0]
    for i in range(devices)
  ]
  np.testing.assert_allclose(y, jnp.concatenate(ref), **TOL)
  _, full = jaxbn.batch_norm(x, state, training=True, **KW)
  np.testing.assert_allclose(new.mean, full.mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(new.var, full.var, rtol=1e-6, atol=1e-6)


def test_ghost_half_precision_input():
  x, _, scale, bias, _ = _data((8, 4), -1)
  y, new = ghost_batch_norm(x.astype(jnp.bfloat16), jaxbn.init_state(4), scale, bias, ghost_batch_size=4, training=True)
  assert y.dtype == jnp.bfloat16 and new.mean.dtype == jnp.float32
  ref = jnp.concatenate(
    [
      jaxbn.batch_norm(x[i : i + 4].astype(jnp.bfloat16), jaxbn.init_state(4), scale, bias, training=True)[0]
      for i in (0, 4)
    ]
  )
  np.testing.assert_allclose(np.float32(y), np.float32(ref), rtol=1e-2, atol=1e-2)


def _renorm_reference(x, mean, var, scale, bias, rmax, dmax, eps):
  """Ioffe (2017), Algorithm 1, in float64 over axis 0."""
  x = np.asarray(x, np.float64)
  mu_b, var_b = x.mean(0), x.var(0)
  sigma_b, sigma = np.sqrt(var_b + eps), np.sqrt(np.asarray(var, np.float64) + eps)
  r = np.clip(sigma_b / sigma, 1 / rmax, rmax)
  d = np.clip((mu_b - mean) / sigma, -dmax, dmax)
  return ((x - mu_b) / sigma_b * r + d) * scale + bias


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_renorm_with_rmax_1_dmax_0_is_batch_norm(masked):
  x, w, scale, bias, _ = _data((16, 3, 3, 4), -1, seed=2)
  mask = jnp.asarray(np.random.default_rng(3).random((16, 1, 1, 1)) > 0.4) if masked else None
  state = jaxbn.BatchNormState(jnp.full((4,), 3.0), jnp.full((4,), 5.0), jnp.array(2))

  def loss(f, x, scale, bias, **kw):
    y, new = f(x, state, scale, bias, training=True, mask=mask, **KW, **kw)
    return jnp.sum(y * w), (y, new)

  renorm = jax.jit(jax.grad(functools.partial(loss, batch_renorm, rmax=1.0, dmax=0.0), (0, 1, 2), has_aux=True))
  g, (y, new) = renorm(x, scale, bias)
  plain = jax.jit(jax.grad(functools.partial(loss, jaxbn.batch_norm), (0, 1, 2), has_aux=True))
  rg, (ry, rnew) = plain(x, scale, bias)
  np.testing.assert_allclose(y, ry, **TOL)
  for a, r in zip(g, rg, strict=True):
    np.testing.assert_allclose(a, r, **TOL)
  for a, r in zip(new, rnew, strict=True):
    np.testing.assert_allclose(a, r, rtol=1e-6, atol=1e-6)
  # The paper's schedule is plain batch norm for the first 5k steps.
  y_paper, _ = batch_renorm(x, state, scale, bias, training=True, mask=mask, **KW)
  np.testing.assert_allclose(y_paper, ry, **TOL)


@pytest.mark.parametrize("rmax,dmax", [(1.5, 0.5), (1.1, 0.1)])
def test_renorm_matches_paper_formula(rmax, dmax):
  x, _, scale, bias, _ = _data((32, 3), -1, seed=4)
  mean, var = np.array([0.0, 2.0, 5.0]), np.array([1.0, 9.0, 30.0])
  state = jaxbn.BatchNormState(jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32), jnp.array(0))
  y, new = batch_renorm(x, state, scale, bias, training=True, rmax=rmax, dmax=dmax, **KW)
  ref = _renorm_reference(x, mean, var, np.asarray(scale), np.asarray(bias), rmax, dmax, KW["epsilon"])
  np.testing.assert_allclose(y, ref, **TOL)
  _, bn_state = jaxbn.batch_norm(x, state, training=True, **KW)
  np.testing.assert_allclose(new.mean, bn_state.mean, rtol=1e-6)
  np.testing.assert_allclose(new.var, bn_state.var, rtol=1e-6)


def test_renorm_gradient_holds_r_and_d_constant():
  x, w, scale, bias, _ = _data((16, 3), -1, seed=6)
  state = jaxbn.BatchNormState(jnp.array([1.0, 2.0, 3.0]), jnp.array([2.0, 5.0, 20.0]), jnp.array(0))
  eps = KW["epsilon"]

  def by_hand(x, scale, bias):
    mu, var = x.mean(0), x.var(0)
    sigma_b, sigma = jnp.sqrt(var + eps), jnp.sqrt(state.var + eps)
    r = jax.lax.stop_gradient(jnp.clip(sigma_b / sigma, 1 / 1.5, 1.5))
    d = jax.lax.stop_gradient(jnp.clip((mu - state.mean) / sigma, -0.5, 0.5))
    return jnp.sum(((((x - mu[None]) / sigma_b[None]) * r[None] + d[None]) * scale[None] + bias[None]) * w)

  def ours(x, scale, bias):
    y, _ = batch_renorm(x, state, scale, bias, training=True, rmax=1.5, dmax=0.5, **KW)
    return jnp.sum(y * w)

  grads = jax.jit(jax.grad(ours, (0, 1, 2)))(x, scale, bias)
  for a, r in zip(grads, jax.jit(jax.grad(by_hand, (0, 1, 2)))(x, scale, bias), strict=True):
    np.testing.assert_allclose(a, r, **TOL)


def test_renorm_schedule_reads_the_state_count():
  x, _, scale, bias, _ = _data((32, 3), -1, seed=7)
  mean, var = np.array([0.0, 2.0, 5.0]), np.array([1.0, 9.0, 30.0])
  for step, rmax, dmax in [(0, 1.0, 0.0), (15000, paper_rmax(15000), 2.5), (10**6, 3.0, 5.0)]:
    state = jaxbn.BatchNormState(jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32), jnp.array(step))
    y, new = jax.jit(functools.partial(batch_renorm, training=True, **KW))(x, state, scale, bias)
    ref = _renorm_reference(x, mean, var, np.asarray(scale), np.asarray(bias), float(rmax), dmax, KW["epsilon"])
    np.testing.assert_allclose(y, ref, **TOL)
    assert int(new.count) == step + 1


def test_paper_schedule_values():
  assert [float(paper_rmax(s)) for s in (0, 5000, 22500, 40000, 10**6)] == [1.0, 1.0, 2.0, 3.0, 3.0]
  assert [float(paper_dmax(s)) for s in (0, 5000, 15000, 25000, 10**6)] == [0.0, 0.0, 2.5, 5.0, 5.0]
  sched = renorm_schedule(start_value=2.0, end_value=1.0, start_step=0, end_step=4)
  np.testing.assert_allclose([sched(s) for s in range(6)], [2.0, 1.75, 1.5, 1.25, 1.0, 1.0])


def test_renorm_with_ghost_batches_gives_each_chunk_its_own_correction():
  x, _, scale, bias, _ = _data((12, 3), -1, seed=8)
  mean, var = np.array([0.0, 2.0, 5.0]), np.array([1.0, 9.0, 30.0])
  state = jaxbn.BatchNormState(jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32), jnp.array(0))
  y, new = batch_renorm(x, state, scale, bias, training=True, rmax=2.0, dmax=1.0, ghost_batch_size=4, **KW)
  ref = np.concatenate(
    [_renorm_reference(x[i : i + 4], mean, var, np.asarray(scale), np.asarray(bias), 2.0, 1.0, 1e-5) for i in (0, 4, 8)]
  )
  np.testing.assert_allclose(y, ref, **TOL)
  _, full = jaxbn.batch_norm(x, state, training=True, **KW)
  np.testing.assert_allclose(new.var, full.var, rtol=1e-6)


def test_renorm_eval_is_batch_norm_eval():
  x, _, scale, bias, _ = _data((5, 3), -1)
  state = jaxbn.BatchNormState(jnp.array([1.0, 2.0, 3.0]), jnp.array([4.0, 1.0, 0.25]), jnp.array(3))
  y, same = batch_renorm(x, state, scale, bias, training=False, rmax=2.0, dmax=1.0)
  ref, _ = jaxbn.batch_norm(x, state, scale, bias, training=False)
  np.testing.assert_allclose(y, ref, **TOL)
  assert same is state


@pytest.mark.parametrize(
  "call,match",
  [
    (lambda x, s: ghost_batch_norm(x, s, ghost_batch_size=0, training=True), "ghost_batch_size must be a positive int"),
    (lambda x, s: ghost_batch_norm(x, s, ghost_batch_size=True, training=True), "ghost_batch_size"),
    (lambda x, s: ghost_batch_norm(x, s, ghost_batch_size=2.0, training=True), "ghost_batch_size"),
    (lambda x, s: ghost_batch_norm(x[0], s, ghost_batch_size=2, training=True), "every axis of x"),
    (lambda x, s: ghost_batch_norm(x, s, ghost_batch_size=2, training=True, momentum=2.0), "momentum"),
    (lambda x, s: batch_renorm(x, s, training=True, rmax=0.5), r"jaxbn.batch_renorm: rmax must be >= 1"),
    (lambda x, s: batch_renorm(x, s, training=True, dmax=-1.0), r"dmax must be >= 0"),
    (lambda x, s: batch_renorm(x, s, training=True, running_average="bad"), "running_average"),
    (lambda x, s: batch_renorm(x, s, training=True, axis_index_groups=[[0]]), "needs an axis_name"),
    (lambda x, s: renorm_schedule(start_value=1.0, end_value=2.0, start_step=5, end_step=5), "end_step"),
  ],
)
def test_bad_arguments_fail_at_trace_time_with_the_call_named(call, match):
  with pytest.raises(ValueError, match=match):
    call(jnp.ones((4, 3)), jaxbn.init_state(3))


def test_bad_input_types():
  with pytest.raises(TypeError, match=r"jaxbn\.ghost_batch_norm: x must have a real floating dtype"):
    ghost_batch_norm(jnp.ones((4, 3), jnp.int32), jaxbn.init_state(3), ghost_batch_size=2, training=True)
  with pytest.raises(TypeError, match=r"state must be a jaxbn\.BatchNormState"):
    batch_renorm(jnp.ones((4, 3)), {"mean": 0}, training=True)
  with pytest.raises(ValueError, match="scale must have the feature shape"):
    batch_renorm(jnp.ones((4, 3)), jaxbn.init_state(3), jnp.ones(2), training=True)


def test_modules_and_schedules_pickle_like_flax_modules():
  import pickle

  from flax import nnx

  import jaxbn.linen
  import jaxbn.nnx

  assert pickle.loads(pickle.dumps(paper_rmax)) == paper_rmax
  assert renorm_schedule(start_value=1.0, end_value=3.0, start_step=5000, end_step=40000) == paper_rmax
  assert hash(renorm_schedule(start_value=0.0, end_value=5.0, start_step=5000, end_step=25000)) == hash(paper_dmax)
  linen_bn = jaxbn.linen.BatchNorm(use_running_average=False, renorm=True)
  assert pickle.loads(pickle.dumps(linen_bn)) == linen_bn
  bn = jaxbn.nnx.BatchNorm(3, renorm=True, rngs=nnx.Rngs(0))
  copy = pickle.loads(pickle.dumps(bn))
  x = jnp.arange(12.0).reshape(4, 3)
  assert jnp.array_equal(copy(x), bn(x)) and copy.rmax == paper_rmax
  graphdef, _ = nnx.split(bn)
  pickle.loads(pickle.dumps(graphdef))


def test_variant_argument_checks_match_batch_norm():
  x, state = jnp.ones((8, 3)), jaxbn.init_state(3)
  y, _ = ghost_batch_norm(x, state, ghost_batch_size=np.int64(4), training=True)  # NumPy ints are ints
  assert y.shape == (8, 3)
  for fn in (ghost_batch_norm, batch_renorm):
    extra = {"ghost_batch_size": 4} if fn is ghost_batch_norm else {}
    with pytest.raises(ValueError, match=r"epsilon must be finite and > 0, got inf"):
      fn(x, state, training=True, epsilon=float("inf"), **extra)
    with pytest.raises(TypeError, match=r"training must be a Python bool"):
      jax.jit(lambda t, fn=fn, extra=extra: fn(x, state, training=t, **extra))(True)
