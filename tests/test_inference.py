"""Folding and PreciseBN recalibration against exact references."""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.linen
import jaxbn.nnx
from jaxbn.inference import fold_batch_norm, fold_batch_norms, recalibrate

EPS = 1e-5


def _bn_vars(rng, c, *, use_scale=True, use_bias=True):
  params = {}
  if use_scale:
    params["scale"] = jnp.asarray(rng.normal(1.0, 0.5, c), jnp.float32)
  if use_bias:
    params["bias"] = jnp.asarray(rng.normal(0.0, 0.5, c), jnp.float32)
  stats = {
    "mean": jnp.asarray(rng.normal(0.0, 2.0, c), jnp.float32),
    "var": jnp.asarray(rng.uniform(0.1, 4, c), jnp.float32),
  }
  return params, stats


class ConvBN(nn.Module):
  groups: int = 1
  conv_bias: bool = False
  use_scale: bool = True
  folded: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(6, (3, 3), feature_group_count=self.groups, use_bias=self.conv_bias or self.folded, name="conv")(x)
    if not self.folded:
      x = jaxbn.linen.BatchNorm(use_running_average=True, use_scale=self.use_scale, name="bn")(x)
    return x


@pytest.mark.parametrize(
  "kw",
  [
    pytest.param({}, id="conv"),
    pytest.param({"conv_bias": True}, id="conv-with-bias"),
    pytest.param({"groups": 2}, id="grouped"),
    pytest.param({"groups": 6, "use_scale": False}, id="depthwise-no-scale"),
  ],
)
def test_folded_conv_equals_conv_then_batch_norm(kw):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(0.5, 2.0, (4, 7, 7, 6)), jnp.float32)
  model = ConvBN(**kw)
  v = model.init(jax.random.key(0), x)
  bn_params, bn_stats = _bn_vars(rng, 6, use_scale=kw.get("use_scale", True))
  v = {"params": {**v["params"], "bn": bn_params}, "batch_stats": {"bn": bn_stats}}
  if kw.get("conv_bias"):
    v["params"]["conv"]["bias"] = jnp.asarray(rng.normal(size=6), jnp.float32)
  folded = fold_batch_norms(v, [("conv", "bn")], epsilon=EPS)
  assert "bn" not in folded["params"] and "bn" not in folded["batch_stats"]
  ref = model.apply(v, x)
  out = ConvBN(groups=kw.get("groups", 1), folded=True).apply(folded, x)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # The core function gives the same kernel and bias.
  k, b = fold_batch_norm(v["params"]["conv"]["kernel"], v["params"]["conv"].get("bias"), bn_params, bn_stats)
  np.testing.assert_array_equal(k, folded["params"]["conv"]["kernel"])
  np.testing.assert_array_equal(b, folded["params"]["conv"]["bias"])


def test_fold_matches_float64_formula_and_accepts_a_state():
  rng = np.random.default_rng(1)
  kernel = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=3), jnp.float32)
  params, stats = _bn_vars(rng, 3)
  state = jaxbn.BatchNormState(stats["mean"], stats["var"], jnp.array(5))
  k, b = jax.jit(fold_batch_norm)(kernel, bias, params, state)
  s = np.asarray(params["scale"], np.float64) / np.sqrt(np.asarray(stats["var"], np.float64) + EPS)
  np.testing.assert_allclose(k, np.asarray(kernel, np.float64) * s, rtol=1e-6)
  ref_b = (np.asarray(bias, np.float64) - np.asarray(stats["mean"], np.float64)) * s + np.asarray(params["bias"])
  np.testing.assert_allclose(b, ref_b, rtol=1e-6, atol=1e-6)


def test_fold_nnx_pure_dict():
  class Net(nnx.Module):
    def __init__(self, folded, rngs):
      self.lin = nnx.Linear(4, 3, rngs=rngs)
      self.bn = None if folded else jaxbn.nnx.BatchNorm(3, use_running_average=True, rngs=rngs)

    def __call__(self, x):
      h = self.lin(x)
      return h if self.bn is None else self.bn(h)

  rng = np.random.default_rng(2)
  model = Net(False, nnx.Rngs(0))
  params, stats = _bn_vars(rng, 3)
  pure = nnx.to_pure_dict(nnx.state(model))
  pure["bn"] = {**params, **stats}
  nnx.update(model, _replaced(model, pure))
  folded_model = Net(True, nnx.Rngs(1))
  folded = fold_batch_norms(nnx.to_pure_dict(nnx.state(model)), [("lin", "bn")])
  assert set(folded) == {"lin"}
  nnx.update(folded_model, _replaced(folded_model, folded))
  x = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  np.testing.assert_allclose(folded_model(x), model(x), rtol=1e-5, atol=1e-5)


def _replaced(model, pure):
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, pure)
  return state


@pytest.mark.parametrize(
  "call,exc,match",
  [
    (
      lambda: fold_batch_norm(jnp.ones((3, 4)), None, {}, {"mean": jnp.zeros(3), "var": jnp.ones(3)}),
      ValueError,
      "trailing",
    ),
    (lambda: fold_batch_norm(jnp.ones((3, 4)), None, {}, {"mean": jnp.zeros(4)}), ValueError, "'mean' and 'var'"),
    (
      lambda: fold_batch_norm(jnp.ones((3, 4)), jnp.ones(3), {}, {"mean": jnp.zeros(4), "var": jnp.ones(4)}),
      ValueError,
      "bias must have",
    ),
    (
      lambda: fold_batch_norm(jnp.ones((3, 4)), None, [1], {"mean": jnp.zeros(4), "var": jnp.ones(4)}),
      TypeError,
      "bn_params must be a mapping",
    ),
    (
      lambda: fold_batch_norms({"params": {"a": {}}, "batch_stats": {}}, [("a", "b")]),
      ValueError,
      "path 'b' not found",
    ),
  ],
)
def test_fold_errors(call, exc, match):
  with pytest.raises(exc, match=match):
    call()


class MLP(nn.Module):
  bn: type = jaxbn.linen.BatchNorm
  kw: dict | None = None

  @nn.compact
  def __call__(self, batch, train: bool):
    x, mask = batch if isinstance(batch, tuple) else (batch, None)
    norm = partial(self.bn, use_running_average=not train, **(self.kw or {}))
    h = nn.relu(norm()(nn.Dense(4)(x), mask=mask))
    return norm()(nn.Dense(3)(h), mask=mask)


def _mlp_reference(params, batches, masks=None):
  """Population statistics of both batch norms' inputs over all batches, in float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h1s, h2s = [], []
  for i, x in enumerate(batches):
    m = np.ones(len(x), bool) if masks is None else np.asarray(masks[i]).reshape(-1)
    h1 = np.asarray(x, np.float64) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    mu, var = h1[m].mean(0), h1[m].var(0)
    a = np.maximum((h1 - mu) / np.sqrt(var + EPS) * p["BatchNorm_0"]["scale"] + p["BatchNorm_0"]["bias"], 0)
    h2 = a @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    h1s.append(h1[m])
    h2s.append(h2[m])
  return [(np.concatenate(h).mean(0), np.concatenate(h).var(0)) for h in (h1s, h2s)]


def _batches(n=5, rows=16, seed=3):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(i - 2.0, 1.0 + i, (rows, 2)), jnp.float32) for i in range(n)]


def _mlp_vars(model, x, seed=4):
  v = model.init(jax.random.key(0), x, train=False)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0.3, 1.0, a.shape), jnp.float32), v["params"])
  return {**v, "params": params}


def _check_recalibrated(bs, ref, rtol=1e-5):
  for name, (mean, var) in zip(("BatchNorm_0", "BatchNorm_1"), ref, strict=True):
    np.testing.assert_allclose(bs[name]["mean"], mean, rtol=rtol, atol=1e-5)
    np.testing.assert_allclose(bs[name]["var"], var, rtol=rtol, atol=1e-5)


def test_recalibrate_linen_is_exact_population_statistics():
  batches = _batches()
  model = MLP()
  v = _mlp_vars(model, batches[0])
  before = jax.tree.map(np.asarray, v)
  new = recalibrate(model, batches, v, train=True)
  _check_recalibrated(new["batch_stats"], _mlp_reference(v["params"], batches))
  jax.tree.map(np.testing.assert_array_equal, v, before)  # the input is not modified
  assert new["params"] is v["params"]
  unbiased = recalibrate(model, batches, v, unbiased_var=True, train=True)
  n = sum(len(b) for b in batches)
  np.testing.assert_allclose(
    unbiased["batch_stats"]["BatchNorm_0"]["var"], new["batch_stats"]["BatchNorm_0"]["var"] * n / (n - 1), rtol=1e-6
  )


def test_recalibrate_with_masks_counts_only_valid_rows():
  batches = _batches(4)
  masks = [jnp.arange(16)[:, None] < k for k in (16, 3, 9, 1)]
  model = MLP()
  v = _mlp_vars(model, batches[0])
  new = recalibrate(model, list(zip(batches, masks, strict=True)), v, train=True)
  _check_recalibrated(new["batch_stats"], _mlp_reference(v["params"], batches, masks))


def test_recalibrate_sharded_batches_and_shard_map_agree_with_one_device():
  batches = _batches(3, rows=16)
  model = MLP()
  v = _mlp_vars(model, batches[0])
  ref = _mlp_reference(v["params"], batches)
  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = [jax.device_put(b, NamedSharding(mesh, P("d"))) for b in batches]
  _check_recalibrated(recalibrate(model, sharded, v, train=True)["batch_stats"], ref)

  model_d = MLP(kw={"axis_name": "d"})

  def apply_fn(variables, batch, mutable, **kw):
    body = lambda variables, batch: model_d.apply(variables, batch, mutable=mutable, **kw)
    return jax.shard_map(body, mesh=mesh, in_specs=(P(), P("d")), out_specs=(P("d"), P()))(variables, batch)

  _check_recalibrated(recalibrate(apply_fn, batches, v, train=True)["batch_stats"], ref)


def test_recalibrate_ghost_layers_use_whole_batches():
  batches = _batches(3)
  model = MLP(kw={"ghost_batch_size": 4})
  v = _mlp_vars(model, batches[0])
  new = recalibrate(model, batches, v, train=True)
  # The first layer's input does not depend on the normalization: its statistics are exact.
  mean, var = _mlp_reference(v["params"], batches)[0]
  np.testing.assert_allclose(new["batch_stats"]["BatchNorm_0"]["mean"], mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new["batch_stats"]["BatchNorm_0"]["var"], var, rtol=1e-5, atol=1e-5)


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.d0 = nnx.Linear(2, 4, rngs=rngs)
    self.bn0 = jaxbn.nnx.BatchNorm(4, rngs=rngs)
    self.d1 = nnx.Linear(4, 3, rngs=rngs)
    self.bn1 = jaxbn.nnx.BatchNorm(3, rngs=rngs)

  def __call__(self, x):
    return self.bn1(self.d1(nnx.relu(self.bn0(self.d0(x)))))


def test_recalibrate_nnx_matches_linen_and_reference():
  batches = _batches()
  model = NnxMLP(nnx.Rngs(0))
  model.eval()  # recalibrate switches the jaxbn layers to batch statistics itself
  linen_v = _mlp_vars(MLP(), batches[0])
  p = linen_v["params"]
  pure = nnx.to_pure_dict(nnx.state(model))
  for ours, theirs in (("d0", "Dense_0"), ("d1", "Dense_1"), ("bn0", "BatchNorm_0"), ("bn1", "BatchNorm_1")):
    pure[ours].update(p[theirs])
  nnx.update(model, _replaced(model, pure))
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  new_stats = recalibrate(model, batches)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model)), before)
  assert model.bn0.use_running_average is True
  got = nnx.to_pure_dict(new_stats)
  _check_recalibrated({"BatchNorm_0": got["bn0"], "BatchNorm_1": got["bn1"]}, _mlp_reference(p, batches))
  nnx.update(model, new_stats)
  np.testing.assert_allclose(model.bn1.var[...], got["bn1"]["var"])


def test_recalibrate_errors():
  batches = _batches(2)
  flax_model = MLP(bn=nn.BatchNorm)
  v = _mlp_vars(flax_model, batches[0])
  with pytest.raises(ValueError, match="no jaxbn batch norm layer computed batch statistics"):
    recalibrate(flax_model, batches, v, train=True)
  with pytest.raises(ValueError, match="no jaxbn batch norm layer"):
    recalibrate(MLP(), [], v, train=True)
  with pytest.raises(ValueError, match="needs its variables"):
    recalibrate(MLP(), batches)
