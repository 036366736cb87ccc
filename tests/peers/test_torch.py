"""jaxbn.batch_norm against torch.nn.BatchNorm1d/2d (CPU) as an oracle, converting conventions.

PyTorch's ``momentum=p`` is jaxbn's ``momentum=1-p``; PyTorch stores the unbiased running variance
(``unbiased_running_var=True``) and ``momentum=None`` is the cumulative average.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

torch = pytest.importorskip("torch", reason="the torch peer is not installed: pip install -e '.[peers]'")


def _torch_and_ours(torch_momentum):
  if torch_momentum is None:
    return {"running_average": "cumulative"}
  return {"momentum": 1.0 - torch_momentum}


@pytest.mark.parametrize("torch_momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("dims", [1, 2])
def test_matches_torch_train_and_eval(torch_momentum, dims):
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  shape = (16, 5) if dims == 1 else (8, 5, 6, 6)  # PyTorch layout: channels on axis 1
  layer = (torch.nn.BatchNorm1d if dims == 1 else torch.nn.BatchNorm2d)(5, eps=1e-5, momentum=torch_momentum)
  with torch.no_grad():
    layer.weight.copy_(torch.tensor(rng.normal(1.0, 0.3, 5), dtype=torch.float32))
    layer.bias.copy_(torch.tensor(rng.normal(0.0, 0.3, 5), dtype=torch.float32))
  scale, bias = jnp.asarray(layer.weight.detach().numpy()), jnp.asarray(layer.bias.detach().numpy())
  state = jaxbn.init_state(5)
  opts = dict(axis=1, unbiased_running_var=True, **_torch_and_ours(torch_momentum))

  def ours(x, s, b, st):
    y, new = jaxbn.batch_norm(x, st, s, b, training=True, **opts)
    return jnp.sum(jnp.tanh(y) * jnp.cos(jnp.arange(y.size).reshape(y.shape))), new

  layer.train()
  for step in range(4):
    x_np = rng.normal(step, 1.0 + step, shape).astype(np.float32)
    xt = torch.tensor(x_np, requires_grad=True)
    yt = layer(xt)
    lt = torch.sum(torch.tanh(yt) * torch.cos(torch.arange(yt.numel(), dtype=torch.float32).reshape(yt.shape)))
    lt.backward()
    (gx, gs, gb), state = jax.grad(ours, (0, 1, 2), has_aux=True)(jnp.asarray(x_np), scale, bias, state)
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gs, layer.weight.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gb, layer.bias.grad.numpy(), rtol=1e-4, atol=1e-5)
    layer.weight.grad = layer.bias.grad = None
    np.testing.assert_allclose(state.mean, layer.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.var, layer.running_var.numpy(), rtol=1e-5, atol=1e-6)
    assert int(state.count) == int(layer.num_batches_tracked)

  layer.eval()
  x_np = rng.normal(0.0, 1.0, shape).astype(np.float32)
  with torch.no_grad():
    want = layer(torch.tensor(x_np)).numpy()
  got, _ = jaxbn.batch_norm(jnp.asarray(x_np), state, scale, bias, training=False, axis=1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
