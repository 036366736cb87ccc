"""Communication of a full-batch step on 8 devices: the gradient crosses devices once per step.

Each device accumulates its own partial gradient over all its micro-batches and the partials are
summed once, after the last one; batch-norm statistics keep their one small collective per layer and
micro-batch (per sweep in exact mode). Counted in the optimized HLO: an all-reduce whose operand has a
weight matrix's shape carries the gradient; one inside a ``while`` body runs once per micro-batch.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn.training import TrainState, full_batch_step, linen_loss

pytestmark = pytest.mark.slow  # three compilations of an 8-device step per case: CI runs them

KERNELS = ((6, 24), (24, 40), (40, 7))  # shapes no batch-norm statistic (stacked in 3s and 5s) or bias has


class Net(nn.Module):
  axis_name: str = "d"

  @nn.compact
  def __call__(self, x, train=True):
    for features in (24, 40):
      x = nn.Dense(features)(x)
      x = jaxbn.linen.BatchNorm(use_running_average=not train, axis_name=self.axis_name)(x)
      x = nn.relu(x)
    return nn.Dense(7)(x)


def _xent(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def _computations(hlo: str) -> dict[str, str]:
  """The HLO module's computations by name, each its text."""
  out, name, lines = {}, None, []
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$", line)
    if head:
      name, lines = head.group(1), []
    elif line.startswith("}") and name is not None:
      out[name] = "\n".join(lines)
      name = None
    elif name is not None:
      lines.append(line)
  return out


def gradient_all_reduces(hlo: str) -> tuple[int, int]:
  """``(outside, inside)``: all-reduces of a weight-matrix-shaped operand outside any ``while`` loop and
  inside one (those run once per iteration)."""
  comps = _computations(hlo)
  calls = {
    n: set(re.findall(r"(?:body|condition|to_apply|calls|branch_computations)=\{?%?([\w.\-]+)", t))
    for n, t in comps.items()
  }
  for n, t in comps.items():
    for group in re.findall(r"branch_computations=\{([^}]*)\}", t):
      calls[n] |= {c.strip().lstrip("%") for c in group.split(",")}
  looped, todo = set(), [b for t in comps.values() for b in re.findall(r"body=%?([\w.\-]+)", t)]
  while todo:
    c = todo.pop()
    if c not in looped:
      looped.add(c)
      todo += list(calls.get(c, ()))
  shapes = tuple(f"f32[{a},{b}]" for a, b in KERNELS)
  outside = inside = 0
  for n, t in comps.items():
    for line in t.splitlines():
      result = re.split(r" all-reduce(?:-start)?\(", line)
      if len(result) > 1 and any(s in result[0] for s in shapes):
        if n in looped:
          inside += 1
        else:
          outside += 1
  return outside, inside


def _step_hlos(style: str, bn_mode: str, micro_batches: int) -> list[tuple[str, int]]:
  """The step's compiled programs as HLO text, each with its calls per step."""
  n_per_device = 16
  data = {
    "x": jnp.asarray(np.random.default_rng(0).normal(size=(8 * n_per_device, 6)), jnp.float32),
    "y": jnp.asarray(np.arange(8 * n_per_device) % 7, jnp.int32),
  }
  variables = Net(axis_name=None).init(jax.random.key(0), data["x"][:4])
  opt = optax.sgd(0.1)
  state = TrainState.create(variables["params"], variables["batch_stats"], opt)
  if style.startswith("jit"):  # global arrays, the rows split over the mesh: the step runs its sweeps per device
    mesh = jax.make_mesh((8,), ("d",), devices=jax.devices()[:8])
    loop = style.split("-")[1]
    step = full_batch_step(
      linen_loss(Net(axis_name=None), _xent),
      opt,
      micro_batch_size=8 * n_per_device // micro_batches,
      loop=loop,
      bn_mode=bn_mode,
      donate=False,
    )
    data = jax.device_put(data, jax.NamedSharding(mesh, P("d")))
    state = jax.device_put(state, jax.NamedSharding(mesh, P()))
    if loop == "scan":
      return [(step.lower(state, data).compile().as_text(), 1)]
    step(state, data)  # the host loop compiles its programs as the step first runs them
    return [(step.programs[name].lower(*args).compile().as_text(), calls) for name, (args, calls) in step.calls.items()]
  step = full_batch_step(
    linen_loss(Net(), _xent),
    opt,
    micro_batch_size=n_per_device // micro_batches,
    axis_name="d",
    jit=False,
    bn_mode=bn_mode,
    donate=False,
  )
  if style == "pmap":
    stacked = jax.tree.map(lambda a: a.reshape(8, n_per_device, *a.shape[1:]), data)
    fn = jax.pmap(step, axis_name="d", in_axes=(None, 0), out_axes=None)
    return [(fn.lower(state, stacked).compile().as_text(), 1)]
  mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
  fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("d")), out_specs=P()))
  return [(fn.lower(state, data).compile().as_text(), 1)]


@pytest.mark.parametrize("bn_mode", ["ghost", "exact"])
@pytest.mark.parametrize("style", ["jit-scan", "jit-host", "shard_map", "pmap"])
def test_gradient_crosses_devices_once_per_step_whatever_the_micro_batch_count(style, bn_mode):
  for micro_batches in (1, 4, 16):
    outside = inside = 0
    for hlo, calls in _step_hlos(style, bn_mode, micro_batches):
      out, ins = gradient_all_reduces(hlo)
      outside, inside = outside + calls * out, inside + calls * ins
    # One all-reduce per weight matrix at most (XLA may combine them into fewer), none in a loop.
    assert inside == 0 and 1 <= outside <= len(KERNELS), (micro_batches, outside, inside)
