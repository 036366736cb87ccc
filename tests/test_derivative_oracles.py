"""Every derivative of the full-batch step against an oracle outside jaxbn, in float64.

The oracle is ``jax.grad`` / ``jax.jvp`` / ``jax.hessian`` of ONE ordinary pass of the same model
built with Flax's own batch norm (``flax.linen.BatchNorm``, ``flax.nnx.BatchNorm``): over all rows
for ``bn_mode="exact"``, over each ghost batch (the step's micro-batches) for ``bn_mode="ghost"``.
jaxbn's step, its Hessian-vector products and its sharpness must equal those derivatives for every
loop, micro-batch size (with and without a remainder) and device count.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn.training import TrainState, full_batch_step, linen_loss, nnx_loss, sharpness
from jaxbn.training.exact import objective_gradient
from jaxbn.training.loops import HostLoop
from jaxbn.training.sweep import SCAN, MicroBatches

pytestmark = pytest.mark.slow  # float64 Hessians of whole models: CI runs them; -m "not slow" skips them

xent = optax.softmax_cross_entropy_with_integer_labels
F64 = jnp.float64


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


class Net(nn.Module):
  """Dense -> BN -> relu, twice, then Dense: the model in which exact mode's Hessian was wrong."""

  bn: type = jaxbn.linen.BatchNorm
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x):
    for width in (8, 6):
      x = nn.Dense(width, param_dtype=F64)(x)
      x = self.bn(use_running_average=False, momentum=0.8, param_dtype=F64, axis_name=self.axis_name)(x)
      x = nn.relu(x)
    return nn.Dense(4, param_dtype=F64)(x)


def _data(n, seed=0):
  rng = np.random.default_rng(seed)
  return {"x": jnp.asarray(rng.normal(size=(n, 5)) * 1.5 + 2.0, F64), "y": jnp.asarray(np.arange(n) % 4)}


def _recorder() -> optax.GradientTransformation:
  """An 'optimizer' whose state becomes the gradient it receives; the parameters stay."""
  return optax.GradientTransformation(
    lambda params: jax.tree.map(jnp.zeros_like, params),
    lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
  )


@functools.cache
def _trained_variables(n=36):
  """Parameters after a few plain steps, away from the initialization's symmetries (computed once per ``n``)."""
  data = _data(n, seed=1)
  variables = Net(nn.BatchNorm).init(jax.random.key(1), data["x"])
  params = variables["params"]

  def loss(p):
    out, _ = Net(nn.BatchNorm).apply({"params": p, **variables}, data["x"], mutable=["batch_stats"])
    return jnp.mean(xent(out, data["y"]))

  grad = jax.jit(jax.grad(loss))  # compiled once: ten eager traces of a flax model cost tens of seconds
  for _ in range(10):
    params = jax.tree.map(lambda p, g: p - 0.3 * g, params, grad(params))
  return {"params": params, "batch_stats": variables["batch_stats"]}


def _flax_objective(variables, data, blocks):
  """Row-weighted mean over ``blocks`` (index arrays) of the mean loss of one flax pass per block."""
  n = sum(len(b) for b in blocks)

  def objective(params):
    total = 0.0
    for rows in blocks:
      out, _ = Net(nn.BatchNorm).apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, data["x"][rows], mutable=["batch_stats"]
      )
      total += len(rows) / n * jnp.mean(xent(out, data["y"][rows]))
    return total

  return jax.jit(objective)  # its gradient, Hessian-vector products and Hessian compile once, not op by op


def _ghost_blocks(n, micro_batch_size, devices=1):
  """The step's micro-batches: per device block of ``n/devices`` rows, contiguous slices of ``m`` rows."""
  per = n // devices
  m = per if micro_batch_size is None else min(max(micro_batch_size // devices, 1), per)
  blocks = []
  for start in range(0, per, m):
    blocks.append(np.concatenate([np.arange(d * per + start, d * per + min(start + m, per)) for d in range(devices)]))
  return blocks


def _dense_hessian(objective, params):
  flat, unravel = ravel_pytree(params)
  return np.asarray(jax.jit(jax.hessian(lambda f: objective(unravel(f))))(flat)), unravel


class _Oracle:
  """The oracle's derivatives at ``_trained_variables(n)`` on ``_data(n)`` for one layout of the flax passes,
  each computed on first use and kept (:func:`_oracle`)."""

  def __init__(self, n, blocks):
    self.variables, self.data = _trained_variables(n), _data(n)
    self.objective = _flax_objective(self.variables, self.data, blocks)
    self.params = self.variables["params"]

  @functools.cached_property
  def loss(self):
    return float(self.objective(self.params))

  @functools.cached_property
  def grad(self):
    return jax.grad(self.objective)(self.params)

  @functools.cached_property
  def top(self):
    """The top eigenvalue of the dense Hessian."""
    return np.linalg.eigvalsh(_dense_hessian(self.objective, self.params)[0])[-1]

  @functools.cached_property
  def hvp(self):
    """The Hessian-vector product along ``_vector(params)``."""
    return jax.jvp(jax.grad(self.objective), (self.params,), (_vector(self.params),))[1]


def _oracle(n, bn_mode, micro_batch_size=None, devices=1):
  """The oracle of the step with these settings: one flax pass over all rows (``"exact"``, whatever the
  micro-batches) or one per ghost batch. Kept per process, so that the cases that share one (the exact mode's
  micro-batch sizes and loops, a ghost layout's two loops) build its programs once."""
  return _layout_oracle(n, None, 1) if bn_mode == "exact" else _layout_oracle(n, micro_batch_size, devices)


@functools.cache
def _layout_oracle(n, micro_batch_size, devices):
  return _Oracle(n, _ghost_blocks(n, micro_batch_size, devices))


def _assert_tree_close(actual, expected, rtol, atol):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


def _vector(params, seed=3):
  flat, unravel = ravel_pytree(params)
  return unravel(jnp.asarray(np.random.default_rng(seed).normal(size=flat.shape), F64))


CASES = [
  # (bn_mode, loop, micro_batch_size) on 36 rows: one micro-batch, even ones, a remainder. Cases that share an
  # oracle (every exact one; ghost batches of 10 on both loops) are neighbours, so that they tend to run in the
  # same process, which builds it once.
  ("exact", "scan", None),
  ("exact", "scan", 10),
  ("exact", "host", 10),
  ("ghost", "scan", 10),
  ("ghost", "host", 10),
  ("ghost", "scan", 12),
]


@pytest.mark.parametrize(("bn_mode", "loop", "micro_batch_size"), CASES)
def test_linen_gradient_hvp_and_sharpness_equal_one_flax_pass(bn_mode, loop, micro_batch_size):
  n = 36
  oracle = _oracle(n, bn_mode, micro_batch_size)
  variables, data, params = oracle.variables, oracle.data, oracle.params
  loss_fn = linen_loss(Net(), xent)
  options = dict(micro_batch_size=micro_batch_size, bn_mode=bn_mode, loop=loop, donate=False)
  options.update(sharpness_every=1, sharpness_iters=40)

  # The gradient the step applies, and the sharpness it reports: the top eigenvalue of the dense Hessian.
  state = TrainState.create(params, variables["batch_stats"], _recorder())
  new, metrics = full_batch_step(loss_fn, _recorder(), **options)(state, data)
  _assert_tree_close(new.opt_state, oracle.grad, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(float(metrics.loss), oracle.loss, rtol=1e-12)
  assert metrics.sharpness.dtype == F64
  np.testing.assert_allclose(float(metrics.sharpness), oracle.top, rtol=1e-6)

  # Hessian-vector products through the step's accumulated gradient.
  # The host loop's are a sweep of compiled per-micro-batch JVPs, its gradient runs from Python.
  host = loop == "host"
  gradient = objective_gradient(
    MicroBatches("test", loss_fn, micro_batch_size, loop=HostLoop() if host else SCAN), bn_mode
  )
  grad_fn = lambda p: gradient(p, variables["batch_stats"], data)[1]
  grad_fn = grad_fn if host else jax.jit(grad_fn)
  v = _vector(params)
  modes = ("forward", "reverse") if (bn_mode, loop, micro_batch_size) == ("exact", "scan", 10) else ("forward",)
  for mode in modes:
    _assert_tree_close(jaxbn.hessian_vector_product(grad_fn, params, v, mode=mode), oracle.hvp, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("bn_mode", ["exact", "ghost"])
def test_eight_devices_equal_one_flax_pass(bn_mode):
  """jit over data sharded on 8 devices, shard_map and pmap: the same derivatives, per-layer gradient norms and
  running statistics.

  Micro-batches of 32 rows over 8 devices of 6 rows: 4 of each device's rows, then its 2 others
  masked in a remainder on every device.
  """
  n, micro_batch_size = 48, 32
  oracle = _oracle(n, bn_mode, micro_batch_size, devices=8)
  variables, data, params = oracle.variables, oracle.data, oracle.params
  expected_grad, top = oracle.grad, oracle.top
  # Exact mode folds the statistics of all rows into the running ones: flax's update on all rows.
  _, expected_stats = Net(nn.BatchNorm).apply(
    {"params": params, "batch_stats": variables["batch_stats"]}, data["x"], mutable=["batch_stats"]
  )
  options = dict(bn_mode=bn_mode, sharpness_every=1, sharpness_iters=40, layer_norms=True, donate=False)
  state = TrainState.create(params, variables["batch_stats"], _recorder())
  # jit on sharded data: exact mode on the host loop, ghost on the scanned one (the default).
  loop = "host" if bn_mode == "exact" else "scan"

  def check(new, metrics):
    _assert_tree_close(new.opt_state, expected_grad, rtol=1e-10, atol=1e-12)
    # The per-layer gradient norms the step reports (layer_norms=True): those of the oracle's gradient.
    assert metrics.layer_grad_norms.keys() == expected_grad.keys()
    for name, norm in metrics.layer_grad_norms.items():
      np.testing.assert_allclose(float(norm), float(optax.tree.norm(expected_grad[name])), rtol=1e-10)
    if bn_mode == "exact":  # kept in float32 (as initialized): a few float32 roundings (eps 1.2e-7)
      _assert_tree_close(new.batch_stats, expected_stats["batch_stats"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(metrics.sharpness), top, rtol=1e-6)

  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharded = jax.device_put(data, NamedSharding(mesh, P("data")))
  step = full_batch_step(linen_loss(Net(), xent), _recorder(), micro_batch_size=micro_batch_size, loop=loop, **options)
  check(*step(state, sharded))

  per_device = micro_batch_size // 8  # under axis_name, the micro-batch size counts each device's rows
  step = full_batch_step(
    linen_loss(Net(axis_name="data"), xent),
    _recorder(),
    micro_batch_size=per_device,
    axis_name="data",
    jit=False,
    **options,
  )
  check(*jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data")), out_specs=P()))(state, data))
  stacked = jax.tree.map(lambda a: a.reshape(8, -1, *a.shape[1:]), data)
  check(*jax.pmap(step, axis_name="data", in_axes=(None, 0), out_axes=None)(state, stacked))


class NnxNet(nnx.Module):
  def __init__(self, bn, rngs):
    self.layers = nnx.List(
      [
        nnx.Linear(5, 8, param_dtype=F64, rngs=rngs),
        bn(8, momentum=0.8, param_dtype=F64, rngs=rngs),
        nnx.Linear(8, 6, param_dtype=F64, rngs=rngs),
        bn(6, momentum=0.8, param_dtype=F64, rngs=rngs),
      ]
    )
    self.head = nnx.Linear(6, 4, param_dtype=F64, rngs=rngs)

  def __call__(self, x):
    for i in range(0, 4, 2):
      x = jnp.tanh(self.layers[i + 1](self.layers[i](x)))
    return self.head(x)


@pytest.mark.parametrize(("bn_mode", "micro_batch_size"), [("exact", 10), ("ghost", 10)])
def test_nnx_gradient_and_sharpness_equal_one_flax_pass(bn_mode, micro_batch_size):
  n = 36
  data = _data(n)
  model = NnxNet(jaxbn.nnx.BatchNorm, nnx.Rngs(0))
  oracle = NnxNet(nnx.BatchNorm, nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  nnx.update(oracle, params)
  graphdef, _, rest = nnx.split(oracle, nnx.Param, ...)
  blocks = [np.arange(n)] if bn_mode == "exact" else _ghost_blocks(n, micro_batch_size)

  def objective(p):
    total = 0.0
    for rows in blocks:
      m = nnx.merge(graphdef, p, jax.tree.map(lambda a: a, rest))  # fresh variables at this trace level
      m.train()
      total += len(rows) / n * jnp.mean(xent(m(data["x"][rows]), data["y"][rows]))
    return total

  loss_fn = nnx_loss(model, xent)
  new, metrics = full_batch_step(
    loss_fn, _recorder(), micro_batch_size=micro_batch_size, bn_mode=bn_mode, sharpness_every=1, sharpness_iters=40
  )(loss_fn.init_state(_recorder()), data)
  # Compiled, as _flax_objective's: flax's nnx modules op by op take seconds.
  _assert_tree_close(new.opt_state, jax.jit(jax.grad(objective))(params), rtol=1e-10, atol=1e-12)
  top = np.linalg.eigvalsh(_dense_hessian(objective, params)[0])[-1]
  np.testing.assert_allclose(float(metrics.sharpness), top, rtol=1e-6)


def test_standalone_sharpness_equals_the_dense_top_eigenvalue():
  """jaxbn.training.sharpness, outside any step: exact mode with a remainder."""
  oracle = _oracle(36, "exact")  # that of the linen cases in exact mode
  state = TrainState.create(oracle.params, oracle.variables["batch_stats"], optax.sgd(0.1))
  measure = sharpness(linen_loss(Net(), xent), micro_batch_size=10, bn_mode="exact", num_iters=40)
  value, _ = measure(state, oracle.data)
  np.testing.assert_allclose(float(value), oracle.top, rtol=1e-6)
