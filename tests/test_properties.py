"""Property-based tests of the batch norm core against a float64 NumPy oracle.

Hypothesis draws shapes, feature axes (NHWC, NCHW, tuples, negative, every axis), masks (none,
broadcast rows, elements, empty, one valid element, a feature left empty), input dtypes (float32,
bfloat16, float16), offsets up to 1e5, several batches in a row and the running-average conventions
(``"ema"``, ``"debiased_ema"``, ``"cumulative"``, biased or unbiased running variance). The oracle
is written from the documented definitions (the conventions table of docs/coming_from.md, ``jaxbn.batch_norm``'s
docstring), not from jaxbn's formulas: two-pass float64 statistics over the valid elements, the
running averages in their closed forms (the debiased EMA as a zero-initialised hidden EMA divided by
``1 - m**t``, the cumulative average as a sum divided by the count).

Tolerances are derived from float32 arithmetic (unit roundoff ``u = 2**-24``), not chosen to pass:

* statistics: the mean is off by ``~u (|mean| + g(n) R)`` and the variance by ``~u g(n) (var + R**2)``,
  with ``R`` the largest distance of a valid element from the mean (the shifted sums cancel at most
  that much) and ``g(n)`` the growth of rounding in a sum of ``n`` terms;
* output: those errors through ``(x - mean) * scale / sqrt(var + eps) + bias``, where the mean's
  error is divided by the standard deviation (the offset/std ratio), plus one rounding to the
  output dtype (``2**-8`` for bfloat16, ``2**-11`` for float16);
* running statistics: the batch statistics' errors weighted as the convention weights them, plus a
  few ``u`` per update for the weights and the blend.

The ci profile (the root conftest.py) runs a fixed set of examples; ``--hypothesis-profile=long`` many more.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn

U32 = 2.0**-24  # unit roundoff of float32, the precision of statistics and of the normalization
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
MODES = ("ema", "debiased_ema", "cumulative")
MASKS = ("none", "ones", "rows", "elements", "empty", "single", "feature_empty")
# Masks whose valid elements can differ between features: "cumulative" and "debiased_ema" then need a
# per-feature count (jaxbn.init_state(..., per_feature_count=True)), as batch_norm's docstring says.
FEATURE_DEPENDENT_MASKS = ("elements", "feature_empty")


def _unit(dtype) -> float:
  """Unit roundoff (half the machine epsilon) of a floating dtype."""
  return float(jnp.finfo(dtype).eps) / 2


def _growth(n):
  """How rounding grows in a float32 sum of ``n`` terms: ``sqrt(n)`` for random rounding, plus slack."""
  return 2.0 + np.sqrt(np.maximum(n, 1))


# ---- the float64 oracle ---------------------------------------------------------------------------


def _reduce_axes(ndim, axes):
  return tuple(a for a in range(ndim) if a not in axes)


def _bshape(shape, axes):
  return tuple(shape[a] if a in axes else 1 for a in range(len(shape)))


def ref_stats(x, axes, mask):
  """Two-pass float64 ``(count, mean, biased var, spread)`` per feature over the valid elements.

  ``spread`` is the largest ``|x - mean|`` over the valid elements (0 where there is none).
  """
  x = np.asarray(x, np.float64)
  m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), x.shape)
  red = _reduce_axes(x.ndim, axes)
  n = m.sum(axis=red).astype(np.float64)
  mean = np.where(m, x, 0).sum(axis=red) / np.maximum(n, 1)
  dev = np.where(m, x - mean.reshape(_bshape(x.shape, axes)), 0)
  var = (dev * dev).sum(axis=red) / np.maximum(n, 1)
  spread = np.abs(dev).max(axis=red, initial=0.0)
  return n, mean, var, spread


def ref_normalize(x, mean, var, scale, bias, axes, eps, n=None):
  """``(x - mean) / sqrt(var + eps) * scale + bias``; a feature with count ``n == 0`` has no statistics
  and normalizes to 0 (its output is the bias)."""
  b = _bshape(x.shape, axes)
  inv = 1.0 / np.sqrt(var + eps)
  if n is not None:
    inv = np.where(n > 0, inv, 0.0)
  y = (np.asarray(x, np.float64) - mean.reshape(b)) * inv.reshape(b)
  if scale is not None:
    y = y * scale.reshape(b)
  if bias is not None:
    y = y + bias.reshape(b)
  return y


def stats_tolerance(n, mean, var, spread, eps):
  """Errors of float32 statistics: ``(mean_tol, var_tol)`` per feature (see the module docstring)."""
  g = _growth(n)
  mean_tol = 2 * U32 * (np.abs(mean) + g * spread)
  var_tol = 4 * U32 * (g * (var + spread * spread) + eps)
  return mean_tol, var_tol


def output_tolerance(x, mean, var, mean_tol, var_tol, scale, bias, axes, eps, out_dtype, n=None):
  """Elementwise bound on ``|y - y_ref|`` from the statistics' errors and the arithmetic of normalize."""
  b = lambda v: np.asarray(v, np.float64).reshape(_bshape(x.shape, axes))
  x = np.asarray(x, np.float64)
  centered = np.abs(x - b(mean))
  inv = 1.0 / np.sqrt(b(var) + eps)
  if n is not None:
    inv = np.where(b(n) > 0, inv, 0.0)
  gain = inv * (1.0 if scale is None else np.abs(b(scale)))
  y_abs = np.abs(ref_normalize(x, mean, var, scale, bias, axes, eps, n))
  tol = gain * (b(mean_tol) + 2 * U32 * centered)  # the mean's error and x - mean in float32
  tol = tol + gain * centered * (0.5 * b(var_tol) * inv * inv + 4 * U32)  # var's error, rsqrt, products
  tol = tol + 2 * U32 * (y_abs + (0.0 if bias is None else np.abs(b(bias))))
  # One rounding to the output dtype (relative), and its spacing near 0 (subnormals of float16).
  return tol * (1 + _unit(out_dtype)) + _unit(out_dtype) * y_abs + float(jnp.finfo(out_dtype).smallest_subnormal)


def ref_running(mode, momentum, unbiased, mean0, var0, count0, batches, per_feature):
  """The running statistics after ``batches`` (``(n, mean, var, mean_tol, var_tol)`` per batch), from
  their definitions, with a bound on jaxbn's float32 error.

  Returns ``(mean, var, count, mean_tol, var_tol)``.
  """
  m = float(momentum)
  fshape = np.shape(mean0)
  count = np.broadcast_to(np.asarray(count0, np.float64), fshape).copy()
  state = {"mean": np.asarray(mean0, np.float64).copy(), "var": np.asarray(var0, np.float64).copy()}
  tol = {"mean": np.zeros(fshape), "var": np.zeros(fshape)}
  scalar_count = float(np.max(count0)) if not per_feature else None
  # Closed forms: the debiased EMA is hidden / (1 - m**t) with hidden an EMA started at 0 (a state of
  # count c stands for hidden = state * (1 - m**c)); the cumulative average is a sum / t (a state of
  # count c stands for c batches with its values).
  cumulative = mode == "cumulative" or (mode == "debiased_ema" and m == 1.0)
  acc = {}
  for k in state:
    if cumulative:
      acc[k] = state[k] * count
    elif mode == "debiased_ema":
      acc[k] = state[k] * (1 - m**count)
  for n, b_mean, b_var, b_mean_tol, b_var_tol in batches:
    valid = n > 0
    if per_feature:
      count = count + valid
      t = count
    else:
      scalar_count += float(np.any(valid))
      count = np.full(fshape, scalar_count)
      t = count
    new_values = {"mean": b_mean, "var": b_var}
    new_tols = {"mean": b_mean_tol, "var": b_var_tol}
    if unbiased:
      bessel = n / np.maximum(n - 1, 1)
      new_values["var"], new_tols["var"] = b_var * bessel, b_var_tol * bessel
    for k in state:
      old, new = state[k], new_values[k]
      if mode == "ema":
        w_old, w_new, w_err = np.full(fshape, m), np.full(fshape, 1 - m), 2 * U32
        value = m * old + (1 - m) * new
      elif cumulative:
        acc[k] = np.where(valid, acc[k] + new, acc[k])
        value = acc[k] / np.maximum(t, 1)
        w_new = 1 / np.maximum(t, 1)
        w_old, w_err = 1 - w_new, 2 * U32
      else:
        acc[k] = np.where(valid, m * acc[k] + (1 - m) * new, acc[k])
        debias = 1 - m ** np.maximum(t, 1)  # t = 0 only where the feature has seen nothing (not valid)
        value = acc[k] / debias
        w_new = (1 - m) / debias
        w_old, w_err = 1 - w_new, 4 * U32
      value = np.where(valid, value, old)
      # The new state's error: the old error and the batch's, weighted; the weights' and the blend's rounding.
      blended = w_old * tol[k] + w_new * new_tols[k] + w_err * (np.abs(old) + np.abs(new)) + 2 * U32 * np.abs(value)
      # A weight of 1 for the batch copies its statistics exactly: the first update of "cumulative" and
      # "debiased_ema", and "ema" with momentum 0.
      exact_copy = (m == 0.0) if mode == "ema" else (t <= 1)
      tol[k] = np.where(valid, np.where(exact_copy, new_tols[k], blended), tol[k])
      state[k] = value
  final_count = count if per_feature else np.asarray(scalar_count)
  return state["mean"], state["var"], final_count, tol["mean"], tol["var"]


def _as_float64(a):
  return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


def assert_within(name, got, want, tol):
  """``|got - want| <= tol`` elementwise; where ``want`` rounds to +-inf in ``got``'s dtype (float16 ends at
  65504), ``got`` must be that infinity."""
  with np.errstate(over="ignore"):
    overflow = np.isinf(np.asarray(want, np.float64).astype(jnp.asarray(got).dtype).astype(np.float64))
  got = _as_float64(got)
  err = np.abs(got - want)
  bad = ~((err <= tol) | (overflow & (got == np.copysign(np.inf, want))))
  if np.any(bad):
    i = np.argwhere(bad)[0]
    raise AssertionError(
      f"{name}: {int(bad.sum())} of {bad.size} entries outside the derived tolerance; first at {tuple(i)}: "
      f"got {got[tuple(i)]!r}, want {want[tuple(i)]!r}, |error| {err[tuple(i)]:.3g} > tol {tol[tuple(i)]:.3g}"
    )


# ---- strategies -----------------------------------------------------------------------------------


def make_mask(kind, rng, shape, axes):
  """A boolean mask of ``kind``; masks that depend only on the reduced axes have size-1 feature axes."""
  ndim = len(shape)
  rshape = tuple(1 if a in axes else shape[a] for a in range(ndim))
  if kind == "none":
    return None
  if kind == "ones":
    return np.ones(rshape, bool)
  if kind == "empty":
    return np.zeros(rshape, bool)
  if kind == "rows":
    return rng.random(rshape) < rng.choice([0.2, 0.5, 0.9])
  if kind == "single":  # one valid element per feature, at the same reduced position for all
    mask = np.zeros(rshape, bool)
    mask.flat[rng.integers(mask.size)] = True
    return mask
  mask = rng.random(shape) < rng.choice([0.2, 0.5, 0.9])
  if kind == "feature_empty":  # one feature has no valid element in this batch
    index = tuple(int(rng.integers(shape[a])) if a in axes else slice(None) for a in range(ndim))
    mask[index] = False
  return mask


@st.composite
def _feature_axes(draw, shape):
  """Feature axes as jaxbn accepts them: NHWC (-1), NCHW (1), an int, a tuple (unsorted, negative), all axes."""
  ndim = len(shape)
  layout = draw(st.sampled_from(["nhwc", "nchw", "int", "tuple", "all"]))
  if layout == "nhwc" or ndim == 1:
    return -1
  if layout == "nchw":
    return 1
  if layout == "int":
    return draw(st.integers(-ndim, ndim - 1))
  if layout == "all":
    return tuple(range(ndim))
  picked = draw(st.permutations(range(ndim)))[: draw(st.integers(1, ndim))]
  return tuple(a - ndim if draw(st.booleans()) else a for a in picked)


def _normalized(axis, ndim):
  return tuple(sorted(a % ndim for a in ((axis,) if isinstance(axis, int) else axis)))


@st.composite
def _data_and_convention(draw, shape, axes):
  dtype = draw(st.sampled_from(sorted(DTYPES)))
  offset = draw(st.sampled_from([0.0, 1.0, -30.0, 1e3, -1e4, 1e5]))
  if dtype == "float16":  # float16 ends at 65504
    offset = float(np.clip(offset, -3e4, 3e4))
  std = 10.0 ** draw(st.integers(-3, 2))
  steps = draw(st.integers(1, 3))
  masks = draw(st.lists(st.sampled_from(MASKS), min_size=steps, max_size=steps))
  mode = draw(st.sampled_from(MODES))
  per_feature = draw(st.booleans())
  if mode != "ema" and any(k in FEATURE_DEPENDENT_MASKS for k in masks):
    per_feature = True
  return {
    "dtype": dtype,
    "offset": offset,
    "std": std,
    "masks": masks,
    "mode": mode,
    "momentum": draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0]) | st.floats(0.0, 1.0)),
    "unbiased": draw(st.booleans()),
    "per_feature": per_feature,
    "fresh_state": draw(st.booleans()),
    "affine": draw(st.booleans()),
    "epsilon": draw(st.sampled_from([1e-5, 1e-3, 0.1])),
    "fused": draw(st.sampled_from([None, False])),
    "seed": draw(st.integers(0, 2**32 - 1)),
  }


@st.composite
def core_cases(draw):
  ndim = draw(st.integers(1, 4))
  shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
  axis = draw(_feature_axes(shape))
  return shape, axis, draw(_data_and_convention(shape, _normalized(axis, ndim)))


@st.composite
def sharded_cases(draw):
  """Batches whose leading axis splits over 8 devices (a reduced axis, or the feature axis under jit)."""
  style = draw(st.sampled_from(["jit-auto", "jit-explicit", "shard_map"]))
  ndim = draw(st.integers(2, 4))
  shape = (8 * draw(st.integers(1, 3)), *draw(st.lists(st.integers(1, 4), min_size=ndim - 1, max_size=ndim - 1)))
  axis = draw(_feature_axes(shape))
  if style == "shard_map" or draw(st.booleans()):  # shard_map's axis_name merges over the leading axis
    axes = [a for a in _normalized(axis, ndim) if a != 0] or [ndim - 1]
    axis = tuple(axes) if len(axes) > 1 else axes[0]
  case = draw(_data_and_convention(shape, _normalized(axis, ndim)))
  case["masks"] = case["masks"][:2]
  return style, shape, axis, case


# ---- the properties -------------------------------------------------------------------------------


def _inputs(shape, axes, case):
  """Batches (rounded to the input dtype), masks, the initial state, scale and bias."""
  rng = np.random.default_rng(case["seed"])
  dtype = DTYPES[case["dtype"]]
  fshape = tuple(shape[a] for a in axes)
  xs = [jnp.asarray(case["offset"] + case["std"] * rng.normal(size=shape), dtype) for _ in case["masks"]]
  masks = [make_mask(kind, rng, shape, axes) for kind in case["masks"]]
  count_shape = fshape if case["per_feature"] else ()
  if case["fresh_state"]:
    state = jaxbn.init_state(fshape, per_feature_count=case["per_feature"])
  else:
    state = jaxbn.BatchNormState(
      jnp.asarray(case["offset"] + rng.normal(size=fshape) * case["std"], jnp.float32),
      jnp.asarray(rng.uniform(0.5, 2.0, fshape) * case["std"] ** 2, jnp.float32),
      jnp.asarray(rng.integers(0, 4, count_shape), jnp.int32),
    )
  scale = bias = None
  if case["affine"]:
    scale = jnp.asarray(rng.normal(1.0, 0.5, fshape), jnp.float32)
    bias = jnp.asarray(rng.normal(0.0, 2.0, fshape), jnp.float32)
  return xs, masks, state, scale, bias


def _run(xs, masks, state, scale, bias, *, axis, case, axis_name=None):
  """Every batch through batch_norm in training mode, then moments and evaluation mode on the last."""
  bn = partial(
    jaxbn.batch_norm,
    axis=axis,
    momentum=case["momentum"],
    epsilon=case["epsilon"],
    running_average=case["mode"],
    unbiased_running_var=case["unbiased"],
    fused=case["fused"],
    axis_name=axis_name,
  )
  ys, moments = [], []
  for x, mask in zip(xs, masks):
    y, state = bn(x, state, scale, bias, training=True, mask=mask)
    ys.append(y)
    moments.append(jaxbn.moments(x, axis, mask=mask, axis_name=axis_name))
  y_eval, _ = bn(xs[-1], state, scale, bias, training=False)
  return ys, moments, state, y_eval


def _check_against_oracle(shape, axes, case, xs, masks, state0, scale, bias, out):
  """Asserts ``out`` (from :func:`_run`) against the oracle; returns ``{name: (got, tolerance)}``."""
  ys, moments, state, y_eval = out
  eps = case["epsilon"]
  s64 = None if scale is None else np.asarray(scale, np.float64)
  b64 = None if bias is None else np.asarray(bias, np.float64)
  checked = {}

  def within(name, got, want, tol):
    assert_within(name, got, want, tol)
    checked[name] = (got, tol)

  batches = []
  for i, (x, mask, y, (mean, var, count)) in enumerate(zip(xs, masks, ys, moments)):
    x64 = _as_float64(x)  # the values jaxbn sees, exactly
    n, r_mean, r_var, spread = ref_stats(x64, axes, mask)
    mean_tol, var_tol = stats_tolerance(n, r_mean, r_var, spread, 0.0)
    np.testing.assert_array_equal(count, n, err_msg=f"moments count, batch {i}")
    within(f"moments mean, batch {i}", mean, r_mean, mean_tol)
    within(f"moments var, batch {i}", var, r_var, var_tol)
    assert y.dtype == x.dtype
    y_tol = output_tolerance(x64, r_mean, r_var, mean_tol, var_tol + 4 * U32 * eps, s64, b64, axes, eps, x.dtype, n)
    within(f"output, batch {i}", y, ref_normalize(x64, r_mean, r_var, s64, b64, axes, eps, n), y_tol)
    batches.append((n, r_mean, r_var, mean_tol, var_tol))
  r_mean, r_var, r_count, mean_tol, var_tol = ref_running(
    case["mode"],
    case["momentum"],
    case["unbiased"],
    _as_float64(state0.mean),
    _as_float64(state0.var),
    np.asarray(state0.count),
    batches,
    case["per_feature"],
  )
  assert state.mean.dtype == state.var.dtype == jnp.float32 and state.count.dtype == jnp.int32
  np.testing.assert_array_equal(state.count, r_count, err_msg="running count")
  within("running mean", state.mean, r_mean, mean_tol)
  within("running var", state.var, r_var, var_tol)
  # Evaluation normalizes with the state it is given: the oracle on jaxbn's own state, whose values
  # enter exactly; only the arithmetic of normalize and the rounding to the output dtype remain.
  x64 = _as_float64(xs[-1])
  s_mean, s_var = _as_float64(state.mean), _as_float64(state.var)
  want = ref_normalize(x64, s_mean, s_var, s64, b64, axes, eps)
  zero = np.zeros(s_mean.shape)
  tol = output_tolerance(x64, s_mean, s_var, zero, 4 * U32 * eps + zero, s64, b64, axes, eps, xs[-1].dtype)
  within("evaluation output", y_eval, want, tol)
  return checked


# A float32 momentum near 1 is not 1 - (1 - m): debiasing weights built from 1 - m**t of the rounded m sum to
# 1 + 6e-6 at m = 0.999, t = 2, which moves a running mean of 1e3 by 6e-3 (the float32 bound is 5e-4).
_DEBIASED_NEAR_ONE = (
  (16, 3),
  -1,
  {
    "dtype": "float32",
    "offset": 1e3,
    "std": 1.0,
    "masks": ["none"] * 3,
    "mode": "debiased_ema",
    "momentum": 0.999,
    "unbiased": False,
    "per_feature": False,
    "fresh_state": True,
    "affine": False,
    "epsilon": 1e-5,
    "fused": None,
    "seed": 0,
  },
)


@given(core_cases())
@example(_DEBIASED_NEAR_ONE)
def test_property_batch_norm_sequence_matches_float64_oracle(case):
  shape, axis, case = case
  axes = _normalized(axis, len(shape))
  xs, masks, state0, scale, bias = _inputs(shape, axes, case)
  out = jax.jit(partial(_run, axis=axis, case=case))(xs, masks, state0, scale, bias)
  _check_against_oracle(shape, axes, case, xs, masks, state0, scale, bias, out)


def _on_eight_devices(style, shape, axis, case, xs, masks, state0, scale, bias):
  """:func:`_run` with the batches' leading axis split over 8 devices."""
  kind = AxisType.Auto if style == "jit-auto" else AxisType.Explicit
  mesh = jax.make_mesh((8,), ("d",), axis_types=(kind,))
  split = lambda a: a is not None and a.shape[0] == shape[0]  # masks broadcast along axis 0 stay whole
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("d"))) if split(a) else a
  xs, masks = [put(x) for x in xs], [put(m) for m in masks]
  if style == "shard_map":  # each device its rows, statistics merged over axis_name
    spec = lambda a: P("d") if split(a) else P()
    in_specs = ([P("d")] * len(xs), [spec(m) for m in masks], P(), P(), P())
    out_specs = ([P("d")] * len(xs), [(P(), P(), P())] * len(xs), P(), P("d"))
    body = partial(_run, axis=axis, case=case, axis_name="d")
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs))(
      xs, masks, state0, scale, bias
    )
  with jax.set_mesh(mesh):
    return jax.jit(partial(_run, axis=axis, case=case))(xs, masks, state0, scale, bias)


# Each example compiles for one and for 8 devices (about 2 s): a third of the profile's examples.
@settings(max_examples=max(3, settings.default.max_examples // 3))
@given(sharded_cases())
def test_property_eight_devices_match_one_device(case):
  style, shape, axis, case = case
  axes = _normalized(axis, len(shape))
  xs, masks, state0, scale, bias = _inputs(shape, axes, case)
  one = jax.jit(partial(_run, axis=axis, case=case))(xs, masks, state0, scale, bias)
  eight = _on_eight_devices(style, shape, axis, case, xs, masks, state0, scale, bias)
  for got, want in zip(jax.tree.leaves(eight), jax.tree.leaves(one)):
    assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_array_equal(eight[2].count, one[2].count)
  for (_, _, count8), (_, _, count1) in zip(eight[1], one[1]):
    np.testing.assert_array_equal(count8, count1)
  # Each within the oracle's derived bounds, so within twice those of each other.
  _check_against_oracle(shape, axes, case, xs, masks, state0, scale, bias, one)
  _check_against_oracle(shape, axes, case, xs, masks, state0, scale, bias, eight)
