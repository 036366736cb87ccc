"""Fingerprints of the compiled programs jaxbn gives for representative calls.

A change that should not move performance (a restructure, new checks at trace time) must leave the
compiled programs as they are. Run this under both versions of the library and compare the lines:

    python benchmarks/programs.py                                  # this checkout
    git worktree add /tmp/old REV && PYTHONPATH=/tmp/old python benchmarks/programs.py   # another one
    (with jaxbn installed in editable mode, uninstall it first, or PYTHONPATH loses to the install)

Each line is a case and the SHA-256 of its optimized HLO (``compile().as_text()``) with the source
locations and metadata removed and the instructions renumbered in order, which move with the code
without changing the program.
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxbn


def programs() -> dict[str, str]:
  """The optimized HLO text of each case."""
  out = {}
  out = {}
  x = jax.random.normal(jax.random.key(0), (64, 28, 28, 128))
  state = jaxbn.init_state(128)
  scale, bias = jnp.ones(128), jnp.zeros(128)

  def loss(x, scale, bias):
    y, s = jaxbn.batch_norm(x, state, scale, bias, training=True)
    return jnp.sum(y * y) + jnp.sum(s.mean)

  out["functional train grad"] = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, scale, bias).compile().as_text()
  out["functional eval"] = (
    jax.jit(lambda x: jaxbn.batch_norm(x, state, scale, bias, training=False)[0]).lower(x).compile().as_text()
  )
  xb = x.astype(jnp.bfloat16)
  out["functional train grad bf16"] = (
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(xb, scale, bias).compile().as_text()
  )

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      x = nn.Conv(16, (3, 3))(x)
      x = jaxbn.linen.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.relu(x)
      x = jaxbn.linen.BatchNorm(use_running_average=not train, ghost_batch_size=8)(x)
      return x.mean()

  xs = x[:32, :, :, :8]
  v = Net().init(jax.random.key(1), xs, False)

  def step(v, xs):
    def f(p):
      y, upd = Net().apply({**v, "params": p}, xs, True, mutable=["batch_stats"])
      return y, upd

    g, upd = jax.grad(f, has_aux=True)(v["params"])
    return g, upd

  out["linen train step"] = jax.jit(step).lower(v, xs).compile().as_text()
  out["linen eval"] = jax.jit(lambda v, xs: Net().apply(v, xs, False)).lower(v, xs).compile().as_text()

  bn = jaxbn.nnx.BatchNorm(8, rngs=nnx.Rngs(0))

  @nnx.jit
  def nstep(bn, xs):
    return nnx.grad(lambda bn: jnp.sum(bn(xs) ** 2))(bn)

  out["nnx train grad"] = nstep.lower(bn, xs).compile().as_text() if hasattr(nstep, "lower") else "n/a"

  class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
      for width in (16, 16):
        x = nn.relu(jaxbn.linen.BatchNorm(use_running_average=False)(nn.Dense(width)(x)))
      return nn.Dense(3)(x)

  model = Mlp()
  data = {"x": jax.random.normal(jax.random.key(2), (40, 8)), "y": jnp.arange(40) % 3}
  variables = model.init(jax.random.key(3), data["x"])
  loss_fn = jaxbn.training.linen_loss(model, optax.softmax_cross_entropy_with_integer_labels)
  opt = optax.sgd(0.1, momentum=0.9)
  state = jaxbn.training.TrainState.create(variables["params"], variables["batch_stats"], opt)
  for mode in ("ghost", "exact"):
    step = jaxbn.training.full_batch_step(loss_fn, opt, micro_batch_size=12, bn_mode=mode, donate=False)
    out[f"full_batch_step {mode}"] = step.lower(state, data).compile().as_text()
  return out


def normalized(text: str) -> str:
  """The program without what moves with the source code: metadata, stack frames, file and function tables."""
  text = re.sub(r", metadata=\{[^}]*\}", "", text)
  text = re.sub(r",?\s*stack_frame_id=\d+", "", text)
  text = re.sub(r"^HloModule [^,]*", "HloModule", text, flags=re.M)
  kept, table = [], False
  for line in text.splitlines():
    if re.match(r"^(FileNames|FunctionNames|FileLocations|StackFrames)\b", line):
      table = True
      continue
    if table and (not line.strip() or re.match(r"^\s*\d+ ", line)):
      table = bool(line.strip())
      continue
    table = False
    kept.append(line)
  # Instruction and computation names carry counters that depend on how many were traced before, and
  # parameter names in a computation's signature are the Python argument names.
  names: dict[str, str] = {}
  rename = lambda m: names.setdefault(m.group(0), f"%v{len(names)}")
  text = re.sub(r"%[A-Za-z_][\w.\-]*", rename, "\n".join(kept))
  signature = lambda m: re.sub(r"[A-Za-z_][\w.\-]*(?=: )", "arg", m.group(0))
  return re.sub(r"^.*->.*\{$", signature, text, flags=re.M)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dump", type=pathlib.Path, help="also write each normalized program to this folder")
  args = p.parse_args()
  print(f"jaxbn from {pathlib.Path(jaxbn.__file__).parent}, jax {jax.__version__}")
  for name, text in programs().items():
    text = normalized(text)
    print(f"{name:28s} {hashlib.sha256(text.encode()).hexdigest()[:16]}")
    if args.dump:
      args.dump.mkdir(parents=True, exist_ok=True)
      (args.dump / f"{name.replace(' ', '_')}.hlo").write_text(text)


if __name__ == "__main__":
  main()
