"""bn_mode='exact': batch norm over the WHOLE dataset, processed in micro-batches, equals one big batch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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

  (value, batch_stats), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
  return value, grads, batch_stats


def _close(actual, expected, atol=1e-5):
  for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=atol)


def _check(step, model, variables, data, run=None, inputs=None):
  opt = _recorder()
  state = TrainState.create(variables["params"], variables["batch_stats"], opt)
  new, metrics = (run or step)(state, data if inputs is None else inputs)
  loss, grads, batch_stats = _reference(model, variables, data)
  np.testing.assert_allclose(float(metrics.loss), float(loss), rtol=1e-5)
  _close(new.opt_state, grads)
  _close(new.batch_stats, batch_stats)
  return new


@pytest.mark.parametrize("model_cls, shape", [(MLP, (5,)), (CNN, (9, 2))])
@pytest.mark.parametrize("micro_batch_size", [None, 8, 7, 1])
def test_equals_one_batch_on_the_whole_dataset(model_cls, shape, micro_batch_size):
  model, data = model_cls(), _data(24, shape)
  variables = model.init(jax.random.key(1), data["x"][:2], train=False)
  step = full_batch_step(linen_loss(model, xent), _recorder(), micro_batch_size=micro_batch_size, bn_mode="exact")
  _check(step, model, variables, data)


def test_ghost_batches_differ_so_the_comparison_can_fail():
  model, data = MLP(), _data(24, (5,))
  variables = model.init(jax.random.key(1), data["x"][:2], train=False)
  state = TrainState.create(variables["params"], variables["batch_stats"], _recorder())
  ghost = full_batch_step(linen_loss(model, xent), _recorder(), micro_batch_size=8)(state, data)[0]
  _, grads, _ = _reference(model, variables, data)
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(ghost.opt_state), jax.tree.leaves(grads)))
  assert diff > 1e-3


def test_eight_devices_equal_one_batch_jit_shard_map_and_pmap():
  data = _data(32, (5,), seed=3)
  model = MLP()
  variables = model.init(jax.random.key(1), data["x"][:2], train=False)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = jax.device_put(data, NamedSharding(mesh, P("data")))
  # Micro-batches of 12 rows: two full ones and a masked remainder, each spread over the 8 devices.
  step = full_batch_step(linen_loss(model, xent), _recorder(), micro_batch_size=12, bn_mode="exact", donate=False)
  _check(step, model, variables, sharded)
  per_device = MLP(axis_name="data")  # 4 rows per device, micro-batches of 3: a remainder on every device
  step = full_batch_step(
    linen_loss(per_device, xent), _recorder(), micro_batch_size=3, bn_mode="exact", axis_name="data", jit=False
  )
  shard_mapped = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data")), out_specs=P()))
  _check(step, model, variables, data, run=shard_mapped)
  pmapped = jax.pmap(step, axis_name="data", in_axes=(None, 0), out_axes=None)
  stacked = jax.tree.map(lambda a: a.reshape(8, -1, *a.shape[1:]), data)
  _check(step, model, variables, data, run=pmapped, inputs=stacked)


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

  (loss, new_stats), grads = jax.value_and_grad(reference, has_aux=True)(params)
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
    (FlaxBN(), TypeError, r"flax.linen.BatchNorm, which cannot normalize with statistics over the whole dataset"),
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
  with pytest.raises(ValueError, match=r"bn_mode='exact' .* use loop='scan'"):
    full_batch_step(linen_loss(MLP(), xent), opt, bn_mode="exact", loop="host")
