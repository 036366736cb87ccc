"""Stability diagnostics of the full-batch step: sharpness of its objective, per-layer norms."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbn
from jaxbn.training import TrainState, full_batch_step, linen_loss, sharpness

xent = optax.softmax_cross_entropy_with_integer_labels


class Net(nn.Module):
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    for width in (6, 5):
      x = nn.Dense(width)(x)
      x = jaxbn.linen.BatchNorm(use_running_average=not train, axis_name=self.axis_name)(x)
      x = jnp.tanh(x)
    return nn.Dense(3)(x)


def _setup(n=24):
  rng = np.random.default_rng(0)
  data = {"x": jnp.asarray(rng.normal(size=(n, 4)) + 2.0, jnp.float32), "y": jnp.asarray(rng.integers(0, 3, n))}
  model = Net()
  variables = model.init(jax.random.key(0), data["x"][:2], train=False)
  return model, variables, data


# The sharpness itself (ghost and exact, every loop, 1 and 8 devices) and the per-layer gradient norms on 8
# devices are checked against the dense Hessian and the gradient of one flax pass in
# tests/test_derivative_oracles.py; here: how the step reports them.


def test_step_reports_sharpness_every_k_steps_and_layer_norms():
  model, variables, data = _setup()
  opt = optax.sgd(0.05)
  loss_fn = linen_loss(model, xent)
  step = full_batch_step(loss_fn, opt, micro_batch_size=8, sharpness_every=2, layer_norms=True, donate=False)
  measure = sharpness(loss_fn, micro_batch_size=8)
  state = TrainState.create(variables["params"], variables["batch_stats"], opt)
  for i in range(3):
    expected = float(measure(state, data)[0])
    new, metrics = step(state, data)
    if i % 2 == 0:
      np.testing.assert_allclose(float(metrics.sharpness), expected, rtol=1e-4)
    else:
      assert np.isnan(float(metrics.sharpness))
    grads = jax.tree.map(lambda a, b: (a - b) / 0.05, state.params, new.params)
    assert sorted(metrics.layer_grad_norms) == ["BatchNorm_0", "BatchNorm_1", "Dense_0", "Dense_1", "Dense_2"]
    for name, norm in metrics.layer_grad_norms.items():
      np.testing.assert_allclose(float(norm), float(optax.tree.norm(grads[name])), rtol=1e-3)
    for name, norm in metrics.layer_param_norms.items():
      np.testing.assert_allclose(float(norm), float(optax.tree.norm(new.params[name])), rtol=1e-6)
    state = new
  # Without the options the metrics carry nothing extra.
  metrics = full_batch_step(loss_fn, opt, micro_batch_size=8, donate=False)(state, data)[1]
  assert metrics.sharpness is None and metrics.layer_grad_norms is None


def test_errors():
  model, _, _ = _setup()
  opt = optax.sgd(0.1)
  with pytest.raises(ValueError, match=r"sharpness_every must be a positive int or None, got 0"):
    full_batch_step(linen_loss(model, xent), opt, sharpness_every=0)
  with pytest.raises(ValueError, match=r"jaxbn.training.sharpness: loop='host' .* takes no axis_name and jit=True"):
    sharpness(linen_loss(model, xent), loop="host", jit=False)
  with pytest.raises(ValueError, match=r"jaxbn.training.sharpness: loop must be one of \('auto', 'scan', 'host'\)"):
    sharpness(linen_loss(model, xent), loop="python")
  with pytest.raises(ValueError, match=r"jaxbn.training.sharpness: bn_mode must be 'ghost' or 'exact'"):
    sharpness(linen_loss(model, xent), bn_mode="other")
