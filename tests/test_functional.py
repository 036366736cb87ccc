"""jaxbn.batch_norm: running averages, evaluation, masks, numerics, transformations and errors."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn


def _x(shape=(32, 4), loc=1.0, scale=2.0, seed=0, dtype=np.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(loc, scale, shape), dtype)


def _batch_stats(x):
  x = np.asarray(x, np.float64)
  return x.mean(0), x.var(0), x.shape[0]


def test_training_normalizes_and_updates_ema():
  x = _x()
  scale, bias = jnp.array([1.0, 2.0, 0.5, -1.0]), jnp.array([0.0, 1.0, -1.0, 3.0])
  y, state = jaxbn.batch_norm(x, jaxbn.init_state(4), scale, bias, training=True, momentum=0.9)
  mean, var, _ = _batch_stats(x)
  want = (np.asarray(x) - mean) / np.sqrt(var + 1e-5) * np.asarray(scale) + np.asarray(bias)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state.mean, 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(state.var, 0.9 + 0.1 * var, rtol=1e-5)
  assert state.count == 1 and state.count.dtype == jnp.int32


def test_evaluation_uses_running_statistics_and_keeps_state():
  x = _x()
  state = jaxbn.BatchNormState(jnp.full(4, 0.5), jnp.full(4, 4.0), jnp.array(7, jnp.int32))
  y, new_state = jaxbn.batch_norm(x, state, training=False, epsilon=1e-3)
  np.testing.assert_allclose(y, (np.asarray(x) - 0.5) / np.sqrt(4.0 + 1e-3), rtol=1e-6)
  assert new_state is state


def test_cumulative_average_weights_batches_equally():
  xs = [_x(seed=s, loc=s) for s in range(4)]
  state = jaxbn.init_state(4)
  for x in xs:
    _, state = jaxbn.batch_norm(x, state, training=True, running_average="cumulative")
  means = np.stack([_batch_stats(x)[0] for x in xs])
  variances = np.stack([_batch_stats(x)[1] for x in xs])
  np.testing.assert_allclose(state.mean, means.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.var, variances.mean(0), rtol=1e-5)
  assert state.count == 4


def test_debiased_ema_starts_from_first_batch_and_debiases():
  m = 0.9
  xs = [_x(seed=s, loc=2.0 * s) for s in range(3)]
  state = jaxbn.init_state(4)
  hidden = np.zeros(4)
  for t, x in enumerate(xs, start=1):
    _, state = jaxbn.batch_norm(x, state, training=True, momentum=m, running_average="debiased_ema")
    hidden = m * hidden + (1 - m) * _batch_stats(x)[0]
    np.testing.assert_allclose(state.mean, hidden / (1 - m**t), rtol=1e-5, atol=1e-6)
    if t == 1:
      np.testing.assert_allclose(state.mean, _batch_stats(x)[0], rtol=1e-6, atol=1e-6)


def test_unbiased_running_variance_is_bessel_corrected():
  x = _x(shape=(10, 3))
  _, state = jaxbn.batch_norm(x, jaxbn.init_state(3), training=True, momentum=0.0, unbiased_running_var=True)
  np.testing.assert_allclose(state.var, np.var(np.asarray(x, np.float64), axis=0, ddof=1), rtol=1e-5)


@pytest.mark.parametrize("mode", ["ema", "debiased_ema", "cumulative"])
def test_batch_without_valid_elements_changes_nothing(mode):
  x = _x()
  state = jaxbn.BatchNormState(jnp.full(4, 0.5), jnp.full(4, 2.0), jnp.array(3, jnp.int32))
  mask = jnp.zeros((32, 1), bool)

  def loss(v, s, b):
    y, new = jaxbn.batch_norm(v, state, s, b, training=True, mask=mask, running_average=mode)
    return jnp.sum(y**2), (y, new)

  grads, (y, new_state) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, jnp.ones(4), jnp.zeros(4))
  for leaf in jax.tree.leaves((y, grads)):
    assert np.all(np.isfinite(leaf))
  for got, want in zip(new_state, state):
    np.testing.assert_array_equal(got, want)


def test_masked_statistics_use_only_valid_rows():
  x = _x(shape=(20, 3))
  mask = jnp.arange(20)[:, None] < 6
  y, state = jaxbn.batch_norm(x, jaxbn.init_state(3), training=True, mask=mask, momentum=0.0)
  mean, var, _ = _batch_stats(x[:6])
  np.testing.assert_allclose(state.mean, mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.var, var, rtol=1e-5)
  np.testing.assert_allclose(y, (np.asarray(x) - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [None, True, False], ids=["default", "fused", "plain"])
def test_feature_without_valid_element_outputs_bias_with_zero_gradient(fused):
  # Feature 1 has no valid element, so no statistics: it normalizes to 0 and y = bias. Its mean and
  # variance read 0, which gave x / sqrt(epsilon) (640 for x = 2 at epsilon = 1e-5).
  x = _x(shape=(8, 3), seed=11) * 10.0
  mask = jnp.ones((8, 3), bool).at[:, 1].set(False)
  scale, bias = jnp.array([1.5, 2.0, 0.5]), jnp.array([0.1, -0.3, 0.2])
  w = _x(shape=(8, 3), seed=12)

  def loss(x, scale, bias, epsilon, cols=slice(None)):
    y, _ = jaxbn.batch_norm(
      x[:, cols], jaxbn.init_state(x[:, cols].shape[1]), scale[cols], bias[cols], training=True,
      mask=mask[:, cols], epsilon=epsilon, fused=fused,
    )  # fmt: skip
    return jnp.sum(y * w[:, cols]), y

  grad = lambda **kw: jax.jit(jax.value_and_grad(partial(loss, **kw), (0, 1, 2, 3), has_aux=True))
  (_, y), (dx, dscale, dbias, deps) = grad()(x, scale, bias, 1e-5)
  np.testing.assert_array_equal(y[:, 1], bias[1])
  np.testing.assert_array_equal(dx[:, 1], 0.0)
  np.testing.assert_array_equal(dscale[1], 0.0)
  np.testing.assert_allclose(dbias[1], jnp.sum(w[:, 1]), rtol=1e-6)
  # The other features are batch norm of those features alone, gradients (epsilon's too) included.
  (_, ry), (rdx, rdscale, rdbias, rdeps) = grad(cols=slice(None, None, 2))(x, scale, bias, 1e-5)
  np.testing.assert_allclose(y[:, ::2], ry, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dx[:, ::2], rdx[:, ::2], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dscale[::2], rdscale[::2], rtol=1e-5)
  np.testing.assert_allclose(dbias[::2], rdbias[::2], rtol=1e-5)
  np.testing.assert_allclose(deps, rdeps, rtol=1e-5)


def test_bfloat16_mean_100_gives_finite_unit_variance_output():
  x = _x(shape=(4096, 8), loc=100.0, scale=1.0, dtype=jnp.bfloat16)
  y, state = jaxbn.batch_norm(x, jaxbn.init_state(8), training=True)
  assert y.dtype == jnp.bfloat16 and state.mean.dtype == jnp.float32
  y32 = np.asarray(y.astype(jnp.float32))
  assert np.all(np.isfinite(y32))
  np.testing.assert_allclose(y32.var(0), 1.0, rtol=0.02)


def test_output_dtype_follows_input_unless_given():
  x = _x(dtype=jnp.float16)
  y, _ = jaxbn.batch_norm(x, jaxbn.init_state(4), training=True)
  assert y.dtype == jnp.float16
  y, _ = jaxbn.batch_norm(x, jaxbn.init_state(4), training=True, dtype=jnp.float32)
  assert y.dtype == jnp.float32


def test_jit_grad_and_vmap():
  x = _x(shape=(3, 16, 4))
  state = jaxbn.init_state(4)

  @jax.jit
  def loss(v, scale, bias):
    y, _ = jaxbn.batch_norm(v, state, scale, bias, training=True)
    return jnp.sum(jax.nn.relu(y) ** 2)

  def plain(v, scale, bias):
    mean = v.mean((0, 1), keepdims=True)
    var = ((v - mean) ** 2).mean((0, 1), keepdims=True)
    y = (v - mean) / jnp.sqrt(var + 1e-5) * scale[None, None] + bias[None, None]
    return jnp.sum(jax.nn.relu(y) ** 2)

  args = (x, jnp.linspace(0.5, 2.0, 4), jnp.linspace(-1.0, 1.0, 4))
  for got, want in zip(jax.grad(loss, (0, 1, 2))(*args), jax.grad(plain, (0, 1, 2))(*args)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

  ys, states = jax.vmap(lambda v: jaxbn.batch_norm(v, state, training=True))(x)
  for i in range(3):
    y_i, s_i = jaxbn.batch_norm(x[i], state, training=True)
    np.testing.assert_allclose(ys[i], y_i, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(states.mean[i], s_i.mean, rtol=1e-6)


def test_state_is_a_pytree_that_scans():
  xs = _x(shape=(5, 16, 4))
  step = lambda s, v: (jaxbn.batch_norm(v, s, training=True, momentum=0.5)[1], None)
  scanned, _ = jax.lax.scan(step, jaxbn.init_state(4), xs)
  looped = jaxbn.init_state(4)
  for v in xs:
    looped = step(looped, v)[0]
  for a, b in zip(scanned, looped):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_init_state_shapes():
  s = jaxbn.init_state((3, 2))
  assert s.mean.shape == s.var.shape == (3, 2) and s.count.shape == ()
  np.testing.assert_array_equal(s.var, 1.0)


# ---- bad input: one test per case, each raised at trace time -------------------------------


def _call(**kw):
  x = kw.pop("x", jnp.ones((4, 3)))
  state = kw.pop("state", jaxbn.init_state(3))
  return jaxbn.batch_norm(x, state, training=kw.pop("training", True), **kw)


def _traced(**kw):
  """Raises while tracing, before anything runs."""
  return jax.jit(lambda: _call(**kw)).trace()


def test_error_axis_out_of_range():
  with pytest.raises(ValueError, match=r"jaxbn.batch_norm: axis=5 is out of range .* 2 dimensions"):
    _traced(axis=5)


def test_error_axis_repeated():
  with pytest.raises(ValueError, match=r"jaxbn.batch_norm: axis=\(1, -1\) names the same axis more than once"):
    _traced(axis=(1, -1))


def test_error_scale_shape():
  with pytest.raises(ValueError, match=r"jaxbn.batch_norm: scale must have the feature shape \(3,\).*got shape \(4,\)"):
    _traced(scale=jnp.ones(4))


def test_error_bias_shape():
  with pytest.raises(ValueError, match=r"jaxbn.batch_norm: bias must have the feature shape \(3,\)"):
    _traced(bias=jnp.ones((1, 3)))


def test_error_state_shape():
  with pytest.raises(ValueError, match=r"jaxbn.batch_norm: state.mean must have the feature shape \(3,\).*\(5,\)"):
    _traced(state=jaxbn.init_state(5))


def test_error_state_type():
  with pytest.raises(TypeError, match=r"jaxbn.batch_norm: state must be a jaxbn.BatchNormState"):
    _traced(state={"mean": jnp.zeros(3), "var": jnp.ones(3)})


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64])
def test_error_non_floating_input(dtype):
  with pytest.raises(
    TypeError, match=rf"jaxbn.batch_norm: x must have a real floating dtype .* got {jnp.dtype(dtype)}"
  ):
    _traced(x=jnp.ones((4, 3), dtype))


def test_error_momentum_out_of_range():
  with pytest.raises(ValueError, match=r"jaxbn.batch_norm: momentum must be in \[0, 1\], got 1.5"):
    _traced(momentum=1.5)


def test_error_epsilon_not_positive():
  with pytest.raises(ValueError, match=r"jaxbn.batch_norm: epsilon must be > 0, got 0.0"):
    _traced(epsilon=0.0)


def test_error_unknown_running_average():
  with pytest.raises(ValueError, match=r"jaxbn.batch_norm: running_average must be one of .* got 'median'"):
    _traced(running_average="median")


def test_error_mask_not_broadcastable():
  with pytest.raises(
    ValueError, match=r"jaxbn.batch_norm: mask of shape \(5, 1\) is not broadcastable to x of shape \(4, 3\)"
  ):
    _traced(mask=jnp.ones((5, 1), bool))


def test_error_mask_not_boolean():
  with pytest.raises(TypeError, match=r"jaxbn.batch_norm: mask must be a boolean array"):
    _traced(mask=jnp.ones((4, 1), jnp.float32))


def test_error_axis_name_not_bound():
  with pytest.raises(
    ValueError, match=r"(?s)jaxbn.batch_norm: axis_name='batch' is not bound.*jax.shard_map.*axis_name=None"
  ):
    _traced(axis_name="batch")


def test_error_groups_without_axis_name():
  with pytest.raises(ValueError, match=r"jaxbn.batch_norm: axis_index_groups=.* needs an axis_name"):
    _traced(axis_index_groups=[[0, 1]])


def test_error_moments_axis():
  with pytest.raises(ValueError, match=r"jaxbn.moments: axis=-3 is out of range"):
    jaxbn.moments(jnp.ones((4, 3)), axis=-3)


def test_error_init_state():
  with pytest.raises(ValueError, match=r"jaxbn.init_state: num_features must be a positive int"):
    jaxbn.init_state(0)


# ---- property-based: batch_norm against a float64 NumPy reference ------------------------


def _np_batch_norm(x, axes, mask, scale, bias, state_mean, state_var, momentum, eps):
  x = np.asarray(x, np.float64)
  red = tuple(a for a in range(x.ndim) if a not in axes)
  m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
  n = m.sum(axis=red)
  mean = np.where(m, x, 0).sum(axis=red) / np.maximum(n, 1)
  b = [x.shape[a] if a in axes else 1 for a in range(x.ndim)]
  var = np.where(m, (x - mean.reshape(b)) ** 2, 0).sum(axis=red) / np.maximum(n, 1)
  y = (x - mean.reshape(b)) / np.sqrt(var.reshape(b) + eps) * scale.reshape(b) + bias.reshape(b)
  ok = n > 0
  y = np.where(ok.reshape(b), y, bias.reshape(b))  # a feature with no valid element normalizes to 0
  new_mean = np.where(ok, momentum * state_mean + (1 - momentum) * mean, state_mean)
  new_var = np.where(ok, momentum * state_var + (1 - momentum) * var, state_var)
  return y, new_mean, new_var


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(
  ndim=st.integers(2, 4),
  seed=st.integers(0, 2**31 - 1),
  dtype=st.sampled_from([np.float32, jnp.bfloat16, np.float16]),
  masked=st.booleans(),
  fused=st.sampled_from([None, False]),
)
def test_property_batch_norm_matches_reference(ndim, seed, dtype, masked, fused):
  rng = np.random.default_rng(seed)
  shape = tuple(int(d) for d in rng.integers(1, 6, ndim))
  axes = tuple(sorted(rng.choice(ndim, size=int(rng.integers(1, ndim)), replace=False).tolist()))
  fshape = tuple(shape[a] for a in axes)
  x = jnp.asarray(rng.normal(rng.uniform(-20, 20), rng.uniform(0.5, 3), shape), dtype)
  mask = rng.random(shape[:1] + (1,) * (ndim - 1)) > 0.3 if masked else None
  scale, bias = rng.normal(1, 0.2, fshape), rng.normal(0, 0.2, fshape)
  state = jaxbn.BatchNormState(
    jnp.asarray(rng.normal(size=fshape), jnp.float32),
    jnp.asarray(rng.uniform(0.5, 2, fshape), jnp.float32),
    jnp.array(0),
  )
  run = jax.jit(partial(jaxbn.batch_norm, training=True, axis=axes, momentum=0.8, fused=fused))
  y, new = run(x, state, jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32), mask=mask)
  ry, rmean, rvar = _np_batch_norm(
    np.asarray(x.astype(jnp.float32)), axes, mask, scale, bias, np.asarray(state.mean), np.asarray(state.var), 0.8, 1e-5
  )
  tol = 1e-4 if dtype == np.float32 else 2e-2
  assert y.dtype == x.dtype
  np.testing.assert_allclose(np.asarray(y, np.float64), ry, rtol=tol, atol=tol * 10)
  np.testing.assert_allclose(new.mean, rmean, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(new.var, rvar, rtol=1e-4, atol=1e-4)


# ---- running-average numerics: exact copies, wide states, per-feature counts ---------------------


def _tiny_var_batch():
  """Columns with variances 1e-8, 1e-6, 1e-4: far below the initial running variance 1."""
  rng = np.random.default_rng(0)
  return (rng.normal(size=(64, 3)) * np.array([1e-4, 1e-3, 1e-2])).astype(np.float32)


@pytest.mark.parametrize(("mode", "momentum"), [("cumulative", 0.9), ("debiased_ema", 0.9), ("ema", 0.0)])
def test_weight_one_update_copies_the_batch_statistics(mode, momentum):
  """At weight 1 the state is the batch's statistics bit for bit; old + w*(new - old) rounded 1e-8 to 0."""
  torch = pytest.importorskip("torch", reason="the torch peer is not installed: pip install -e '.[peers]'")
  x = _tiny_var_batch()
  stats = jaxbn.stats.local_stats(jnp.asarray(x), (1,))
  new = jaxbn.functional.update_running_stats(
    jaxbn.init_state(3), stats, momentum=momentum, running_average=mode, unbiased_running_var=True
  )
  np.testing.assert_array_equal(new.mean, stats.mean)
  np.testing.assert_array_equal(new.var, stats.m2 / (stats.count - 1))
  bn = torch.nn.BatchNorm1d(3, momentum=None)  # cumulative: the first batch is taken whole
  bn(torch.tensor(x))
  _, state = jaxbn.batch_norm(
    x, jaxbn.init_state(3), training=True, momentum=momentum, running_average=mode, unbiased_running_var=True
  )
  np.testing.assert_allclose(state.var, bn.running_var.numpy(), rtol=1e-5)
  np.testing.assert_allclose(state.mean, bn.running_mean.numpy(), rtol=1e-5, atol=1e-9)


def test_ema_update_is_flax_bit_for_bit():
  """Batches whose statistics are exact in float32, so that only the blend formula can differ."""
  import flax.linen as nn

  rng = np.random.default_rng(1)
  xs = [jnp.asarray(rng.integers(-8, 9, (4, 3)) * 0.5 + k, jnp.float32) for k in range(4)]
  module = nn.BatchNorm(use_running_average=False, momentum=0.9)
  variables = module.init(jax.random.key(0), xs[0])
  state = jaxbn.init_state(3)
  for x in xs:
    _, updated = module.apply(variables, x, mutable=["batch_stats"])
    variables = {**variables, **updated}
    _, state = jaxbn.batch_norm(x, state, training=True, momentum=0.9)
    np.testing.assert_array_equal(state.mean, variables["batch_stats"]["mean"])
    np.testing.assert_array_equal(state.var, variables["batch_stats"]["var"])


def test_float64_state_is_not_rounded_by_float32_input():
  with jax.enable_x64(True):
    old_mean = np.array([1e6 + 0.123456789, -3.0e5 + 0.987654321])
    state = jaxbn.init_state(2, dtype=jnp.float64)._replace(mean=jnp.asarray(old_mean))
    x = jnp.asarray([[1.0, 2.0], [3.0, 5.0]], jnp.float32)
    _, frozen = jaxbn.batch_norm(x, state, training=True, momentum=1.0)
    assert frozen.mean.dtype == frozen.var.dtype == jnp.float64
    np.testing.assert_array_equal(frozen.mean, old_mean)
    _, half = jaxbn.batch_norm(x, state, training=True, momentum=0.5)
    np.testing.assert_allclose(half.mean, 0.5 * old_mean + 0.5 * np.array([2.0, 3.5]), rtol=1e-15)
    np.testing.assert_allclose(half.var, 0.5 + 0.5 * np.array([1.0, 2.25]), rtol=1e-15)


@pytest.mark.parametrize("mode", ["cumulative", "debiased_ema"])
def test_per_feature_count_weights_each_feature_by_its_own_updates(mode):
  """Feature 1 is masked out of batch 1: with a per-feature count it ends as if it had seen batch 2 only."""
  b1, m1 = jnp.array([[1.0, 10.0], [3.0, 20.0]]), jnp.array([[True, False], [True, False]])
  b2, b3 = jnp.array([[5.0, 100.0], [7.0, 104.0]]), jnp.array([[0.0, 90.0], [4.0, 96.0]])
  run = partial(jaxbn.batch_norm, training=True, running_average=mode, momentum=0.9)
  state = jaxbn.init_state(2, per_feature_count=True)
  _, state = run(b1, state, mask=m1)
  np.testing.assert_array_equal(state.count, [1, 0])
  _, state = run(b2, state)
  _, state = run(b3, state)
  np.testing.assert_array_equal(state.count, [3, 2])
  # Each feature against a fresh scalar-count state that saw only that feature's batches.
  ref0, ref1 = jaxbn.init_state(1), jaxbn.init_state(1)
  for b in (b1, b2, b3):
    _, ref0 = run(b[:, :1], ref0)
  for b in (b2, b3):
    _, ref1 = run(b[:, 1:], ref1)
  np.testing.assert_allclose(state.mean, [ref0.mean[0], ref1.mean[0]], rtol=1e-6)
  np.testing.assert_allclose(state.var, [ref0.var[0], ref1.var[0]], rtol=1e-6)
  if mode == "cumulative":  # and against the float64 equal-weight average of batch statistics
    np.testing.assert_allclose(state.mean[1], (102.0 + 93.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(state.var[1], (4.0 + 9.0) / 2, rtol=1e-6)
  # The default scalar count is unchanged: one count, incremented when any feature is seen.
  scalar = jaxbn.init_state(2)
  for b, m in ((b1, m1), (b2, None), (b3, None)):
    _, scalar = run(b, scalar, mask=m)
  assert scalar.count.shape == () and int(scalar.count) == 3
  np.testing.assert_allclose(scalar.mean[0], state.mean[0], rtol=1e-6)


def test_state_count_as_python_int_and_numpy_sizes_are_accepted():
  state = jaxbn.init_state(np.int64(3))
  assert state.mean.shape == (3,)
  assert jaxbn.init_state((np.int64(2), 3)).mean.shape == (2, 3)
  x = _x(shape=(8, 3))
  _, new = jaxbn.batch_norm(x, jaxbn.BatchNormState(state.mean, state.var, 0), training=True, momentum=0.0)
  assert new.count.dtype == jnp.int32 and int(new.count) == 1
  np.testing.assert_allclose(new.mean, _batch_stats(x)[0], rtol=1e-5, atol=1e-6)


def test_normalize_accepts_negative_and_int_feature_axes():
  x = _x(shape=(4, 5, 3))
  mean, var = jnp.linspace(-1.0, 1.0, 3), jnp.linspace(0.5, 2.0, 3)
  want = (np.asarray(x) - np.asarray(mean)) / np.sqrt(np.asarray(var) + 1e-5)
  for axes in ((-1,), -1, (2,), 2):
    got = jaxbn.functional.normalize(x, mean, var, None, None, feature_axes=axes, epsilon=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---- bad input to the other public helpers and the remaining batch_norm arguments ----------------


@pytest.mark.parametrize(
  ("kw", "err", "match"),
  [
    ({"axis": None}, TypeError, r"jaxbn.batch_norm: axis must be an int or a sequence of ints .* got None"),
    ({"axis": 1.0}, TypeError, r"jaxbn.batch_norm: axis must be an int or a sequence of ints .* got 1.0"),
    ({"epsilon": None}, TypeError, r"jaxbn.batch_norm: epsilon must be a number, got None"),
    ({"epsilon": float("inf")}, ValueError, r"jaxbn.batch_norm: epsilon must be finite and > 0, got inf"),
    ({"training": "no"}, TypeError, r"jaxbn.batch_norm: training must be a Python bool \(True or False\), got 'no'"),
    ({"dtype": "bad"}, TypeError, r"jaxbn.batch_norm: dtype must be None or a real floating dtype .* got 'bad'"),
    ({"dtype": jnp.int32}, TypeError, r"jaxbn.batch_norm: dtype must be None or a real floating dtype"),
    ({"fused": "yes"}, TypeError, r"jaxbn.batch_norm: fused must be None, True or False, got 'yes'"),
    (
      {"state": jaxbn.BatchNormState(jnp.zeros(3), jnp.ones(3), jnp.zeros(2, jnp.int32))},
      ValueError,
      r"jaxbn.batch_norm: state.count must be a scalar .* feature shape \(3,\) .* got shape \(2,\)",
    ),
  ],
)
def test_error_bad_arguments(kw, err, match):
  with pytest.raises(err, match=match):
    _traced(**kw)


def test_error_traced_training_says_to_make_it_static():
  with pytest.raises(
    TypeError, match=r"(?s)jaxbn.batch_norm: training must be a Python bool .*traced.*static_argnames"
  ):
    jax.jit(lambda t: _call(training=t))(True)


def test_error_update_running_stats_arguments():
  update = jaxbn.functional.update_running_stats
  stats = jaxbn.stats.local_stats(jnp.ones((4, 3)), (1,))
  fn = "jaxbn.update_running_stats"
  with pytest.raises(ValueError, match=rf"{fn}: running_average must be one of .* got 'EMA'"):
    update(jaxbn.init_state(3), stats, running_average="EMA")
  with pytest.raises(ValueError, match=rf"{fn}: momentum must be in \[0, 1\], got 5.0"):
    update(jaxbn.init_state(3), stats, momentum=5.0)
  with pytest.raises(ValueError, match=rf"{fn}: stats\.count must have the shape of state.mean \(4,\)"):
    update(jaxbn.init_state(4), stats)


def test_error_normalize_arguments():
  x, v = jnp.ones((4, 3)), jnp.ones(3)
  fn = "jaxbn.normalize"
  with pytest.raises(ValueError, match=rf"{fn}: feature_axes=\(2,\) is out of range"):
    jaxbn.functional.normalize(x, v, v, None, None, feature_axes=(2,), epsilon=1e-5)
  with pytest.raises(ValueError, match=rf"{fn}: mean must have the feature shape \(4,\)"):
    jaxbn.functional.normalize(x, v, v, None, None, feature_axes=0, epsilon=1e-5)


def test_error_init_state_dtype_and_count_flag():
  with pytest.raises(TypeError, match=r"jaxbn.init_state: dtype must be a real floating dtype .* got <class"):
    jaxbn.init_state(3, dtype=jnp.int32)
  with pytest.raises(TypeError, match=r"jaxbn.init_state: per_feature_count must be a Python bool .* got 'yes'"):
    jaxbn.init_state(3, per_feature_count="yes")
  with pytest.raises(ValueError, match=r"jaxbn.init_state: num_features must be a positive int .* got 2.0"):
    jaxbn.init_state(2.0)
