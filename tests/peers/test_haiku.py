"""running_average="debiased_ema" against haiku.BatchNorm's zero-debiased moving averages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

hk = pytest.importorskip("haiku", reason="the haiku peer (dm-haiku) is not installed: pip install -e '.[peers]'")


def test_debiased_ema_matches_haiku():
  decay = 0.9

  def forward(x, is_training):
    return hk.BatchNorm(create_scale=False, create_offset=False, decay_rate=decay, eps=1e-5)(x, is_training)

  model = hk.transform_with_state(forward)
  rng = np.random.default_rng(0)
  xs = [jnp.asarray(rng.normal(0.5 * i, 1.0 + 0.2 * i, (32, 4)), jnp.float32) for i in range(4)]
  params, hk_state = model.init(jax.random.key(0), xs[0], True)
  state = jaxbn.init_state(4)
  for x in xs:
    hy, hk_state = model.apply(params, hk_state, None, x, True)
    y, state = jaxbn.batch_norm(x, state, training=True, momentum=decay, running_average="debiased_ema")
    np.testing.assert_allclose(y, hy, rtol=1e-4, atol=1e-4)
    hmean = hk_state["batch_norm/~/mean_ema"]["average"].reshape(4)
    hvar = hk_state["batch_norm/~/var_ema"]["average"].reshape(4)
    np.testing.assert_allclose(state.mean, hmean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.var, hvar, rtol=1e-5, atol=1e-6)
  hy, _ = model.apply(params, hk_state, None, xs[0], False)
  y, _ = jaxbn.batch_norm(xs[0], state, training=False)
  np.testing.assert_allclose(y, hy, rtol=1e-4, atol=1e-4)
