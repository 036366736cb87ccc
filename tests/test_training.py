"""jaxbn.training: exact accumulated full-batch gradients, batch-norm state, guard, devices, tracing."""

import re
import warnings
from functools import partial

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn.training import Loss, LossAux, TrainState, full_batch_step, linen_loss, minibatch_epoch


def _data(n=10, d=3, classes=4, seed=0):
  rng = np.random.default_rng(seed)
  return {
    "x": jnp.asarray(rng.normal(2.0, 1.5, (n, d)), jnp.float32),
    "y": jnp.asarray(rng.integers(0, classes, n), jnp.int32),
  }


class MLP(nn.Module):
  norm: type | None = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Dense(8, use_bias=self.norm is None)(x)
    if self.norm is not None:
      x = self.norm(use_running_average=not train, momentum=0.8)(x)
    x = nn.tanh(x)
    x = nn.Dense(8)(x)
    if self.norm is not None:
      x = self.norm(use_running_average=not train, momentum=0.8)(x)
    return nn.Dense(4)(nn.tanh(x))


xent = optax.softmax_cross_entropy_with_integer_labels


def _setup(norm=None, opt=None, **kw):
  model = MLP(norm)
  variables = model.init(jax.random.key(0), _data()["x"], train=False)
  opt = opt or optax.sgd(0.1, momentum=0.9)
  loss_fn = linen_loss(model, xent, train=True)
  step = full_batch_step(loss_fn, opt, update_batch_stats=loss_fn.update_batch_stats, **kw)
  return model, variables, opt, step


@pytest.mark.parametrize("micro", [1, 3, 4, 10, None])
def test_without_batch_norm_equals_one_step_on_the_whole_dataset(micro):
  data = _data()
  model, variables, opt, step = _setup(micro_batch_size=micro)
  state = TrainState.create(variables["params"], {}, opt)

  def whole(params):
    return jnp.mean(xent(model.apply({"params": params}, data["x"]), data["y"]))

  loss, grads = jax.value_and_grad(whole)(variables["params"])
  updates, _ = opt.update(grads, opt.init(variables["params"]), variables["params"])
  want = optax.apply_updates(variables["params"], updates)
  state, metrics = step(state, data)
  np.testing.assert_allclose(metrics.loss, loss, rtol=1e-5)
  np.testing.assert_allclose(metrics.grad_norm, optax.tree.norm(grads), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", [jaxbn.linen.BatchNorm, nn.BatchNorm], ids=["jaxbn", "flax"])
def test_batch_norm_ghost_gradients_and_one_exact_running_update(norm):
  # 10 rows in micro-batches of 4: [0:4], [4:8] and [8:10] (read as [6:10] with rows 6, 7 masked).
  data = _data()
  model, variables, opt, step = _setup(norm, opt=optax.sgd(0.1), micro_batch_size=4)
  params, stats = variables["params"], variables["batch_stats"]
  state = TrainState.create(params, stats, opt)
  new_state, metrics = step(state, data)

  parts = [slice(0, 4), slice(4, 8), slice(8, 10)]

  def part_loss(p, sl):
    out, _ = model.apply({"params": p, "batch_stats": stats}, data["x"][sl], mutable=["batch_stats"])
    return jnp.mean(xent(out, data["y"][sl]))

  weights = [(sl.stop - sl.start) / 10 for sl in parts]
  grads = [jax.grad(part_loss)(params, sl) for sl in parts]
  mean_grad = jax.tree.map(lambda *g: sum(w * gi for w, gi in zip(weights, g)), *grads)
  want = jax.tree.map(lambda p, g: p - 0.1 * g, params, mean_grad)
  for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics.loss, sum(w * part_loss(params, sl) for w, sl in zip(weights, parts)), rtol=1e-5)

  # The first batch norm sees Dense_0(x): its running statistics move once, towards the statistics
  # of ALL 10 rows, not towards an EMA over the three micro-batches.
  h = data["x"] @ params["Dense_0"]["kernel"]
  bn0 = new_state.batch_stats["BatchNorm_0"]
  np.testing.assert_allclose(bn0["mean"], 0.2 * np.asarray(h).mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bn0["var"], 0.8 + 0.2 * np.asarray(h).var(0), rtol=1e-5, atol=1e-6)


class _FlaxNormFirst(nn.Module):
  fast: bool

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.BatchNorm(use_running_average=not train, momentum=0.0, use_fast_variance=self.fast)(x)
    return nn.Dense(4)(x)


@pytest.mark.parametrize("fast", [True, False], ids=["fast_variance", "two_pass"])
def test_flax_batch_norm_running_update_merges_the_statistics_it_normalized_with(fast):
  # flax.linen.BatchNorm's running statistics are those of the statistics the layer normalizes with
  # (its use_fast_variance formula). At |mean| / std = 1000 in float32 the fast formula is off by
  # about 5 % (the two-pass one by 1e-7), so the running update must merge Flax's own per-micro-batch
  # statistics, not statistics jaxbn computed another way. Oracle: flax's apply on each micro-batch
  # (momentum 0: its running statistics are its batch statistics), merged in float64.
  rng = np.random.default_rng(3)
  data = {"x": jnp.asarray(1000 + rng.normal(size=(10, 5)), jnp.float32), "y": jnp.asarray(rng.integers(0, 4, 10))}
  model = _FlaxNormFirst(fast)
  variables = model.init(jax.random.key(0), data["x"], train=False)
  loss_fn = linen_loss(model, xent, train=True)
  step = full_batch_step(loss_fn, optax.sgd(0.0), micro_batch_size=4)
  state, _ = step(TrainState.create(variables["params"], variables["batch_stats"], optax.sgd(0.0)), data)

  layer = nn.BatchNorm(use_running_average=False, momentum=0.0, use_fast_variance=fast)
  bn = {"params": variables["params"]["BatchNorm_0"], "batch_stats": variables["batch_stats"]["BatchNorm_0"]}
  counts, means, variances = [], [], []
  for rows, valid in ((slice(0, 4), 4), (slice(4, 8), 4), (slice(6, 10), 2)):  # the last re-reads rows 6, 7 masked
    mask = (np.arange(4) >= 4 - valid)[:, None]
    _, new = layer.apply(bn, data["x"][rows], mask=jnp.asarray(mask), mutable=["batch_stats"])
    counts.append(valid)
    means.append(np.asarray(new["batch_stats"]["mean"], np.float64))
    variances.append(np.asarray(new["batch_stats"]["var"], np.float64))
  n, mu = sum(counts), sum(c * m for c, m in zip(counts, means)) / sum(counts)
  var = sum(c * (v + (m - mu) ** 2) for c, m, v in zip(counts, means, variances)) / n
  got = state.batch_stats["BatchNorm_0"]
  np.testing.assert_allclose(got["mean"], mu, rtol=1e-7)  # float32 means near 1000: a few ulps
  np.testing.assert_allclose(got["var"], var, rtol=1e-5)  # merged in float32 from offsets to the largest part


def test_non_finite_step_changes_nothing():
  data = _data()
  _, variables, opt, step = _setup(jaxbn.linen.BatchNorm, opt=optax.adam(1e-2), micro_batch_size=4, donate=False)
  state = TrainState.create(variables["params"], variables["batch_stats"], opt)
  state, _ = step(state, data)  # one good step so that every part of the state is non-trivial
  bad = {**data, "x": data["x"].at[5, 1].set(jnp.nan)}
  new_state, metrics = step(state, bad)
  assert bool(metrics.skipped) and int(new_state.skipped) == 1 and int(new_state.step) == int(state.step) == 1
  for a, b in zip(jax.tree.leaves((new_state.params, new_state.opt_state, new_state.batch_stats)),
                  jax.tree.leaves((state.params, state.opt_state, state.batch_stats))):  # fmt: skip
    np.testing.assert_array_equal(a, b)
  # Without the guard the NaN reaches the batch statistics, as it does in Flax's ImageNet example.
  _, _, _, unguarded = _setup(
    jaxbn.linen.BatchNorm, opt=optax.adam(1e-2), micro_batch_size=4, guard=False, donate=False
  )
  corrupted, _ = unguarded(state, bad)
  assert not np.all(np.isfinite(corrupted.batch_stats["BatchNorm_0"]["mean"]))


def test_guard_also_covers_overflowing_statistics_and_float16_norms():
  # One huge row: the loss and gradient stay finite (tanh saturates) but the batch variance is inf,
  # which would make the running variance inf for good.
  data = _data()
  _, variables, opt, step = _setup(jaxbn.linen.BatchNorm, micro_batch_size=4, donate=False)
  state = TrainState.create(variables["params"], flax.core.freeze(variables["batch_stats"]), opt)  # frozen works
  new_state, metrics = step(state, {**data, "x": data["x"].at[0].set(1e25)})
  assert np.isfinite(float(metrics.loss)) and bool(metrics.skipped) and int(new_state.skipped) == 1
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), new_state.batch_stats, state.batch_stats))
  # float16 parameters whose gradient (components 300) is finite but whose norm overflows float16.
  w = {"w": jnp.ones((4,), jnp.float16)}
  step16 = full_batch_step(
    lambda p, bs, b, m: (jnp.mean(300.0 * jnp.sum(p["w"][None] * b["x"], -1)), LossAux()), optax.sgd(0.0)
  )
  _, metrics = step16(TrainState.create(w, {}, optax.sgd(0.0)), {"x": jnp.ones((2, 4), jnp.float16)})
  assert not bool(metrics.skipped) and float(metrics.grad_norm) == pytest.approx(600.0)
  # A finite loss and update (6000) that overflow float16 parameters (60000 + 6000 > 65504): skipped.
  big = {"w": jnp.full((4,), 6e4, jnp.float16)}
  state16 = TrainState.create(big, {}, optax.sgd(2000.0))
  loss16 = lambda p, bs, b, m: (jnp.mean(-jnp.sum(p["w"].astype(jnp.float32)[None] * b["x"], -1)), LossAux())
  new16, metrics = full_batch_step(loss16, optax.sgd(2000.0))(state16, {"x": jnp.full((2, 4), 3.0)})
  assert np.isfinite(float(metrics.loss)) and np.isfinite(float(metrics.update_norm))
  assert bool(metrics.skipped) and bool(jnp.all(new16.params["w"] == big["w"]))


def test_no_retracing_and_donated_state():
  traces = []
  data = _data()
  model = MLP(jaxbn.linen.BatchNorm)
  variables = model.init(jax.random.key(0), data["x"], train=False)
  base = linen_loss(model, xent, train=True)

  def counting_loss(*args):
    traces.append(1)
    return base(*args)

  opt = optax.sgd(0.1)
  step = full_batch_step(counting_loss, opt, micro_batch_size=4, update_batch_stats=base.update_batch_stats)
  state = TrainState.create(variables["params"], variables["batch_stats"], opt)
  for i in range(3):
    old = state
    state, _ = step(state, data)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old.params))
    # Traced once per program: the scanned step's one, or the host loop's first and next micro-batch (its
    # finish program only sums).
    assert len(traces) == (1 if step.loop == "scan" else 2), i
  # Reusing a consumed state is refused before XLA sees the deleted buffers, saying what to do.
  for loop in ("scan", "host"):
    again = full_batch_step(base, opt, micro_batch_size=4, loop=loop)
    state, _ = again(old := state, data)
    with pytest.raises(
      ValueError,
      match=r"(?s)full_batch_step: the state passed in was already consumed: its buffer state\.params\[.*donate=False",
    ):
      again(old, data)
  assert (
    again.programs and full_batch_step(base, opt, loop="scan").lower(state, data).compile()
  )  # still the jitted step's own


@pytest.mark.parametrize(
  ("loop", "norm"),
  [("scan", jaxbn.linen.BatchNorm), ("host", jaxbn.linen.BatchNorm), ("host", nn.BatchNorm)],
  ids=["scan-jaxbn", "host-jaxbn", "host-flax"],
)
def test_sharded_data_on_eight_devices_equals_one_device(loop, norm):
  data = _data(n=32)
  _, variables, opt, step = _setup(norm, micro_batch_size=8, donate=False, loop=loop)
  state = TrainState.create(variables["params"], variables["batch_stats"], opt)
  mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(data, NamedSharding(mesh, P("batch")))
  # Each device holds 4 rows and takes 1 of its own into every micro-batch of 8: micro-batch i is
  # rows {4d + i}. One device reproduces the step on the rows in that order.
  order = np.array([4 * d + i for i in range(4) for d in range(8)])
  want, want_metrics = step(state, jax.tree.map(lambda a: a[order], data))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got, got_metrics = step(state, sharded)
  # jaxbn's batch norms let each device sweep its own rows (one gradient all-reduce per step, counted in
  # tests/test_communication.py); flax's would see one device's rows, so the step says it cannot.
  said = [str(w.message) for w in caught if "once per micro-batch" in str(w.message)]
  if norm is nn.BatchNorm:
    assert len(said) == 1 and "all-reduces the gradient once per micro-batch (4 per step)" in said[0], said
    assert "flax.linen.BatchNorm, which computes its statistics itself" in said[0], said
  else:
    assert not said, said
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_metrics.loss, want_metrics.loss, rtol=1e-6)
  # Nothing moves the data: no collective of a row-sized (32-row) array, in any of the step's programs.
  if loop == "scan":
    programs = [step.lower(state, sharded)]
  else:
    programs = [step.programs[label].lower(*args) for label, (args, _) in step.calls.items()]
  for hlo in (p.compile().as_text() for p in programs):
    moved = [
      line
      for line in hlo.splitlines()
      if re.search(r"= \w+\[32[,\]].* (all-gather|all-to-all|collective-permute)", line)
    ]
    assert not moved, moved


@pytest.mark.parametrize("loop", ["scan", "host"])
def test_accumulated_bfloat16_gradient_is_the_float32_mean(loop):
  # 1000 micro-batches of one row, each gradient a 0/1 vector (exact in bfloat16), each weighted 1/1000.
  # Summed in bfloat16 the running sum stalls near 0.5 (half its ulp there exceeds 1/1000); in float32
  # it is the mean to ~1e-7, and the SGD step from zero (lr 1) sets the parameters to its bfloat16 rounding.
  # The means (0.999, 0.695, 0.298) lie >= 5e-4 (relative) from a bfloat16 rounding boundary: float32
  # error cannot cross one.
  x = (np.random.default_rng(0).random((1000, 3)) < np.array([[0.9995, 0.7, 0.3]])).astype(np.float32)
  x[0, 0] = 0.0  # 999 ones in column 0: mean 0.999
  loss_fn = lambda p, bs, b, m: (jnp.sum(p["w"][None] * b["x"].astype(jnp.bfloat16)), LossAux())
  opt = optax.sgd(1.0)
  step = full_batch_step(loss_fn, opt, micro_batch_size=1, loop=loop, donate=False)
  state = TrainState.create({"w": jnp.zeros(3, jnp.bfloat16)}, {}, opt)
  new_state, metrics = step(state, {"x": jnp.asarray(x)})
  mean = x.astype(np.float64).mean(0)
  assert new_state.params["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(new_state.params["w"], np.float64), (-mean).astype(jnp.bfloat16))
  np.testing.assert_allclose(metrics.grad_norm, np.linalg.norm(mean), rtol=1e-5)


def test_metrics_are_count_weighted_means():
  data = _data()
  model, variables, opt, _ = _setup()
  accuracy = lambda out, y: (jnp.argmax(out, -1) == y).astype(jnp.float32)
  loss_fn = linen_loss(model, xent, metrics=accuracy)
  step = full_batch_step(loss_fn, opt, micro_batch_size=4, donate=False)
  state = TrainState.create(variables["params"], {}, opt)
  _, metrics = step(state, data)
  want = np.mean(np.argmax(model.apply(variables, data["x"]), -1) == np.asarray(data["y"]))
  np.testing.assert_allclose(metrics.extra, want, rtol=1e-6)


def test_minibatch_epoch_visits_every_example_once():
  data = _data(n=10)
  seen = []

  def loss_fn(params, batch_stats, batch, mask):
    jax.debug.callback(lambda v: seen.extend(np.asarray(v).tolist()), batch["x"][:, 0])
    return jnp.mean((batch["x"] @ params["w"]) ** 2), LossAux()

  opt = optax.sgd(0.01)
  step = full_batch_step(loss_fn, opt)
  state, history = minibatch_epoch(
    step, TrainState.create({"w": jnp.ones(3)}, {}, opt), data, batch_size=np.int64(4), key=jax.random.key(1)
  )
  assert len(history) == 3 and int(state.step) == 3
  np.testing.assert_allclose(sorted(seen), sorted(np.asarray(data["x"][:, 0]).tolist()), rtol=1e-6)

  # Resumed after its first batch (a checkpoint taken by on_update), the epoch ends bit for bit the same.
  step = full_batch_step(loss_fn, opt, donate=False)
  saved, seen[:] = {}, []
  start = TrainState.create({"w": jnp.ones(3)}, {}, opt)
  whole, _ = minibatch_epoch(
    step, start, data, batch_size=4, key=jax.random.key(1), on_update=lambda i, st, m: saved.setdefault(i, st)
  )
  assert sorted(saved) == [1, 2, 3]
  resumed, history = minibatch_epoch(step, saved[1], data, batch_size=4, key=jax.random.key(1), start=1)
  assert len(history) == 2
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(whole), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_errors():
  opt = optax.sgd(0.1)
  with pytest.raises(ValueError, match=r"jaxbn.training.full_batch_step: micro_batch_size must be a positive int"):
    full_batch_step(lambda *a: (0.0, LossAux()), opt, micro_batch_size=0)
  model, variables, _, _ = _setup(jaxbn.linen.BatchNorm)
  with_stats = linen_loss(model, xent, train=True)
  step = full_batch_step(lambda *args: with_stats(*args), opt)  # no update_batch_stats to pick up
  state = TrainState.create(variables["params"], variables["batch_stats"], opt)
  with pytest.raises(ValueError, match=r"no update_batch_stats was given"):
    step(state, _data())
  with pytest.raises(ValueError, match=r"same leading \(example\) dimension"):
    step(state, {"x": jnp.ones((4, 3)), "y": jnp.ones(5, jnp.int32)})
  with pytest.raises(ValueError, match=r"batch_size must be a positive int"):
    minibatch_epoch(step, state, _data(), batch_size=0, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"minibatch_epoch: start must be an int from 0 to the epoch's 3 batches"):
    minibatch_epoch(step, state, _data(), batch_size=4, key=jax.random.key(0), start=4)


def test_nnx_model_trains_like_the_same_linen_model():
  from flax import nnx

  class NnxMLP(nnx.Module):
    def __init__(self, rngs):
      self.d0 = nnx.Linear(3, 8, use_bias=False, rngs=rngs)
      self.bn0 = jaxbn.nnx.BatchNorm(8, momentum=0.8, rngs=rngs)
      self.d1 = nnx.Linear(8, 8, rngs=rngs)
      self.bn1 = jaxbn.nnx.BatchNorm(8, momentum=0.8, rngs=rngs)
      self.d2 = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
      return self.d2(nnx.tanh(self.bn1(self.d1(nnx.tanh(self.bn0(self.d0(x)))))))

  data = _data()
  nnx_model = NnxMLP(nnx.Rngs(0))
  _, variables, opt, step = _setup(jaxbn.linen.BatchNorm, opt=optax.sgd(0.1), micro_batch_size=4, donate=False)
  # Same weights in both.
  p = variables["params"]
  nnx_model.d0.kernel[...] = p["Dense_0"]["kernel"]
  nnx_model.d1.kernel[...], nnx_model.d1.bias[...] = p["Dense_1"]["kernel"], p["Dense_1"]["bias"]
  nnx_model.d2.kernel[...], nnx_model.d2.bias[...] = p["Dense_2"]["kernel"], p["Dense_2"]["bias"]
  loss_fn = jaxbn.training.nnx_loss(nnx_model, xent)
  nnx_step = full_batch_step(loss_fn, opt, micro_batch_size=4, update_batch_stats=loss_fn.update_batch_stats)
  nnx_state = loss_fn.init_state(opt)
  state = TrainState.create(variables["params"], variables["batch_stats"], opt)
  for _ in range(2):
    state, metrics = step(state, data)
    nnx_state, nnx_metrics = nnx_step(nnx_state, data)
    np.testing.assert_allclose(nnx_metrics.loss, metrics.loss, rtol=1e-5)
  np.testing.assert_allclose(
    nnx_state.params["d1"]["kernel"][...], state.params["Dense_1"]["kernel"], rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    nnx_state.batch_stats["bn1"]["var"][...], state.batch_stats["BatchNorm_1"]["var"], rtol=1e-5
  )
  nnx.update(nnx_model, nnx_state.params, nnx_state.batch_stats)
  np.testing.assert_allclose(nnx_model.bn0.mean[...], state.batch_stats["BatchNorm_0"]["mean"], rtol=1e-5, atol=1e-6)


def test_nnx_batch_norms_inside_lifted_transforms_report_their_statistics():
  # A batch norm under nnx.remat and a stack of 3 built with nnx.vmap and run with nnx.scan: the
  # step's running statistics (momentum 0) equal the batch statistics the model itself computes
  # eagerly in training mode, layer by layer.
  from flax import nnx

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(4, 4, rngs=rngs)
      self.bn = jaxbn.nnx.BatchNorm(4, momentum=0.0, rngs=rngs)

    def __call__(self, x):
      return nnx.tanh(self.bn(self.lin(x)))

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.stem = nnx.Linear(3, 4, rngs=rngs)
      self.bn = jaxbn.nnx.BatchNorm(4, momentum=0.0, rngs=rngs)
      self.blocks = nnx.split_rngs(splits=3)(nnx.vmap(Block, in_axes=0, out_axes=0))(rngs)

    def __call__(self, x):
      x = nnx.remat(lambda bn, h: bn(h))(self.bn, self.stem(x))
      return nnx.scan(lambda h, blk: (blk(h), None), in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))(x, self.blocks)[0]

  data = _data(n=12)
  model = Net(nnx.Rngs(0))
  loss_fn = jaxbn.training.nnx_loss(model, lambda out, y: jnp.sum(out**2, -1))
  step = full_batch_step(loss_fn, optax.sgd(0.0), micro_batch_size=12)
  state, _ = step(loss_fn.init_state(optax.sgd(0.0)), data)
  model(data["x"])  # eager, training mode: momentum 0 stores each layer's batch statistics
  expected = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  got = nnx.to_pure_dict(state.batch_stats)
  assert got["blocks"]["bn"]["mean"].shape == (3, 4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, expected)
  assert not np.allclose(got["bn"]["var"], 1.0) and not np.allclose(got["blocks"]["bn"]["var"], 1.0)


@pytest.mark.parametrize("lift", ["scan", "remat"])
@pytest.mark.parametrize("norm", [nn.BatchNorm, jaxbn.linen.BatchNorm])
def test_linen_batch_norms_inside_lifted_transforms_update_like_flax(lift, norm):
  # Flax's own training-mode apply on the whole dataset is the oracle for the running statistics.

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
      y = nn.relu(norm(use_running_average=False, momentum=0.9)(nn.Dense(4)(x)))
      return (y, None) if lift == "scan" else y

  class Net(nn.Module):
    moments: bool = True

    @nn.compact
    def __call__(self, x):
      if lift == "scan":
        axes = {"params": 0, "batch_stats": 0} | ({jaxbn.linen.MOMENTS: 0} if self.moments else {})
        x = nn.scan(Block, variable_axes=axes, split_rngs={"params": True}, length=3)()(x, None)[0]
      else:
        x = nn.remat(Block)()(x)
      return nn.Dense(4)(x)

  data = _data(n=12, d=4)
  model = Net()
  variables = model.init(jax.random.key(0), data["x"][:2])
  loss_fn = linen_loss(model, xent)
  state = TrainState.create(variables["params"], variables["batch_stats"], optax.sgd(0.1))
  got, _ = full_batch_step(loss_fn, optax.sgd(0.1), donate=False)(state, data)
  _, want = model.apply(variables, data["x"], mutable=["batch_stats"])
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got.batch_stats, want["batch_stats"]
  )
  if lift == "scan":  # without MOMENTS in variable_axes the statistics cannot leave the scan: say so
    bare = linen_loss(Net(moments=False), xent)
    with pytest.raises(ValueError, match=r"ScanBlock_0/BatchNorm_0 reported no statistics.*jaxbn.linen.MOMENTS: 0"):
      full_batch_step(bare, optax.sgd(0.1))(state, data)
  elif norm is jaxbn.linen.BatchNorm:  # exact mode numbers the calls of one trace: a lift is refused
    exact = full_batch_step(loss_fn, optax.sgd(0.1), micro_batch_size=4, bn_mode="exact")
    with pytest.raises(ValueError, match=r"bn_mode='exact'.*own trace level"):
      exact(state, data)


def test_nnx_loss_rejects_flax_batch_norm():
  from flax import nnx

  class Bad(nnx.Module):
    def __init__(self):
      self.bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))

  with pytest.raises(TypeError, match=r"jaxbn.training.nnx_loss: the model's batch norm at bn is flax.nnx.BatchNorm"):
    jaxbn.training.nnx_loss(Bad(), xent)


def test_pmap_style_step_on_eight_devices_equals_one_device():
  # Device d holds rows d*4..d*4+3; micro-batches of 2 rows per device form global micro-batches of
  # 16 rows: one device reproduces them with the rows reordered and micro_batch_size=16.
  data = _data(n=32)
  model = MLP(partial(jaxbn.linen.BatchNorm, axis_name="batch"))
  variables = model.init(jax.random.key(0), data["x"], train=False)
  opt = optax.sgd(0.1, momentum=0.9)
  loss_fn = linen_loss(model, xent, train=True)
  step = full_batch_step(
    loss_fn, opt, micro_batch_size=2, update_batch_stats=loss_fn.update_batch_stats, jit=False, axis_name="batch"
  )
  state = TrainState.create(variables["params"], variables["batch_stats"], opt)
  shards = jax.tree.map(lambda a: a.reshape((8, 4, *a.shape[1:])), data)
  replicated = jax.tree.map(lambda a: jnp.broadcast_to(a, (8, *a.shape)), state)
  got, metrics = jax.pmap(step, axis_name="batch")(replicated, shards)

  one_model = MLP(jaxbn.linen.BatchNorm)
  one_loss = linen_loss(one_model, xent, train=True)
  one_step = full_batch_step(one_loss, opt, micro_batch_size=16, update_batch_stats=one_loss.update_batch_stats)
  order = np.concatenate([[d * 4 + k * 2, d * 4 + k * 2 + 1] for k in (0, 1) for d in range(8)])
  reordered = jax.tree.map(lambda a: a[order], data)
  want, want_metrics = one_step(TrainState.create(variables["params"], variables["batch_stats"], opt), reordered)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a[7], b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics.loss[0], want_metrics.loss, rtol=1e-5)


def test_explicit_mesh_data_runs_per_device_or_gets_a_clear_error():
  data = _data(n=32)
  sharded = jax.device_put(data, NamedSharding(jax.make_mesh((8,), ("batch",)), P("batch")))
  order = np.array([4 * d + i for i in range(4) for d in range(8)])  # as in the Auto-mesh test above
  # jaxbn's batch norm: each device sweeps its own rows inside shard_map, which Explicit axes allow.
  _, variables, opt, step = _setup(jaxbn.linen.BatchNorm, micro_batch_size=8, donate=False)
  state = TrainState.create(variables["params"], variables["batch_stats"], opt)
  want, _ = step(state, jax.tree.map(lambda a: a[order], data))
  for a, b in zip(jax.tree.leaves(step(state, sharded)[0]), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # flax's: the global-array program, which XLA cannot partition over Explicit axes (a matmul with the batch).
  _, variables, opt, step = _setup(nn.BatchNorm, micro_batch_size=8, donate=False)
  state = TrainState.create(variables["params"], variables["batch_stats"], opt)
  with pytest.warns(UserWarning, match="once per micro-batch"):
    with pytest.raises(ValueError, match=r"(?s)jaxbn.training.full_batch_step: .*Explicit mesh axes.*AxisType.Auto"):
      step(state, sharded)


@pytest.mark.parametrize("micro", [4, 5])
def test_host_loop_equals_scan(micro):
  data = _data()
  accuracy = lambda out, y: (jnp.argmax(out, -1) == y).astype(jnp.float32)
  model = MLP(jaxbn.linen.BatchNorm)
  variables = model.init(jax.random.key(0), data["x"], train=False)
  opt = optax.adam(1e-2)
  loss_fn = linen_loss(model, xent, metrics=accuracy, train=True)
  results = []
  for loop in ("scan", "host"):
    step = full_batch_step(loss_fn, opt, micro_batch_size=micro, loop=loop)
    state = TrainState.create(variables["params"], variables["batch_stats"], opt)
    for _ in range(2):
      state, metrics = step(state, data)
    results.append((state, metrics))
  (a, ma), (b, mb) = results
  for x, y in zip(jax.tree.leaves((a, ma)), jax.tree.leaves((b, mb))):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"loop='host' .* cannot be traced into pmap"):
    full_batch_step(loss_fn, opt, loop="host", axis_name="batch", jit=False)


def test_dropout_draws_fresh_keys_per_step_and_micro_batch():
  from flax import nnx

  class Drop(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
      return nn.Dense(4)(nn.Dropout(0.5, deterministic=not train)(nn.Dense(8)(x)))

  rows = _data(n=4)
  data = jax.tree.map(lambda a: jnp.concatenate([a, a]), rows)  # two micro-batches with the same rows
  model = Drop()
  variables = model.init(jax.random.key(0), rows["x"], train=False)
  with pytest.raises(ValueError, match=r"rngs=.* same keys on every step.*rng_streams=\('dropout',\)"):
    linen_loss(model, xent, train=True, rngs={"dropout": jax.random.key(1)})
  loss_fn = linen_loss(model, xent, train=True, rng_streams=("dropout",))
  step = full_batch_step(loss_fn, optax.sgd(0.0), micro_batch_size=4, donate=False)
  with pytest.raises(ValueError, match=r"draws random numbers.*TrainState.create\(\.\.\., key="):
    step(TrainState.create(variables["params"], {}, optax.sgd(0.0)), data)
  state = TrainState.create(variables["params"], {}, optax.sgd(0.0), key=jax.random.key(3))
  losses = []
  for t in range(2):
    # Oracle: micro-batch i of step t applies the model with key fold_in(fold_in(fold_in(key, t), i), 0).
    keys = [jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(3), t), i), 0) for i in (0, 1)]
    per = [jnp.mean(xent(model.apply(variables, rows["x"], rngs={"dropout": k}), rows["y"])) for k in keys]
    state, metrics = step(state, data)
    np.testing.assert_allclose(metrics.loss, np.mean(per), rtol=1e-6)
    assert abs(float(per[0]) - float(per[1])) > 1e-4  # same rows, different masks
    losses.append(float(metrics.loss))
  assert losses[0] != losses[1]

  class NnxDrop(nnx.Module):
    def __init__(self, rngs):
      self.a, self.drop, self.b = nnx.Linear(3, 8, rngs=rngs), nnx.Dropout(0.5, rngs=rngs), nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
      return self.b(self.drop(self.a(x)))

  class Stacked(nnx.Module):  # dropout streams of layers stacked with nnx.vmap hold one key per layer
    def __init__(self, rngs):
      self.blocks = nnx.split_rngs(splits=2)(nnx.vmap(lambda r: NnxDrop(r), in_axes=0, out_axes=0))(rngs)

    def __call__(self, x):
      return jnp.mean(nnx.vmap(lambda blk, x: blk(x), in_axes=(0, None))(self.blocks, x), 0)

  for net in (NnxDrop(nnx.Rngs(0, dropout=1)), Stacked(nnx.Rngs(0, dropout=1))):
    nnx_fn = jaxbn.training.nnx_loss(net, xent)
    nnx_step = full_batch_step(nnx_fn, optax.sgd(0.0), micro_batch_size=4)
    nnx_state = nnx_fn.init_state(optax.sgd(0.0), key=jax.random.key(3))
    nnx_losses = []
    for _ in range(2):
      nnx_state, metrics = nnx_step(nnx_state, data)
      nnx_losses.append(float(metrics.loss))
    assert nnx_losses[0] != nnx_losses[1]
  # The state keeps raw key data, read back with the default implementation: other ones are refused.
  with pytest.raises(TypeError, match=r"key must use the default PRNG implementation"):
    TrainState.create({}, {}, optax.sgd(0.0), key=jax.random.key(0, impl="rbg"))


def test_row_mask_that_cannot_follow_rows_into_a_vmap_is_an_error():
  # A batch norm vmapped over the rows sees one row at a time: the remainder's row mask cannot apply.
  class PerRow(nn.Module):
    @nn.compact
    def __call__(self, x):
      axes = {"params": None, "batch_stats": None, jaxbn.linen.MOMENTS: None}
      bn = nn.vmap(jaxbn.linen.BatchNorm, axis_name="rows", variable_axes=axes, split_rngs={"params": False})
      return nn.Dense(4)(bn(use_running_average=False, axis_name="rows")(nn.Dense(3)(x)))

  data = _data(n=12)
  variables = PerRow().init(jax.random.key(0), data["x"])
  state = TrainState.create(variables["params"], variables["batch_stats"], optax.sgd(0.1))
  step = full_batch_step(linen_loss(PerRow(), xent), optax.sgd(0.1), micro_batch_size=5)
  with pytest.raises(ValueError, match=r"input of shape \(3,\).*not the micro-batch's 5 rows"):
    step(state, data)
  full_batch_step(linen_loss(PerRow(), xent), optax.sgd(0.1), micro_batch_size=6)(state, data)  # no mask: fine


# ---- the Loss record ----------------------------------------------------------------------------


def _noisy_loss(params, batch_stats, batch, mask, key):
  """Squared error plus one uniform draw per micro-batch; reports the mean of x over the valid rows."""
  err = (batch["x"] @ params["w"] - batch["y"]) ** 2 + jax.random.uniform(key)
  valid = jnp.ones(err.shape, bool) if mask is None else mask
  stats = jaxbn.stats.compute_stats(batch["x"], (1,), mask=valid[:, None])
  return jnp.sum(jnp.where(valid, err, 0)) / jnp.sum(valid), LossAux(stats={"x": stats})


def _running_mean(batch_stats, merged):
  return {"mean": merged["x"].mean}


def _step_with_noisy_loss(loss_fn, **kw):
  data = {"x": jnp.arange(20.0).reshape(10, 2), "y": jnp.ones(10)}  # micro-batches of 4, 4 and 2 rows
  opt = optax.sgd(0.01)
  state = TrainState.create({"w": jnp.zeros(2)}, {"mean": jnp.zeros(2)}, opt, key=jax.random.key(7))
  return full_batch_step(loss_fn, opt, micro_batch_size=4, **kw)(state, data), data


def test_a_loss_built_by_hand_gives_the_step_its_running_update_and_keys():
  (new, metrics), data = _step_with_noisy_loss(Loss(_noisy_loss, _running_mean, takes_key=True))
  # One running update, from the statistics of all 10 rows merged over the micro-batches.
  np.testing.assert_allclose(new.batch_stats["mean"], np.asarray(data["x"]).mean(0), rtol=1e-6)
  # w = 0: every row's error is 1; micro-batch i draws from fold_in(fold_in(key, step 0), i).
  draws = [jax.random.uniform(jax.random.fold_in(jax.random.fold_in(jax.random.key(7), 0), i)) for i in range(3)]
  np.testing.assert_allclose(metrics.loss, 1.0 + np.dot([0.4, 0.4, 0.2], draws), rtol=1e-6)
  assert not bool(metrics.skipped)
  # The step's own update_batch_stats replaces the Loss's.
  (new, _), _ = _step_with_noisy_loss(
    Loss(_noisy_loss, _running_mean, takes_key=True), update_batch_stats=lambda bs, merged: {"mean": bs["mean"] + 1}
  )
  np.testing.assert_array_equal(new.batch_stats["mean"], [1.0, 1.0])
  with pytest.raises(TypeError, match=r"jaxbn.training.Loss: update_batch_stats must be callable"):
    Loss(_noisy_loss, 5)


def test_a_plain_function_with_the_old_attributes_still_works():
  def loss_fn(*args):
    return _noisy_loss(*args)

  loss_fn.update_batch_stats = _running_mean
  loss_fn.takes_key = True
  (new, metrics), _ = _step_with_noisy_loss(loss_fn)
  (want, want_metrics), _ = _step_with_noisy_loss(Loss(_noisy_loss, _running_mean, takes_key=True))
  for a, b in zip(jax.tree.leaves((new, metrics)), jax.tree.leaves((want, want_metrics))):
    np.testing.assert_array_equal(a, b)


def test_linen_loss_returns_a_loss():
  model, variables, *_ = _setup(jaxbn.linen.BatchNorm)
  loss_fn = linen_loss(model, xent, train=True)
  assert isinstance(loss_fn, Loss) and callable(loss_fn.update_batch_stats) and loss_fn.takes_key is False
  assert linen_loss(model, xent, train=True, rng_streams=("dropout",)).takes_key is True
  # Called, traced and shape-evaluated like the plain function it used to be.
  data = _data()
  value, aux = loss_fn(variables["params"], variables["batch_stats"], data, None)
  assert jax.eval_shape(loss_fn, variables["params"], variables["batch_stats"], data, None)[0].shape == ()
  np.testing.assert_allclose(jax.jit(loss_fn)(variables["params"], variables["batch_stats"], data, None)[0], value)
  assert sorted(aux.stats) == [("BatchNorm_0",), ("BatchNorm_1",)]
  # Its update reads each layer's settings from the loss's latest trace: a layer never traced is an error.
  loss_fn.update_batch_stats(variables["batch_stats"], aux.stats)
  with pytest.raises(ValueError, match=r"linen_loss: update_batch_stats got statistics for the batch norm at Other/BN"):
    loss_fn.update_batch_stats(variables["batch_stats"], {("Other", "BN"): aux.stats[("BatchNorm_0",)]})


def test_data_with_no_rows_is_refused():
  # A process whose rows were left out of a global batch sees such data; it must not divide by zero.
  loss_fn = lambda p, bs, b, m: (jnp.mean((b["x"] @ p["w"]) ** 2), LossAux())
  opt = optax.sgd(0.1)
  state = TrainState.create({"w": jnp.zeros(3)}, {}, opt)
  for loop in ("scan", "host"):
    step = full_batch_step(loss_fn, opt, micro_batch_size=4, loop=loop)
    with pytest.raises(ValueError, match=r"full_batch_step: data has no rows .*jaxbn.parallel.global_batch"):
      step(state, {"x": np.zeros((0, 3), np.float32)})
