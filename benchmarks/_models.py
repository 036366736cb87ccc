"""A small CIFAR-style ResNet whose batch norm layers are supplied by the caller.

The convolutions, pooling and classifier are plain ``jax.lax`` code shared by every library; only the
normalization differs. A batch norm layer is any function with the canonical signature

    norm(x, scale, bias, mean, var, *, training) -> (y, new_mean, new_var)

over NHWC activations with per-channel float32 ``scale``, ``bias``, ``mean`` and ``var``, so the same
network is built once per library by passing that library's layer (see ``benchmarks/batch_norm.py``).
There is a batch norm after every convolution, shortcut projections included.

References:
  He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", 2016.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Norm = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


class ResNetParams(NamedTuple):
  """Trainable parameters: conv kernels (HWIO), batch norm ``(scale, bias)`` pairs, classifier."""

  kernels: tuple[jax.Array, ...]
  norms: tuple[tuple[jax.Array, jax.Array], ...]
  dense: tuple[jax.Array, jax.Array]


class ResNetStats(NamedTuple):
  """Running statistics: one ``(mean, var)`` pair per batch norm layer."""

  norms: tuple[tuple[jax.Array, jax.Array], ...]


def _layout(width: int, in_channels: int, blocks: int, stages: int) -> list[tuple[int, int, int, int]]:
  """``(kernel size, in, out, stride)`` of every convolution, in the order ``resnet_apply`` uses them."""
  convs = [(3, in_channels, width, 1)]
  cin = width
  for stage in range(stages):
    cout = width * 2**stage
    for block in range(blocks):
      stride = 2 if stage > 0 and block == 0 else 1
      convs += [(3, cin, cout, stride), (3, cout, cout, 1)]
      if stride != 1 or cin != cout:
        convs.append((1, cin, cout, stride))
      cin = cout
  return convs


def init_resnet(
  seed: int,
  *,
  width: int = 16,
  in_channels: int = 3,
  num_classes: int = 10,
  blocks: int = 1,
  stages: int = 3,
) -> tuple[ResNetParams, ResNetStats]:
  """Parameters (He-normal kernels, scale near 1, bias near 0) and fresh running statistics.

  Drawn with NumPy, so that building a model compiles nothing.

  Args:
    seed: seed of the NumPy generator.
    width: channels of the first stage; stage ``i`` has ``width * 2**i`` channels and, after the
      first, halves the resolution.
    in_channels: channels of the input images.
    num_classes: outputs of the classifier.
    blocks: residual blocks per stage.
    stages: number of stages (3 for the usual CIFAR ResNet; fewer compile faster).

  Returns:
    ``(params, stats)``, float32.
  """
  rng = np.random.default_rng(seed)
  f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
  kernels, norms, stats = [], [], []
  for k, cin, cout, _ in _layout(width, in_channels, blocks, stages):
    std = (2.0 / (k * k * cin)) ** 0.5
    kernels.append(f32(std * rng.standard_normal((k, k, cin, cout))))
    # Scale and bias away from 1 and 0 so that no library can simplify them away.
    norms.append((f32(1.0 + 0.1 * rng.standard_normal(cout)), f32(0.1 * rng.standard_normal(cout))))
    stats.append((f32(np.zeros(cout)), f32(np.ones(cout))))
  dense = (f32(rng.standard_normal((cout, num_classes)) / cout**0.5), f32(np.zeros(num_classes)))
  return ResNetParams(tuple(kernels), tuple(norms), dense), ResNetStats(tuple(stats))


def resnet_apply(
  norm: Norm,
  params: ResNetParams,
  stats: ResNetStats,
  x: jax.Array,
  *,
  training: bool,
  blocks: int = 1,
) -> tuple[jax.Array, ResNetStats]:
  """Logits (float32) and the updated running statistics.

  The activations keep the dtype of ``x`` (kernels are cast to it), so a bfloat16 input gives a
  bfloat16 network with a float32 classifier.
  """
  dtype = x.dtype
  kernels = iter(params.kernels)
  norms = iter(zip(params.norms, stats.norms))
  new_stats = []

  def conv_bn(h, stride, relu):
    kernel = next(kernels)
    (scale, bias), (mean, var) = next(norms)
    pad = "SAME" if kernel.shape[0] > 1 else "VALID"
    h = lax.conv_general_dilated(
      h, kernel.astype(dtype), (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h, mean, var = norm(h, scale, bias, mean, var, training=training)
    new_stats.append((mean, var))
    return jax.nn.relu(h) if relu else h

  h = conv_bn(x, 1, True)
  cin = h.shape[-1]
  width = params.kernels[0].shape[-1]
  stage = 0
  while len(new_stats) < len(params.norms):
    cout = width * 2**stage
    for block in range(blocks):
      stride = 2 if stage > 0 and block == 0 else 1
      r = conv_bn(h, stride, True)
      r = conv_bn(r, 1, False)
      shortcut = conv_bn(h, stride, False) if (stride != 1 or cin != cout) else h
      h = jax.nn.relu(r + shortcut)
      cin = cout
    stage += 1
  pooled = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
  w, b = params.dense
  return pooled @ w + b[None], ResNetStats(tuple(new_stats))


def make_train_step(norm: Norm, *, learning_rate: float = 0.1, blocks: int = 1) -> Callable[..., Any]:
  """``step(params, stats, x, labels) -> (params, stats, loss)``: one SGD step on softmax cross-entropy."""

  def loss_fn(params, stats, x, labels):
    logits, new_stats = resnet_apply(norm, params, stats, x, training=True, blocks=blocks)
    logp = jax.nn.log_softmax(logits)
    loss = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))
    return loss, new_stats

  def step(params, stats, x, labels):
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, labels)
    params = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
    return params, new_stats, loss

  return step
