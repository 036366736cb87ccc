"""jaxbn.linen.BatchNorm: Flax's interface and variable layout, dtype rules, extras, errors."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn.linen import MOMENTS, BatchNorm
from jaxbn.variants import batch_renorm, ghost_batch_norm

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _x(shape=(6, 4, 4, 3), seed=0, dtype=jnp.float32):
  return (jax.random.normal(jax.random.key(seed), shape) * 2.0 + 1.0).astype(dtype)


def _spec(tree):
  return jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), tree)


CONFIGS = [
  pytest.param({}, id="default"),
  pytest.param({"axis": (1, 3)}, id="two-axes"),
  pytest.param({"axis": 1}, id="NCHW"),
  pytest.param({"use_scale": False}, id="no-scale"),
  pytest.param({"use_scale": False, "use_bias": False}, id="no-affine"),
  pytest.param({"dtype": jnp.bfloat16}, id="bf16-out"),
  pytest.param({"param_dtype": jnp.bfloat16}, id="bf16-params"),
  pytest.param({"scale_init": nn.initializers.normal(1.0), "bias_init": nn.initializers.uniform()}, id="random-init"),
  pytest.param({"force_float32_reductions": False, "param_dtype": jnp.bfloat16}, id="no-force-f32"),
]


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("in_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_layout_dtypes_and_values_match_flax(kw, in_dtype):
  x = _x(dtype=in_dtype)
  theirs, ours = nn.BatchNorm(momentum=0.9, **kw), BatchNorm(momentum=0.9, **kw)
  vt = theirs.init(jax.random.key(1), x, use_running_average=False)
  vo = ours.init(jax.random.key(1), x, use_running_average=False)
  assert _spec(vo) == _spec(vt)
  jax.tree.map(np.testing.assert_array_equal, vo, vt)
  low = in_dtype == jnp.bfloat16 or jnp.bfloat16 in (kw.get("dtype"), kw.get("param_dtype"))
  tol = {"rtol": 2e-2, "atol": 2e-2} if low else TOL
  yt, ut = theirs.apply(vt, x, use_running_average=False, mutable=["batch_stats"])
  yo, uo = ours.apply(vo, x, use_running_average=False, mutable=["batch_stats"])
  assert yo.dtype == yt.dtype
  np.testing.assert_allclose(np.float32(yo), np.float32(yt), **tol)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.float32(a), np.float32(b), **tol), uo, ut)
  # jaxbn keeps the running statistics in their declared dtype; Flax promotes them on update
  # when force_float32_reductions=False stores them in bfloat16.
  assert _spec(uo["batch_stats"]) == _spec(vo["batch_stats"])
  yt = theirs.apply({**vt, **ut}, x, use_running_average=True)
  yo = ours.apply({**vo, **uo}, x, use_running_average=True)
  assert yo.dtype == yt.dtype
  np.testing.assert_allclose(np.float32(yo), np.float32(yt), **tol)


def test_init_does_not_update_statistics_and_ignores_axis_name():
  x = _x()
  variables = BatchNorm(use_running_average=False, axis_name="not-bound").init(jax.random.key(0), x)
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0.0)
  np.testing.assert_array_equal(variables["batch_stats"]["var"], 1.0)


def test_use_running_average_at_construction_or_call_exactly_once():
  x = _x()
  v = BatchNorm().init(jax.random.key(0), x, use_running_average=True)
  np.testing.assert_allclose(BatchNorm(use_running_average=True).apply(v, x), BatchNorm().apply(v, x, True), **TOL)
  with pytest.raises(ValueError, match="must be passed to the constructor or at call time"):
    BatchNorm().apply(v, x)
  with pytest.raises(ValueError, match="passed to the constructor and at call time"):
    BatchNorm(use_running_average=True).apply(v, x, use_running_average=True)


def test_training_requires_mutable_batch_stats_as_in_flax():
  x = _x()
  v = BatchNorm().init(jax.random.key(0), x, use_running_average=False)
  with pytest.raises(Exception, match="batch_stats"):
    BatchNorm().apply(v, x, use_running_average=False)


@pytest.mark.parametrize("mask_dtype", [bool, jnp.float32], ids=["bool", "0/1"])
def test_mask_matches_flax(mask_dtype):
  x = _x((8, 3))
  mask = (jax.random.uniform(jax.random.key(3), (8, 1)) > 0.4).astype(mask_dtype)
  bn_t, bn_o = nn.BatchNorm(use_running_average=False, momentum=0.5), BatchNorm(use_running_average=False, momentum=0.5)
  v = bn_o.init(jax.random.key(0), x)
  yt, ut = bn_t.apply(v, x, mask=mask.astype(bool), mutable=["batch_stats"])
  yo, uo = bn_o.apply(v, x, mask=mask, mutable=["batch_stats"])
  np.testing.assert_allclose(yo, yt, **TOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), uo, ut)


def test_all_masked_feature_keeps_statistics_where_flax_gives_nan():
  x = _x((8, 3))
  mask = jnp.zeros((8, 3), bool).at[:, 0].set(True)
  bn = BatchNorm(use_running_average=False)
  v = bn.init(jax.random.key(0), x)
  _, upd = bn.apply(v, x, mask=mask, mutable=["batch_stats"])
  assert np.all(np.isfinite(upd["batch_stats"]["var"]))
  np.testing.assert_array_equal(upd["batch_stats"]["mean"][1:], 0.0)


EXTRAS = [
  pytest.param({}, False, id="none"),
  pytest.param({"unbiased_running_var": True}, False, id="unbiased"),
  pytest.param({"ghost_batch_size": 2}, False, id="ghost"),
  pytest.param({"renorm": True, "rmax": 2.0, "dmax": 1.0}, False, id="renorm-numbers"),
  pytest.param({"renorm": True}, True, id="renorm-paper-schedule"),
  pytest.param({"running_average": "debiased_ema"}, True, id="debiased"),
  pytest.param({"running_average": "cumulative"}, True, id="cumulative"),
]


@pytest.mark.parametrize("kw,has_count", EXTRAS)
def test_extra_variables_only_when_needed(kw, has_count):
  v = BatchNorm(use_running_average=False, **kw).init(jax.random.key(0), _x())
  expected = {"mean", "var"} | ({"count"} if has_count else set())
  assert set(v["batch_stats"]) == expected
  assert set(v["params"]) == {"scale", "bias"}
  if has_count:
    assert v["batch_stats"]["count"].dtype == jnp.int32 and int(v["batch_stats"]["count"]) == 0


def _run(module, x, variables, steps=3):
  step = jax.jit(lambda v, x: module.apply(v, x, use_running_average=False, mutable=["batch_stats"]))
  ys = []
  for i in range(steps):
    y, upd = step(variables, x + i)
    variables = {**variables, **upd}
    ys.append(y)
  return ys, variables


@pytest.mark.parametrize(
  "kw,ref",
  [
    pytest.param(
      {"running_average": "debiased_ema"},
      lambda x, s, p: jaxbn.batch_norm(x, s, **p, training=True, momentum=0.9, running_average="debiased_ema"),
      id="debiased",
    ),
    pytest.param(
      {"running_average": "cumulative", "unbiased_running_var": True},
      lambda x, s, p: jaxbn.batch_norm(
        x, s, **p, training=True, running_average="cumulative", unbiased_running_var=True
      ),
      id="cumulative-unbiased",
    ),
    pytest.param(
      {"ghost_batch_size": 4},
      lambda x, s, p: ghost_batch_norm(x, s, **p, ghost_batch_size=4, training=True, momentum=0.9),
      id="ghost",
    ),
    pytest.param(
      {"renorm": True, "rmax": 1.5, "dmax": 0.5},
      lambda x, s, p: batch_renorm(x, s, **p, training=True, rmax=1.5, dmax=0.5, momentum=0.9),
      id="renorm",
    ),
    pytest.param(
      {"renorm": True, "rmax": lambda t: 1.0 + t, "dmax": lambda t: 0.1 * t, "ghost_batch_size": 3},
      lambda x, s, p: batch_renorm(
        x, s, **p, training=True, rmax=lambda t: 1.0 + t, dmax=lambda t: 0.1 * t, ghost_batch_size=3, momentum=0.9
      ),
      id="renorm-schedule-ghost",
    ),
  ],
)
def test_extras_match_the_pure_functions(kw, ref):
  x = _x((10, 3), seed=4)
  module = BatchNorm(momentum=0.9, **kw)
  v = module.init(jax.random.key(0), x, use_running_average=False)
  p = {"scale": v["params"]["scale"] + 0.5, "bias": v["params"]["bias"] - 0.25}
  v = {**v, "params": p}
  ys, v = _run(module, x, v)
  state = jaxbn.init_state(3)
  for i, y in enumerate(ys):
    ry, state = ref(x + i, state, p)
    np.testing.assert_allclose(y, ry, **TOL)
  np.testing.assert_allclose(v["batch_stats"]["mean"], state.mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(v["batch_stats"]["var"], state.var, rtol=1e-6, atol=1e-6)
  if "count" in v["batch_stats"]:
    assert int(v["batch_stats"]["count"]) == int(state.count) == 3
  y_eval = module.apply(v, x, use_running_average=True)
  ry, _ = jaxbn.batch_norm(x, state, p["scale"], p["bias"], training=False)
  np.testing.assert_allclose(y_eval, ry, **TOL)


def test_ghost_eval_any_batch_size():
  module = BatchNorm(ghost_batch_size=4)
  init = module.init(jax.random.key(0), _x((8, 3)), use_running_average=False)
  # Running statistics and affine parameters away from their initial values (mean 0, var 1, scale 1, bias 0).
  v = {
    "params": {"scale": jnp.array([0.5, 2.0, -1.0]), "bias": jnp.array([0.1, -0.3, 2.0])},
    "batch_stats": {"mean": jnp.array([1.0, -2.0, 0.5]), "var": jnp.array([4.0, 0.25, 9.0])},
  }
  assert jax.tree.structure(v) == jax.tree.structure(init)
  for rows in (1, 9):  # neither a multiple of the ghost batch size: evaluation uses no batch statistics
    x = _x((rows, 3), seed=rows)
    y = module.apply(v, x, use_running_average=True)
    stats, params = ({k: np.asarray(a, np.float64)[None] for k, a in v[c].items()} for c in ("batch_stats", "params"))
    want = (np.asarray(x, np.float64) - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * params["scale"] + params["bias"]
    assert y.shape == (rows, 3)
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)


def test_moments_collection_records_exact_statistics_merged_over_calls():
  class Twice(nn.Module):
    @nn.compact
    def __call__(self, a, b):
      bn = BatchNorm(use_running_average=False)
      return bn(a), bn(b)

  a, b = _x((5, 3), seed=1), _x((7, 3), seed=2) + 3.0
  v = Twice().init(jax.random.key(0), a, b)
  _, upd = Twice().apply(v, a, b, mutable=["batch_stats", MOMENTS])
  got = upd[MOMENTS]["BatchNorm_0"]
  both = np.concatenate([np.asarray(a, np.float64), np.asarray(b, np.float64)])
  np.testing.assert_array_equal(got["count"], 12.0)
  np.testing.assert_allclose(got["mean"], both.mean(0), rtol=1e-6)
  np.testing.assert_allclose(got["m2"], both.var(0) * 12, rtol=1e-5)
  # Without the collection named mutable nothing is recorded, also with mutable=True.
  _, upd = Twice().apply(v, a, b, mutable=["batch_stats"])
  assert MOMENTS not in upd
  _, upd = Twice().apply(v, a, b, mutable=True)
  assert MOMENTS not in upd


def test_axis_name_merges_exactly_with_uneven_masks_under_vmap():
  # Two "devices" with 2 and 8 valid rows: the global mean is the mean of the 10 rows
  # (Flax averages the two per-device means instead).
  x = _x((2, 8, 3), seed=6)
  mask = jnp.arange(8)[None, :, None] < jnp.array([2, 8])[:, None, None]
  bn = BatchNorm(use_running_average=False, axis_name="d", momentum=0.0)
  v = bn.init(jax.random.key(0), x[0])
  _, upd = jax.jit(jax.vmap(lambda x, m: bn.apply(v, x, mask=m, mutable=["batch_stats"]), axis_name="d"))(x, mask)
  valid = np.concatenate([np.asarray(x[0, :2]), np.asarray(x[1])]).astype(np.float64)
  np.testing.assert_allclose(upd["batch_stats"]["mean"][0], valid.mean(0), rtol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["var"][1], valid.var(0), rtol=1e-5)


def test_gradients_match_flax_under_jit():
  x = _x((8, 3), seed=7)
  w = jax.random.normal(jax.random.key(8), x.shape)
  v = nn.BatchNorm().init(jax.random.key(0), x, use_running_average=False)
  v = {**v, "params": {"scale": jnp.linspace(0.5, 1.5, 3), "bias": jnp.linspace(-1, 1, 3)}}

  def grads(module):
    def loss(params, x):
      y, _ = module.apply({**v, "params": params}, x, use_running_average=False, mutable=["batch_stats"])
      return jnp.sum(y * w)

    return jax.jit(jax.grad(loss, (0, 1)))(v["params"], x)

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), grads(BatchNorm()), grads(nn.BatchNorm()))


@pytest.mark.parametrize(
  "kw,match",
  [
    ({"momentum": 1.5}, "momentum must be in"),
    ({"epsilon": 0.0}, "epsilon must be > 0"),
    ({"running_average": "sma"}, "running_average must be one of"),
    ({"ghost_batch_size": 0}, "ghost_batch_size must be a positive int"),
    ({"renorm": True, "rmax": 0.5}, "rmax must be >= 1"),
    ({"axis": 5}, "jaxbn.linen.BatchNorm: axis=5 is out of range"),
  ],
)
def test_bad_configuration_names_the_argument(kw, match):
  with pytest.raises(ValueError, match=re.escape(match)):
    BatchNorm(use_running_average=False, **kw).init(jax.random.key(0), _x())


def test_per_feature_count_in_the_modules_matches_the_function():
  # Feature 1 has no valid element in the first batch: with a count per feature, the cumulative
  # average of feature 1 is its second batch's statistics alone.
  from flax import nnx

  import jaxbn

  rng = np.random.default_rng(0)
  xs = [jnp.asarray(rng.normal(100.0, 2.0, (6, 3)), jnp.float32) for _ in range(2)]
  masks = [jnp.array([[True, False, True]] * 6), jnp.ones((6, 3), bool)]
  state = jaxbn.init_state(3, per_feature_count=True)
  for x, m in zip(xs, masks):
    _, state = jaxbn.batch_norm(x, state, training=True, mask=m, running_average="cumulative")
  np.testing.assert_allclose(state.mean[1], xs[1][:, 1].mean(), rtol=1e-6)

  bn = BatchNorm(use_running_average=False, running_average="cumulative", per_feature_count=True)
  variables = bn.init(jax.random.key(0), xs[0])
  assert variables["batch_stats"]["count"].shape == (3,)
  for x, m in zip(xs, masks):
    _, upd = bn.apply(variables, x, mask=m, mutable=["batch_stats"])
    variables = {**variables, **upd}
  layer = jaxbn.nnx.BatchNorm(3, running_average="cumulative", per_feature_count=True, rngs=nnx.Rngs(0))
  for x, m in zip(xs, masks):
    layer(x, mask=m)
  for got in (variables["batch_stats"], {"mean": layer.mean[...], "var": layer.var[...], "count": layer.count[...]}):
    np.testing.assert_allclose(got["mean"], state.mean, rtol=1e-6)
    np.testing.assert_allclose(got["var"], state.var, rtol=1e-5)
    np.testing.assert_array_equal(got["count"], state.count)


@pytest.mark.parametrize(
  "kw",
  [
    pytest.param({}, id="plain"),
    pytest.param({"ghost_batch_size": 4}, id="ghost"),
    pytest.param({"renorm": True, "rmax": 2.0, "dmax": 1.0}, id="renorm"),
  ],
)
def test_feature_without_valid_element_outputs_bias_with_zero_gradient(kw):
  # Feature 1 has no valid element: it normalizes to 0, so y = bias (Flax gives NaN; x / sqrt(epsilon)
  # came out before).
  x = _x((8, 3), seed=9) * 10.0
  mask = jnp.ones((8, 3), bool).at[:, 1].set(False)
  bn = BatchNorm(use_running_average=False, **kw)
  v = bn.init(jax.random.key(0), x)
  params = {"scale": jnp.array([1.5, 2.0, 0.5]), "bias": jnp.array([0.1, -0.3, 0.2])}
  w = jax.random.normal(jax.random.key(10), x.shape)

  def loss(params, x):
    y, _ = bn.apply({**v, "params": params}, x, mask=mask, mutable=["batch_stats"])
    return jnp.sum(y * w), y

  (_, y), (dp, dx) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x)
  np.testing.assert_array_equal(y[:, 1], params["bias"][1])
  assert np.all(np.isfinite(y)) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves((dp, dx)))
  np.testing.assert_array_equal(dx[:, 1], 0.0)
  np.testing.assert_array_equal(dp["scale"][1], 0.0)
  np.testing.assert_allclose(dp["bias"][1], jnp.sum(w[:, 1]), rtol=1e-6)
  assert float(jnp.max(jnp.abs(dx[:, ::2]))) > 0


def _complex_x(shape=(8, 3), seed=0, offset=0.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(offset + rng.normal(1.0, 2.0, shape) + 1j * rng.normal(0.0, 1.0, shape), jnp.complex64)


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_complex_variance_accurate_at_large_mean(offset):
  # Flax's mean(|x|^2) - |mean|^2 cancels at |mean| / std = 1e4 in float32; jaxbn's shifted sums do not.
  x = _complex_x((4096, 3), seed=1, offset=offset)
  mask = jnp.asarray(np.random.default_rng(2).random((4096, 1)) > 0.25)
  bn = BatchNorm(use_running_average=False, momentum=0.0)
  _, upd = bn.apply(bn.init(jax.random.key(0), x), x, mask=mask, mutable=["batch_stats"])
  valid = np.asarray(x, np.complex128)[np.asarray(mask[:, 0])]
  np.testing.assert_allclose(upd["batch_stats"]["var"], np.var(valid, axis=0), rtol=1e-3)
  np.testing.assert_allclose(upd["batch_stats"]["mean"], valid.mean(0), rtol=1e-6)


def test_complex_input_keeps_the_axis_name_merge_exact_under_uneven_masks():
  x = jnp.stack([_complex_x((8, 3), seed=3), _complex_x((8, 3), seed=4, offset=5.0)])
  mask = jnp.arange(8)[None, :, None] < jnp.array([2, 8])[:, None, None]
  bn = BatchNorm(use_running_average=False, axis_name="d", momentum=0.0)
  v = bn.init(jax.random.key(0), x[0])
  _, upd = jax.jit(jax.vmap(lambda x, m: bn.apply(v, x, mask=m, mutable=["batch_stats"]), axis_name="d"))(x, mask)
  valid = np.concatenate([np.asarray(x[0, :2]), np.asarray(x[1])]).astype(np.complex128)
  np.testing.assert_allclose(upd["batch_stats"]["mean"][0], valid.mean(0), rtol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["var"][1], np.var(valid, axis=0), rtol=1e-5)


@pytest.mark.parametrize(
  "kw,err,match",
  [
    ({"ghost_batch_size": 4}, ValueError, "ghost_batch_size=4 is not supported for complex input"),
    ({"renorm": True}, ValueError, "renorm=True is not supported for complex input"),
    ({"dtype": jnp.float32}, TypeError, "dtype=float32 is real but x is complex"),
  ],
)
def test_complex_input_refuses_what_it_does_not_support(kw, err, match):
  x = _complex_x()
  with pytest.raises(err, match=re.escape(f"jaxbn.linen.BatchNorm: {match}")):
    BatchNorm(use_running_average=False, **kw).init(jax.random.key(0), x)


def test_complex_input_refuses_moments_recording():
  x = _complex_x()
  bn = BatchNorm(use_running_average=False)
  v = bn.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"jaxbn\.linen\.BatchNorm: x is complex \(complex64\)"):
    bn.apply(v, x, mutable=["batch_stats", MOMENTS])
