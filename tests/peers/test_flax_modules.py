"""jaxbn.linen.BatchNorm and jaxbn.nnx.BatchNorm as drop-ins for Flax's, in a ResNet built like Flax's ImageNet example.

The same model is built twice, once with ``flax.linen.BatchNorm`` and once with the jaxbn module
(the one-line swap), and compared on variable structure, initial values, training outputs,
gradients and running statistics over several SGD steps, evaluation outputs, under ``jax.jit``,
and with ``axis_name`` under ``jax.shard_map`` and ``jax.pmap``.
"""

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxbn.linen
import jaxbn.nnx

TOL = {"rtol": 2e-4, "atol": 2e-5}
D = 8  # devices


class ResNetBlock(nn.Module):
  """The basic block of Flax's ImageNet example (``examples/imagenet/models.py``)."""

  filters: int
  conv: Any
  norm: Any
  act: Callable
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = self.norm()(y)
    y = self.act(y)
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


class ResNet(nn.Module):
  """A small ResNet wired like Flax's ImageNet example; ``norm_cls`` is the only difference between variants."""

  norm_cls: Any
  stage_sizes: tuple[int, ...] = (1, 1)
  num_filters: int = 4
  num_classes: int = 3
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = partial(nn.Conv, use_bias=False)
    norm = partial(self.norm_cls, use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=self.axis_name)
    x = conv(self.num_filters, (3, 3), name="conv_init")(x)
    x = norm(name="bn_init")(x)
    x = nn.relu(x)
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = ResNetBlock(self.num_filters * 2**i, strides=strides, conv=conv, norm=norm, act=nn.relu)(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


def _batches(n, rows, seed=0):
  rng = np.random.default_rng(seed)
  xs = [jnp.asarray(rng.normal(0.5, 2.0, (rows, 8, 8, 3)), jnp.float32) for _ in range(n)]
  ys = [jnp.asarray(rng.integers(0, 3, rows)) for _ in range(n)]
  return xs, ys


def _loss(model, params, batch_stats, x, y):
  logits, upd = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits, upd["batch_stats"])


def _step(model, params, batch_stats, x, y, reduce=None):
  grads, (logits, batch_stats) = jax.grad(partial(_loss, model), has_aux=True)(params, batch_stats, x, y)
  if reduce is not None:
    grads = reduce(grads)
  params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
  return params, batch_stats, grads, logits


def _shapes(model):
  return jax.eval_shape(partial(model.init, train=False), jax.random.key(0), jnp.ones((2, 8, 8, 3)))


def _init(model, seed=0):
  """Variables of the right structure, filled with NumPy draws (compiling Flax's random
  initializers for a whole ResNet costs more CPU time than all the comparisons)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, leaf.shape) if name == "scale" else np.ones(leaf.shape)
    else:  # bias, mean
      value = rng.normal(0.0, 0.1, leaf.shape) if name == "bias" else np.zeros(leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, _shapes(model))


def _close(a, b, **tol):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), **(tol or TOL)), a, b)


def test_swap_keeps_checkpoint_structure():
  # Initial values are compared layer by layer in tests/test_linen.py; here the whole model's
  # variable tree: names, nesting, shapes and dtypes.
  theirs, ours = _shapes(ResNet(nn.BatchNorm)), _shapes(ResNet(jaxbn.linen.BatchNorm))
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), ours) == jax.tree.map(lambda a: (a.shape, a.dtype), theirs)
  assert set(theirs["batch_stats"]["ResNetBlock_1"]) == {"BatchNorm_0", "BatchNorm_1", "norm_proj"}


def test_resnet_training_and_eval_match_flax_under_jit():
  flax_model, our_model = ResNet(nn.BatchNorm), ResNet(jaxbn.linen.BatchNorm)
  v = _init(flax_model)
  flax_state = our_state = (v["params"], v["batch_stats"])
  flax_step, our_step = jax.jit(partial(_step, flax_model)), jax.jit(partial(_step, our_model))
  xs, ys = _batches(3, 16)
  for x, y in zip(xs, ys, strict=True):
    fp, fs, fg, fl = flax_step(*flax_state, x, y)
    op, os_, og, ol = our_step(*our_state, x, y)
    _close(ol, fl)
    _close(og, fg)
    _close(os_, fs)
    _close(op, fp)
    flax_state, our_state = (fp, fs), (op, os_)
  # The statistics did move, so the comparison above is not between two initial states.
  assert float(jnp.abs(our_state[1]["bn_init"]["mean"]).max()) > 1e-2
  evaluate = lambda m, s: jax.jit(lambda p, b, x: m.apply({"params": p, "batch_stats": b}, x, train=False))(*s, xs[0])
  _close(evaluate(our_model, our_state), evaluate(flax_model, flax_state))


def _mesh():
  return jax.make_mesh((D,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))


def test_resnet_matches_flax_with_axis_name_under_shard_map():
  flax_model = ResNet(nn.BatchNorm, stage_sizes=(1,), axis_name="batch")
  our_model = ResNet(jaxbn.linen.BatchNorm, stage_sizes=(1,), axis_name="batch")
  v = _init(flax_model)  # init ignores axis_name, as in Flax
  xs, ys = _batches(2, 2 * D, seed=1)
  # Under shard_map the gradient of replicated params is already summed over devices (the
  # transpose of their implicit broadcast); dividing by D gives the gradient of the global mean loss.
  global_mean = partial(jax.tree.map, lambda g: g / D)

  def sharded(model):
    body = partial(_step, model, reduce=global_mean)
    return jax.jit(
      jax.shard_map(
        body, mesh=_mesh(), in_specs=(P(), P(), P("batch"), P("batch")), out_specs=(P(), P(), P(), P("batch"))
      )
    )

  flax_step, our_step = sharded(flax_model), sharded(our_model)
  flax_state = our_state = (v["params"], v["batch_stats"])
  for x, y in zip(xs, ys, strict=True):
    fp, fs, fg, _ = flax_step(*flax_state, x, y)
    op, os_, og, _ = our_step(*our_state, x, y)
    _close(og, fg)
    _close(os_, fs)
    flax_state, our_state = (fp, fs), (op, os_)


def test_resnet_matches_flax_with_axis_name_under_pmap():
  flax_model = ResNet(nn.BatchNorm, stage_sizes=(1,), axis_name="batch")
  our_model = ResNet(jaxbn.linen.BatchNorm, stage_sizes=(1,), axis_name="batch")
  v = _init(flax_model)
  x, y = _batches(1, 2 * D, seed=2)
  pmean = partial(jax.lax.pmean, axis_name="batch")
  x, y = x[0].reshape(D, 2, 8, 8, 3), y[0].reshape(D, 2)
  rep = jax.tree.map(lambda a: jnp.broadcast_to(a, (D, *a.shape)), (v["params"], v["batch_stats"]))
  in_axes = (0, 0, 0, 0)
  fp, fs, fg, fl = jax.pmap(partial(_step, flax_model, reduce=pmean), "batch", in_axes=in_axes)(*rep, x, y)
  op, os_, og, ol = jax.pmap(partial(_step, our_model, reduce=pmean), "batch", in_axes=in_axes)(*rep, x, y)
  _close(ol, fl)
  _close(og, fg)
  _close(os_, fs)
  _close(op, fp)
  # Every replica holds the same statistics.
  _close(os_, jax.tree.map(lambda a: jnp.broadcast_to(a[0], a.shape), os_), rtol=0, atol=0)


class NnxNet(nnx.Module):
  def __init__(self, norm_cls, *, rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs)
    self.bn = norm_cls(4, momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(4, 4, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = norm_cls(4, momentum=0.9, scale_init=nnx.initializers.zeros_init(), rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.bn(self.conv(x)))
    h = nnx.relu(h + self.bn2(self.conv2(h)))
    return self.head(h.mean(axis=(1, 2)))


def test_nnx_training_and_eval_match_flax_nnx():
  theirs, ours = NnxNet(nnx.BatchNorm, rngs=nnx.Rngs(0)), NnxNet(jaxbn.nnx.BatchNorm, rngs=nnx.Rngs(0))
  ts, os_ = nnx.state(theirs), nnx.state(ours)
  assert jax.tree.structure(ts) == jax.tree.structure(os_)
  jax.tree.map(np.testing.assert_array_equal, ts, os_)
  assert {
    type(v) for v in jax.tree.leaves(nnx.state(ours, nnx.BatchStat), is_leaf=lambda v: isinstance(v, nnx.Variable))
  } == {nnx.BatchStat}

  @nnx.jit
  def step(model, optimizer, x, y):
    def loss(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    value, grads = nnx.value_and_grad(loss)(model)
    optimizer.update(model, grads)
    return value, grads

  opt_theirs = nnx.Optimizer(theirs, optax.sgd(0.1), wrt=nnx.Param)
  opt_ours = nnx.Optimizer(ours, optax.sgd(0.1), wrt=nnx.Param)
  xs, ys = _batches(3, 16, seed=3)
  for x, y in zip(xs, ys, strict=True):
    lt, gt = step(theirs, opt_theirs, x, y)
    lo, go = step(ours, opt_ours, x, y)
    _close(lo, lt)
    _close(go, gt)
    _close(nnx.state(ours), nnx.state(theirs))
  theirs.eval()
  ours.eval()
  _close(ours(xs[0]), theirs(xs[0]))
  assert ours.bn.use_running_average and ours.bn2.use_running_average


@pytest.mark.parametrize("shape", [(4096, 4), (64, 8, 8, 4)])
def test_accurate_where_flax_fast_variance_is_not(shape):
  # |mean| / std = 1e4: Flax's default E[x^2] - E[x]^2 loses the variance; jaxbn does not.
  x = jnp.asarray(1e4 + np.random.default_rng(4).normal(0.0, 1.0, shape), jnp.float32)
  true_var = np.var(np.asarray(x, np.float64).reshape(-1, shape[-1]), axis=0)
  errors = {}
  for name, cls in (("flax", nn.BatchNorm), ("jaxbn", jaxbn.linen.BatchNorm)):
    bn = cls(use_running_average=False, momentum=0.0)
    variables = bn.init(jax.random.key(0), x)
    _, upd = bn.apply(variables, x, mutable=["batch_stats"])
    errors[name] = float(np.max(np.abs(np.asarray(upd["batch_stats"]["var"]) / true_var - 1)))
  assert errors["jaxbn"] < 1e-3, errors
  assert errors["flax"] > 1e-1, errors  # documents the failure the swap removes


# ---- inputs Flax's modules take: integer, boolean and complex ----------------------------------


def _int_input(dtype, shape=(8, 4, 3), seed=5):
  rng = np.random.default_rng(seed)
  values = rng.integers(0, 2, shape) if dtype == jnp.bool_ else rng.integers(0, 9, shape) * 3
  return jnp.asarray(values, dtype)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_], ids=["int32", "uint8", "bool"])
def test_linen_integer_and_boolean_input_match_flax(dtype):
  x = _int_input(dtype)
  results = {}
  for name, cls in (("flax", nn.BatchNorm), ("jaxbn", jaxbn.linen.BatchNorm)):
    module = cls(momentum=0.9)
    v = module.init(jax.random.key(0), x, use_running_average=False)
    y, upd = module.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    y_eval = module.apply({**v, **upd}, x, use_running_average=True)
    results[name] = (y, upd["batch_stats"], y_eval)
  for ours, theirs in zip(results["jaxbn"], results["flax"], strict=True):
    assert jax.tree.map(lambda a: a.dtype, ours) == jax.tree.map(lambda a: a.dtype, theirs)
    _close(ours, theirs)
  assert results["jaxbn"][0].dtype == jnp.float32


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_], ids=["int32", "uint8", "bool"])
def test_nnx_integer_and_boolean_input_match_flax(dtype):
  x = _int_input(dtype)
  theirs, ours = (
    nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0)),
    jaxbn.nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0)),
  )
  for _ in range(2):
    yt, yo = theirs(x), ours(x)
    assert yo.dtype == yt.dtype == jnp.float32
    _close(yo, yt)
  _close(nnx.state(ours), nnx.state(theirs))
  theirs.eval()
  ours.eval()
  _close(ours(x), theirs(x))


def _complex_input(shape, seed, offset=0.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(offset + rng.normal(1.0, 2.0, shape) + 1j * rng.normal(-0.5, 1.0, shape), jnp.complex64)


def _dtypes(tree):
  return jax.tree.map(lambda a: jnp.dtype(a.dtype), tree)


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_linen_complex_input_matches_flax(masked):
  # Flax: complex mean, real variance mean(|x|^2) - |mean|^2, complex output, complex running mean.
  x = _complex_input((8, 4, 3), seed=6)
  w = _complex_input((8, 4, 3), seed=7)
  mask = jnp.asarray(np.random.default_rng(8).random((8, 4, 1)) > 0.3) if masked else None
  params = {"scale": jnp.linspace(0.5, 1.5, 3), "bias": jnp.linspace(-1.0, 1.0, 3)}

  def run(cls):
    module = cls(momentum=0.9)
    v = module.init(jax.random.key(0), x, use_running_average=False)

    def loss(params, stats, x):
      y, upd = module.apply(
        {"params": params, "batch_stats": stats}, x, use_running_average=False, mask=mask, mutable=["batch_stats"]
      )
      return jnp.sum(jnp.real(y * jnp.conj(w))), (y, upd["batch_stats"])

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    stats, out = v["batch_stats"], []
    for i in range(2):  # the second step starts from a complex running mean
      (_, (y, stats)), grads = step(params, stats, x * (i + 1))
      out.append((y, grads, stats))
    out.append(module.apply({"params": params, "batch_stats": stats}, x, use_running_average=True))
    return out

  theirs, ours = run(nn.BatchNorm), run(jaxbn.linen.BatchNorm)
  assert _dtypes(ours) == _dtypes(theirs)
  assert _dtypes(ours[0][2]) == {"mean": jnp.complex64, "var": jnp.float32}
  assert ours[0][0].dtype == ours[-1].dtype == jnp.complex64
  _close(ours, theirs)


def test_nnx_complex_input_matches_flax():
  x = _complex_input((8, 4, 3), seed=9)
  w = _complex_input((8, 4, 3), seed=10)
  kw = {"momentum": 0.9, "scale_init": nnx.initializers.uniform(), "rngs": nnx.Rngs(0)}
  theirs, ours = nnx.BatchNorm(3, **kw), jaxbn.nnx.BatchNorm(3, **{**kw, "rngs": nnx.Rngs(0)})

  def loss(model, x):
    return jnp.sum(jnp.real(model(x) * jnp.conj(w)))

  for i in range(2):
    with warnings.catch_warnings():  # Flax casts the complex running mean to float32, with warnings
      warnings.simplefilter("ignore")
      gt = nnx.grad(loss)(theirs, x * (i + 1))
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # jaxbn takes the real part explicitly, as documented
      go = nnx.grad(loss)(ours, x * (i + 1))
    assert _dtypes(go) == _dtypes(gt)
    _close(go, gt)
  assert _dtypes(nnx.state(ours)) == _dtypes(nnx.state(theirs))
  _close(nnx.state(ours), nnx.state(theirs))
  for model in (theirs, ours):
    model.eval()
  assert ours(x).dtype == jnp.complex64
  _close(ours(x), theirs(x))


def test_linen_complex_input_with_axis_name_under_vmap_matches_flax():
  x = _complex_input((4, 6, 3), seed=11)  # 4 replicas of 6 rows: equal counts, so Flax's mean of means is exact

  def run(cls):
    module = cls(momentum=0.5, axis_name="d")
    v = module.init(jax.random.key(0), x[0], use_running_average=False)
    step = lambda x: module.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    return jax.jit(jax.vmap(step, axis_name="d"))(x)

  (yt, ut), (yo, uo) = run(nn.BatchNorm), run(jaxbn.linen.BatchNorm)
  # Flax stacks the mean and mean(|x|^2) for one pmean, which makes its variance complex (with a zero
  # imaginary part); jaxbn's stays real, as Flax's is without axis_name.
  assert _dtypes(uo) == {"batch_stats": {"mean": jnp.complex64, "var": jnp.float32}}
  np.testing.assert_array_equal(np.imag(ut["batch_stats"]["var"]), 0.0)
  _close((yo, uo), (yt, ut))
  # Every replica normalizes with the statistics of all 24 rows.
  both = np.asarray(x, np.complex128).reshape(24, 3)
  np.testing.assert_allclose(uo["batch_stats"]["var"][0], 0.5 + 0.5 * np.var(both, axis=0), rtol=1e-5)
