"""jaxbn.moments and jaxbn.stats against float64 NumPy references."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn import stats

# float32's unit roundoff. jaxbn.moments subtracts a per-feature shift that is a sample of the data (so
# x - shift is exact, by Sterbenz's lemma, for data near the shift) and sums the differences and their
# squares in float32: the variance then carries a few roundings of u relative error whatever the mean,
# where the one-pass E[x^2] - E[x]^2 loses (mean / std)^2 u. Bounds below are ~10x the measured error.
F32_U = 2.0**-24


def reference_moments(x, feature_axes, mask=None):
  """Two-pass float64 statistics over the non-feature axes."""
  x = np.asarray(x, np.float64)
  m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), x.shape)
  red = tuple(a for a in range(x.ndim) if a not in feature_axes)
  n = m.sum(axis=red)
  safe = np.maximum(n, 1)
  mean = np.where(m, x, 0).sum(axis=red) / safe
  bshape = [x.shape[a] if a in feature_axes else 1 for a in range(x.ndim)]
  var = np.where(m, (x - mean.reshape(bshape)) ** 2, 0).sum(axis=red) / safe
  return mean, var, n


@pytest.mark.parametrize(
  "shape,axis",
  [((16, 5), -1), ((4, 6, 6, 3), -1), ((4, 3, 6, 6), 1), ((4, 5, 3, 2), (1, 3)), ((7, 2, 3), (0, 2))],
)
@pytest.mark.parametrize("masked", [False, True])
def test_moments_match_float64_reference(shape, axis, masked):
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, shape).astype(np.float32)
  mask = rng.random(shape[:1] + (1,) * (len(shape) - 1)) > 0.3 if masked else None
  axes = tuple(sorted(a % len(shape) for a in np.atleast_1d(axis)))
  mean, var, count = jaxbn.moments(x, axis=axis, mask=mask)
  rmean, rvar, rn = reference_moments(x, axes, mask)
  np.testing.assert_allclose(mean, rmean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(var, rvar, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(count, rn)
  assert mean.dtype == var.dtype == jnp.float32


@pytest.mark.parametrize("offset", [1e4, 1e5])
def test_variance_accurate_at_large_mean_float32(offset):
  # |mean| / std = 1e4 and 1e5: the one-pass E[x^2] - E[x]^2 of flax's default has no correct digit (0 or 8 for 1.0).
  rng = np.random.default_rng(1)
  x = (offset + rng.normal(0.0, 1.0, (4096, 8))).astype(np.float32)
  _, var, _ = jaxbn.moments(x)
  _, rvar, _ = reference_moments(x, (1,))
  assert np.max(np.abs(np.asarray(var) / rvar - 1)) <= 16 * F32_U  # measured 1.5 u at both offsets


def test_large_mean_with_padding_masked_out():
  # Padded rows hold zeros far from the data's mean; the shift must come from a valid row.
  rng = np.random.default_rng(2)
  x = (1e4 + rng.normal(0.0, 1.0, (256, 4))).astype(np.float32)
  x[:100] = 0.0
  mask = np.arange(256)[:, None] >= 100
  mean, var, count = jaxbn.moments(x, mask=mask)
  rmean, rvar, _ = reference_moments(x, (1,), mask)
  assert np.max(np.abs(np.asarray(var) / rvar - 1)) <= 100 * F32_U  # measured 9 u
  np.testing.assert_allclose(mean, rmean, rtol=1e-6)
  np.testing.assert_array_equal(count, 156)


def test_bfloat16_input_accumulates_in_float32():
  # haiku computes bf16 statistics in bf16 and returns a negative variance at mean 30 (dm-haiku#396).
  rng = np.random.default_rng(3)
  x = jnp.asarray(100.0 + rng.normal(0.0, 1.0, (2048, 16)), jnp.bfloat16)
  mean, var, _ = jaxbn.moments(x)
  assert mean.dtype == jnp.float32
  rmean, rvar, _ = reference_moments(np.asarray(x.astype(jnp.float32)), (1,))
  np.testing.assert_allclose(var, rvar, rtol=40 * F32_U)  # measured 4 u: bfloat16 input is exact in float32
  np.testing.assert_allclose(mean, rmean, rtol=1e-6)


def _moments_on_8_devices(style, x, mask):
  """jaxbn.moments under jax.jit of a batch split in 8 row blocks, one per device."""
  axis_type = {"jit-explicit": AxisType.Explicit, "jit-auto": AxisType.Auto}[style]
  mesh = jax.make_mesh((8,), ("d",), axis_types=(axis_type,))
  put = lambda a: None if a is None else jax.device_put(a, NamedSharding(mesh, P("d")))
  return jax.jit(lambda x, m: jaxbn.moments(x, mask=m))(put(x), put(mask))


@pytest.mark.parametrize("style", ["jit-auto", "jit-explicit"])  # jit-explicit merges as shard_map does
@pytest.mark.parametrize("offset", [1e4, 1e5])
def test_cross_device_variance_accurate_at_large_mean(style, offset):
  # Each device (or chunk) summarises its rows around its own first valid row; merging those
  # summaries must not round each part's mean to float32 first (an error of 1e-3 of the variance
  # at 1e5, as large as the one-pass formula's own error budget).
  rng = np.random.default_rng(11)
  x = (offset + rng.normal(0.0, 1.0, (64, 8))).astype(np.float32)
  mask = np.concatenate([np.arange(8) < v for v in (8, 0, 1, 3, 8, 2, 5, 4)])[:, None]
  mean, var, count = _moments_on_8_devices(style, x, mask)
  rmean, rvar, rn = reference_moments(x, (1,), mask)
  assert np.max(np.abs(np.asarray(var) / rvar - 1)) <= 1e-5
  np.testing.assert_allclose(mean, rmean, rtol=1e-7)
  np.testing.assert_array_equal(count, rn)


def test_cross_device_bfloat16_at_mean_100():
  rng = np.random.default_rng(12)
  x = jnp.asarray(100.0 + rng.normal(0.0, 1.0, (2048, 16)), jnp.bfloat16)
  mean, var, _ = _moments_on_8_devices("jit-auto", x, None)
  assert mean.dtype == var.dtype == jnp.float32
  rmean, rvar, _ = reference_moments(np.asarray(x.astype(jnp.float32)), (1,))
  np.testing.assert_allclose(var, rvar, rtol=1e-5)
  np.testing.assert_allclose(mean, rmean, rtol=1e-7)


def test_float64_statistics_stay_float64():
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(4).normal(size=(64, 3)), jnp.float64)
    mean, var, count = jaxbn.moments(x)
    assert mean.dtype == var.dtype == count.dtype == jnp.float64
    rmean, rvar, _ = reference_moments(x, (1,))
    np.testing.assert_allclose(mean, rmean, rtol=1e-12)
    np.testing.assert_allclose(var, rvar, rtol=1e-12)


def test_empty_mask_gives_zeros_and_finite_gradients():
  x = jnp.asarray(np.random.default_rng(5).normal(size=(8, 3)), jnp.float32)
  mask = jnp.zeros((8, 1), bool)
  mean, var, count = jaxbn.moments(x, mask=mask)
  np.testing.assert_array_equal(count, 0)
  np.testing.assert_array_equal(mean, 0)
  np.testing.assert_array_equal(var, 0)
  g = jax.grad(lambda v: sum(jnp.sum(t) for t in jaxbn.moments(v, mask=mask)[:2]))(x)
  assert np.all(np.isfinite(g)) and np.all(g == 0)


def test_per_feature_masks_count_each_feature():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(10, 3)).astype(np.float32)
  mask = rng.random((10, 3)) > 0.5
  mask[:, 2] = False
  mean, var, count = jaxbn.moments(x, mask=mask)
  rmean, rvar, rn = reference_moments(x, (1,), mask)
  np.testing.assert_array_equal(count, rn)
  np.testing.assert_allclose(mean, rmean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var, rvar, rtol=1e-5, atol=1e-6)


def test_gradients_match_two_pass_formula():
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(3.0, 2.0, (6, 5, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)

  def ours(v):
    mean, var, _ = jaxbn.moments(v)
    return jnp.sum(w[0] * mean + w[1] * var)

  def plain(v):
    mean = v.mean((0, 1), keepdims=True)
    return jnp.sum(w[0] * mean[0, 0] + w[1] * ((v - mean) ** 2).mean((0, 1)))

  np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(plain)(x), rtol=1e-5, atol=1e-6)


def test_merge_is_exact_for_uneven_parts():
  rng = np.random.default_rng(8)
  a = rng.normal(5.0, 1.0, (2, 3)).astype(np.float32)
  b = rng.normal(-1.0, 4.0, (8, 3)).astype(np.float32)
  merged = stats.merge(stats.local_stats(jnp.asarray(a), (1,)), stats.local_stats(jnp.asarray(b), (1,)))
  rmean, rvar, rn = reference_moments(np.concatenate([a, b]), (1,))
  np.testing.assert_allclose(merged.mean, rmean, rtol=1e-6)
  np.testing.assert_allclose(merged.var, rvar, rtol=1e-5)
  np.testing.assert_array_equal(merged.count, rn)


def test_merge_with_an_empty_part_is_the_other_part():
  x = jnp.asarray(np.random.default_rng(9).normal(size=(5, 2)), jnp.float32)
  s = stats.local_stats(x, (1,))
  empty = stats.local_stats(x, (1,), jnp.zeros((5, 1), bool))
  for merged in (stats.merge(s, empty), stats.merge(empty, s)):
    for got, want in zip(merged, s):
      np.testing.assert_allclose(got, want, rtol=1e-6)


def test_moments_under_jit_and_vmap():
  x = jnp.asarray(np.random.default_rng(10).normal(size=(3, 16, 4)), jnp.float32)
  jitted = jax.jit(jaxbn.moments, static_argnames="axis")(x, axis=-1)
  np.testing.assert_allclose(jitted[1], reference_moments(x, (2,))[1], rtol=1e-5)
  per_group = jax.vmap(jaxbn.moments)(x)
  for i in range(3):
    np.testing.assert_allclose(per_group[1][i], reference_moments(x[i], (1,))[1], rtol=1e-5)


@pytest.mark.parametrize("groups", [None, [[0, 2], [1, 3]]], ids=["all", "groups"])
def test_axis_name_merge_needs_no_rank_promotion(groups):
  # Flax's CI runs with JAX_NUMPY_RANK_PROMOTION=raise; gather_rows multiplied a (size, 1, ...) slot
  # into x by implicit rank promotion.
  x = jnp.asarray(np.random.default_rng(11).normal(5.0, 2.0, size=(4, 6, 3)), jnp.float32)
  with jax.numpy_rank_promotion("raise"):
    mean, var, count = jax.vmap(lambda x: jaxbn.moments(x, axis_name="d", axis_index_groups=groups), axis_name="d")(x)
  first = np.asarray(x)[[0, 2] if groups else slice(None)].reshape(-1, 3)
  np.testing.assert_allclose(mean[0], first.mean(0), rtol=1e-5)
  np.testing.assert_allclose(var[0], first.var(0), rtol=1e-5)
  np.testing.assert_array_equal(count[0], first.shape[0])


@pytest.mark.parametrize("masked", [False, True])
def test_complex_stats_match_float64_reference(masked):
  # Complex mean and the real variance mean(|x - mean|^2), at |mean| / std = 1e4, also across devices.
  rng = np.random.default_rng(12)
  x = jnp.asarray(1e4 * (1 - 2j) + rng.normal(size=(4, 32, 3)) + 1j * rng.normal(size=(4, 32, 3)), jnp.complex64)
  mask = jnp.asarray(rng.random((4, 32, 1)) > 0.4) if masked else None
  s = stats.compute_complex_stats(x.reshape(128, 3), (1,), mask=None if mask is None else mask.reshape(128, 1))
  per_device = jax.vmap(
    lambda x, m: stats.compute_complex_stats(x, (1,), mask=m, axis_name="d"), in_axes=(0, None if mask is None else 0),
    axis_name="d",
  )(x, mask)  # fmt: skip
  ref = np.asarray(x, np.complex128).reshape(128, 3)
  valid = ref if mask is None else ref[np.asarray(mask).reshape(128)]
  for got in (s, jax.tree.map(lambda a: a[0], per_device)):
    assert (got.mean.dtype, got.m2.dtype, got.count.dtype) == (jnp.complex64, jnp.float32, jnp.float32)
    np.testing.assert_array_equal(got.count, len(valid))
    np.testing.assert_allclose(got.mean, valid.mean(0), rtol=1e-7)
    np.testing.assert_allclose(got.var, np.var(valid, axis=0), rtol=1e-4)


@st.composite
def _cases(draw):
  ndim = draw(st.integers(1, 4))
  shape = draw(hnp.array_shapes(min_dims=ndim, max_dims=ndim, min_side=1, max_side=6))
  n_feat = draw(st.integers(1, ndim))
  axes = tuple(sorted(draw(st.permutations(range(ndim)))[:n_feat]))
  dtype = draw(st.sampled_from([np.float32, np.float16, jnp.bfloat16]))
  loc = draw(st.sampled_from([0.0, 3.0, -50.0]))
  seed = draw(st.integers(0, 2**31 - 1))
  mask_kind = draw(st.sampled_from(["none", "rows", "full"]))
  return shape, axes, dtype, loc, seed, mask_kind


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_cases())
def test_property_moments_match_reference(case):
  shape, axes, dtype, loc, seed, mask_kind = case
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(loc, 2.0, shape), dtype)
  mask = None
  if mask_kind == "rows":
    mask = rng.random(shape[:1] + (1,) * (len(shape) - 1)) > 0.4
  elif mask_kind == "full":
    mask = rng.random(shape) > 0.4
  mean, var, count = jax.jit(jaxbn.moments, static_argnames="axis")(x, axis=axes, mask=mask)
  # The reference sees the same (already rounded) values the library sees.
  rmean, rvar, rn = reference_moments(np.asarray(x.astype(jnp.float32)), axes, mask)
  np.testing.assert_array_equal(count, rn)
  scale = np.maximum(np.abs(rmean), 1.0)
  np.testing.assert_allclose(mean, rmean, rtol=1e-5, atol=1e-5 * scale.max())
  np.testing.assert_allclose(var, rvar, rtol=1e-4, atol=1e-5 * scale.max() ** 2 * 1e-2 + 1e-6)


@pytest.mark.parametrize("shape,axis", [((0, 3), -1), ((0, 3, 2, 2), 1), ((2, 0, 3), -1), ((0, 2, 3), (1, 2))])
@pytest.mark.parametrize("masked", [False, True])
def test_empty_batch_gives_count_zero(shape, axis, masked):
  # torch and flax return an empty output for an empty batch; its statistics have count 0.
  mask = jnp.ones(shape[:1] + (1,) * (len(shape) - 1), bool) if masked else None
  axes = tuple(sorted(a % len(shape) for a in np.atleast_1d(axis)))
  fshape = tuple(shape[a] for a in axes)
  for moments in (jaxbn.moments, jax.jit(jaxbn.moments, static_argnames="axis")):
    mean, var, count = moments(jnp.zeros(shape), axis=axis, mask=mask)
    for v in (mean, var, count):
      assert v.shape == fshape and v.dtype == jnp.float32
      np.testing.assert_array_equal(v, 0)


def test_explicit_mesh_sharded_along_features_only():
  # Model parallel: the batch is replicated and the features split over an Explicit mesh axis; the
  # statistics stay sharded like the features (no collective is needed).
  mesh = jax.make_mesh((8,), ("f",), axis_types=(AxisType.Explicit,))
  rng = np.random.default_rng(13)
  x = rng.normal(3.0, 2.0, (6, 16)).astype(np.float32)
  mask = np.arange(6)[:, None] < 4
  xs = jax.device_put(x, NamedSharding(mesh, P(None, "f")))
  for m in (None, mask):
    mean, var, count = jax.jit(lambda v, m=m: jaxbn.moments(v, mask=m))(xs)
    assert jax.typeof(mean).sharding.spec == P("f")
    rmean, rvar, rn = reference_moments(x, (1,), m)
    np.testing.assert_allclose(mean, rmean, rtol=1e-6)
    np.testing.assert_allclose(var, rvar, rtol=1e-5)
    np.testing.assert_array_equal(count, rn)


@pytest.mark.parametrize("mask_shape", [None, (6, 1, 1), (6, 4, 1), (1, 4, 5), (4, 5), (6, 4, 5)])
def test_valid_count_per_feature_from_the_mask_alone(mask_shape):
  # The count of the statistics (jaxbn's and those recorded for a flax.linen.BatchNorm), from the mask's own
  # entries: the oracle is the mask broadcast to the input and summed over the non-feature axes.
  shape, features = (6, 4, 5), (2,)
  mask = None if mask_shape is None else np.random.default_rng(0).random(mask_shape) < 0.6
  full = np.ones(shape, bool) if mask is None else np.broadcast_to(mask, shape)
  got = stats.valid_count(shape, features, None if mask is None else jnp.asarray(mask), jnp.float32)
  np.testing.assert_array_equal(got, full.sum((0, 1)))
