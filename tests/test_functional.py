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
    mean = v.mean((0, 1))
    var = ((v - mean) ** 2).mean((0, 1))
    y = (v - mean) / jnp.sqrt(var + 1e-5) * scale + bias
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
