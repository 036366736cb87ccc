"""Tests of jaxbn.transforms: known values, chaining with Optax, jit, inject_hyperparams, sharding, masks.

Parity of adamp/sgdp with the PyTorch reference lives in tests/peers/test_adamp.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn import transforms
from jaxbn.transforms import masks as transform_masks

# ------------------------------------------------------------------------------------------------
# clip_by_running_norm


def feed_norms(tx, norms, state=None):
  """Feeds gradients {"w": [n, 0]} (global norm n) and returns the updates' norms and the state."""
  params = {"w": jnp.zeros(2)}
  state = tx.init(params) if state is None else state
  out = []
  for n in norms:
    u, state = tx.update({"w": jnp.array([n, 0.0], jnp.float32)}, state, params)
    out.append(float(u["w"][0]))
  return np.array(out), state


def weighted_stats(xs, decay):
  """Closed form of the debiased EMA mean and variance: weights decay**(t-i), normalized."""
  xs = np.asarray(xs, np.float64)
  w = decay ** np.arange(len(xs) - 1, -1, -1)
  w = w / w.sum()
  mean = np.sum(w * xs)
  return mean, np.sum(w * (xs - mean) ** 2)


@pytest.mark.parametrize("decay", [0.97, 0.5, 1.0])
def test_running_norm_statistics_are_the_weighted_mean_and_variance(decay):
  norms = [1.0, 2.0, 0.5, 4.0, 3.0, 1.5, 2.5]
  tx = transforms.clip_by_running_norm(decay, warmup_steps=100)  # no clipping: pure statistics
  out, state = feed_norms(tx, norms)
  np.testing.assert_allclose(out, norms, rtol=1e-6)
  mean, var = weighted_stats(norms, decay)
  assert int(state.count) == len(norms) and int(state.num_clipped) == 0
  np.testing.assert_allclose(float(state.mean), mean, rtol=1e-5)
  np.testing.assert_allclose(float(state.var), var, rtol=1e-4)


@pytest.mark.parametrize("mode", ["adaptive", "mean", "threshold"])
def test_running_norm_clips_a_spike_to_the_documented_norm(mode):
  warm = [1.0, 1.2, 0.8, 1.1, 0.9, 1.0]
  tx = transforms.clip_by_running_norm(0.9, 2.5, warmup_steps=len(warm), mode=mode)
  _, state = feed_norms(tx, warm)
  mean, var = weighted_stats(warm, 0.9)
  std = np.sqrt(max(var, 0.0))  # 1 - w rounds below 0 at the first step
  spike = 10.0
  z = (spike - mean) / (std + 1e-6)
  expected = {"adaptive": mean + 2.5**2 * std / z, "mean": mean, "threshold": mean + 2.5 * std}[mode]
  out, new_state = feed_norms(tx, [spike], state)
  np.testing.assert_allclose(out[0], expected, rtol=1e-4)
  assert int(new_state.num_clipped) == 1
  # The statistics take the clipped norm, not the spike.
  w = (1 - 0.9) / (1 - 0.9 ** (len(warm) + 1))
  np.testing.assert_allclose(float(new_state.mean), mean + w * (expected - mean), rtol=1e-5)
  # An ordinary norm passes unchanged.
  out, _ = feed_norms(tx, [1.05], state)
  np.testing.assert_allclose(out[0], 1.05, rtol=1e-6)


def test_running_norm_waits_for_warmup_and_ignores_non_finite_norms():
  tx = transforms.clip_by_running_norm(warmup_steps=3)
  out, state = feed_norms(tx, [1.0, 1.0, 100.0])  # a spike inside the warm-up is not clipped
  np.testing.assert_allclose(out, [1.0, 1.0, 100.0])
  for bad in [np.nan, np.inf]:
    out, bad_state = feed_norms(tx, [bad], state)
    assert not np.isfinite(out[0])  # passed through: optax.apply_if_finite decides
    for a, b in zip(bad_state, state, strict=True):
      np.testing.assert_array_equal(a, b)


def test_running_norm_rejects_bad_arguments():
  with pytest.raises(ValueError, match=r"clip_by_running_norm: decay must be in \[0, 1\], got 1.5"):
    transforms.clip_by_running_norm(1.5)
  with pytest.raises(ValueError, match="z_threshold must be > 0"):
    transforms.clip_by_running_norm(z_threshold=0.0)
  with pytest.raises(ValueError, match="warmup_steps must be >= 1"):
    transforms.clip_by_running_norm(warmup_steps=0)
  with pytest.raises(ValueError, match="mode must be one of"):
    transforms.clip_by_running_norm(mode="percentile")


def test_running_norm_under_apply_if_finite_skips_the_bad_step():
  tx = optax.apply_if_finite(optax.chain(transforms.clip_by_running_norm(warmup_steps=2), optax.sgd(1.0)), 3)
  params = {"w": jnp.ones(2)}
  state = tx.init(params)
  for g in [1.0, np.nan, 2.0]:
    _, state = tx.update({"w": jnp.array([g, 0.0])}, state, params)
  assert int(state.inner_state[0].count) == 2 and int(state.total_notfinite) == 1


# ------------------------------------------------------------------------------------------------
# scale_by_norm_damping


def test_norm_damping_known_values():
  tx = transforms.scale_by_norm_damping(0.5)
  g = {"a": jnp.array([3.0]), "b": jnp.array([[4.0]], jnp.bfloat16)}  # global norm 5 across leaves
  u, _ = tx.update(g, tx.init(g))
  np.testing.assert_allclose(u["a"], [3.0 / 3.5], rtol=1e-6)
  assert u["b"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(u["b"]), [[4.0 / 3.5]], rtol=1e-2)
  same, _ = transforms.scale_by_norm_damping(0.0).update(g, optax.EmptyState())
  np.testing.assert_array_equal(same["a"], g["a"])
  with pytest.raises(ValueError, match=r"scale_by_norm_damping: beta must be >= 0, got -1.0"):
    transforms.scale_by_norm_damping(-1.0)


def test_norm_damping_bounds_the_step_on_the_explosion_example():
  """A 16-layer ReLU MLP with batch norm and no skips (Yang et al. 2019): the first layer's gradient is
  an order of magnitude above the last's, and the damped step stays below 1/beta."""
  depth, width = 16, 32
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k1, (64, width))
  y = jnp.arange(64) % 10
  params = {
    "hidden": jax.random.normal(k2, (depth, width, width)) / jnp.sqrt(width),
    "out": jax.random.normal(k3, (width, 10)) / jnp.sqrt(width),
  }

  def loss(params):
    def layer(h, w):
      h, _ = jaxbn.batch_norm(h @ w, jaxbn.init_state(width), training=True)
      return jax.nn.relu(h), None

    h, _ = jax.lax.scan(layer, x, params["hidden"])
    return optax.softmax_cross_entropy_with_integer_labels(h @ params["out"], y).mean()

  g = jax.jit(jax.grad(loss))(params)
  norms = jnp.linalg.norm(g["hidden"], axis=(1, 2))
  assert norms[0] > 5 * norms[-1]  # the explosion
  beta = 1.0
  u, _ = transforms.scale_by_norm_damping(beta).update(g, optax.EmptyState())
  n, un = float(optax.tree.norm(g)), float(optax.tree.norm(u))
  np.testing.assert_allclose(un, n / (1 + beta * n), rtol=1e-5)
  assert un < 1 / beta


# ------------------------------------------------------------------------------------------------
# project_scale_invariant


def test_projection_known_values_channel_layer_and_none():
  tx = transforms.project_scale_invariant(0.1, 0.1, weight_decay=0.5)
  w = jnp.array([[3.0, 0.0], [4.0, 1.0]])  # (in, out)
  # Tangent to each output channel: channel view, decay 0.5 * 0.1.
  g = jnp.array([[4.0, 1.0], [-3.0, 0.0]])
  u, s = tx.update(g, tx.init(w), w)
  assert int(s.view) == 1
  np.testing.assert_allclose(u, g + 0.05 * w, rtol=1e-6)
  # Tangent to the whole tensor (radial +w on channel 0, -25 w on channel 1), not to each channel.
  g = jnp.array([[3.0, 0.0], [4.0, -25.0]])
  u, s = tx.update(g, tx.init(w), w)
  assert int(s.view) == 2
  np.testing.assert_allclose(u, g + 0.05 * w, atol=1e-6)
  # Radial gradient: no projection, full decay.
  u, s = tx.update(w, tx.init(w), w)
  assert int(s.view) == 0
  np.testing.assert_allclose(u, w + 0.5 * w, rtol=1e-6)
  # The projection acts on the update, the test on the gradient.
  inner = optax.GradientTransformation(lambda p: optax.EmptyState(), lambda g, s, p=None: (g + p, s))
  tx = transforms.project_scale_invariant(inner=inner)
  g = jnp.array([[4.0, 1.0], [-3.0, 0.0]])
  u, s = tx.update(g, tx.init(w), w)  # inner adds a radial w, which is removed again
  assert int(s.view) == 1
  np.testing.assert_allclose(u, g, atol=1e-6)
  # Vectors are left alone.
  b = jnp.array([1.0, 2.0])
  u, s = tx.update(b, tx.init(b), b)
  np.testing.assert_allclose(u, 2 * b)


def test_projection_on_a_real_scale_invariant_kernel():
  """A conv kernel feeding a batch norm: the loss is invariant to its scale and the projected Adam
  update has no radial component per output channel."""
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(k1, (8, 5, 5, 3))
  kernel = jax.random.normal(k2, (3, 3, 3, 5))
  head = jax.random.normal(k3, (5,))

  def loss(kernel):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y, _ = jaxbn.batch_norm(y, jaxbn.init_state(5), training=True, epsilon=1e-12)
    return jnp.mean((jnp.tanh(y) @ head) ** 2)

  value_and_grad = jax.jit(jax.value_and_grad(loss))
  (value, g), (scaled, _) = value_and_grad(kernel), value_and_grad(3.0 * kernel)
  np.testing.assert_allclose(scaled, value, rtol=1e-5)
  tx = transforms.adamp(0.1)
  state = tx.init(kernel)
  update = jax.jit(tx.update)
  for _ in range(3):
    u, state = update(g, state, kernel)
  assert int(state[0].view) == 1
  radial = jnp.sum(u * kernel, axis=(0, 1, 2)) / jnp.linalg.norm(u.reshape(-1, 5), axis=0)
  np.testing.assert_allclose(radial, 0.0, atol=1e-5)


def test_projection_errors():
  tx = transforms.project_scale_invariant()
  w = jnp.ones((2, 2))
  with pytest.raises(ValueError, match="project_scale_invariant: the update needs the current parameters"):
    tx.update(w, tx.init(w))
  with pytest.raises(ValueError, match="channel_axis=2 is out of range for a parameter of shape"):
    transforms.project_scale_invariant(channel_axis=2).update(w, tx.init(w), w)
  with pytest.raises(TypeError, match="project_scale_invariant: channel_axis must be an int, got True"):
    transforms.project_scale_invariant(channel_axis=True).update(w, tx.init(w), w)
  np.testing.assert_array_equal(  # a NumPy integer is an int
    transforms.project_scale_invariant(channel_axis=np.int64(1)).update(w, tx.init(w), w)[0],
    transforms.project_scale_invariant(channel_axis=1).update(w, tx.init(w), w)[0],
  )
  with pytest.raises(TypeError, match=r"inner must be an optax\.GradientTransformation"):
    transforms.project_scale_invariant(inner=optax.sgd)
  with pytest.raises(ValueError, match=r"sgdp: momentum must be in \[0, 1\)"):
    transforms.sgdp(0.1, momentum=1.0)


def test_sgdp_without_momentum_is_sgd_after_the_projection():
  w = {"k": jax.random.normal(jax.random.key(0), (4, 3)), "b": jnp.ones(3)}
  g = {"k": jnp.asarray(nearly_tangent(w["k"], jax.random.normal(jax.random.key(1), (4, 3))), jnp.float32)}
  g["b"] = jnp.ones(3)
  a, state = transforms.sgdp(0.1, weight_decay=0.01).update(g, transforms.sgdp(0.1).init(w), w)
  tx = optax.chain(transforms.project_scale_invariant(weight_decay=0.01), optax.sgd(0.1))
  b, _ = tx.update(g, tx.init(w), w)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), a, b)
  # Both equal SGD on the projected gradient, with the weight decay of projected weights cut to wd_ratio.
  assert int(state[0].view["k"]) == 1
  want_k = -0.1 * (project_channels(g["k"], w["k"]) + 0.01 * 0.1 * np.asarray(w["k"], np.float64))
  np.testing.assert_allclose(a["k"], want_k, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(a["b"], -0.1 * (1.0 + 0.01 * 1.0) * np.ones(3), rtol=1e-6)


def nearly_tangent(w, r, tilt=0.005):
  """``r`` made orthogonal to every output channel (last axis) of ``w``, then tilted towards it (cosine ~``tilt``).

  Such are the gradients of weights feeding a batch norm (exactly tangent) plus a little noise. The cosine
  stays below AdamP's threshold delta / sqrt(channel size) (0.1 / 6 for a 3x3x4 conv channel), so the
  channel-view projection is active and has a radial part to remove.
  """
  shape = np.shape(w)
  w = np.asarray(w, np.float64).reshape(-1, shape[-1])
  r = np.asarray(r, np.float64).reshape(w.shape)
  tangent = r - w * (np.sum(w * r, 0, keepdims=True) / np.sum(w * w, 0, keepdims=True))
  scale = np.linalg.norm(tangent, axis=0, keepdims=True) / np.linalg.norm(w, axis=0, keepdims=True)
  return (tangent + tilt * scale * w).reshape(shape)


def project_channels(u, w, eps=1e-8):
  """The channel-view projection of the ``adamp`` package (Heo et al. 2021) in float64.

  u - w_n <w_n, u> per output channel (last axis), with w_n = w / (||w|| + eps).
  """
  shape = np.shape(w)
  w = np.asarray(w, np.float64).reshape(-1, shape[-1])
  u = np.asarray(u, np.float64).reshape(w.shape)
  wn = w / (np.linalg.norm(w, axis=0, keepdims=True) + eps)
  return (u - wn * np.sum(wn * u, 0, keepdims=True)).reshape(shape)


# ------------------------------------------------------------------------------------------------
# Every transform: chained with sgd/adam/adamw, under jit, with inject_hyperparams, on sharded params.

PARAMS_SHAPES = {"conv": (3, 3, 4, 16), "dense": (24, 8), "bias": (16,)}


def make_params(seed=0):
  keys = jax.random.split(jax.random.key(seed), len(PARAMS_SHAPES))
  return {k: jax.random.normal(key, s) for key, (k, s) in zip(keys, PARAMS_SHAPES.items(), strict=True)}


NORMS = [10.0, 11.0, 9.0, 10.5, 9.5, 10.0, 300.0, 10.0]  # one spike, at step 6


def make_grads(t):
  g = make_params(100 + t)
  return jax.tree.map(lambda x: x * (NORMS[t] / optax.tree.norm(g)), g)


TRANSFORMS = {
  "clip_by_running_norm": lambda: transforms.clip_by_running_norm(0.9, warmup_steps=3),
  "scale_by_norm_damping": lambda: transforms.scale_by_norm_damping(0.1),
  "project_scale_invariant": lambda: transforms.project_scale_invariant(weight_decay=1e-2),
}
BASES = {
  "sgd": lambda: optax.sgd(0.1, momentum=0.9),
  "adam": lambda: optax.adam(1e-2),
  "adamw": lambda: optax.adamw(1e-2),
}


def run_steps(tx, params, steps=7):
  """Seven jitted steps (the spike is the last); returns the params, the state and the jitted update."""
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(steps):
    updates, state = update(make_grads(t), state, params)
    params = optax.apply_updates(params, updates)
  return params, state, update


@pytest.fixture(scope="module")
def plain_runs():
  return {base: run_steps(make(), make_params())[0] for base, make in BASES.items()}


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_chains_with_optax_under_jit(name, base, plain_runs):
  params, state, _ = run_steps(optax.chain(TRANSFORMS[name](), BASES[base]()), make_params())
  plain = plain_runs[base]
  assert all(bool(jnp.all(jnp.isfinite(p))) for p in params.values())
  # The transformation did something.
  assert max(float(jnp.max(jnp.abs(params[k] - plain[k]))) for k in PARAMS_SHAPES) > 1e-4
  if name == "clip_by_running_norm":
    assert int(state[0].num_clipped) == 1 and int(state[0].count) == 7
  # The same steps with the transformation done by hand in float64, then the plain Optax base.
  want, tx, memo = make_params(), BASES[base](), {}
  opt_state = tx.init(want)
  for t in range(7):
    grads = {k: jnp.asarray(v, jnp.float32) for k, v in by_hand(name, make_grads(t), want, memo).items()}
    updates, opt_state = tx.update(grads, opt_state, want)
    want = optax.apply_updates(want, updates)
  for k in PARAMS_SHAPES:
    np.testing.assert_allclose(params[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def project_by_hand(g, p, *, weight_decay, delta=0.1, wd_ratio=0.1, eps=1e-8):
  """project_scale_invariant on one leaf (no inner): the ``adamp`` package's test and projection, float64."""
  if p.ndim <= 1:
    return g + weight_decay * p
  # The channel view (rows: output channels, the last axis), then the layer view (one row).
  for rows, back in ((lambda x: x.reshape(-1, p.shape[-1]).T, lambda r: r.T.reshape(p.shape)),
                     (lambda x: x.reshape(1, -1), lambda r: r.reshape(p.shape))):  # fmt: skip
    gr, pr = rows(g), rows(p)
    gn, pn = (np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps) for x in (gr, pr))
    if np.max(np.abs(np.sum((gr / gn) * (pr / pn), 1))) < delta / np.sqrt(pr.shape[1]):
      unit = pr / (np.linalg.norm(pr, axis=1, keepdims=True) + eps)
      return back(gr - unit * np.sum(unit * gr, 1, keepdims=True)) + weight_decay * wd_ratio * p
  return g + weight_decay * p


def by_hand(name, grads, params, memo):
  """One step of ``TRANSFORMS[name]`` on ``grads`` in float64 NumPy; ``memo`` carries the clip's statistics."""
  g = {k: np.asarray(v, np.float64) for k, v in grads.items()}
  norm = np.sqrt(sum(np.sum(v * v) for v in g.values()))
  if name == "scale_by_norm_damping":
    return {k: v / (1 + 0.1 * norm) for k, v in g.items()}
  if name == "project_scale_invariant":
    return {k: project_by_hand(v, np.asarray(params[k], np.float64), weight_decay=1e-2) for k, v in g.items()}
  # clip_by_running_norm(0.9, warmup_steps=3): z_threshold 2.5, adaptive mode, eps 1e-6.
  count, mean, var = memo.get("clip", (0, 0.0, 0.0))
  std = np.sqrt(max(var, 0.0))  # 1 - w rounds below 0 at the first step
  z = (norm - mean) / (std + 1e-6)
  scale = min((mean + 2.5**2 * std / z) / norm, 1.0) if count >= 3 and z > 2.5 else 1.0
  count += 1
  w = 0.1 / (1 - 0.9**count)
  d = norm * scale - mean
  memo["clip"] = (count, mean + w * d, (1 - w) * (var + w * d * d))
  return {k: v * scale for k, v in g.items()}


def test_ready_optimizers_match_their_chains():
  params = make_params()
  a, _, _ = run_steps(transforms.adamp(1e-2, weight_decay=0.1), params)
  tx = optax.chain(
    transforms.project_scale_invariant(inner=optax.scale_by_adam(), weight_decay=0.1),
    optax.scale_by_learning_rate(1e-2),
  )
  b, _, _ = run_steps(tx, params)
  for k in PARAMS_SHAPES:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6)
  # Both are AdamP, on the gradients of scale-invariant weights too (where the projection acts).
  for each in (transforms.adamp(1e-2, weight_decay=0.1), tx):
    assert_matches_reference(each, "adamp", lr=1e-2, weight_decay=0.1)


def tangent_grads(params, t):
  """Step ``t``'s gradients: kernels' nearly tangent to their output channels (the projection acts), bias free."""
  noise = make_params(200 + t)
  return {k: nearly_tangent(p, noise[k]) if p.ndim > 1 else np.asarray(noise[k], np.float64) for k, p in params.items()}


def numpy_reference(kind, steps, lr, *, momentum=0.0, weight_decay=0.0, nesterov=False, b1=0.9, b2=0.999, eps=1e-8):
  """The ``adamp`` package's (0.3.0) AdamP / SGDP in float64 NumPy, on ``tangent_grads``.

  Only the channel view is written out: ``tangent_grads`` makes it the one that applies (wd_ratio 0.1).
  """
  params = {k: np.asarray(v, np.float64) for k, v in make_params().items()}
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(p) for k, p in params.items()}
  for t in range(steps):
    grads = tangent_grads(params, t)
    for k, p in params.items():
      g = grads[k]
      if kind == "sgdp":
        m[k] = momentum * m[k] + g
        d, decay, step_size = (g + momentum * m[k] if nesterov else m[k]), weight_decay / (1 - momentum), lr
      else:
        m[k] = b1 * m[k] + (1 - b1) * g
        v[k] = b2 * v[k] + (1 - b2) * g * g
        d = ((b1 * m[k] + (1 - b1) * g) if nesterov else m[k]) / (np.sqrt(v[k]) / np.sqrt(1 - b2 ** (t + 1)) + eps)
        decay, step_size = weight_decay, lr / (1 - b1 ** (t + 1))
      ratio = 1.0
      if p.ndim > 1:
        d, ratio = project_channels(d, p, eps), 0.1
        if kind == "sgdp" and not nesterov:
          m[k] = d  # the reference projects its step in place, and here the step is the buffer
      params[k] = p * (1 - lr * decay * ratio) - step_size * d
  return params


def assert_matches_reference(tx, kind, steps=5, **kwargs):
  """``tx``'s jitted trajectory on ``tangent_grads`` equals ``numpy_reference(kind, steps, **kwargs)``."""
  params = make_params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(steps):
    grads = {k: jnp.asarray(g, jnp.float32) for k, g in tangent_grads(params, t).items()}
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  want = numpy_reference(kind, steps, **kwargs)
  for k in PARAMS_SHAPES:
    np.testing.assert_allclose(params[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


INJECTED = {
  "clip_by_running_norm": (transforms.clip_by_running_norm, dict(decay=0.9, z_threshold=2.5, warmup_steps=3)),
  "scale_by_norm_damping": (transforms.scale_by_norm_damping, dict(beta=0.1)),
  "project_scale_invariant": (transforms.project_scale_invariant, dict(weight_decay=1e-2, wd_ratio=0.1)),
  "adamp": (transforms.adamp, dict(learning_rate=1e-2, weight_decay=1e-2, nesterov=True)),
  "sgdp": (transforms.sgdp, dict(learning_rate=0.1, momentum=0.9, weight_decay=1e-2)),
}
VARIED = {"clip_by_running_norm": "z_threshold", "scale_by_norm_damping": "beta"}


@pytest.mark.parametrize("name", list(INJECTED))
def test_inject_hyperparams(name):
  factory, kwargs = INJECTED[name]
  tx = optax.inject_hyperparams(factory)(**kwargs)
  direct, _, _ = run_steps(factory(**kwargs), make_params(), steps=6)
  injected, state, update = run_steps(tx, make_params(), steps=6)
  for k in PARAMS_SHAPES:
    np.testing.assert_allclose(injected[k], direct[k], rtol=1e-5, atol=1e-6)
  # The injected value is the one used: changing it changes the next update (the spike, for the clip).
  key = VARIED.get(name, next(iter(kwargs)))
  u1, _ = update(make_grads(6), state, injected)
  state.hyperparams[key] = state.hyperparams[key] * 2
  u2, _ = update(make_grads(6), state, injected)
  assert max(float(jnp.max(jnp.abs(u1[k] - u2[k]))) for k in PARAMS_SHAPES) > 1e-6
  if name in ("adamp", "sgdp"):  # the optimizer itself, where its projection acts
    lr = kwargs["learning_rate"]
    assert_matches_reference(tx, name, lr=lr, **{k: v for k, v in kwargs.items() if k != "learning_rate"})


SHARDED = {
  "clip-damping-projection": lambda: optax.chain(
    transforms.clip_by_running_norm(0.9, warmup_steps=3),
    transforms.scale_by_norm_damping(0.1),
    transforms.project_scale_invariant(weight_decay=0.1),
    optax.sgd(0.1),
  ),
  "adamp": lambda: transforms.adamp(1e-2, weight_decay=0.1, nesterov=True),
  "sgdp": lambda: transforms.sgdp(0.1, 0.9, weight_decay=0.1),
}


@pytest.fixture(scope="module")
def unsharded_runs():
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = run_steps(SHARDED[name](), make_params())[:2]
    return cache[name]

  return get


@pytest.mark.parametrize("name, axis_type", [(n, "explicit") for n in SHARDED] + [("sgdp", "auto")])
def test_sharded_params_on_8_devices(name, axis_type, unsharded_runs):
  assert jax.device_count() == 8
  types = jax.sharding.AxisType.Explicit if axis_type == "explicit" else jax.sharding.AxisType.Auto
  mesh = jax.make_mesh((8,), ("x",), axis_types=(types,))
  # Output channels (the projection's rows) split across devices, and a replicated bias.
  specs = {"conv": P(None, None, None, "x"), "dense": P(None, "x"), "bias": P()}
  shard = lambda tree: {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in tree.items()}
  tx = SHARDED[name]()
  ref, ref_state = unsharded_runs(name)
  params = shard(make_params())
  state = tx.init(params)
  update = jax.jit(tx.update)
  with jax.set_mesh(mesh):
    for t in range(7):
      updates, state = update(shard(make_grads(t)), state, params)
      params = optax.apply_updates(params, updates)
  for k in PARAMS_SHAPES:
    if axis_type == "explicit":
      assert params[k].sharding.is_equivalent_to(NamedSharding(mesh, specs[k]), params[k].ndim)
    np.testing.assert_allclose(params[k], ref[k], rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state, ref_state)


# ------------------------------------------------------------------------------------------------
# Masks


class LinenNet(nn.Module):
  """Every case: plain conv -> BN, conv with bias -> BN, dense with bias -> BN on another axis,
  dense -> relu -> BN, a dense used twice, a BN subclass, LayerNorm, and a head."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    ura = not train
    h = nn.Conv(4, (3,), use_bias=False, name="conv_plain")(x)  # x: (batch, time, channels)
    h = nn.BatchNorm(use_running_average=ura, name="bn_plain")(h)
    h = nn.Conv(4, (3,), use_bias=True, name="conv_bias")(h)
    h = nn.BatchNorm(use_running_average=ura, name="bn_bias")(h)
    t = nn.Dense(4, use_bias=True, name="dense_bias_time")(h)
    t = nn.BatchNorm(use_running_average=ura, axis=1, name="bn_time")(t)  # normalizes per time step
    r = nn.Dense(4, use_bias=False, name="dense_relu")(h)
    r = nn.BatchNorm(use_running_average=ura, name="bn_relu")(nn.relu(r))
    shared = nn.Dense(4, use_bias=False, name="dense_shared")
    s = SubBatchNorm(use_running_average=ura, name="bn_sub")(shared(h)) + shared(t)
    n = nn.LayerNorm(name="ln")(nn.Dense(4, use_bias=False, name="dense_ln")(h))
    return nn.Dense(2, name="head")(jnp.concatenate([t, r, s, n], -1).mean(1))


class SubBatchNorm(nn.BatchNorm):
  pass


EXPECTED_INVARIANT = {"conv_plain"}  # and conv_bias, see below; never the others
BN_MODULES = {"bn_plain", "bn_bias", "bn_time", "bn_relu", "bn_sub"}


@pytest.fixture(scope="module")
def linen_setup():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 10, 3)), jnp.float32)
  shapes = jax.eval_shape(LinenNet().init, jax.random.key(1), x)
  # Random values everywhere (nonzero biases included) without compiling init; positive variances.
  variables = jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype), shapes)
  return x, variables


def invariant_modules(mask):
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  return {transform_masks._key_names(path)[-2] for path, m in flat if m}


def test_scale_invariant_mask_linen(linen_setup):
  x, variables = linen_setup
  mask = transforms.scale_invariant_mask(LinenNet(), variables, x, train=True)
  assert jax.tree.structure(mask) == jax.tree.structure(variables["params"])
  # conv_bias: its bias is per output channel, which bn_bias normalizes per: the kernel stays invariant.
  assert invariant_modules(mask) == {"conv_plain", "conv_bias"}
  assert mask["conv_bias"]["bias"] is False
  # In evaluation mode no batch norm uses batch statistics: nothing is scale-invariant.
  assert not any(jax.tree.leaves(transforms.scale_invariant_mask(LinenNet(), variables, x, train=False)))
  # Shapes are enough.
  shapes = jax.eval_shape(lambda: variables)
  assert transforms.scale_invariant_mask(LinenNet(), shapes, jax.ShapeDtypeStruct(x.shape, x.dtype)) == mask
  # Restricting the batch-norm classes to the subclass finds none of the plain kernels.
  assert not any(
    jax.tree.leaves(transforms.scale_invariant_mask(LinenNet(), variables, x, batch_norm_types=(SubBatchNorm,)))
  )


def test_scale_invariant_mask_matches_the_loss(linen_setup):
  """What the mask says is what the training loss does when a kernel is scaled by 3."""
  x, variables = linen_setup
  params = variables["params"]
  loss = jax.jit(lambda p: LinenNet().apply({**variables, "params": p}, x, mutable=["batch_stats"])[0].sum())
  mask = transforms.scale_invariant_mask(LinenNet(), variables, x)
  base = float(loss(params))

  def invariant(name):
    scaled = {**params, name: {**params[name], "kernel": 3.0 * params[name]["kernel"]}}
    return abs(float(loss(scaled)) - base) < 1e-4 * abs(base)

  for name in ["conv_plain", "conv_bias", "dense_bias_time", "dense_shared", "head"]:
    assert invariant(name) == mask[name]["kernel"], name
  # Invariant, but not through a batch norm fed directly (ReLU in between; a LayerNorm): not marked.
  for name in ["dense_relu", "dense_ln"]:
    assert invariant(name) and not mask[name]["kernel"], name


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 4, (3,), use_bias=True, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(4, 4, use_bias=True, rngs=rngs), nnx.BatchNorm(5, axis=1, rngs=rngs)])
    self.plain = nnx.Linear(4, 4, use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(4, rngs=rngs)
    self.ln = nnx.LayerNorm(4, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    h = self.bn(self.conv(x))
    t = self.layers[1](self.layers[0](h))
    p = self.bn2(self.plain(t))
    return self.head(self.ln(p).mean(1))


def test_scale_invariant_and_batch_norm_masks_nnx():
  model = NnxNet(nnx.Rngs(0))
  x = jnp.ones((8, 5, 3))
  before = jax.tree.map(np.asarray, nnx.state(model))
  mask = transforms.scale_invariant_mask(model, x)
  assert jax.tree.structure(mask) == jax.tree.structure(nnx.as_pure(nnx.state(model, nnx.Param)))
  assert invariant_modules(mask) == {"conv", "plain"}
  # The model is untouched: same classes, same running statistics.
  assert type(model.bn) is nnx.BatchNorm and type(model.conv) is nnx.Conv
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model)), before)
  model.eval()
  assert not any(jax.tree.leaves(transforms.scale_invariant_mask(model, x)))
  model.train()
  bn = transforms.batch_norm_mask(model)
  assert invariant_modules(bn) == {"bn", 1, "bn2"}  # layers[1] is a BatchNorm; ln is not
  assert bn["bn"]["scale"] and not bn["ln"]["scale"] and not bn["conv"]["kernel"]


def test_batch_norm_mask_linen(linen_setup):
  _, variables = linen_setup
  mask = transforms.batch_norm_mask(variables)
  assert mask == transforms.batch_norm_mask(variables["params"], variables["batch_stats"])
  assert jax.tree.structure(mask) == jax.tree.structure(variables["params"])
  assert invariant_modules(mask) == BN_MODULES
  with pytest.raises(ValueError, match="batch_norm_mask: cannot tell batch-norm parameters from parameters alone"):
    transforms.batch_norm_mask(variables["params"])


def test_jaxbn_modules_are_batch_norms():
  jl = pytest.importorskip("jaxbn.linen")
  jn = pytest.importorskip("jaxbn.nnx")

  class Net(nn.Module):
    renorm: bool = False

    @nn.compact
    def __call__(self, x):
      h = jl.BatchNorm(use_running_average=False, renorm=self.renorm)(nn.Dense(3, use_bias=False)(x))
      return nn.Dense(1)(h)

  x = jnp.ones((4, 2))
  variables = jax.eval_shape(Net().init, jax.random.key(0), x)
  assert invariant_modules(transforms.scale_invariant_mask(Net(), variables, x)) == {"Dense_0"}
  assert invariant_modules(transforms.batch_norm_mask(variables)) == {"BatchNorm_0"}
  assert not any(jax.tree.leaves(transforms.scale_invariant_mask(Net(renorm=True), variables, x)))

  class NnxNet2(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(2, 3, use_bias=False, rngs=rngs)
      self.bn = jn.BatchNorm(3, rngs=rngs)

    def __call__(self, x):
      return self.bn(self.dense(x))

  model = NnxNet2(nnx.Rngs(0))
  assert invariant_modules(transforms.scale_invariant_mask(model, x)) == {"dense"}
  assert invariant_modules(transforms.batch_norm_mask(model)) == {"bn"}
  assert type(model.bn) is jn.BatchNorm


def test_register_batch_norm():
  class MyNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
      return (x - x.mean(0, keepdims=True)) / (x.std(0, keepdims=True) + 1e-5)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return MyNorm()(nn.Dense(3, use_bias=False)(x))

  x = jnp.ones((4, 2))
  variables = jax.eval_shape(Net().init, jax.random.key(0), x)
  assert not transforms.scale_invariant_mask(Net(), variables, x)["Dense_0"]["kernel"]
  assert transforms.scale_invariant_mask(Net(), variables, x, batch_norm_types=(MyNorm,))["Dense_0"]["kernel"]
  try:
    transforms.register_batch_norm(MyNorm)
    assert transforms.scale_invariant_mask(Net(), variables, x)["Dense_0"]["kernel"]
  finally:
    transform_masks._REGISTERED_BATCH_NORMS.remove(MyNorm)
  with pytest.raises(TypeError, match=r"scale_invariant_mask: model must be a flax\.linen\.Module"):
    transforms.scale_invariant_mask(lambda x: x, x)
  with pytest.raises(TypeError, match="pass its variables"):
    transforms.scale_invariant_mask(Net(), x)


def test_masks_with_optax_masked_and_partition(linen_setup):
  x, variables = linen_setup
  params = variables["params"]
  invariant = transforms.scale_invariant_mask(LinenNet(), variables, x)
  not_bn = jax.tree.map(lambda m: not m, transforms.batch_norm_mask(variables))
  labels = jax.tree.map(lambda m: "invariant" if m else "other", invariant)
  tx = optax.partition(
    {
      "invariant": transforms.sgdp(1.0, weight_decay=0.5),
      "other": optax.chain(optax.masked(optax.add_decayed_weights(0.5), not_bn), optax.sgd(1.0)),
    },
    labels,
  )
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, state = jax.jit(tx.update)(zero, tx.init(params), params)
  # Batch-norm parameters: no decay. Other parameters: -0.5 p. Invariant kernels: SGDP, whose zero
  # gradient counts as tangent, so the decay is 0.5 * wd_ratio.
  np.testing.assert_array_equal(updates["bn_plain"]["scale"], 0.0)
  np.testing.assert_allclose(updates["head"]["kernel"], -0.5 * params["head"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(updates["conv_plain"]["kernel"], -0.05 * params["conv_plain"]["kernel"], rtol=1e-6)
  view = state.inner_states["invariant"].inner_state[0].view
  assert int(view["conv_plain"]["kernel"]) == 1


def test_masks_with_nnx_optimizer():
  model = NnxNet(nnx.Rngs(0))
  x = jnp.ones((8, 5, 3))
  invariant = transforms.scale_invariant_mask(model, x)
  bn = transforms.batch_norm_mask(model)
  labels = jax.tree.map(lambda m: "invariant" if m else "other", invariant)
  tx = optax.partition(
    {
      "invariant": transforms.adamp(1e-2, weight_decay=0.1),
      "other": optax.adamw(1e-2, weight_decay=0.1, mask=jax.tree.map(lambda m: not m, bn)),
    },
    labels,
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  before = nnx.as_pure(nnx.state(model, nnx.Param))
  grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
  nnx.jit(lambda optimizer, model, grads: optimizer.update(model, grads))(optimizer, model, grads)
  after = nnx.as_pure(nnx.state(model, nnx.Param))
  np.testing.assert_array_equal(after["bn"]["scale"], before["bn"]["scale"])  # no decay on BN
  np.testing.assert_allclose(after["head"]["kernel"], before["head"]["kernel"] * (1 - 1e-3), rtol=1e-6)
  np.testing.assert_allclose(after["conv"]["kernel"], before["conv"]["kernel"] * (1 - 1e-4), rtol=1e-6)
