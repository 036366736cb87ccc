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
  with pytest.raises(ValueError, match=r"reported no batch statistics.*BatchNorm_0, BatchNorm_1"):
    recalibrate(flax_model, batches, v, train=True)
  with pytest.raises(ValueError, match="batches is empty"):
    recalibrate(MLP(), [], v, train=True)
  dense = nn.Dense(2)
  with pytest.raises(ValueError, match="no jaxbn batch norm layer computed batch statistics"):
    recalibrate(dense, batches, dense.init(jax.random.key(0), batches[0]))
  with pytest.raises(ValueError, match="no jaxbn batch norm layer computed batch statistics"):
    recalibrate(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), batches)
  with pytest.raises(ValueError, match="needs its variables"):
    recalibrate(MLP(), batches)


# ---- stacked layers, explicit output-channel axis, lifted transforms ----------------------------


def _scan_mlp(depth, width, folded=False, moments=False):
  """A stack of `depth` Dense(width) -> jaxbn BatchNorm -> tanh blocks built with nn.scan."""

  class Block(nn.Module):
    train: bool = False

    @nn.compact
    def __call__(self, c, _):
      h = nn.Dense(width, use_bias=folded, name="dense")(c)
      if not folded:
        h = jaxbn.linen.BatchNorm(use_running_average=not self.train, name="bn")(h)
      return jnp.tanh(h), None

  axes = {"params": 0, "batch_stats": 0, **({jaxbn.linen.MOMENTS: 0} if moments else {})}

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      stack = nn.scan(Block, variable_axes=axes, split_rngs={"params": True}, length=depth)
      return stack(train, name="blocks")(x, None)[0]

  return Net()


def _random_stats(v, seed):
  rng = np.random.default_rng(seed)
  bs = v["batch_stats"]["blocks"]["bn"]
  stats = {
    "mean": jnp.asarray(rng.normal(0, 1, bs["mean"].shape), jnp.float32),
    "var": jnp.asarray(rng.uniform(0.2, 3, bs["var"].shape), jnp.float32),
  }
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0.5, 1.0, a.shape), jnp.float32), v["params"])
  return {"params": params, "batch_stats": {"blocks": {"bn": stats}}}


@pytest.mark.parametrize("depth,width", [(3, 4), (4, 4)])
def test_fold_scanned_layers_folds_each_layer(depth, width):
  x = jnp.asarray(np.random.default_rng(5).normal(size=(6, width)), jnp.float32)
  model = _scan_mlp(depth, width)
  v = _random_stats(model.init(jax.random.key(0), x), depth)
  ref = model.apply(v, x)
  folded_model = _scan_mlp(depth, width, folded=True)
  if depth == width:
    # (L, in, out) with L == in also reads as one layer with feature axes (in, out): refused, not guessed.
    with pytest.raises(ValueError, match=r"more than one way.*stack_axes"):
      fold_batch_norms(v, [("blocks/dense", "blocks/bn")])
  else:
    folded = fold_batch_norms(v, [("blocks/dense", "blocks/bn")])
    np.testing.assert_allclose(folded_model.apply(folded, x), ref, rtol=1e-5, atol=1e-5)
  for stack_axes in (1, np.int64(1)):  # NumPy integers are integers, as everywhere in jaxbn
    folded = fold_batch_norms(v, [("blocks/dense", "blocks/bn")], stack_axes=stack_axes)
    assert folded["params"]["blocks"]["dense"]["bias"].shape == (depth, width)
    np.testing.assert_allclose(folded_model.apply(folded, x), ref, rtol=1e-5, atol=1e-5)
  for bad in (2, True):
    with pytest.raises(ValueError, match="stack_axes must be None or an int"):
      fold_batch_norms(v, [("blocks/dense", "blocks/bn")], stack_axes=bad)


def test_fold_torch_layout_with_axis_matches_torch_fusion():
  torch = pytest.importorskip("torch", reason="the torch peer is not installed: pip install -e '.[peers]'")
  from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

  rng = np.random.default_rng(6)
  params, stats = _bn_vars(rng, 5)
  t = lambda a: torch.tensor(np.asarray(a, np.float64))
  for shape in ((5, 5), (5, 3, 2, 2)):  # Linear (out, in) with in == out; Conv2d OIHW
    kernel = jnp.asarray(rng.normal(size=shape))
    bias = jnp.asarray(rng.normal(size=5))
    args = (t(stats["mean"]), t(stats["var"]), EPS, t(params["scale"]), t(params["bias"]))
    fuse = fuse_linear_bn_weights if len(shape) == 2 else fuse_conv_bn_weights
    ref_k, ref_b = fuse(t(kernel), t(bias), *args)
    k, b = fold_batch_norm(kernel.astype(jnp.float32), bias, params, stats, axis=0)
    np.testing.assert_allclose(k, ref_k.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b, ref_b.detach().numpy(), rtol=1e-5, atol=1e-5)
  # A stack of two PyTorch kernels (L, out, in): the stack axis leads, the channel axis is given.
  k2, b2 = fold_batch_norm(
    jnp.stack([kernel[..., 0, 0]] * 2), None, None, {n: jnp.stack([a, a]) for n, a in stats.items()}, axis=1
  )
  k1, b1 = fold_batch_norm(kernel[..., 0, 0], None, None, stats, axis=0)
  np.testing.assert_allclose(k2, np.stack([k1, k1]), rtol=1e-6)
  np.testing.assert_allclose(b2, np.stack([b1, b1]), rtol=1e-6)
  with pytest.raises(ValueError, match=r"axis=0"):
    fold_batch_norm(jnp.ones((3, 4)), None, None, {"mean": jnp.zeros(4), "var": jnp.ones(4)}, axis=0)


def _layer_stats_reference(batches, layers, acts):
  """Float64 population statistics of every layer's batch-norm input; each batch in training mode.

  `layers` is a list of (kernel, bias, scale, beta) applied in order: h = x @ kernel + bias (h = x
  when kernel is None), then batch norm with the batch's own statistics, then `acts[i]`.
  """
  f64 = lambda a: np.asarray(a, np.float64)
  inputs = [[] for _ in layers]
  for x in batches:
    x = f64(x)
    for i, (k, b, g, beta) in enumerate(layers):
      h = x if k is None else x @ f64(k) + f64(b)
      inputs[i].append(h)
      x = acts[i]((h - h.mean(0)) / np.sqrt(h.var(0) + EPS) * f64(g) + f64(beta))
  return [(np.concatenate(h).mean(0), np.concatenate(h).var(0)) for h in inputs]


def test_recalibrate_linen_scan_needs_moments_axis_and_is_exact_per_layer():
  batches = _batches(3, rows=12)
  batches = [jnp.concatenate([b, b[:, :1] * 2], axis=1)[:, :3] for b in batches]  # width 3
  depth, width = 2, 3
  plain = _scan_mlp(depth, width)
  v = _random_stats(plain.init(jax.random.key(0), batches[0]), 7)
  # Without MOMENTS in variable_axes the scanned layers cannot report: an error that names them.
  with pytest.raises(ValueError, match=r"(?s)blocks/bn\..*jaxbn\.linen\.MOMENTS: 0"):
    recalibrate(plain, batches, v, train=True)
  new = recalibrate(_scan_mlp(depth, width, moments=True), batches, v, train=True)
  p = v["params"]["blocks"]
  layers = [(p["dense"]["kernel"][i], np.zeros(width), p["bn"]["scale"][i], p["bn"]["bias"][i]) for i in range(depth)]
  ref = _layer_stats_reference(batches, layers, [np.tanh] * depth)
  got = new["batch_stats"]["blocks"]["bn"]
  np.testing.assert_allclose(got["mean"], np.stack([m for m, _ in ref]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["var"], np.stack([s for _, s in ref]), rtol=1e-5, atol=1e-5)

  # nn.vmap: one batch norm per group, statistics (groups, C).
  class Grouped(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      axes = {"params": 0, "batch_stats": 0, jaxbn.linen.MOMENTS: 0}
      bn = nn.vmap(jaxbn.linen.BatchNorm, variable_axes=axes, split_rngs={"params": True})
      return bn(use_running_average=not train)(x.reshape(2, -1, x.shape[-1]))

  vg = Grouped().init(jax.random.key(1), batches[0], train=False)
  got = recalibrate(Grouped(), batches, vg, train=True)["batch_stats"]["VmapBatchNorm_0"]
  groups = np.concatenate([np.asarray(b, np.float64).reshape(2, -1, width) for b in batches], axis=1)
  np.testing.assert_allclose(got["mean"], groups.mean(1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["var"], groups.var(1), rtol=1e-5, atol=1e-5)


def test_recalibrate_linen_refuses_flax_batch_norm_layers_it_cannot_see():
  class Mixed(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      x = jaxbn.linen.BatchNorm(use_running_average=not train, name="ours")(x)
      return nn.BatchNorm(use_running_average=not train, name="flax_bn")(x)

  batches = _batches(2)
  v = Mixed().init(jax.random.key(0), batches[0], train=False)
  with pytest.raises(ValueError, match=r"(?s)old ones: flax_bn\. .*flax\.linen\.BatchNorm"):
    recalibrate(Mixed(), batches, v, train=True)
  # strict=False: the layers that report nothing (here flax's) keep their statistics; jaxbn's are recalibrated.
  new = recalibrate(Mixed(), batches, v, train=True, strict=False)
  np.testing.assert_array_equal(new["batch_stats"]["flax_bn"]["var"], v["batch_stats"]["flax_bn"]["var"])
  np.testing.assert_allclose(new["batch_stats"]["ours"]["mean"], jnp.concatenate(batches).mean(0), rtol=1e-5, atol=1e-6)


class _NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(3, 3, rngs=rngs)
    self.bn = jaxbn.nnx.BatchNorm(3, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.bn(self.lin(x)))


class _NnxLifted(nnx.Module):
  """A plain layer, a layer under nnx.remat, a vmap-built stack run by nnx.scan, an unused layer."""

  def __init__(self, rngs, depth=3):
    self.stem = jaxbn.nnx.BatchNorm(3, rngs=rngs)
    self.ckpt = _NnxBlock(rngs)
    self.unused = jaxbn.nnx.BatchNorm(3, rngs=rngs)

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return _NnxBlock(rngs)

    self.blocks = make(rngs)

  def __call__(self, x):
    x = nnx.remat(lambda blk, x: blk(x))(self.ckpt, self.stem(x))

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, blk):
      return blk(x)

    return body(x, self.blocks)


def test_recalibrate_nnx_reaches_layers_inside_remat_scan_and_vmap():
  depth = 3
  batches = [b[:, :1] + jnp.asarray([[0.0, 1.5, -2.0]]) * b[:, 1:] for b in _batches(3, rows=12)]  # width 3
  model = _NnxLifted(nnx.Rngs(0), depth)
  rng = np.random.default_rng(8)
  pure = nnx.to_pure_dict(nnx.state(model))
  pure = jax.tree.map(lambda a: jnp.asarray(rng.normal(0.3, 1.0, a.shape), a.dtype), pure)
  for path in (("stem",), ("ckpt", "bn"), ("unused",), ("blocks", "bn")):
    node = pure
    for key in path:
      node = node[key]
    node["var"] = jnp.abs(node["var"]) + 0.5
  nnx.update(model, _replaced(model, pure))
  new = nnx.to_pure_dict(recalibrate(model, batches))

  one = lambda d: (None, None, d["scale"], d["bias"])
  dense = lambda d, i=None: tuple(
    a if i is None else a[i] for a in (d["lin"]["kernel"], d["lin"]["bias"], d["bn"]["scale"], d["bn"]["bias"])
  )
  layers = [one(pure["stem"]), dense(pure["ckpt"])] + [dense(pure["blocks"], i) for i in range(depth)]
  acts = [lambda z: z] + [lambda z: np.maximum(z, 0)] * (depth + 1)
  ref = _layer_stats_reference(batches, layers, acts)
  got = [new["stem"], new["ckpt"]["bn"]] + [
    jax.tree.map(lambda a, i=i: a[i], new["blocks"]["bn"]) for i in range(depth)
  ]
  for (mean, var), g in zip(ref, got, strict=True):
    np.testing.assert_allclose(g["mean"], mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g["var"], var, rtol=1e-5, atol=1e-5)
  # A layer never called keeps its statistics.
  np.testing.assert_array_equal(new["unused"]["mean"], pure["unused"]["mean"])
  np.testing.assert_array_equal(new["unused"]["var"], pure["unused"]["var"])


def test_recalibrate_nnx_refuses_flax_batch_norm():
  class Mixed(nnx.Module):
    def __init__(self, rngs):
      self.ours = jaxbn.nnx.BatchNorm(2, rngs=rngs)
      self.theirs = nnx.BatchNorm(2, rngs=rngs)

    def __call__(self, x):
      return self.theirs(self.ours(x))

  with pytest.raises(ValueError, match=r"theirs are flax\.nnx\.BatchNorm"):
    recalibrate(Mixed(nnx.Rngs(0)), _batches(1))
