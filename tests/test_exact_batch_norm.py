"""bn_mode='exact': batch norm over the WHOLE dataset, processed in micro-batches, equals one big batch."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbn
from jaxbn.training import TrainState, full_batch_step, linen_loss, nnx_loss

xent = optax.softmax_cross_entropy_with_integer_labels


def _recorder() -> optax.GradientTransformation:
  """An 'optimizer' that stores the gradient it receives and leaves the parameters unchanged."""
  return optax.GradientTransformation(
    lambda params: jax.tree.map(jnp.zeros_like, params),
    lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
  )


class MLP(nn.Module):
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    # Three batch norms with the running-average conventions users come from.
    for width, extra in ((12, {}), (10, {"unbiased_running_var": True}), (8, {"running_average": "debiased_ema"})):
      x = nn.Dense(width)(x)
      x = jaxbn.linen.BatchNorm(use_running_average=not train, momentum=0.8, axis_name=self.axis_name, **extra)(x)
      x = jnp.tanh(x)
    return nn.Dense(3)(x)


class CNN(nn.Module):
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    for channels in (4, 6, 5):
      x = nn.Conv(channels, (3,))(x)
      x = jaxbn.linen.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.axis_name)(x)
      x = nn.relu(x)
    return nn.Dense(3)(x.mean(1))


def _data(n, shape, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, *shape)) * 2.0 + 3.0  # far from zero mean: the statistics matter
  return {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(rng.integers(0, 3, n))}


def _reference(model, variables, data):
  """Loss, gradient and new running statistics of ordinary batch norm on the whole dataset at once."""

  def loss(params):
    out, updates = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]}, data["x"], mutable=["batch_stats"]
    )
    return jnp.mean(xent(out, data["y"])), updates["batch_stats"]

  (value, batch_stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  return value, grads, batch_stats


@functools.cache
def _whole_dataset(model_cls, shape, n=24):
  """``model_cls()``, ``_data(n, shape)``, the model's variables and :func:`_reference` on them. Kept per
  process: the cases of one model share them (its reference compiles once)."""
  model, data = model_cls(), _data(n, shape)
  variables = model.init(jax.random.key(1), data["x"][:2], train=False)
  return model, data, variables, _reference(model, variables, data)


def _close(actual, expected, atol=1e-5):
  for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=atol)


@pytest.mark.parametrize(
  "model_cls, shape, micro_batch_size",
  # One micro-batch, even ones, a remainder, single rows: each once, on the MLP or the CNN (each model's cases,
  # and the ghost-batch test after them, share a reference: _whole_dataset).
  [(CNN, (9, 2), None), (MLP, (5,), 8), (CNN, (9, 2), 7), (MLP, (5,), 1)],
)
def test_equals_one_batch_on_the_whole_dataset(model_cls, shape, micro_batch_size):
  model, data, variables, (loss, grads, batch_stats) = _whole_dataset(model_cls, shape)
  step = full_batch_step(linen_loss(model, xent), _recorder(), micro_batch_size=micro_batch_size, bn_mode="exact")
  new, metrics = step(TrainState.create(variables["params"], variables["batch_stats"], _recorder()), data)
  np.testing.assert_allclose(float(metrics.loss), float(loss), rtol=1e-5)
  _close(new.opt_state, grads)
  _close(new.batch_stats, batch_stats)


def test_ghost_batches_differ_so_the_comparison_can_fail():
  model, data, variables, (_, grads, _) = _whole_dataset(MLP, (5,))
  state = TrainState.create(variables["params"], variables["batch_stats"], _recorder())
  ghost = full_batch_step(linen_loss(model, xent), _recorder(), micro_batch_size=8)(state, data)[0]
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(ghost.opt_state), jax.tree.leaves(grads)))
  assert diff > 1e-3


@pytest.mark.slow
# Eight devices (jit on sharded data with a remainder on every device, shard_map, pmap): the gradient,
# sharpness and running statistics against one flax pass in float64, in
# tests/test_derivative_oracles.py::test_eight_devices_equal_one_flax_pass.


def test_nnx_model_equals_one_batch():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.List([nnx.Linear(5, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs), nnx.Linear(8, 6, rngs=rngs)])
      self.norms = nnx.List([jaxbn.nnx.BatchNorm(f, momentum=0.8, rngs=rngs) for f in (8, 8, 6)])
      self.out = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
      for dense, norm in zip(self.dense, self.norms, strict=True):
        x = jnp.tanh(norm(dense(x)))
      return self.out(x)

  data = _data(30, (5,))
  model = Net(nnx.Rngs(0))
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)

  def reference(params):
    m = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, batch_stats))
    return jnp.mean(xent(m(data["x"]), data["y"])), nnx.state(m, nnx.BatchStat)

  # Compiled: flax's nnx modules op by op take seconds.
  (loss, new_stats), grads = jax.jit(jax.value_and_grad(reference, has_aux=True))(params)
  loss_fn = nnx_loss(model, xent)
  step = full_batch_step(loss_fn, _recorder(), micro_batch_size=7, bn_mode="exact")
  new, metrics = step(loss_fn.init_state(_recorder()), data)
  np.testing.assert_allclose(float(metrics.loss), float(loss), rtol=1e-5)
  _close(new.opt_state, grads)
  _close(new.batch_stats, new_stats)


def test_training_with_exact_statistics_and_the_guard():
  model, data = MLP(), _data(40, (5,))
  variables = model.init(jax.random.key(1), data["x"][:2], train=False)
  opt = optax.sgd(0.1, momentum=0.9)
  step = full_batch_step(linen_loss(model, xent), opt, micro_batch_size=16, bn_mode="exact")
  state = TrainState.create(variables["params"], variables["batch_stats"], opt)
  losses = []
  for _ in range(15):
    state, metrics = step(state, data)
    losses.append(float(metrics.loss))
  assert losses[-1] < 0.8 * losses[0]
  before = jax.tree.map(np.asarray, state)
  bad = {**data, "x": data["x"].at[3, 0].set(jnp.nan)}
  state, metrics = step(state, bad)
  assert bool(metrics.skipped) and int(state.skipped) == 1
  for a, b in zip(jax.tree.leaves(state)[:-1], jax.tree.leaves(before)[:-1]):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_errors():
  data = _data(16, (5,))

  class FlaxBN(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.BatchNorm(use_running_average=False)(nn.Dense(4)(x)))

  class Ghost(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(jaxbn.linen.BatchNorm(use_running_average=False, ghost_batch_size=4)(nn.Dense(4)(x)))

  opt = optax.sgd(0.1)
  for model, err, match in (
    (FlaxBN(), TypeError, r"flax.linen.BatchNorm, which computes its statistics itself and cannot be given others"),
    (
      Ghost(),
      ValueError,
      r"jaxbn.linen.BatchNorm: the training loop supplies statistics over the whole dataset .* ghost_batch_size=4",
    ),
  ):
    variables = model.init(jax.random.key(0), data["x"])
    step = full_batch_step(linen_loss(model, xent), opt, micro_batch_size=8, bn_mode="exact")
    with pytest.raises(err, match=match):
      step(TrainState.create(variables["params"], variables["batch_stats"], opt), data)

  def functional_loss(params, batch_stats, batch, mask):  # statistics of its own, no jaxbn module
    stats = jaxbn.stats.compute_stats(batch["x"], (1,), mask=None if mask is None else mask[:, None])
    return jnp.mean(batch["x"] @ params["w"]), jaxbn.training.LossAux(stats={"layer": stats})

  step = full_batch_step(functional_loss, opt, update_batch_stats=lambda b, s: b, bn_mode="exact")
  with pytest.raises(ValueError, match=r"bn_mode='exact' needs the model's batch norms to be jaxbn's"):
    step(TrainState.create({"w": jnp.ones(5)}, {}, opt), data)
  with pytest.raises(ValueError, match=r"bn_mode must be 'ghost' or 'exact', got 'full'"):
    full_batch_step(linen_loss(MLP(), xent), opt, bn_mode="full")
  with pytest.raises(
    ValueError, match=r"full_batch_step: loop must be one of \('auto', 'scan', 'host'\), got 'python'"
  ):
    full_batch_step(linen_loss(MLP(), xent), opt, bn_mode="exact", loop="python")


def _plain_bn_loss(params, x, y):
  """A loss with batch norm written out by hand over all of ``x``: the oracle for the functional form."""
  h = x @ params["w1"]
  h = (h - h.mean(0, keepdims=True)) / jnp.sqrt(h.var(0, keepdims=True) + 1e-5) * params["scale"][None] + params[
    "bias"
  ][None]
  return jnp.mean(xent(jnp.tanh(h) @ params["w2"], y))


def _functional_params():
  rng = np.random.default_rng(5)
  return {
    "w1": jnp.asarray(rng.normal(size=(5, 6)), jnp.float32),
    "scale": jnp.asarray(1.0 + 0.1 * rng.normal(size=6), jnp.float32),
    "bias": jnp.asarray(0.1 * rng.normal(size=6), jnp.float32),
    "w2": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
  }


@pytest.mark.parametrize("micro_batch_size", [None, 8, 7])
def test_functional_batch_norm_takes_part_in_exact_mode(micro_batch_size):
  """A hand-written loss calling jaxbn.batch_norm gets whole-data statistics, like the modules."""
  data = _data(24, (5,))

  def loss_fn(params, batch_stats, batch, mask):
    h = batch["x"] @ params["w1"]
    h, _ = jaxbn.batch_norm(
      h,
      jaxbn.init_state(6),
      params["scale"],
      params["bias"],
      training=True,
      mask=None if mask is None else mask[:, None],
    )
    per_row = xent(jnp.tanh(h) @ params["w2"], batch["y"])
    valid = jnp.ones(per_row.shape, bool) if mask is None else mask
    return jnp.sum(jnp.where(valid, per_row, 0)) / jnp.sum(valid), jaxbn.training.LossAux()

  params = _functional_params()
  step = full_batch_step(loss_fn, _recorder(), micro_batch_size=micro_batch_size, bn_mode="exact")
  new, metrics = step(TrainState.create(params, {}, _recorder()), data)
  loss, grads = jax.value_and_grad(_plain_bn_loss)(params, data["x"], data["y"])
  np.testing.assert_allclose(float(metrics.loss), float(loss), rtol=1e-5)
  _close(new.opt_state, grads, atol=2e-5)


def _haiku_loss():
  hk = pytest.importorskip("haiku", reason="the haiku peer (dm-haiku) is not installed: pip install -e '.[peers]'")

  def forward(x):
    h = hk.Linear(6)(x)
    h = hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9)(h, is_training=True)
    return hk.Linear(3)(jnp.tanh(h))

  model = hk.transform_with_state(forward)
  params, hk_state = model.init(jax.random.key(0), jnp.ones((4, 5)))

  def loss_fn(params, batch_stats, batch, mask):
    out, _ = model.apply(params, hk_state, None, batch["x"])
    return jnp.mean(xent(out, batch["y"])), jaxbn.training.LossAux()

  return loss_fn, params


def _equinox_loss():
  eqx = pytest.importorskip("equinox", reason="the equinox peer is not installed: pip install -e '.[peers]'")

  layer = eqx.nn.BatchNorm(5, axis_name="batch")
  eqx_state = eqx.nn.State(layer)

  def loss_fn(params, batch_stats, batch, mask):
    out, _ = jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(batch["x"], eqx_state)
    return jnp.mean((out @ params["w"]) ** 2), jaxbn.training.LossAux()

  return loss_fn, {"w": jnp.ones(5)}


def _jaxbn_variant_loss(variant):
  def loss_fn(params, batch_stats, batch, mask):
    h = batch["x"] @ params["w1"]
    if variant == "ghost":
      h, _ = jaxbn.ghost_batch_norm(h, jaxbn.init_state(6), training=True, ghost_batch_size=4)
    else:
      h, _ = jaxbn.batch_renorm(h, jaxbn.init_state(6), training=True, rmax=2.0, dmax=1.0)
    return jnp.mean(xent(h @ params["w2"], batch["y"])), jaxbn.training.LossAux()

  return loss_fn, _functional_params()


def _hand_written_loss():
  def loss_fn(params, batch_stats, batch, mask):
    h = batch["x"] @ params["w1"]
    h = (h - h.mean(0, keepdims=True)) / jnp.sqrt(h.var(0, keepdims=True) + 1e-5)
    return jnp.mean(xent(h @ params["w2"], batch["y"])), jaxbn.training.LossAux()

  return loss_fn, _functional_params()


@pytest.mark.parametrize(
  "make, match",
  [
    (_haiku_loss, r"mixes the rows of a micro-batch at"),
    (_equinox_loss, r"mixes the rows of a micro-batch at"),
    (_hand_written_loss, r"mixes the rows of a micro-batch at sub at .*test_exact_batch_norm.py:\d+"),
    (lambda: _jaxbn_variant_loss("ghost"), r"jaxbn.ghost_batch_norm: the training loop supplies statistics"),
    (lambda: _jaxbn_variant_loss("renorm"), r"jaxbn.batch_renorm: the training loop supplies statistics"),
  ],
  ids=["haiku", "equinox", "hand-written", "ghost_batch_norm", "batch_renorm"],
)
def test_exact_mode_refuses_batch_norms_it_cannot_make_exact(make, match):
  """Never a silent fallback to per-micro-batch statistics under the name 'exact'."""
  loss_fn, params = make()
  data = _data(16, (5,))
  opt = optax.sgd(0.1)
  state = TrainState.create(params, {}, opt)
  with pytest.raises(ValueError, match=match):
    full_batch_step(loss_fn, opt, micro_batch_size=8, bn_mode="exact")(state, data)
  with pytest.raises(ValueError, match=match):
    jaxbn.training.sharpness(loss_fn, micro_batch_size=8, bn_mode="exact")(state, data)
  # The same losses are fine in ghost mode, which is what they compute.
  full_batch_step(loss_fn, opt, micro_batch_size=8)(state, data)


class Shared(nn.Module):
  """One batch norm (and one Dense) applied twice in a forward pass: shared weights."""

  bn: type = jaxbn.linen.BatchNorm

  @nn.compact
  def __call__(self, x):
    dense, norm = nn.Dense(5), self.bn(use_running_average=False, momentum=0.8)
    h = jnp.tanh(norm(dense(x)))
    h = jnp.tanh(norm(dense(h)))
    return nn.Dense(3)(h)


@functools.cache
def _shared_reference():
  """Data, variables and :func:`_reference` of ``Shared`` with flax's batch norm, kept per process (three cases)."""
  data = _data(24, (5,))
  variables = Shared(nn.BatchNorm).init(jax.random.key(1), data["x"])
  return data, variables, _reference(Shared(nn.BatchNorm), variables, data)


@pytest.mark.parametrize(("bn_mode", "micro_batch_size"), [("exact", 7), ("exact", None), ("ghost", None)])
def test_layer_called_twice_updates_like_model_apply(bn_mode, micro_batch_size):
  """Two running updates, in call order, each from its call's statistics over all rows: flax's model.apply."""
  data, variables, (loss, grads, batch_stats) = _shared_reference()
  state = TrainState.create(variables["params"], variables["batch_stats"], _recorder())
  step = full_batch_step(linen_loss(Shared(), xent), _recorder(), micro_batch_size=micro_batch_size, bn_mode=bn_mode)
  new, metrics = step(state, data)
  np.testing.assert_allclose(float(metrics.loss), float(loss), rtol=1e-5)
  _close(new.opt_state, grads)
  _close(new.batch_stats, batch_stats)
  # One update from the two calls' merged statistics would differ: the comparison can fail.
  once = jax.tree.map(lambda a, b: a - b, batch_stats, variables["batch_stats"])
  assert float(jnp.max(jnp.abs(once["BatchNorm_0"]["mean"]))) > 1e-2


@pytest.mark.parametrize(("bn_mode", "micro_batch_size"), [("exact", 7), ("ghost", None)])
def test_nnx_layer_called_twice_updates_like_the_model_itself(bn_mode, micro_batch_size):
  from flax import nnx

  class SharedNnx(nnx.Module):
    def __init__(self, bn, rngs):
      self.dense, self.norm, self.out = (
        nnx.Linear(5, 5, rngs=rngs),
        bn(5, momentum=0.8, rngs=rngs),
        nnx.Linear(5, 3, rngs=rngs),
      )

    def __call__(self, x):
      h = jnp.tanh(self.norm(self.dense(x)))
      return self.out(jnp.tanh(self.norm(self.dense(h))))

  data = _data(24, (5,))
  oracle = SharedNnx(nnx.BatchNorm, nnx.Rngs(0))
  graphdef, params, batch_stats = nnx.split(oracle, nnx.Param, nnx.BatchStat)

  def reference(params):  # flax's own layer, called twice on all rows: two updates in call order
    m = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, batch_stats))
    return jnp.mean(xent(m(data["x"]), data["y"])), nnx.state(m, nnx.BatchStat)

  (loss, want), grads = jax.jit(jax.value_and_grad(reference, has_aux=True))(params)  # compiled: seconds op by op
  model = SharedNnx(jaxbn.nnx.BatchNorm, nnx.Rngs(0))
  loss_fn = nnx_loss(model, xent)
  step = full_batch_step(loss_fn, _recorder(), micro_batch_size=micro_batch_size, bn_mode=bn_mode)
  new, metrics = step(loss_fn.init_state(_recorder()), data)
  np.testing.assert_allclose(float(metrics.loss), float(loss), rtol=1e-5)
  _close(new.opt_state, grads)
  _close(new.batch_stats["norm"], want["norm"])
