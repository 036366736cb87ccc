"""Parity of jaxbn.transforms.adamp / sgdp with the reference PyTorch package ``adamp`` 0.3.0.

Both sides start from the same parameters (PyTorch layouts OIHW / (out, in) on the torch side, Flax
layouts HWIO / (in, out) on the jax side) and compute their gradients from their own current parameters
with the same float64 function, so the trajectories are compared, not just one step. The gradients are
built so that every branch of the reference runs: tangent to each output channel (channel view),
tangent to the whole tensor only (layer view), and unconstrained (no projection).
"""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch", reason="the torch peer is not installed: pip install -e '.[peers]'")
adamp_ref = pytest.importorskip("adamp", reason="the adamp peer is not installed: pip install -e '.[peers]'")

from jaxbn import transforms  # noqa: E402

STEPS = 20
# name -> (torch shape, kind of gradient)
LEAVES = {
  "conv_channel": ((8, 4, 3, 3), "channel"),
  "conv_layer": ((6, 3, 3, 3), "layer"),
  "conv_free": ((5, 4, 3, 3), "free"),
  "dense_channel": ((10, 7), "channel"),
  "dense_free": ((4, 7), "free"),
  "bias": ((10,), "free"),
}


def to_flax(name, x):
  x = np.asarray(x)
  if x.ndim == 4:
    return x.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if x.ndim == 2:
    return x.T  # (out, in) -> (in, out)
  return x


def to_torch(name, x):
  x = np.asarray(x)
  if x.ndim == 4:
    return x.transpose(3, 2, 0, 1)  # HWIO -> OIHW
  if x.ndim == 2:
    return x.T
  return x


def initial_params():
  rng = np.random.default_rng(0)
  return {k: rng.normal(size=shape).astype(np.float32) for k, (shape, _) in LEAVES.items()}


NOISE = [
  {k: np.random.default_rng(100 + t).normal(size=shape) for k, (shape, _) in LEAVES.items()} for t in range(STEPS)
]


def grads_torch_layout(params, t):
  """float64 gradients from torch-layout params at step t."""
  out = {}
  for k, (_, kind) in LEAVES.items():
    p = np.asarray(params[k], np.float64)
    r = NOISE[t][k]
    if kind == "channel":
      pr = p.reshape(p.shape[0], -1)
      rr = r.reshape(p.shape[0], -1)
      g = rr - pr * (np.sum(pr * rr, 1, keepdims=True) / np.sum(pr * pr, 1, keepdims=True))
      g = g.reshape(p.shape)
    elif kind == "layer":
      g = r - p * (np.sum(p * r) / np.sum(p * p))
    else:
      g = r
    out[k] = g.astype(np.float32)
  return out


def run_torch(make_opt):
  params = {k: torch.tensor(v) for k, v in initial_params().items()}
  for p in params.values():
    p.requires_grad_(True)
  opt = make_opt(list(params.values()))
  for t in range(STEPS):
    g = grads_torch_layout({k: v.detach().numpy() for k, v in params.items()}, t)
    for k, p in params.items():
      p.grad = torch.tensor(g[k])
    opt.step()
  return {k: v.detach().numpy() for k, v in params.items()}


def run_jax(tx):
  # Eagerly: every case then reuses the same compiled primitives, where jit would compile each optimizer
  # anew (jit is tested in tests/test_transforms.py).
  params = {k: jnp.asarray(to_flax(k, v)) for k, v in initial_params().items()}
  state = tx.init(params)
  for t in range(STEPS):
    g = grads_torch_layout({k: to_torch(k, v) for k, v in params.items()}, t)
    updates, state = tx.update({k: jnp.asarray(to_flax(k, v)) for k, v in g.items()}, state, params)
    params = optax.apply_updates(params, updates)
  return {k: to_torch(k, v) for k, v in params.items()}, state


def views(state):
  """The ProjectScaleInvariantState inside chain(project_scale_invariant(...), scale_by_learning_rate)."""
  return {k: int(v) for k, v in state[0].view.items()}


def assert_same(ours, ref):
  for k in LEAVES:
    np.testing.assert_allclose(ours[k], ref[k], rtol=0, atol=1e-5, err_msg=k)
  # The trajectories moved: a test on parameters that stayed put could not fail.
  start = initial_params()
  assert all(np.max(np.abs(ref[k] - start[k])) > 1e-2 for k in LEAVES)


EXPECTED_VIEWS = {"conv_channel": 1, "conv_layer": 2, "dense_channel": 1, "bias": 0}


@pytest.mark.parametrize(
  "weight_decay, nesterov", [(0.0, False), (0.5, False), (0.5, True)], ids=["plain", "wd", "wd-nesterov"]
)
def test_adamp_matches_reference(weight_decay, nesterov):
  kw = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, delta=0.1, wd_ratio=0.1)
  ref = run_torch(lambda ps: adamp_ref.AdamP(ps, nesterov=nesterov, **kw))
  ours, state = run_jax(
    transforms.adamp(0.01, 0.9, 0.999, 1e-8, weight_decay=weight_decay, delta=0.1, wd_ratio=0.1, nesterov=nesterov)
  )
  assert_same(ours, ref)
  assert EXPECTED_VIEWS.items() <= views(state).items()


@pytest.mark.parametrize(
  "momentum, dampening, weight_decay, nesterov",
  [
    (0.0, 0.0, 0.0, False),
    (0.9, 0.0, 0.05, False),
    (0.9, 0.0, 0.05, True),
    (0.9, 0.1, 0.05, False),
    (0.8, 0.2, 0.05, True),
  ],
  ids=["plain", "wd-momentum", "wd-nesterov", "wd-dampening", "wd-dampening-nesterov"],
)
def test_sgdp_matches_reference(momentum, dampening, weight_decay, nesterov):
  kw = dict(momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
  ref = run_torch(lambda ps: adamp_ref.SGDP(ps, lr=0.05, eps=1e-8, delta=0.1, wd_ratio=0.1, **kw))
  ours, state = run_jax(transforms.sgdp(0.05, eps=1e-8, delta=0.1, wd_ratio=0.1, **kw))
  assert_same(ours, ref)
  assert EXPECTED_VIEWS.items() <= views(state).items()


def test_channel_axis_matters():
  """With the reference's axis 0 on Flax layouts the channel view is the wrong one and parity breaks."""
  ref = run_torch(lambda ps: adamp_ref.AdamP(ps, lr=0.01, weight_decay=0.5))
  ours, state = run_jax(transforms.adamp(0.01, weight_decay=0.5, channel_axis=0))
  assert views(state)["conv_channel"] != 1
  assert max(np.max(np.abs(ours[k] - ref[k])) for k in LEAVES) > 1e-3
