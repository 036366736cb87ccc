"""Tests of jaxbn.diagnostics against exact references: dense Hessians, manual norms, simulated optax."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.linen
from jaxbn.diagnostics import hessian_vector_product, norms_by_layer, stability_threshold, top_hessian_eigenvalue

# ---- references ---------------------------------------------------------------------------------


N = 24
PARAMS = {"w": jnp.ones((8, 1)), "b": jnp.ones(N - 8)}  # 24 parameters in two leaves
_PRODUCTS = []  # one entry per Hessian-vector product taken by _top(..., count=True)


def _matrix(eigenvalues, seed=0):
  """A symmetric matrix with the given spectrum and its eigenvectors (columns, same order), float64."""
  n = len(eigenvalues)
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
  a = (q * np.asarray(eigenvalues, np.float64)) @ q.T
  return (a + a.T) / 2, q


def _quadratic_grad(a, count=False):
  """The gradient of 0.5 x^T A x, x the raveled parameters (b first, then w)."""

  def grad_fn(p):
    if count:
      jax.debug.callback(lambda: _PRODUCTS.append(1))
    return jax.grad(lambda q: 0.5 * ravel_pytree(q)[0] @ a @ ravel_pytree(q)[0])(p)

  return grad_fn


@functools.partial(jax.jit, static_argnames=("method", "num_iters", "tol", "count"))
def _top(a, params=PARAMS, key=None, init=None, *, method="lanczos", num_iters=20, tol=1e-4, count=False):
  """top_hessian_eigenvalue on a quadratic, jitted with the matrix as an argument: one compilation per
  configuration, shared by the tests."""
  key = jax.random.key(0) if key is None else key
  grad_fn = _quadratic_grad(a, count)
  return top_hessian_eigenvalue(grad_fn, params, method=method, num_iters=num_iters, tol=tol, key=key, init=init)


def _dense_spectrum(loss, params, vectors=False):
  """Eigenvalues (and eigenvectors) of the dense Hessian of ``loss`` in the raveled parameters, float64."""
  flat, unravel = ravel_pytree(params)
  hessian = np.asarray(jax.jit(jax.hessian(lambda f: loss(unravel(f))))(flat), np.float64)
  return np.linalg.eigh((hessian + hessian.T) / 2) if vectors else np.linalg.eigvalsh(hessian)


def _data(n=32, d=8, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = jax.nn.one_hot(rng.integers(0, classes, n), classes)
  return jnp.asarray(x), jnp.asarray(y)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(jnp.tanh(nn.Dense(12)(x)))


class BatchNormCNN(nn.Module):
  """Conv -> jaxbn batch norm (batch statistics) -> ReLU -> Dense: 119 parameters on length-8 inputs."""

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(4, (3,), use_bias=False)(x[..., None])
    h = jaxbn.linen.BatchNorm(use_running_average=False)(h)
    return nn.Dense(3)(jax.nn.relu(h).reshape(x.shape[0], -1))


def _linen_loss(model, x, y):
  variables = jax.jit(model.init)(jax.random.key(1), x)
  params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}

  def loss(p, x=x, y=y):
    out = model.apply({"params": p, **rest}, x, mutable=list(rest))[0] if rest else model.apply({"params": p}, x)
    return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, -1))  # MSE on one-hot targets, as in Cohen et al.

  return loss, params


# ---- top_hessian_eigenvalue ---------------------------------------------------------------------------


def test_quadratic_with_negative_eigenvalues_lanczos_finds_algebraic_top():
  spectrum = np.concatenate([np.linspace(-9.0, 4.0, N - 2), [6.0, 7.5]])  # |-9| > 7.5
  a, q = _matrix(spectrum)
  value, vector = _top(a, num_iters=N, tol=0.0)
  assert value == pytest.approx(7.5, rel=1e-5)
  flat = ravel_pytree(vector)[0]
  assert float(jnp.linalg.norm(flat)) == pytest.approx(1.0, rel=1e-5)
  assert abs(float(flat @ q[:, -1])) == pytest.approx(1.0, abs=1e-4)
  assert jax.tree.structure(vector) == jax.tree.structure(PARAMS)
  # Power iteration converges to the eigenvalue of largest magnitude, the negative one (documented).
  power, _ = _top(a, method="power", num_iters=500, tol=1e-6)
  assert power == pytest.approx(-9.0, rel=1e-3)


def test_quadratic_default_budget_and_early_stop():
  # A clear top eigenvalue: the default 20 products are enough (Lanczos stops at its residual
  # estimate), and power iteration gets there too.
  a, _ = _matrix(np.concatenate([np.linspace(-1.0, 1.0, N - 1), [3.0]]), seed=1)
  _PRODUCTS.clear()
  value, _ = _top(a, count=True)
  assert value == pytest.approx(3.0, rel=1e-4)
  assert len(_PRODUCTS) < 20  # stopped early
  power, _ = _top(a, method="power", num_iters=100)
  assert power == pytest.approx(3.0, rel=1e-4)
  # Two products are not enough: the checks above can fail.
  short, _ = _top(a, num_iters=2, tol=0.0)
  assert abs(float(short) - 3.0) > 1e-3


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_breakdown_gives_exact_values_without_nans(method):
  # The Krylov space of a Hessian with k distinct eigenvalues has dimension k, where Lanczos breaks
  # down (beta = 0): it stops after k products with exact values. With H = c I the first Rayleigh
  # quotient is exact and power iteration stops too.
  cases = [
    (np.full(N, 2.0), 1),  # H = 2 I
    (np.zeros(N), 1),  # a linear objective: H = 0, nothing to divide by
    (np.concatenate([np.zeros(N - 2), [-1.0, 5.0]]), 3),  # rank two
  ]
  for spectrum, products in cases:
    _PRODUCTS.clear()
    value, vector = _top(_matrix(spectrum)[0], method=method, num_iters=N, tol=0.0, count=True)
    jax.effects_barrier()
    assert float(value) == pytest.approx(max(spectrum), rel=1e-5, abs=1e-6)
    assert np.all(np.isfinite(ravel_pytree(vector)[0]))
    if method == "lanczos" or not spectrum.any():  # with tol=0 power iteration stops only at H v = 0
      assert len(_PRODUCTS) == products, spectrum
  # More iterations than parameters: Lanczos uses at most the dimension.
  _PRODUCTS.clear()
  value, _ = _top(_matrix(np.linspace(-1.0, 2.0, N))[0], num_iters=50, tol=0.0, count=True)
  jax.effects_barrier()
  assert float(value) == pytest.approx(2.0, rel=1e-5) and len(_PRODUCTS) <= N


def test_mlp_matches_dense_hessian_whole_accumulated_and_sharded():
  x, y = _data(n=64)
  loss, params = _linen_loss(MLP(), x, y)
  spectrum, eigenvectors = _dense_spectrum(loss, params, vectors=True)
  assert ravel_pytree(params)[0].size == 147 and spectrum[0] < 0
  value, vector = top_hessian_eigenvalue(jax.grad(loss), params)
  assert value == pytest.approx(spectrum[-1], rel=1e-3)
  assert abs(float(ravel_pytree(vector)[0] @ eigenvectors[:, -1])) == pytest.approx(1.0, abs=1e-3)
  power, _ = top_hessian_eigenvalue(jax.grad(loss), params, method="power", num_iters=300, tol=1e-5)
  assert power == pytest.approx(spectrum[-1], rel=1e-3)

  # The same full-batch objective, its gradient accumulated over 4 micro-batches of 16 rows in a scan.
  def accumulated(p):
    def body(total, batch):
      return jax.tree.map(jnp.add, total, jax.grad(loss)(p, *batch)), None

    chunks = (x.reshape(4, 16, -1), y.reshape(4, 16, -1))
    total, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, p), chunks)
    return jax.tree.map(lambda g: g / 4, total)

  micro, _ = top_hessian_eigenvalue(accumulated, params)
  assert micro == pytest.approx(float(value), rel=1e-4)

  # The batch split over 8 devices.
  mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
  xs, ys = jax.device_put((x, y), jax.sharding.NamedSharding(mesh, P("batch")))

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("batch"), P("batch")), out_specs=P())
  def sharded(p, xs, ys):
    # The gradient of the devices' mean loss with respect to replicated parameters: shard_map sums
    # the devices' cotangents of an unvarying input, so this is the full-batch gradient.
    return jax.grad(lambda q: jax.lax.pmean(loss(q, xs, ys), "batch"))(p)

  @jax.jit
  def sharpness(p, xs, ys):
    return top_hessian_eigenvalue(lambda q: sharded(q, xs, ys), p)[0]

  assert sharpness(params, xs, ys) == pytest.approx(float(value), rel=1e-4)


def test_batch_norm_cnn_matches_dense_hessian():
  # Batch statistics inside the objective: jaxbn's batch norm switches to its plain formula under
  # forward-mode autodiff, so forward-over-reverse products and the dense jax.hessian both work.
  x, y = _data(n=16, d=8)
  loss, params = _linen_loss(BatchNormCNN(), x, y)
  spectrum = _dense_spectrum(loss, params)
  assert ravel_pytree(params)[0].size == 119
  value, _ = top_hessian_eigenvalue(jax.grad(loss), params, num_iters=30)
  assert value == pytest.approx(spectrum[-1], rel=1e-3)


def test_reverse_mode_for_custom_vjp_objectives():
  # fused=True is jaxbn's custom_vjp kernel, which has no forward mode: mode="reverse" still works
  # and agrees with the dense Hessian of the plain formula (reverse-over-reverse, jacrev(jacrev)).
  x = jnp.asarray(np.random.default_rng(3).normal(size=(16, 5)), jnp.float32)
  state = jaxbn.init_state(5)

  def loss(p, fused):
    y, _ = jaxbn.batch_norm(x @ p["w"], state, p["scale"], None, training=True, fused=fused)
    return jnp.mean(jnp.tanh(y) ** 2)

  params = {"w": jnp.eye(5) + 0.1, "scale": jnp.linspace(0.5, 1.5, 5)}
  flat, unravel = ravel_pytree(params)
  dense = jax.jit(jax.jacrev(jax.jacrev(lambda f: loss(unravel(f), False))))(flat)
  top = np.linalg.eigvalsh(np.asarray(dense, np.float64))[-1]
  grad_fused = jax.grad(functools.partial(loss, fused=True))
  value, _ = top_hessian_eigenvalue(grad_fused, params, num_iters=30, mode="reverse")
  assert value == pytest.approx(top, rel=1e-3)
  with pytest.raises(ValueError, match="fused=True has a closed-form reverse-mode gradient only"):
    top_hessian_eigenvalue(grad_fused, params)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_hessian_vector_product_is_exact_on_a_quadratic(mode):
  a, _ = _matrix(np.linspace(-2.0, 3.0, N))
  v = {"w": jnp.arange(8.0).reshape(8, 1), "b": -jnp.arange(N - 8.0)}
  hv = hessian_vector_product(_quadratic_grad(a), PARAMS, v, mode=mode)
  assert jax.tree.structure(hv) == jax.tree.structure(PARAMS)
  np.testing.assert_allclose(ravel_pytree(hv)[0], a @ np.asarray(ravel_pytree(v)[0]), rtol=1e-5, atol=1e-4)


def test_eager_matches_jit_and_warm_start():
  a, _ = _matrix(np.linspace(-2.0, 3.0, N))
  eager = top_hessian_eigenvalue(_quadratic_grad(a), PARAMS, key=jax.random.key(5))
  jitted = _top(a, key=jax.random.key(5))
  np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-6)
  for x, y in zip(jax.tree.leaves(jitted[1]), jax.tree.leaves(eager[1])):
    np.testing.assert_allclose(x, y, atol=1e-5)
  # Power iteration started at the eigenvector converges after one product.
  _PRODUCTS.clear()
  value, _ = _top(a, init=eager[1], method="power", num_iters=50, count=True)
  jax.effects_barrier()
  assert value == pytest.approx(3.0, rel=1e-4) and len(_PRODUCTS) == 1
  # A zero start vector would stay in the Krylov space {0}: the random start is used instead.
  zero = jax.tree.map(jnp.zeros_like, eager[1])
  for method in ("lanczos", "power"):
    value, vector = _top(a, init=zero, method=method, num_iters=50)
    assert value == pytest.approx(3.0, rel=1e-3), method
    assert float(jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(vector)))) == pytest.approx(1.0, rel=1e-4)


def test_float64_params_accumulate_in_float64():
  with jax.enable_x64(True):
    a, _ = _matrix(np.concatenate([np.linspace(-3.0, 2.0, N - 1), [2.5]]))
    params = jax.tree.map(lambda p: p.astype(jnp.float64), PARAMS)
    value, vector = top_hessian_eigenvalue(_quadratic_grad(jnp.asarray(a)), params, num_iters=N, tol=0.0)
    assert value.dtype == jnp.float64 and all(v.dtype == jnp.float64 for v in jax.tree.leaves(vector))
    assert abs(float(value) - 2.5) < 1e-11


def test_bfloat16_params_keep_their_dtype():
  a, _ = _matrix(np.concatenate([np.linspace(-1.0, 1.0, N - 1), [4.0]]))
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
  value, vector = _top(a.astype(np.float32), params, num_iters=N, tol=0.0)
  assert value.dtype == jnp.float32 and all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(vector))
  assert value == pytest.approx(4.0, rel=2e-2)  # the products run in bfloat16


def test_nnx_state_params():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(4, 6, rngs=rngs)
      self.out = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
      return self.out(jnp.tanh(self.hidden(x)))

  net = Net(nnx.Rngs(0))
  graphdef, params = nnx.split(net, nnx.Param)
  x, y = _data(n=16, d=4, classes=2)

  def loss(p):
    return jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)

  value, vector = top_hessian_eigenvalue(jax.grad(loss), params, num_iters=30)
  assert isinstance(vector, nnx.State)
  assert value == pytest.approx(_dense_spectrum(loss, params)[-1], rel=1e-3)


# ---- norms_by_layer ---------------------------------------------------------------------------------


def test_norms_by_layer_linen_params_and_gradients():
  x, y = _data(n=16)
  loss, params = _linen_loss(BatchNormCNN(), x, y)
  names = {"Conv_0": ["kernel"], "BatchNorm_0": ["scale", "bias"], "Dense_0": ["kernel", "bias"]}
  grads = jax.jit(jax.grad(loss))(params)
  for tree in (params, grads):
    norms = norms_by_layer(tree)
    assert list(norms) == sorted(names)
    for layer, leaves in names.items():
      manual = np.sqrt(sum(np.sum(np.asarray(tree[layer][k], np.float64) ** 2) for k in leaves))
      assert float(norms[layer]) == pytest.approx(manual, rel=1e-6)
    # The layers' squares add up to optax's global norm.
    total = np.sqrt(sum(float(v) ** 2 for v in norms.values()))
    assert total == pytest.approx(float(optax.tree.norm(tree)), rel=1e-5)
  leaves = norms_by_layer(params, per_leaf=True)
  assert set(leaves) == {f"{layer}/{k}" for layer, ks in names.items() for k in ks}
  np.testing.assert_allclose(leaves["BatchNorm_0/scale"], 2.0, rtol=1e-6)  # ones(4)
  # Under jit, as a step metric.
  jitted = jax.jit(norms_by_layer)(grads)
  for k, v in norms_by_layer(grads).items():
    np.testing.assert_allclose(jitted[k], v, rtol=1e-6)


def test_norms_by_layer_nnx_state_drops_the_value_attribute():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.blocks = nnx.List([nnx.Linear(3, 5, rngs=rngs), nnx.Linear(5, 2, rngs=rngs)])
      self.norm = jaxbn.nnx.BatchNorm(5, rngs=rngs)

  net = Net(nnx.Rngs(0))
  state = nnx.state(net, nnx.Param)
  norms = norms_by_layer(state)
  assert set(norms) == {"blocks/0", "blocks/1", "norm"}
  for i, layer in enumerate(net.blocks):
    manual = np.sqrt(np.sum(np.asarray(layer.kernel[...]) ** 2) + np.sum(np.asarray(layer.bias[...]) ** 2))
    assert float(norms[f"blocks/{i}"]) == pytest.approx(manual, rel=1e-6)
  assert float(norms["norm"]) == pytest.approx(np.sqrt(5.0), rel=1e-6)  # scale ones, bias zeros
  assert "blocks/0/kernel" in norms_by_layer(state, per_leaf=True)


def test_norms_by_layer_root_leaves_dtypes_and_errors():
  norms = norms_by_layer({"w": jnp.full(4, 2.0, jnp.bfloat16), "b": jnp.array(3.0), "step": jnp.array(4)})
  assert {k: float(v) for k, v in norms.items()} == {"b": 3.0, "step": 4.0, "w": 4.0}
  assert norms["w"].dtype == jnp.float32
  assert float(norms_by_layer(jnp.array([3.0, 4.0]))[""]) == 5.0
  # Accumulation in float32: a bfloat16 sum of squares of 4096 ones would stop at 256.
  assert float(norms_by_layer({"w": jnp.ones(4096, jnp.bfloat16)})["w"]) == 64.0
  with pytest.raises(ValueError, match=r"jaxbn.norms_by_layer: tree must have at least one array leaf"):
    norms_by_layer({})
  with pytest.raises(TypeError, match=r"jaxbn.norms_by_layer: every leaf must be a numeric array, got dtype bool"):
    norms_by_layer({"a": jnp.ones(2, bool)})
  with pytest.raises(ValueError, match=r"both named 'a/b'"):
    norms_by_layer({"a/b": {"x": jnp.ones(1)}, "a": {"b": {"y": jnp.ones(1)}}})


# ---- stability_threshold -----------------------------------------------------------------------------


def _simulate(optimizer, curvature, steps):
  """|x| after ``steps`` updates of ``optimizer`` on f(x) = curvature x^2 / 2 from x = 1."""

  def body(carry, _):
    x, state = carry
    updates, state = optimizer.update(curvature * x, state, x)
    return (optax.apply_updates(x, updates), state), None

  x = jnp.ones((), jnp.float32)
  (x, _), _ = jax.lax.scan(body, (x, optimizer.init(x)), None, length=steps)
  return float(jnp.abs(x))


@pytest.mark.parametrize(
  ("momentum", "nesterov", "expected"),
  [(0.0, False, 2.0), (0.5, False, 3.0), (0.9, False, 3.8), (0.5, True, 1.5), (0.9, True, 3.8 / 2.8)],
)
def test_stability_threshold_against_optax_sgd(momentum, nesterov, expected):
  lr = 0.1
  threshold = float(stability_threshold(lr, momentum=momentum, nesterov=nesterov))
  assert threshold == pytest.approx(expected / lr, rel=1e-6)
  optimizer = optax.sgd(lr, momentum=momentum or None, nesterov=nesterov)
  below = _simulate(optimizer, 0.99 * threshold, 3000)
  above = _simulate(optimizer, 1.01 * threshold, 3000)
  assert below < 1.0, below  # bounded (in fact contracting)
  assert not above < 1e3, above  # divergent (possibly inf)
  # Nesterov's threshold is not heavy ball's: between the two, Nesterov diverges.
  if nesterov:
    heavy_ball = float(stability_threshold(lr, momentum=momentum))
    assert not _simulate(optimizer, 0.5 * (threshold + heavy_ball), 3000) < 1e3


def test_stability_threshold_arrays_and_jit():
  lrs = jnp.array([0.1, 0.01])
  np.testing.assert_allclose(stability_threshold(lrs), [20.0, 200.0], rtol=1e-6)
  jitted = jax.jit(lambda lr, b: stability_threshold(lr, momentum=b, nesterov=True))
  np.testing.assert_allclose(jitted(0.1, 0.9), 38.0 / 2.8, rtol=1e-6)
  with jax.enable_x64(True):
    assert stability_threshold(jnp.float64(0.1)).dtype == jnp.float64


# ---- errors --------------------------------------------------------------------------------------


def test_argument_errors():
  params = {"w": jnp.ones((1, 1)), "b": jnp.ones(2)}
  grad_fn = _quadratic_grad(jnp.eye(3))
  top = "jaxbn.top_hessian_eigenvalue"
  with pytest.raises(ValueError, match=rf"{top}: method must be one of \('lanczos', 'power'\), got 'arnoldi'"):
    top_hessian_eigenvalue(grad_fn, params, method="arnoldi")
  with pytest.raises(ValueError, match=rf"{top}: num_iters must be >= 1, got 0"):
    top_hessian_eigenvalue(grad_fn, params, num_iters=0)
  for bad in (2.5, True, jnp.array(3)):
    with pytest.raises(TypeError, match=rf"{top}: num_iters must be a positive Python int"):
      top_hessian_eigenvalue(grad_fn, params, num_iters=bad)
  with pytest.raises(ValueError, match=rf"{top}: tol must be >= 0, got -1.0"):
    top_hessian_eigenvalue(grad_fn, params, tol=-1.0)
  with pytest.raises(TypeError, match=rf"{top}: key must be a PRNG key"):
    top_hessian_eigenvalue(grad_fn, params, key=3)
  with pytest.raises(ValueError, match=rf"{top}: mode must be one of \('forward', 'reverse'\), got 'fwd'"):
    top_hessian_eigenvalue(grad_fn, params, mode="fwd")
  with pytest.raises(ValueError, match=rf"{top}: init must have the same leaf shapes as params, got a leaf of shape"):
    top_hessian_eigenvalue(grad_fn, params, init={"w": jnp.ones(1), "b": jnp.ones(2)})
  with pytest.raises(ValueError, match=rf"{top}: init must have the same tree structure as params"):
    top_hessian_eigenvalue(grad_fn, params, init=[jnp.ones(1), jnp.ones(2)])
  with pytest.raises(TypeError, match=rf"{top}: every leaf of params must have a real floating dtype, got int32"):
    top_hessian_eigenvalue(grad_fn, {**params, "step": jnp.array(1)})
  with pytest.raises(ValueError, match=rf"{top}: params must be a pytree with at least one array leaf"):
    top_hessian_eigenvalue(grad_fn, {})
  with pytest.raises(ValueError, match=rf"{top}: grad_fn\(params\) must have the same tree structure as params"):
    top_hessian_eigenvalue(lambda p: grad_fn(p)["w"], params)
  with pytest.raises(ValueError, match=r"jaxbn.hessian_vector_product: vector must have the same leaf shapes"):
    hessian_vector_product(grad_fn, params, {"w": jnp.ones(2), "b": jnp.ones(2)})

  thr = "jaxbn.stability_threshold"
  with pytest.raises(ValueError, match=rf"{thr}: learning_rate must be > 0, got 0.0"):
    stability_threshold(0.0)
  with pytest.raises(ValueError, match=rf"{thr}: momentum must be in \[0, 1\), got 1.0"):
    stability_threshold(0.1, momentum=1.0)
  with pytest.raises(TypeError, match=rf"{thr}: nesterov must be a Python bool, got 'yes'"):
    stability_threshold(0.1, momentum=0.9, nesterov="yes")
  with pytest.raises(TypeError, match=rf"{thr}: learning_rate must be a real number or array, got None"):
    stability_threshold(None)
