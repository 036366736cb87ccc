"""full_batch_step(gradient_penalty=...): SGD's implicit regularizer, against jax.grad of the objective written out.

The oracle is one flax pass per block and per micro-batch, in float64: the mean loss over the
micro-batches (ghost batch norm; under ``bn_mode="exact"`` one flax pass over all rows) plus
``(alpha / 4) * sum_k (n_k / N) ||grad L_k||^2`` with ``L_k`` the
mean loss of a flax pass over block ``k`` alone, differentiated by ``jax.grad`` (reverse over reverse),
its Hessian by ``jax.hessian``. Nothing of jaxbn's is in it.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn.training import TrainState, full_batch_step, linen_loss

F64 = jnp.float64
ALPHA = 0.7
xent = optax.softmax_cross_entropy_with_integer_labels


class Net(nn.Module):
  bn: type = jaxbn.linen.BatchNorm
  dtype: type = F64

  @nn.compact
  def __call__(self, x):
    for width in (8, 6):
      x = nn.Dense(width, param_dtype=self.dtype)(x)
      x = self.bn(use_running_average=False, momentum=0.8, param_dtype=self.dtype)(x)
      x = nn.relu(x)
    return nn.Dense(4, param_dtype=self.dtype)(x)


def _data(n, dtype=F64):
  rng = np.random.default_rng(0)
  return {"x": jnp.asarray(rng.normal(size=(n, 5)) * 1.5 + 2.0, dtype), "y": jnp.asarray(np.arange(n) % 4)}


def _recorder():
  """An 'optimizer' whose state becomes the gradient it receives; the parameters stay."""
  return optax.GradientTransformation(
    lambda params: jax.tree.map(jnp.zeros_like, params),
    lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
  )


def _layout(n, micro_batch_size, block_size, devices=1):
  """The documented layout: micro-batches of each device's ``m / devices`` consecutive rows, blocks of
  ``b / devices`` consecutive rows of each micro-batch's valid rows, from its first one."""
  per = n // devices
  m = per if micro_batch_size is None else micro_batch_size // devices
  micro, blocks = [], []
  for start in range(0, per, m):
    size = min(m, per - start)
    b = size if block_size is None else block_size // devices
    rows = lambda lo, hi, s=start: np.concatenate([d * per + np.arange(s + lo, s + hi) for d in range(devices)])
    micro.append(rows(0, size))
    blocks += [rows(t, min(t + b, size)) for t in range(0, size, b)]
  return micro, blocks


def _oracle(variables, data, micro, blocks, alpha=ALPHA, bn_mode="ghost"):
  """``params -> (objective, (mean loss, penalty))``, written out with flax's batch norm: the mean loss of one
  pass per micro-batch (``"ghost"``) or of one pass over all rows (``"exact"``); the blocks' losses are
  always passes over the block alone."""
  n = sum(len(r) for r in micro)
  if bn_mode == "exact":
    micro = [np.concatenate(micro)]

  def block_loss(params, rows):
    out, _ = Net(nn.BatchNorm).apply(
      {"params": params, "batch_stats": variables["batch_stats"]}, data["x"][rows], mutable=["batch_stats"]
    )
    return jnp.mean(xent(out, data["y"][rows]))

  def objective(params):
    loss = sum(len(r) / n * block_loss(params, r) for r in micro)
    squares = lambda g: sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(g))
    penalty = alpha / 4 * sum(len(r) / n * squares(jax.grad(block_loss)(params, r)) for r in blocks)
    return loss + penalty, (loss, penalty)

  return objective


def _variables(n=22):
  return Net(nn.BatchNorm).init(jax.random.key(1), _data(n)["x"])


@functools.cache
def _written_out(n, micro_batch_size, block_size, bn_mode, devices=1):
  """``(mean loss, penalty), gradient`` of the written-out objective (:func:`_oracle`) at ``_variables(n)`` on
  ``_data(n)`` with the documented layout, in float64. Kept per process: the cases that differ only in the
  penalty's method, the loop or the batch norm of the step share one."""
  data, variables = _data(n), _variables(n)
  objective = _oracle(variables, data, *_layout(n, micro_batch_size, block_size, devices), bn_mode=bn_mode)
  (_, (loss, penalty)), grad = jax.jit(jax.value_and_grad(objective, has_aux=True))(variables["params"])
  return (loss, penalty), grad


def _relative_error(actual, expected):
  """Largest difference over the largest entry, over all leaves (a leaf whose gradient is 0 in exact
  arithmetic, a bias before a batch norm, would make a per-leaf ratio meaningless)."""
  a, e = ravel_pytree(actual)[0], ravel_pytree(expected)[0]
  return float(jnp.max(jnp.abs(a - e)) / jnp.max(jnp.abs(e)))


@pytest.fixture
def float64():
  with jax.enable_x64(True):
    yield


@pytest.mark.slow
@pytest.mark.parametrize(
  "micro_batch_size, block_size, method, loop, bn_mode",
  [
    # Each layout's cases are neighbours: they share an oracle (_written_out), built once in a process.
    (None, 5, "hvp", "host", "ghost"),  # one micro-batch, blocks of 5, the last one of 2
    (None, 5, "finite_difference", "scan", "ghost"),
    (8, 4, "hvp", "scan", "ghost"),  # two blocks per micro-batch; the last micro-batch's 6 rows: blocks of 4 and 2
    (8, 4, "finite_difference", "host", "ghost"),
    (8, None, "hvp", "host", "ghost"),  # each micro-batch one block: its gradient reused
    (None, None, "hvp", "scan", "ghost"),  # one block of every row
    (None, 2, "hvp", "scan", "ghost"),  # 11 blocks: more than jaxbn.training.penalty.UNROLL, vmapped
    # Exact: the mean loss normalizes with all rows' statistics, each block with its own.
    (8, 4, "hvp", "host", "exact"),  # with the remainder
    (8, None, "hvp", "scan", "exact"),  # blocks = micro-batches: their gradient is not the exact loss's
    (None, 5, "finite_difference", "host", "exact"),
  ],
)
def test_gradient_and_penalty_equal_jax_grad_of_the_written_out_objective(
  float64, micro_batch_size, block_size, method, loop, bn_mode
):
  n = 22
  data, variables = _data(n), _variables(n)
  (loss, penalty), grad = _written_out(n, micro_batch_size, block_size, bn_mode)
  step = full_batch_step(
    linen_loss(Net(), xent),
    _recorder(),
    micro_batch_size=micro_batch_size,
    loop=loop,
    donate=False,
    bn_mode=bn_mode,
    gradient_penalty=ALPHA,
    penalty_block_size=block_size,
    penalty_method=method,
  )
  state = TrainState.create(variables["params"], variables["batch_stats"], _recorder())
  new, metrics = step(state, data)
  # Exact: float64 rounding (measured <= 3e-14). Finite differences: the step eps * g_k has relative size
  # sqrt(eps64) = 1.5e-8 of (1 + ||theta||); its truncation error measured 3e-7 to 4e-6 of the gradient.
  assert _relative_error(new.opt_state, grad) < (1e-12 if method == "hvp" else 2e-5)
  np.testing.assert_allclose(metrics.loss, loss, rtol=1e-14)
  # float64 rounding: measured <= 5e-13 (blocks of 2 rows, whose batch norm is the worst conditioned).
  np.testing.assert_allclose(metrics.gradient_penalty, penalty, rtol=2e-12)
  assert float(penalty) > 0.01 * float(loss)  # the penalty is not negligible at this alpha: the test can fail


@pytest.mark.slow
@pytest.mark.parametrize("bn_mode", ["ghost", "exact"])
def test_sharpness_is_that_of_the_penalized_objective(float64, bn_mode):
  """The step's, on the host loop, whose Hessian-vector products are compiled JVPs of each
  program; under exact batch norm also the standalone function's, on the scanned loop (one program of JVPs)."""
  n = 22
  data, variables = _data(n), _variables(n)
  objective = _oracle(variables, data, *_layout(n, None, 11), bn_mode=bn_mode)
  flat, unravel = ravel_pytree(variables["params"])
  top = np.linalg.eigvalsh(np.asarray(jax.jit(jax.hessian(lambda f: objective(unravel(f))[0]))(flat)))[-1]
  step = full_batch_step(
    linen_loss(Net(), xent),
    _recorder(),
    loop="host",
    donate=False,
    bn_mode=bn_mode,
    gradient_penalty=ALPHA,
    penalty_block_size=11,
    sharpness_every=1,
    sharpness_iters=30,
  )
  state = TrainState.create(variables["params"], variables["batch_stats"], _recorder())
  _, metrics = step(state, data)
  np.testing.assert_allclose(metrics.sharpness, top, rtol=1e-6)
  if bn_mode == "ghost":
    plain = np.linalg.eigvalsh(np.asarray(jax.jit(jax.hessian(lambda f: objective(unravel(f))[1][0]))(flat)))[-1]
    assert abs(top - plain) > 1e-3 * abs(plain)  # the penalty changes the sharpness: the check can fail
  else:
    measure = jaxbn.training.sharpness(
      linen_loss(Net(), xent), bn_mode=bn_mode, gradient_penalty=ALPHA, penalty_block_size=11, num_iters=30, loop="scan"
    )
    np.testing.assert_allclose(measure(state, data)[0], top, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
  "bn, loop, bn_mode",
  [
    (jaxbn.linen.BatchNorm, "host", "ghost"),
    (jaxbn.linen.BatchNorm, "scan", "ghost"),
    (nn.BatchNorm, "scan", "ghost"),
    (jaxbn.linen.BatchNorm, "host", "exact"),
  ],
  ids=["per-device-host", "per-device-scan", "global-arrays-flax", "per-device-host-exact"],
)
def test_eight_devices_equal_the_written_out_objective(float64, bn, loop, bn_mode):
  """32 rows on 8 devices, micro-batches of 16 (2 rows of each device), blocks of 8 (1 row of each).

  jaxbn's batch norms run per device (each block's gradient all-reduced once); flax's on the global arrays.
  """
  n = 32
  data, variables = _data(n), _variables(n)
  (loss, penalty), grad = _written_out(n, 16, 8, bn_mode, devices=8)  # the ghost cases share it
  step = full_batch_step(
    linen_loss(Net(bn), xent),
    _recorder(),
    micro_batch_size=16,
    loop=loop,
    donate=False,
    bn_mode=bn_mode,
    gradient_penalty=ALPHA,
    penalty_block_size=8,
  )
  mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(data, NamedSharding(mesh, P("batch")))
  state = TrainState.create(variables["params"], variables["batch_stats"], _recorder())
  new, metrics = step(state, sharded)
  assert _relative_error(new.opt_state, grad) < 1e-12
  np.testing.assert_allclose(metrics.loss, loss, rtol=1e-13)
  np.testing.assert_allclose(metrics.gradient_penalty, penalty, rtol=1e-12)


def test_zero_penalty_is_the_plain_step_bitwise():
  data, variables = _data(10, jnp.float32), Net(dtype=jnp.float32).init(jax.random.key(1), _data(10, jnp.float32)["x"])
  opt = optax.sgd(0.1, momentum=0.9)
  loss_fn = linen_loss(Net(dtype=jnp.float32), xent)
  plain = full_batch_step(loss_fn, opt, micro_batch_size=4, loop="scan", donate=False)
  zero = full_batch_step(loss_fn, opt, micro_batch_size=4, loop="scan", donate=False, gradient_penalty=0.0)
  state = TrainState.create(variables["params"], variables["batch_stats"], opt)
  strip = lambda text: re.sub(r"(loc|metadata)\(.*?\)", "", text)
  assert strip(plain.lower(state, data).as_text()) == strip(zero.lower(state, data).as_text())
  (a, ma), (b, mb) = plain(state, data), zero(state, data)
  for x, y in zip(jax.tree.leaves((a, ma)), jax.tree.leaves((b, mb)), strict=True):
    np.testing.assert_array_equal(x, y)
  assert mb.gradient_penalty is None


def test_a_penalized_step_that_overflows_changes_nothing():
  data = _data(12, jnp.float32)
  variables = Net(dtype=jnp.float32).init(jax.random.key(1), data["x"])
  opt = optax.sgd(0.1)
  step = full_batch_step(linen_loss(Net(dtype=jnp.float32), xent), opt, donate=False, gradient_penalty=1e38)
  state = TrainState.create(variables["params"], variables["batch_stats"], opt)
  new, metrics = step(state, data)
  assert not np.isfinite(metrics.grad_norm) and bool(metrics.skipped)
  assert int(new.step) == 0 and int(new.skipped) == 1
  for x, y in zip(jax.tree.leaves((new.params, new.batch_stats)), jax.tree.leaves((state.params, state.batch_stats))):
    np.testing.assert_array_equal(x, y)


def test_a_penalized_step_trains_with_dropout_keys_and_float32():
  """A loss that draws random numbers: each block draws its own; the penalized step still lowers the loss,
  and reports per-layer norms."""

  class Dropped(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
      x = nn.relu(jaxbn.linen.BatchNorm(use_running_average=not train)(nn.Dense(16)(x)))
      return nn.Dense(4)(nn.Dropout(0.1, deterministic=not train)(x))

  data = _data(24, jnp.float32)
  model = Dropped()
  variables = model.init(jax.random.key(0), data["x"], train=False)
  opt = optax.sgd(0.1)
  loss_fn = linen_loss(model, xent, train=True, rng_streams=("dropout",))
  step = full_batch_step(
    loss_fn, opt, micro_batch_size=12, gradient_penalty=0.5, penalty_block_size=4, layer_norms=True
  )
  state = TrainState.create(variables["params"], variables["batch_stats"], opt, key=jax.random.key(2))
  losses = []
  for _ in range(20):
    state, metrics = step(state, data)
    losses.append(float(metrics.loss))
    assert np.isfinite(metrics.gradient_penalty) and metrics.gradient_penalty > 0
    # The per-layer norms are those of the penalized gradient, whose global norm the metrics also hold.
    layers = np.sqrt(sum(float(v) ** 2 for v in metrics.layer_grad_norms.values()))
    np.testing.assert_allclose(layers, metrics.grad_norm, rtol=1e-5)
  assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"gradient_penalty": -0.1}, "gradient_penalty must be a finite number >= 0"),
    ({"gradient_penalty": float("nan")}, "gradient_penalty must be a finite number >= 0"),
    ({"gradient_penalty": "0.1"}, "gradient_penalty must be a finite number >= 0"),
    ({"gradient_penalty": True}, "gradient_penalty must be a finite number >= 0"),
    ({"gradient_penalty": 0.1, "penalty_block_size": 0}, "penalty_block_size must be a positive int or None"),
    ({"gradient_penalty": 0.1, "penalty_block_size": 2.5}, "penalty_block_size must be a positive int or None"),
    ({"gradient_penalty": 0.1, "penalty_method": "exact"}, "penalty_method must be one of"),
    ({"gradient_penalty": 0.1, "micro_batch_size": 8, "penalty_block_size": 3}, "must divide micro_batch_size=8"),
  ],
)
def test_bad_penalty_arguments_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    full_batch_step(linen_loss(Net(), xent), optax.sgd(0.1), **kwargs)
