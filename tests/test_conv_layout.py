"""Convolutions rewritten into XLA:CPU's canonical layout inside loop bodies (``jaxbn._conv_layout``).

Two things are checked: the numbers do not change (against the same function compiled as a program of
its own, and against a float64 ``jax.grad``), and every convolution of a scanned gradient reaches
XLA:CPU's optimized HLO in the canonical layout, the one its fast kernel runs (without the rewrite the
kernel gradient's convolution stays ``f0b_i0o->0bf`` inside the loop).
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import jaxbn
from jaxbn import _conv_layout
from jaxbn.training import TrainState, full_batch_step, linen_loss

CANONICAL = {1: "b0f_0io->b0f", 2: "b01f_01io->b01f"}


def _conv_labels(hlo: str) -> list[str]:
  return re.findall(r" convolution\(.*?dim_labels=([\w>-]+)", hlo)


def _conv(x, w, dims=("NWC", "WIO", "NWC"), **kw):
  kw = {"window_strides": (1,) * (x.ndim - 2), "padding": "SAME", **kw}
  return lax.conv_general_dilated(x, w, dimension_numbers=dims, **kw)


# Each case: (name, input shape, kernel shape, the loss of (w, x)). Every one is differentiated with
# respect to the kernel and the input, so the gradients' convolutions (kernel-gradient ones contract
# over the batch) are in non-canonical layouts, as are the forward ones of the NCHW cases.
CASES = [
  ("1d", (6, 12, 3), (5, 3, 4), lambda w, x: jnp.sum(jnp.tanh(_conv(x, w)) ** 2)),
  (
    "1d strided dilated",
    (6, 13, 3),
    (3, 3, 4),
    lambda w, x: jnp.sum(jnp.sin(_conv(x, w, window_strides=(2,), rhs_dilation=(2,)))),
  ),
  (
    "1d transposed (lhs dilation)",
    (6, 7, 3),
    (3, 3, 4),
    lambda w, x: jnp.sum(jnp.cos(_conv(x, w, lhs_dilation=(2,), padding=((1, 1),)))),
  ),
  ("2d NCHW", (4, 3, 7, 6), (4, 3, 3, 2), lambda w, x: jnp.sum(jnp.tanh(_conv(x, w, ("NCHW", "OIHW", "NCHW"))) ** 2)),
  (
    "2d grouped",
    (4, 7, 6, 4),
    (3, 3, 2, 6),
    lambda w, x: jnp.sum(jnp.tanh(_conv(x, w, ("NHWC", "HWIO", "NHWC"), feature_group_count=2)) ** 2),
  ),
]


def _grad(loss):
  return jax.grad(loss, argnums=(0, 1))


def _inputs(x_shape, w_shape, dtype=jnp.float32):
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.normal(size=w_shape) / 3, dtype), jnp.asarray(rng.normal(size=(3, *x_shape)), dtype)


def _scanned(g):
  """The sum of ``g(w, x[i])`` over ``i`` in a ``lax.scan``."""

  def run(w, xs):
    def body(carry, x):
      return jax.tree.map(jnp.add, carry, g(w, x)), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(g, w, xs[0]))
    return lax.scan(body, zeros, xs)[0]

  return run


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_scanned_gradients_equal_the_unrolled_ones_and_a_float64_oracle(case):
  _, x_shape, w_shape, loss = case
  w, xs = _inputs(x_shape, w_shape)
  g = _grad(loss)
  rewritten = jax.jit(_scanned(_conv_layout.canonical_convolutions(g)))(w, xs)
  # Each micro-batch in a program of its own: XLA canonicalizes its convolutions itself there.
  unrolled = jax.tree.map(lambda *a: sum(a), *[jax.jit(g)(w, x) for x in xs])
  with jax.enable_x64(True):
    w64, xs64 = (np.asarray(a, np.float64) for a in (w, xs))
    oracle = jax.tree.map(lambda *a: sum(a), *[g(jnp.asarray(w64), jnp.asarray(x)) for x in xs64])
    oracle = jax.tree.map(np.asarray, oracle)
  for r, u, o in zip(jax.tree.leaves(rewritten), jax.tree.leaves(unrolled), jax.tree.leaves(oracle)):
    scale = np.max(np.abs(o))
    assert np.max(np.abs(np.asarray(r, np.float64) - o)) <= 1e-5 * scale
    assert np.max(np.abs(np.asarray(r) - np.asarray(u))) <= 1e-5 * scale


# Not the transposed and grouped cases: XLA rewrites their kernel gradients after the rewrite (into a
# strided and a 5-D convolution), which its own pass would not reach inside a loop either.
@pytest.mark.parametrize("case", CASES[:2] + CASES[3:4], ids=[c[0] for c in CASES[:2] + CASES[3:4]])
def test_every_convolution_of_a_scanned_gradient_is_canonical_on_cpu(case):
  _, x_shape, w_shape, loss = case
  w, xs = _inputs(x_shape, w_shape)
  n = len(x_shape) - 2
  g = _grad(loss)
  plain = _conv_labels(jax.jit(_scanned(g)).lower(w, xs).compile().as_text())
  labels = _conv_labels(jax.jit(_scanned(_conv_layout.canonical_convolutions(g))).lower(w, xs).compile().as_text())
  assert any(label != CANONICAL[n] for label in plain), plain  # what the rewrite is for
  assert labels and all(label == CANONICAL[n] for label in labels), labels


def _nested(p, x):
  """Convolutions behind a nested jit, a rematerialized block, a conditional and an inner scan."""
  x = jax.jit(lambda w, v: jnp.tanh(_conv(v, w)))(p[0], x)
  x = jax.checkpoint(lambda w, v: jnp.tanh(_conv(v, w)))(p[1], x)
  x = lax.cond(jnp.sum(x) > 0, lambda v: _conv(v, p[2]), lambda v: _conv(-v, p[2]), x)

  def inner(carry, _):
    return jnp.tanh(_conv(carry, p[3])), None

  x, _ = lax.scan(inner, x, None, length=2)
  return jnp.sum(x**2)


def test_nested_calls_remat_cond_and_inner_scans_are_rewritten_too():
  rng = np.random.default_rng(1)
  xs = jnp.asarray(rng.normal(size=(3, 5, 9, 4)), jnp.float32)
  params = [jnp.asarray(rng.normal(size=(3, 4, 4)) / 3, jnp.float32) for _ in range(4)]
  g = jax.grad(_nested)
  scanned = jax.jit(_scanned(_conv_layout.canonical_convolutions(g)))
  labels = _conv_labels(scanned.lower(params, xs).compile().as_text())
  plain = _conv_labels(jax.jit(_scanned(g)).lower(params, xs).compile().as_text())
  assert any(label != CANONICAL[1] for label in plain), plain
  assert len(labels) >= 10 and all(label == CANONICAL[1] for label in labels), labels
  reference = jax.tree.map(lambda *a: sum(a), *[jax.jit(g)(params, x) for x in xs])
  for a, b in zip(jax.tree.leaves(scanned(params, xs)), jax.tree.leaves(reference)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_a_function_is_traced_once_and_one_without_convolutions_is_unchanged():
  calls = []

  def f(x):
    calls.append(1)
    return {"y": jnp.sin(x), "n": None}

  rewritten = _conv_layout.canonical_convolutions(f)
  out = jax.jit(rewritten)(jnp.ones(3))
  assert out["n"] is None and np.allclose(out["y"], np.sin(1.0))
  assert len(calls) == 1
  assert str(jax.make_jaxpr(rewritten)(jnp.ones(3))) == str(jax.make_jaxpr(f)(jnp.ones(3)))


class _CNN(nn.Module):
  norm: type = nn.BatchNorm

  @nn.compact
  def __call__(self, x, train=True):
    for kernel in (5, 3):
      x = nn.Conv(8, (kernel,), strides=(2,), use_bias=False)(x)
      x = nn.relu(self.norm(use_running_average=not train)(x))
    return nn.Dense(3)(jnp.mean(x, axis=1))


@pytest.mark.parametrize("bn_mode", ["ghost", "exact"])
def test_the_scanned_step_runs_every_convolution_in_the_canonical_layout(bn_mode):
  model = _CNN(nn.BatchNorm if bn_mode == "ghost" else jaxbn.linen.BatchNorm)  # exact mode needs jaxbn's
  rng = np.random.default_rng(2)
  data = {"x": jnp.asarray(rng.normal(size=(24, 16, 1)), jnp.float32), "y": jnp.asarray(rng.integers(0, 3, 24))}
  variables = model.init(jax.random.key(0), data["x"][:2])
  opt = optax.sgd(0.1)
  state = TrainState.create(variables["params"], variables["batch_stats"], opt)
  xent = optax.softmax_cross_entropy_with_integer_labels
  loss = linen_loss(model, xent)
  scan, host = (
    full_batch_step(loss, opt, micro_batch_size=8, loop=loop, bn_mode=bn_mode, donate=False)
    for loop in ("scan", "host")
  )
  hlo = scan.lower(state, data).compile().as_text()
  labels = _conv_labels(hlo)
  assert "while" in hlo and len(labels) >= 4, labels
  assert all(label == CANONICAL[1] for label in labels), labels
  # The host loop's programs, each micro-batch in a program of its own: XLA canonicalizes them itself.
  for u, v in zip(jax.tree.leaves(scan(state, data)[0]), jax.tree.leaves(host(state, data)[0])):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def test_hessian_vector_products_in_the_lanczos_loop_are_canonical_and_exact():
  # top_hessian_eigenvalue runs its products inside a while loop: a convolution there is rewritten too.
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(6, 12, 2)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 2, 2)) / 2, jnp.float32)

  def loss(w, x):
    return jnp.sum(jnp.tanh(_conv(x, w)) ** 2) / x.shape[0]

  grad_fn = jax.grad(lambda p: loss(p, x))
  top = jax.jit(lambda p: jaxbn.top_hessian_eigenvalue(grad_fn, p, num_iters=12)[0])
  labels = _conv_labels(top.lower(w).compile().as_text())
  assert labels and all(label == CANONICAL[1] for label in labels), labels
  with jax.enable_x64(True):
    h = jax.hessian(loss)(jnp.asarray(w, jnp.float64), jnp.asarray(x, jnp.float64))
    oracle = np.linalg.eigvalsh(np.asarray(h).reshape(w.size, w.size))
  assert float(top(w)) == pytest.approx(oracle.max(), rel=1e-4)
