"""jaxbn.batch_norm against flax.linen.BatchNorm(use_fast_variance=False) as an oracle."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

CASES = [
  pytest.param((8, 6, 6, 5), -1, id="NHWC"),
  pytest.param((8, 5, 6, 6), 1, id="NCHW"),
  pytest.param((64, 7), -1, id="2D"),
  pytest.param((6, 3, 5, 4), (1, 3), id="two-feature-axes"),
]


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_matches_flax_over_several_steps(shape, axis, masked):
  rng = np.random.default_rng(0)
  axes = tuple(sorted(a % len(shape) for a in np.atleast_1d(axis)))
  fshape = tuple(shape[a] for a in axes)
  module = nn.BatchNorm(axis=axis, momentum=0.9, use_fast_variance=False)
  xs = [jnp.asarray(rng.normal(1.0 + i, 2.0, shape), jnp.float32) for i in range(3)]
  mask = jnp.asarray(rng.random(shape[:1] + (1,) * (len(shape) - 1)) > 0.3) if masked else None
  variables = module.init(jax.random.key(0), xs[0], use_running_average=False)
  params = {
    "scale": jnp.asarray(rng.normal(1.0, 0.3, fshape), jnp.float32),
    "bias": jnp.asarray(rng.normal(0.0, 0.3, fshape), jnp.float32),
  }
  flax_stats = variables["batch_stats"]
  state = jaxbn.init_state(fshape)

  def flax_loss(x, p, s):
    y, upd = module.apply(
      {"params": p, "batch_stats": s}, x, use_running_average=False, mask=mask, mutable=["batch_stats"]
    )
    return jnp.sum(jax.nn.relu(y) ** 2 * jnp.arange(y.size).reshape(y.shape) / y.size), (y, upd["batch_stats"])

  def our_loss(x, p, s):
    y, new = jaxbn.batch_norm(x, s, p["scale"], p["bias"], training=True, axis=axis, momentum=0.9, mask=mask)
    return jnp.sum(jax.nn.relu(y) ** 2 * jnp.arange(y.size).reshape(y.shape) / y.size), (y, new)

  for x in xs:
    (fg, (fy, flax_stats)) = jax.jit(jax.grad(flax_loss, (0, 1), has_aux=True))(x, params, flax_stats)
    (og, (oy, state)) = jax.jit(jax.grad(our_loss, (0, 1), has_aux=True))(x, params, state)
    np.testing.assert_allclose(oy, fy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(og[0], fg[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(og[1]["scale"], fg[1]["scale"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(og[1]["bias"], fg[1]["bias"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.mean, flax_stats["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.var, flax_stats["var"], rtol=1e-5, atol=1e-6)

  # Evaluation with the accumulated statistics.
  fy = module.apply({"params": params, "batch_stats": flax_stats}, xs[0], use_running_average=True)
  oy, _ = jaxbn.batch_norm(xs[0], state, params["scale"], params["bias"], training=False, axis=axis)
  np.testing.assert_allclose(oy, fy, rtol=1e-5, atol=1e-5)


def test_flax_default_variance_fails_where_jaxbn_holds():
  # The failure jaxbn exists to avoid: flax's default one-pass variance at |mean|/std = 1e4.
  x = jnp.asarray(1e4 + np.random.default_rng(1).normal(0.0, 1.0, (4096, 4)), jnp.float32)
  true_var = np.var(np.asarray(x, np.float64), axis=0)
  _, upd = nn.BatchNorm(use_running_average=False, momentum=0.0).init_with_output(jax.random.key(0), x)
  _, upd = nn.BatchNorm(use_running_average=False, momentum=0.0).apply(upd, x, mutable=["batch_stats"])
  flax_err = np.max(np.abs(np.asarray(upd["batch_stats"]["var"]) / true_var - 1))
  _, state = jaxbn.batch_norm(x, jaxbn.init_state(4), training=True, momentum=0.0)
  ours_err = np.max(np.abs(np.asarray(state.var) / true_var - 1))
  assert ours_err <= 1e-3 < flax_err
