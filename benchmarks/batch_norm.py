"""Batch norm speed and memory: jaxbn against flax.linen, flax.nnx, haiku and equinox.

Every library's layer gets the same inputs, epsilon (1e-5), momentum (0.99), scale, bias and running
statistics, normalizes over every axis but the last (NHWC) and returns its output in the input dtype;
outputs and gradients are checked against ``flax.linen.BatchNorm(use_fast_variance=False)`` before
anything is timed. Cases, for float32 and bfloat16:

* ``train``: jit-compiled training forward and backward of the isolated layer, gradients with respect
  to input, scale and bias plus the new running statistics, for the loss ``sum(relu(y)**2)`` (its
  gradient needs the forward output, so the forward cannot be skipped);
* ``train_forward``: the training forward alone (output and new running statistics);
* ``inference``: the inference forward;
* ``resnet``: one SGD step of a small ResNet with a batch norm after every convolution
  (``benchmarks/_models.py``), built once per library.

Within each repeat the libraries run back to back, in an order that rotates between repeats, and
every number reported is the median over repeats of the time divided by flax.linen's time in the
same repeat. Compiled temporary memory is ``jit(f).lower(...).compile().memory_analysis()
.temp_size_in_bytes``. Results go to ``benchmarks/results/batch_norm_<mode>.{json,md}``.

``--gpu`` runs large bfloat16 shapes and reports the achieved bandwidth of each library's isolated
training forward and backward (the vector-Jacobian product for a given output cotangent) as a
fraction of the device-to-device copy bandwidth measured in the same run.

Usage::

  python benchmarks/batch_norm.py           # full CPU run (under ~10 minutes on 2 cores)
  python benchmarks/batch_norm.py --quick   # smoke run, well under a minute
  python benchmarks/batch_norm.py --gpu     # one accelerator, under 5 minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import math
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_HERE = pathlib.Path(__file__).resolve().parent
for _path in (_HERE, _HERE.parent):  # _models, and jaxbn when it is not installed (e.g. on a lent GPU machine)
  if str(_path) not in sys.path:
    sys.path.insert(0, str(_path))

import _machine  # noqa: E402
import _models  # noqa: E402

import jaxbn  # noqa: E402

MOMENTUM = 0.99
EPSILON = 1e-5
BASELINE = "flax.linen"
REFERENCE = "flax.linen exact-var"  # the oracle for the agreement check
CASES = ("train", "train_forward", "inference")

CPU_SHAPES = ((256, 32, 32, 64), (128, 16, 16, 256), (64, 28, 28, 128), (4096, 512))
QUICK_SHAPES = ((32, 8, 8, 32),)
GPU_SHAPES = ((256, 56, 56, 256), (256, 14, 14, 1024), (16384, 4096))

# Agreement with the reference: max |a - ref| / max |ref| per output leaf. In float32 every library
# must agree (a larger difference is a set-up mismatch: the run stops); in bfloat16 the libraries'
# own arithmetic differs (haiku's statistics in bfloat16, dm-haiku#396; equinox and flax.nnx
# normalize in bfloat16), so differences above these levels are only reported.
TOLERANCE = {"float32": 2e-4, "bfloat16": 0.1}
RESNET_TOLERANCE = {"float32": 5e-3, "bfloat16": 0.25}


Norm = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


# ------------------------------------------------------------------------------------------------
# Each library's batch norm behind one signature: norm(x, scale, bias, mean, var, *, training)
# -> (y, new_mean, new_var), NHWC, float32 per-channel parameters and statistics, y in x.dtype.
# ------------------------------------------------------------------------------------------------


def _flax_linen(use_fast_variance: bool) -> Norm:
  import flax.linen as nn

  def norm(x, scale, bias, mean, var, *, training):
    # dtype=x.dtype: without it flax promotes a bfloat16 input to float32 output (float32 params).
    layer = nn.BatchNorm(
      use_running_average=not training,
      momentum=MOMENTUM,
      epsilon=EPSILON,
      dtype=x.dtype,
      use_fast_variance=use_fast_variance,
    )
    variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": {"mean": mean, "var": var}}
    if not training:
      return layer.apply(variables, x), mean, var
    y, updates = layer.apply(variables, x, mutable=["batch_stats"])
    return y, updates["batch_stats"]["mean"], updates["batch_stats"]["var"]

  return norm


_NNX_NAMES = ("scale", "bias", "mean", "var")


def _flax_nnx() -> Norm:
  from flax import nnx

  @functools.cache
  def template(channels, dtype):
    with jax.ensure_compile_time_eval():
      layer = nnx.BatchNorm(channels, momentum=MOMENTUM, epsilon=EPSILON, dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    paths, treedef = jax.tree_util.tree_flatten_with_path(state)
    names = [
      next(str(getattr(k, "key", k)) for k in path if str(getattr(k, "key", "")) in _NNX_NAMES) for path, _ in paths
    ]
    return graphdef, treedef, names

  def norm(x, scale, bias, mean, var, *, training):
    graphdef, treedef, names = template(x.shape[-1], x.dtype)
    # A fresh state every trace: nnx.merge reuses the Variables it is given.
    values = {"scale": scale, "bias": bias, "mean": mean, "var": var}
    layer = nnx.merge(graphdef, jax.tree.unflatten(treedef, [values[n] for n in names]))
    y = layer(x, use_running_average=not training)
    return y, layer.mean[...], layer.var[...]

  return norm


def _haiku() -> Norm:
  import haiku as hk

  model = hk.transform_with_state(
    lambda x, training: hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=MOMENTUM, eps=EPSILON)(
      x, training
    )
  )

  def norm(x, scale, bias, mean, var, *, training):
    shape = (1,) * (x.ndim - 1) + (x.shape[-1],)
    # haiku keeps parameters and moving averages in the input dtype.
    params = {
      "batch_norm": {"scale": scale.astype(x.dtype).reshape(shape), "offset": bias.astype(x.dtype).reshape(shape)}
    }

    def ema(v):
      v = v.astype(x.dtype).reshape(shape)
      return {"counter": jnp.zeros((), jnp.int32), "hidden": jnp.zeros_like(v), "average": v}

    state = {"batch_norm/~/mean_ema": ema(mean), "batch_norm/~/var_ema": ema(var)}
    y, state = model.apply(params, state, None, x, training)
    # Haiku's running averages are zero-debiased: after this first update they hold the batch
    # statistics, unlike flax's EMA; they are timed but not compared.
    new_mean = state["batch_norm/~/mean_ema"]["average"].reshape(-1).astype(mean.dtype)
    new_var = state["batch_norm/~/var_ema"]["average"].reshape(-1).astype(var.dtype)
    return y, new_mean, new_var

  return norm


def _equinox() -> Norm:
  import equinox as eqx

  @functools.cache
  def template(channels):
    with jax.ensure_compile_time_eval():
      layer = eqx.nn.BatchNorm(channels, axis_name="batch", eps=EPSILON, momentum=MOMENTUM, mode="batch")
      state = eqx.nn.State(layer)
    return layer, state

  def norm(x, scale, bias, mean, var, *, training):
    layer, state = template(x.shape[-1])
    state = jax.tree.unflatten(*reversed(jax.tree.flatten(state)))  # a fresh copy: equinox States are single-use
    layer = eqx.tree_at(lambda m: (m.weight, m.bias), layer, (scale, bias))
    # counter 0: equinox's inference statistics are hidden / (1 - momentum**counter) = hidden.
    state = state.set(layer.batch_state_index, (mean, var))
    # equinox normalizes one example of shape (channels, ...) under a named vmap; every NHWC
    # position is one example here, which needs no transpose.
    rows = x.reshape(-1, x.shape[-1])
    call = functools.partial(layer, inference=not training)
    y, state = jax.vmap(call, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(rows, state)
    new_mean, new_var = state.get(layer.batch_state_index)
    # float32 weights promote a bfloat16 input; return the input dtype like the others.
    return y.reshape(x.shape).astype(x.dtype), new_mean, new_var

  return norm


def _jaxbn(fused: bool | None) -> Norm:
  def norm(x, scale, bias, mean, var, *, training):
    state = jaxbn.BatchNormState(mean, var, jnp.zeros((), jnp.int32))
    y, new = jaxbn.batch_norm(x, state, scale, bias, training=training, momentum=MOMENTUM, epsilon=EPSILON, fused=fused)
    return y, new.mean, new.var

  return norm


LIBRARIES: dict[str, tuple[Callable[[], Norm], str | None]] = {
  # name: (factory, module the factory needs)
  "flax.linen": (functools.partial(_flax_linen, True), "flax.linen"),
  "flax.linen exact-var": (functools.partial(_flax_linen, False), "flax.linen"),
  "flax.nnx": (_flax_nnx, "flax.nnx"),
  "haiku": (_haiku, "haiku"),
  "equinox": (_equinox, "equinox"),
  "jaxbn": (functools.partial(_jaxbn, None), None),
  "jaxbn autodiff": (functools.partial(_jaxbn, False), None),
}
LIBRARY_NOTES = {
  "flax.linen": "flax.linen.BatchNorm defaults (use_fast_variance=True: E[x^2]-E[x]^2), dtype=input dtype",
  "flax.linen exact-var": "flax.linen.BatchNorm(use_fast_variance=False): two-pass variance",
  "flax.nnx": "flax.nnx.BatchNorm defaults (use_fast_variance=True)",
  "haiku": "haiku.BatchNorm: one-pass variance in the input dtype, zero-debiased moving averages",
  "equinox": "equinox.nn.BatchNorm(mode='batch') under jax.vmap(axis_name=...) over NHWC positions",
  "jaxbn": "jaxbn.batch_norm: accurate shifted one-pass variance, closed-form backward (default)",
  "jaxbn autodiff": "jaxbn.batch_norm(fused=False): autodiff of the same forward (for reference)",
}


def available_libraries(names: Sequence[str] | None = None) -> dict[str, Norm]:
  """The requested (default: all) libraries that import here; missing ones are reported and skipped."""
  out = {}
  for name in names or LIBRARIES:
    factory, module = LIBRARIES[name]
    if module is not None:
      try:
        importlib.import_module(module)
      except ImportError as err:
        peer = {"haiku": "dm-haiku", "equinox": "equinox"}.get(module)
        why = f"the {peer} peer is not installed (pip install -e '.[peers]')" if peer else "it does not import"
        print(f"skipping {name}: {why}: {err}", file=sys.stderr)
        continue
    out[name] = factory()
  if BASELINE not in out:
    raise RuntimeError(f"the baseline {BASELINE} is needed for the ratios")
  return out


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------


def _loss(y: jax.Array) -> jax.Array:
  return jnp.sum(jnp.square(jax.nn.relu(y.astype(jnp.float32))))


def case_function(norm: Norm, case: str) -> Callable[..., Any]:
  """The function timed for ``case``, of ``(x, scale, bias, mean, var)`` (``(x, dy, ...)`` for "vjp")."""
  if case == "train":

    def loss(x, scale, bias, mean, var):
      y, new_mean, new_var = norm(x, scale, bias, mean, var, training=True)
      return _loss(y), (new_mean, new_var)

    return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
  if case == "train_forward":
    return lambda x, scale, bias, mean, var: norm(x, scale, bias, mean, var, training=True)
  if case == "inference":
    return lambda x, scale, bias, mean, var: norm(x, scale, bias, mean, var, training=False)[0]
  if case == "vjp":

    def vjp(x, dy, scale, bias, mean, var):
      (y, _, _), pullback = jax.vjp(lambda x, s, b: norm(x, s, b, mean, var, training=True), x, scale, bias)
      zeros = jnp.zeros_like(mean)
      return y, pullback((dy, zeros, zeros))

    return vjp
  raise ValueError(f"unknown case {case!r}")


@functools.cache
def make_inputs(shape: tuple[int, ...], dtype: Any, seed: int = 0) -> tuple[jax.Array, ...]:
  """``(x, scale, bias, running mean, running var)``: per-channel means in [-1, 2], stds in [0.5, 3]."""
  c = shape[-1]
  rng = np.random.default_rng(seed)
  mu = rng.uniform(-1.0, 2.0, c).astype(np.float32)
  sd = rng.uniform(0.5, 3.0, c).astype(np.float32)
  x = rng.standard_normal(tuple(shape), np.float32) * sd + mu
  scale = 1.0 + 0.1 * rng.standard_normal(c, np.float32)
  bias = 0.1 * rng.standard_normal(c, np.float32)
  mean = mu + 0.1 * rng.standard_normal(c, np.float32)
  f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
  return jnp.asarray(x, dtype), f32(scale), f32(bias), f32(mean), f32(sd * sd)


@jax.jit
def _max_abs(a: jax.Array, ref: jax.Array) -> tuple[jax.Array, jax.Array]:
  a, ref = a.astype(jnp.float32), ref.astype(jnp.float32)
  return jnp.max(jnp.abs(a - ref)), jnp.max(jnp.abs(ref))


def _rel_err(a: Any, ref: Any, skip_stats: bool) -> float:
  """Largest max|a - ref| / max|ref| over the leaves (the running statistics left out if asked)."""
  if skip_stats:
    a, ref = _drop_stats(a), _drop_stats(ref)
  errs = []
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(ref)):
    diff, size = (float(t) for t in _max_abs(jnp.asarray(u), jnp.asarray(v)))
    errs.append(diff / max(size, 1e-30))
  return max(errs)


def _drop_stats(out: Any) -> Any:
  # train: (grads, (mean, var)); train_forward: (y, mean, var); vjp: (y, grads)
  if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], tuple) and len(out[1]) == 2:
    return out[0]
  if isinstance(out, tuple) and len(out) == 3:
    return out[0]
  return out


@dataclasses.dataclass
class Group:
  """One case: the same arguments timed for every library."""

  kind: str
  shape: tuple[int, ...]
  dtype: str
  compiled: dict[str, Any]
  args: dict[str, tuple[Any, ...]]
  temp_bytes: dict[str, int]
  bytes_accessed: dict[str, float]
  rel_err: dict[str, float]
  number: int = 1
  times: dict[str, list[float]] = dataclasses.field(default_factory=dict)

  @property
  def key(self) -> str:
    return f"{self.kind} {self.dtype} {'x'.join(map(str, self.shape))}"


def _compile(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[Any, int, float]:
  """The executable, its temporary memory and XLA's cost-model estimate of the bytes it accesses."""
  compiled = jax.jit(fn).lower(*args).compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, list) and cost else cost) or {}
  temp = int(memory.temp_size_in_bytes) if memory is not None else -1
  return compiled, temp, float(cost.get("bytes accessed", -1.0))


def build_layer_group(libs: dict[str, Norm], case: str, shape: Sequence[int], dtype: str) -> Group:
  """Compiles ``case`` for every library, measures temporary memory and checks the outputs agree."""
  x, scale, bias, mean, var = make_inputs(tuple(shape), jnp.dtype(dtype))
  args: tuple[Any, ...] = (x, scale, bias, mean, var)
  if case == "vjp":
    dy = jnp.asarray(np.random.default_rng(7).standard_normal(x.shape, np.float32), x.dtype)
    args = (x, dy, scale, bias, mean, var)
  compiled, temp, traffic, outs = {}, {}, {}, {}
  for name, norm in libs.items():
    compiled[name], temp[name], traffic[name] = _compile(case_function(norm, case), args)
    outs[name] = jax.block_until_ready(compiled[name](*args))
  ref = outs.get(REFERENCE, outs[BASELINE])
  errs = {name: _rel_err(out, ref, skip_stats=name == "haiku") for name, out in outs.items()}
  _check(errs, TOLERANCE[dtype], f"{case} {dtype} {tuple(shape)}", dtype)
  del outs
  return Group(case, tuple(shape), dtype, compiled, {n: args for n in libs}, temp, traffic, errs)


def build_resnet_group(libs: dict[str, Norm], dtype: str, batch: int, width: int, stages: int) -> Group:
  """One SGD step of the small ResNet on 32x32x3 images, built once with each library's batch norm."""
  params, stats = _models.init_resnet(1, width=width, stages=stages)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((batch, 32, 32, 3), np.float32), dtype)
  labels = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
  args = (params, stats, x, labels)
  compiled, temp, traffic, outs = {}, {}, {}, {}
  for name, norm in libs.items():
    compiled[name], temp[name], traffic[name] = _compile(_models.make_train_step(norm), args)
    new_params, new_stats, loss = jax.block_until_ready(compiled[name](*args))
    step = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), new_params, params)
    step = jax.tree.map(functools.partial(jnp.asarray, dtype=jnp.float32), step)
    outs[name] = (loss, step) if name == "haiku" else (loss, step, new_stats)
  ref = outs.get(REFERENCE, outs[BASELINE])
  errs = {name: _rel_err(out[:2], ref[:2], False) for name, out in outs.items()}
  _check(errs, RESNET_TOLERANCE[dtype], f"resnet {dtype}", dtype)
  del outs
  return Group("resnet", (batch, 32, 32, 3), dtype, compiled, {n: args for n in libs}, temp, traffic, errs)


def _check(errs: dict[str, float], tol: float, what: str, dtype: str) -> None:
  bad = {k: round(v, 4) for k, v in errs.items() if not v <= tol}
  if bad and dtype == "float32":
    raise AssertionError(f"{what}: outputs differ from {REFERENCE} by more than {tol}: {bad}")
  if bad:
    print(f"note: {what}: outputs differ from {REFERENCE} by more than {tol}: {bad}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def _time(compiled: Any, args: Sequence[Any], number: int) -> float:
  start = time.perf_counter()
  for _ in range(number):
    out = compiled(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / number


def run_groups(groups: Sequence[Group], repeats: int, min_time: float) -> None:
  """Times every group: per repeat, all libraries back to back in a rotating order."""
  for g in groups:
    t = min(_time(g.compiled[BASELINE], g.args[BASELINE], 1) for _ in range(2))
    g.number = max(1, math.ceil(min_time / max(t, 1e-6)))
    g.times = {name: [] for name in g.compiled}
  for r in range(repeats):
    for g in groups:
      names = list(g.compiled)
      names = names[r % len(names) :] + names[: r % len(names)]
      for name in names:
        g.times[name].append(_time(g.compiled[name], g.args[name], g.number))
    print(f"  repeat {r + 1}/{repeats} done", file=sys.stderr, flush=True)


# Temporary memory differing by less than this is a few per-channel vectors, not an activation
# (e.g. 768 against 512 bytes): reported as a ratio of 1.
SMALL_TEMP_BYTES = 1 << 20


def _temp_ratio(tb: int, bb: int) -> float:
  if abs(tb - bb) < SMALL_TEMP_BYTES:
    return 1.0
  return tb / bb if bb > 0 else math.inf


def summarize(g: Group) -> dict[str, Any]:
  base = np.asarray(g.times[BASELINE])
  out = {}
  for name, ts in g.times.items():
    ratios = np.asarray(ts) / base
    out[name] = {
      "time_s": float(np.median(ts)),
      "time_ratio": float(np.median(ratios)),
      "time_ratio_q25": float(np.percentile(ratios, 25)),
      "time_ratio_q75": float(np.percentile(ratios, 75)),
      "temp_bytes": g.temp_bytes[name],
      "temp_ratio": _temp_ratio(g.temp_bytes[name], g.temp_bytes[BASELINE]),
      "bytes_accessed": g.bytes_accessed[name],
      "bytes_accessed_ratio": g.bytes_accessed[name] / g.bytes_accessed[BASELINE]
      if g.bytes_accessed[BASELINE] > 0
      else math.nan,
      "max_rel_err": g.rel_err[name],
    }
  return out


# ------------------------------------------------------------------------------------------------
# GPU bandwidth
# ------------------------------------------------------------------------------------------------


def copy_bandwidth(nbytes: int, repeats: int) -> float:
  """Device-to-device copy bandwidth in bytes/s (read + write counted) of a ``nbytes`` float32 array."""
  a = jnp.ones((nbytes // 4,), jnp.float32)
  compiled = jax.jit(jnp.copy).lower(a).compile()
  jax.block_until_ready(compiled(a))
  t = np.median([_time(compiled, (a,), 5) for _ in range(repeats)])
  return 2 * a.size * 4 / float(t)


def bandwidth_rows(g: Group, copy_bw: float) -> dict[str, Any]:
  """Achieved bandwidth of each library's VJP group against the copy bandwidth."""
  tensor = math.prod(g.shape) * jnp.dtype(g.dtype).itemsize
  rows = {}
  for name, ts in g.times.items():
    t = float(np.median(ts))
    # Compulsory traffic: read x and dy, write y and dx. The 8-pass model (forward: read for the
    # statistics, read + write to normalize; backward: read x, dy for the sums, read x, dy + write
    # dx) is what non-persistent kernels such as cuDNN's or apex's move.
    rows[name] = {
      "time_s": t,
      "compulsory_bw_fraction": 4 * tensor / t / copy_bw,
      "eight_pass_bw_fraction": 8 * tensor / t / copy_bw,
    }
  return rows


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
  return _machine.machine_info(("jax", "jaxlib", "flax", "haiku", "equinox", "jaxbn"))


def evaluate_targets(cases: list[dict[str, Any]], lib: str = "jaxbn") -> dict[str, Any]:
  """The issue's targets for ``lib``, each with the measured value and whether it holds."""

  def ratios(kind, dtype=None, key="time_ratio"):
    return [c["results"][lib][key] for c in cases if c["kind"] == kind and (dtype is None or c["dtype"] == dtype)]

  out = {}
  train32 = ratios("train", "float32")
  if train32:
    med = float(np.median(train32))
    out["train_f32_median_ratio<=0.75"] = {"value": med, "ok": med <= 0.75}
  train = ratios("train")
  if train:
    out["train_max_ratio<=1"] = {"value": max(train), "ok": max(train) <= 1.0}
  resnet = ratios("resnet")
  if resnet:
    out["resnet_max_ratio<=0.95"] = {"value": max(resnet), "ok": max(resnet) <= 0.95}
  temps = [c["results"][lib]["temp_ratio"] for c in cases]
  out["temp_max_ratio<=1"] = {"value": max(temps), "ok": max(temps) <= 1.0}
  inference = ratios("inference")
  if inference:
    out["inference_max_ratio<=1"] = {"value": max(inference), "ok": max(inference) <= 1.0}
  return out


def _fmt_shape(shape: Sequence[int]) -> str:
  return "(" + ",".join(map(str, shape)) + ")"


def markdown(result: dict[str, Any]) -> str:
  libs = result["libraries"]
  m = result["machine"]
  lines = [
    f"Machine: {m['device']} ({m['backend']}; {m['cpu']}, {m['cpu_count']} cores), jax {m['versions']['jax']}, "
    f"flax {m['versions']['flax']}, haiku {m['versions']['haiku']}, equinox {m['versions']['equinox']}; "
    f"{result['config']['repeats']} interleaved repeats, medians of per-repeat ratios to {BASELINE}; {m['date']}.",
    "",
  ]
  for metric, absolute_key, title, unit, scale in (
    ("time_ratio", "time_s", "Time (median of per-repeat ratios)", "ms", 1e3),
    (
      "temp_ratio",
      "temp_bytes",
      "Compiled temporary memory (differences under 1 MiB count as equal)",
      "MiB",
      1 / 2**20,
    ),
    ("bytes_accessed_ratio", "bytes_accessed", "Bytes accessed, XLA cost model (deterministic)", "MB", 1e-6),
  ):
    lines += [
      f"**{title}, ratio to {BASELINE}** (lower is better; the {BASELINE} column is absolute, {unit})",
      "",
    ]
    head = ["case", "dtype", "shape", f"{BASELINE} ({unit})", *[n for n in libs if n != BASELINE]]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for c in result["cases"]:
      r = c["results"]
      absolute = r[BASELINE][absolute_key] * scale
      cells = [c["kind"], c["dtype"], _fmt_shape(c["shape"]), f"{absolute:.1f}"]
      cells += [f"{r[n][metric]:.2f}" for n in libs if n != BASELINE]
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
  if result.get("bandwidth"):
    bw = result["bandwidth"]
    lines += [
      f"**Training forward+backward (VJP for a given dy) bandwidth as a fraction of the measured copy "
      f"bandwidth ({bw['copy_bytes_per_s'] / 1e9:.0f} GB/s)**: compulsory traffic (read x, dy; write y, dx) "
      "/ 8-pass model",
      "",
      "| dtype | shape | " + " | ".join(libs) + " |",
      "|---|---|" + "|".join(["---:"] * len(libs)) + "|",
    ]
    for row in bw["cases"]:
      cells = [row["dtype"], _fmt_shape(row["shape"])]
      cells += [
        f"{row['results'][n]['compulsory_bw_fraction']:.2f} / {row['results'][n]['eight_pass_bw_fraction']:.2f}"
        for n in libs
      ]
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
  if result.get("targets"):
    lines += ["**Targets (jaxbn)**", ""]
    for name, t in result["targets"].items():
      lines.append(f"- {name}: {t['value']:.3f} {'met' if t['ok'] else 'NOT met'}")
    lines.append("")
  lines += ["Libraries:", ""] + [f"- {n}: {LIBRARY_NOTES[n]}" for n in libs]
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def _parse_shapes(text: str) -> tuple[tuple[int, ...], ...]:
  return tuple(tuple(int(d) for d in s.split(",")) for s in text.split(";") if s.strip())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true", help="few small shapes and repeats (smoke run)")
  p.add_argument("--gpu", action="store_true", help="large bfloat16 shapes and bandwidth on the default accelerator")
  p.add_argument("--shapes", type=_parse_shapes, help='layer shapes, e.g. "256,32,32,64;4096,512"')
  p.add_argument("--dtypes", type=lambda s: tuple(s.split(",")), help="e.g. float32,bfloat16")
  p.add_argument("--libraries", type=lambda s: tuple(s.split(",")), help=f"subset of {', '.join(LIBRARIES)}")
  p.add_argument("--repeats", type=int, help="interleaved repeats")
  p.add_argument("--resnet-batch", type=int, help="ResNet batch size (0: skip the ResNet)")
  p.add_argument("--resnet-width", type=int, help="ResNet first-stage channels")
  p.add_argument("--resnet-stages", type=int, help="ResNet stages (3: the CIFAR ResNet)")
  p.add_argument("--out", type=pathlib.Path, default=_HERE / "results", help="folder for the JSON and Markdown")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.gpu:
    mode = "gpu" + ("-quick" if args.quick else "")
    if jax.default_backend() == "cpu":
      print("warning: --gpu on a CPU backend (only useful to test the script)", file=sys.stderr)
    defaults = dict(
      shapes=GPU_SHAPES,
      dtypes=("bfloat16",),
      repeats=10,
      resnet_batch=256,
      resnet_width=64,
      resnet_stages=3,
      min_time=0.02,
    )
    if args.quick:
      defaults.update(shapes=((256, 28, 28, 128),), repeats=3, resnet_batch=64, resnet_width=16, resnet_stages=1)
  elif args.quick:
    mode = f"{jax.default_backend()}-quick"
    defaults = dict(
      shapes=QUICK_SHAPES,
      dtypes=("float32", "bfloat16"),
      repeats=3,
      resnet_batch=8,
      resnet_width=8,
      resnet_stages=1,
      min_time=0.005,
    )
  else:
    mode = jax.default_backend()
    defaults = dict(
      shapes=CPU_SHAPES,
      dtypes=("float32", "bfloat16"),
      repeats=9,
      resnet_batch=64,
      resnet_width=16,
      resnet_stages=3,
      min_time=0.05,
    )
  shapes = args.shapes or defaults["shapes"]
  dtypes = args.dtypes or defaults["dtypes"]
  repeats = args.repeats or defaults["repeats"]
  resnet_batch = defaults["resnet_batch"] if args.resnet_batch is None else args.resnet_batch
  resnet_width = args.resnet_width or defaults["resnet_width"]
  resnet_stages = args.resnet_stages or defaults["resnet_stages"]
  libs = available_libraries(args.libraries)
  for dtype in dtypes:
    if dtype not in TOLERANCE:
      raise SystemExit(f"--dtypes: expected float32 and/or bfloat16, got {dtype!r}")

  start = time.perf_counter()
  result: dict[str, Any] = {
    "machine": machine_info(),
    "config": {
      "mode": mode,
      "shapes": [list(s) for s in shapes],
      "dtypes": list(dtypes),
      "repeats": repeats,
      "resnet_batch": resnet_batch,
      "resnet_width": resnet_width,
      "resnet_stages": resnet_stages,
      "momentum": MOMENTUM,
      "epsilon": EPSILON,
      "loss": "sum(relu(y)**2)",
    },
    "baseline": BASELINE,
    "libraries": list(libs),
    "cases": [],
  }
  groups: list[Group] = []
  for dtype in dtypes:
    for case in CASES:
      for shape in shapes:
        print(f"compiling {case} {dtype} {shape}", file=sys.stderr, flush=True)
        groups.append(build_layer_group(libs, case, shape, dtype))
    if resnet_batch:
      print(f"compiling resnet {dtype}", file=sys.stderr, flush=True)
      groups.append(build_resnet_group(libs, dtype, resnet_batch, resnet_width, resnet_stages))
  bw_groups = []
  if args.gpu:
    for shape in shapes:
      bw_groups.append(build_layer_group(libs, "vjp", shape, "bfloat16"))
  print(f"compiled and checked in {time.perf_counter() - start:.0f} s; timing", file=sys.stderr, flush=True)
  run_groups(groups + bw_groups, repeats, defaults["min_time"])
  for g in groups:
    result["cases"].append(
      {"kind": g.kind, "dtype": g.dtype, "shape": list(g.shape), "number": g.number, "results": summarize(g)}
    )
  if args.gpu:
    copy_bw = copy_bandwidth(2**30 if not args.quick else 2**26, repeats)
    result["bandwidth"] = {
      "copy_bytes_per_s": copy_bw,
      "cases": [{"dtype": g.dtype, "shape": list(g.shape), "results": bandwidth_rows(g, copy_bw)} for g in bw_groups],
    }
  if "jaxbn" in libs:
    result["targets"] = evaluate_targets(result["cases"])
  result["wall_s"] = time.perf_counter() - start

  _machine.write_results(args.out, f"batch_norm_{mode}", result, markdown)
  return result


if __name__ == "__main__":
  main()
