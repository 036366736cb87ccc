"""jaxbn.nnx.BatchNorm: Flax NNX's interface, variables and modes; agreement with jaxbn.linen."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.linen
from jaxbn.nnx import BatchNorm

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _x(shape=(6, 4, 4, 3), seed=0, dtype=jnp.float32):
  return (jax.random.normal(jax.random.key(seed), shape) * 2.0 + 1.0).astype(dtype)


def _types(module):
  flat = nnx.to_flat_state(nnx.state(module))
  return {k: (type(v).__name__, v.get_value().shape, v.get_value().dtype) for k, v in flat}


CONFIGS = [
  pytest.param({}, id="default"),
  pytest.param({"use_scale": False}, id="no-scale"),
  pytest.param({"use_scale": False, "use_bias": False}, id="no-affine"),
  pytest.param({"dtype": jnp.bfloat16}, id="bf16-out"),
  pytest.param({"param_dtype": jnp.bfloat16}, id="bf16-params"),
  pytest.param({"scale_init": nnx.initializers.normal(1.0), "bias_init": nnx.initializers.uniform()}, id="random-init"),
  pytest.param({"axis": 1}, id="NCHW"),
]


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("in_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_state_layout_and_results_match_flax_nnx(kw, in_dtype):
  x = _x(dtype=in_dtype)
  features = x.shape[kw.get("axis", -1)]
  theirs = nnx.BatchNorm(features, momentum=0.9, rngs=nnx.Rngs(0), **kw)
  ours = BatchNorm(features, momentum=0.9, rngs=nnx.Rngs(0), **kw)
  assert _types(ours) == _types(theirs)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(ours), nnx.state(theirs))
  low = in_dtype == jnp.bfloat16 or jnp.bfloat16 in (kw.get("dtype"), kw.get("param_dtype"))
  tol = {"rtol": 2e-2, "atol": 2e-2} if low else TOL
  for _ in range(2):
    yt, yo = theirs(x), ours(x)
    assert yo.dtype == yt.dtype
    np.testing.assert_allclose(np.float32(yo), np.float32(yt), **tol)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.float32(a), np.float32(b), **tol), nnx.state(ours), nnx.state(theirs)
  )
  theirs.eval()
  ours.eval()
  yt, yo = theirs(x), ours(x)
  assert yo.dtype == yt.dtype
  np.testing.assert_allclose(np.float32(yo), np.float32(yt), **tol)


def test_train_eval_view_and_call_time_flag():
  x = _x((8, 3))
  bn = BatchNorm(3, rngs=nnx.Rngs(0))
  assert bn.use_running_average is False  # Flax NNX's default: training mode
  bn(x)
  after_train = nnx.clone(nnx.state(bn, nnx.BatchStat))
  bn.eval()
  assert bn.use_running_average is True
  bn(x)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(bn, nnx.BatchStat), after_train)
  bn(x, use_running_average=False)  # the call-time flag wins
  assert not np.array_equal(bn.mean[...], after_train["mean"][...])
  bn.train()
  assert bn.use_running_average is False
  viewed = nnx.view(bn, use_running_average=True)
  assert viewed.use_running_average is True and bn.use_running_average is False
  with pytest.raises(ValueError, match=r"jaxbn\.nnx\.BatchNorm: no use_running_average"):
    BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))(x)


@pytest.mark.parametrize(
  "kw,has_count",
  [
    ({}, False),
    ({"ghost_batch_size": 2, "unbiased_running_var": True}, False),
    ({"renorm": True, "rmax": 2.0, "dmax": 1.0}, False),
    ({"renorm": True}, True),
    ({"running_average": "cumulative"}, True),
  ],
)
def test_count_variable_only_when_needed(kw, has_count):
  bn = BatchNorm(3, rngs=nnx.Rngs(0), **kw)
  names = set(nnx.to_pure_dict(nnx.state(bn, nnx.BatchStat)))
  assert names == ({"mean", "var", "count"} if has_count else {"mean", "var"})


LINEN_NNX = [
  pytest.param({}, id="default"),
  pytest.param({"axis": 1}, id="NCHW"),
  pytest.param({"use_scale": False, "dtype": jnp.bfloat16}, id="bf16-out"),
  pytest.param({"running_average": "debiased_ema", "unbiased_running_var": True}, id="debiased-unbiased"),
  pytest.param({"ghost_batch_size": 2}, id="ghost"),
  pytest.param({"renorm": True, "rmax": lambda t: 1.0 + t, "dmax": 0.5}, id="renorm-schedule"),
]


@pytest.mark.parametrize("kw", LINEN_NNX)
def test_nnx_and_linen_agree(kw):
  x = _x((6, 4, 4, 3), seed=1)
  features = x.shape[kw.get("axis", -1)]
  scale_init = nnx.initializers.normal(1.0)
  ours = BatchNorm(features, momentum=0.8, scale_init=scale_init, rngs=nnx.Rngs(0), **kw)
  linen = jaxbn.linen.BatchNorm(momentum=0.8, **kw)
  params = {k: v for k, v in nnx.to_pure_dict(nnx.state(ours, nnx.Param)).items()}
  variables = linen.init(jax.random.key(0), x, use_running_average=False)
  variables = {**variables, "params": params}

  @jax.jit
  def linen_step(variables, x):
    return linen.apply(variables, x, use_running_average=False, mutable=["batch_stats"])

  @nnx.jit
  def nnx_step(model, x):
    return model(x)

  for i in range(3):
    y_linen, upd = linen_step(variables, x * (i + 1))
    variables = {**variables, **upd}
    y_nnx = nnx_step(ours, x * (i + 1))
    np.testing.assert_allclose(np.float32(y_nnx), np.float32(y_linen), **TOL)
  stats = nnx.to_pure_dict(nnx.state(ours, nnx.BatchStat))
  assert set(stats) == set(variables["batch_stats"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), stats, variables["batch_stats"])
  ours.eval()
  np.testing.assert_allclose(
    np.float32(ours(x)), np.float32(linen.apply(variables, x, use_running_average=True)), **TOL
  )


def test_axis_name_under_shard_map_gives_global_statistics():
  devices, rows = 8, 3
  x = _x((devices * rows, 5), seed=2)
  mask = jnp.arange(devices * rows) % 5 != 0
  bn = BatchNorm(5, axis_name="d", momentum=0.0, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(bn)
  mesh = jax.make_mesh((devices,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))

  def body(state, x, mask):
    model = nnx.merge(graphdef, state)
    y = model(x, mask=mask[:, None])
    return y, nnx.state(model)

  y, new_state = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("d"), P("d")), out_specs=(P("d"), P())))(
    state, x, mask
  )
  ref_y, ref_state = jaxbn.batch_norm(x, jaxbn.init_state(5), training=True, momentum=0.0, mask=mask[:, None])
  np.testing.assert_allclose(y, ref_y, **TOL)
  np.testing.assert_allclose(new_state["mean"][...], ref_state.mean, **TOL)
  np.testing.assert_allclose(new_state["var"][...], ref_state.var, **TOL)


def test_gradients_flow_to_params_not_batch_stats():
  x = _x((8, 3), seed=3)
  ours = BatchNorm(3, rngs=nnx.Rngs(0))
  theirs = nnx.BatchNorm(3, rngs=nnx.Rngs(0))

  def loss(model):
    return jnp.sum(model(x) ** 3)

  go, gt = nnx.grad(loss)(ours), nnx.grad(loss)(theirs)
  assert set(nnx.to_pure_dict(go)) == {"scale", "bias"}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), go, gt)


def test_bad_num_features():
  with pytest.raises(ValueError, match=r"jaxbn\.nnx\.BatchNorm: num_features must be a positive int"):
    BatchNorm(0, rngs=nnx.Rngs(0))


def test_several_feature_axes():
  x = _x((4, 3, 5, 2), seed=4)
  bn = BatchNorm((3, 2), axis=(1, 3), momentum=0.0, rngs=nnx.Rngs(0))
  y = bn(x)
  ref, state = jaxbn.batch_norm(x, jaxbn.init_state((3, 2)), training=True, axis=(1, 3), momentum=0.0)
  np.testing.assert_allclose(y, ref, **TOL)
  np.testing.assert_allclose(bn.var[...], state.var, **TOL)
  linen_vars = jaxbn.linen.BatchNorm(axis=(1, 3)).init(jax.random.key(0), x, use_running_average=True)
  assert linen_vars["batch_stats"]["mean"].shape == bn.mean[...].shape


def test_num_features_takes_numpy_ints_and_refuses_bools():
  # One rule for integer arguments, as jaxbn.init_state: NumPy integers accepted, bools refused.
  for num_features, shape in [(np.int64(4), (4,)), ((np.int32(2), np.int64(3)), (2, 3)), (np.array([2, 3]), (2, 3))]:
    bn = BatchNorm(num_features, axis=-1 if len(shape) == 1 else (1, 2), rngs=nnx.Rngs(0))
    assert bn.mean[...].shape == bn.scale[...].shape == jaxbn.init_state(num_features).mean.shape == shape
  for bad in (True, (2, True), np.bool_(True), 2.0, "4"):
    with pytest.raises(ValueError, match=r"jaxbn\.nnx\.BatchNorm: num_features must be a positive int"):
      BatchNorm(bad, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"jaxbn\.init_state: num_features must be a positive int"):
      jaxbn.init_state(bad)


def test_feature_without_valid_element_outputs_bias_with_zero_gradient():
  x = _x((8, 3), seed=5) * 10.0
  mask = jnp.ones((8, 3), bool).at[:, 1].set(False)
  bn = BatchNorm(3, bias_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(0))
  w = jax.random.normal(jax.random.key(6), x.shape)

  def loss(model, x):
    return jnp.sum(model(x, mask=mask) * w)

  gm, dx = nnx.grad(loss, argnums=(0, 1))(bn, x)
  np.testing.assert_array_equal(bn(x, mask=mask)[:, 1], bn.bias[...][1])
  np.testing.assert_array_equal(dx[:, 1], 0.0)
  np.testing.assert_array_equal(gm["scale"][...][1], 0.0)
  np.testing.assert_allclose(gm["bias"][...][1], jnp.sum(w[:, 1]), rtol=1e-6)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves((gm, dx)))


def test_batch_moments_of_float64_input_are_float64():
  from jaxbn.nnx import collect_moments

  with jax.enable_x64(True):
    rng = np.random.default_rng(7)
    # |mean| / std = 1e8: float32 cannot even hold the deviations.
    a, b = (jnp.asarray(rng.normal(1e6, 1e-2, (16, 3)), jnp.float64) for _ in range(2))
    bn = BatchNorm(3, param_dtype=jnp.float64, rngs=nnx.Rngs(0))

    @nnx.jit
    def collect(model, a, b):
      with collect_moments(model) as read:
        model(a)
        model(b)
        return read()[()]

    stats = collect(bn, a, b)
    both = np.concatenate([np.asarray(a), np.asarray(b)])
    assert {s.dtype for s in stats} == {jnp.dtype(jnp.float64)}
    np.testing.assert_array_equal(stats.count, 32.0)
    np.testing.assert_allclose(stats.mean, both.mean(0), rtol=1e-15)
    np.testing.assert_allclose(stats.m2, ((both - both.mean(0)) ** 2).sum(0), rtol=1e-6)
    # float32 input: float32 statistics, the wider of float32 and the input's dtype.
    stats32 = collect(BatchNorm(3, rngs=nnx.Rngs(0)), a.astype(jnp.float32), b.astype(jnp.float32))
    assert {s.dtype for s in stats32} == {jnp.dtype(jnp.float32)}


def test_complex_input_refuses_collected_moments():
  from jaxbn.nnx import collect_moments

  x = jnp.asarray(np.random.default_rng(8).normal(size=(8, 3)) * (1 + 1j), jnp.complex64)
  bn = BatchNorm(3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"jaxbn\.nnx\.BatchNorm: x is complex \(complex64\)"):
    with collect_moments(bn):
      bn(x)
