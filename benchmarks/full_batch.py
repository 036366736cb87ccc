"""Full-batch training speed and memory: jaxbn.training.full_batch_step against hand-written Flax + Optax.

A batch-norm 1-D CNN on MNIST-1D-sized data (4000 sequences of length 40, one channel, 10 classes) is
trained with one update per step from the mean gradient over ALL examples, accumulated over
micro-batches (500 rows by default; batch norm normalizes each micro-batch with its own statistics,
i.e. ghost batch norm). Contenders, all doing that same mathematics in the same run:

* ``hand-written`` (the baseline): an idiomatic jitted Flax + Optax step, a ``flax.training.train_state``
  with ``batch_stats``, ``lax.scan`` over micro-batches, gradients summed and divided by their number,
  the optimizer applied once, the running statistics threaded through the scan (an EMA per micro-batch,
  as people write it);
* ``optax.MultiSteps``: the same optimizer wrapped in ``optax.MultiSteps(every_k_schedule=k)``, and
  ``k`` calls of a jitted micro-batch step per update (the gradient accumulation users reach for);
* ``jaxbn``: ``full_batch_step(linen_loss(model, ...), opt, micro_batch_size=m,
  update_batch_stats=...)`` on the same model (``flax.linen.BatchNorm``), so only the step differs,
  with its default ``loop="auto"``, the scanned loop: every micro-batch in a ``lax.scan`` inside
  one compiled step;
* ``jaxbn + jaxbn BN``: the same with ``jaxbn.linen.BatchNorm`` layers (the whole jaxbn stack);
* ``jaxbn host loop`` (``+ jaxbn BN``): ``full_batch_step(..., loop="host")``, which calls one compiled
  program per micro-batch from Python (gradient, loss and statistics accumulators donated) and one
  compiled update (its programs are ``step.programs``, their argument types ``step.calls``).

Every jaxbn contender also gets its time ratio to ``optax.MultiSteps`` (the same per-repeat medians).

One contender does other mathematics and is compared with jaxbn's ghost step instead:
``jaxbn exact BN``, ``full_batch_step(..., bn_mode="exact")`` with ``jaxbn.linen.BatchNorm`` layers,
normalizes with the statistics of the WHOLE dataset, which takes ``L`` statistics sweeps over the
micro-batches (``L`` batch-norm layers), one loss-and-gradient sweep and ``L`` adjoint sweeps. Its
time per update is reported as a ratio to ``jaxbn + jaxbn BN`` (same layers, same default loop),
against the target ``(2L + 1) / 2`` plus 15%, with its compiled peak and its number of sweeps
(host-loop sweep programs, or ``while`` loops in the compiled step); it is checked to run with
finite losses, not against the hand-written loop. ``--diagnose`` adds it on the host loop.

``--diagnose`` adds variants that take ``full_batch_step`` apart (no guard; the model's batch norms
not intercepted; ...), used to find where any extra time goes.

Before anything is timed every contender runs a few updates from the same parameters: the loss
trajectories and the final parameters must agree (the mean gradient is the same), else the run stops
(the exact batch-norm contender: finite losses and parameters).
The running statistics differ by design: the hand-written loop and MultiSteps fold every micro-batch
into the EMA (``k`` updates per step), jaxbn folds the exact merged statistics of the whole dataset
once per step; the difference is reported.

Speed is full-batch updates per second: each repeat runs every contender back to back in a rotating
order, and the reported ratio is the median over repeats of the time over the hand-written loop's time
in the same repeat. Memory, from the compiled programs (``memory_analysis()``): arguments, outputs,
aliased (donated) bytes and temporaries of each jitted function, and an estimate of the peak of the
device memory during an update, the largest over its programs of ``live + outputs - aliased +
temporaries``, where ``live`` is what the update keeps on the device when the program starts: the
state, the dataset counted once, and the host loop's accumulators (at least the program's
arguments). This counts the same things for every contender whatever each program receives:
MultiSteps passes one micro-batch per call, the rest of the dataset resident; the host loop passes
the whole dataset to its sweep programs (which slice it on the device) but not the optimizer
state, which stays resident; its update program gets neither the dataset nor anything large. MultiSteps' accumulator is part of its optimizer state, counted in the
persistent ``state`` column; the host loop's (the same size) lives only during an update.

``memory_analysis()``'s temporaries are the size of a heap that XLA's heap simulator packs, holes
included: programs with the same live buffers can differ by hundreds of KiB. With ``--buffers``
(default in the full run) a fresh process per contender dumps XLA's buffer assignment
(``XLA_FLAGS=--xla_dump_to``) and :func:`buffer_peak` finds the peak of the temporaries live at one
time, and the buffers live then; ``peak live`` replaces the heap by it. On Linux the peak
resident-set growth of an update (``VmHWM`` after resetting it through ``/proc/self/clear_refs``) is
measured too, in the same fresh process, whose allocator maps every buffer over 16 KiB separately
(``--rss``; approximate: it also sees buffers that the asynchronous dispatch of the next call
allocates early).

On CPU, XLA leaves some convolutions of a ``while`` loop's body (here the kernel-gradient and
input-gradient convolutions inside ``lax.scan``) in a non-canonical layout that its generic, slow
emitter runs (jax-ml/jax#12868): the hand-written scanned step is tens of times slower than
MultiSteps' separate calls there. jaxbn's scanned step traces its body with those convolutions in the
canonical layout (``jaxbn/_conv_layout.py``), as XLA does outside loops; its host loop
avoids the loop like MultiSteps. On GPUs this does not apply.

Usage::

  python benchmarks/full_batch.py            # full CPU run with --rss --buffers, about 6 minutes on 2 cores
  python benchmarks/full_batch.py --quick    # smoke run, about 30 s of CPU time
  python benchmarks/full_batch.py --diagnose # add the variants that explain jaxbn's time
  python benchmarks/full_batch.py --streaming [streaming.py options]  # data on disk, streamed: benchmarks/streaming.py
  python benchmarks/full_batch.py --communication [--quick]  # bytes per step on 8 devices: benchmarks/communication.py

Results go to ``benchmarks/results/full_batch[_quick].{json,md}``.

References:
  Hoffer, Hubara & Soudry, "Train longer, generalize better: closing the generalization gap in large
  batch training of neural networks", NeurIPS 2017 (ghost batch norm).
  Geiping, Goldblum, Pope, Moeller & Goldstein, "Stochastic Training is Not Necessary for
  Generalization", ICLR 2022 (full-batch training with gradient accumulation).
  Greydanus & Kobak, "Scaling down Deep Learning with MNIST-1D", ICML 2024.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax import lax

_HERE = pathlib.Path(__file__).resolve().parent
for _path in (_HERE, _HERE.parent):  # _machine, and jaxbn when it is not installed
  if str(_path) not in sys.path:
    sys.path.insert(0, str(_path))

import _machine  # noqa: E402

import jaxbn  # noqa: E402
from jaxbn import training  # noqa: E402

BASELINE = "hand-written"
CONTENDERS = (
  "hand-written",
  "optax.MultiSteps",
  "jaxbn",
  "jaxbn + jaxbn BN",
  "jaxbn host loop",
  "jaxbn host loop + jaxbn BN",
  "jaxbn exact BN",
)
# jaxbn's step with ghost batch norm over the same layers and loop: the reference of the exact mode.
EXACT, EXACT_REFERENCE = "jaxbn exact BN", "jaxbn + jaxbn BN"
MULTISTEPS = "optax.MultiSteps"
# jaxbn as a user gets it (the default loop): no slower than optax.MultiSteps.
DEFAULTS = ("jaxbn", "jaxbn + jaxbn BN")
DIAGNOSTICS = (
  "hand-written + jaxbn BN",
  "jaxbn guard=False",
  "jaxbn no interception",
  "jaxbn exact BN host loop",
)
NOTES = {
  "hand-written": "jitted Flax + Optax step: lax.scan over micro-batches, summed gradients, one optimizer "
  "update, EMA of the running statistics per micro-batch (flax.linen.BatchNorm)",
  "optax.MultiSteps": "optax.MultiSteps(opt, every_k_schedule=k): k jitted micro-batch steps per update, "
  "EMA per micro-batch (flax.linen.BatchNorm)",
  "jaxbn": "jaxbn.training.full_batch_step(linen_loss(model)) on the same flax.linen.BatchNorm model, default "
  "loop ('auto': the micro-batches in a lax.scan inside one compiled step): guard, masks, exact once-per-step "
  "running statistics",
  "jaxbn + jaxbn BN": "the same with jaxbn.linen.BatchNorm layers",
  "jaxbn host loop": "full_batch_step(..., loop='host'): one compiled program per micro-batch called from Python "
  "and one compiled update (flax.linen.BatchNorm)",
  "jaxbn host loop + jaxbn BN": "the same with jaxbn.linen.BatchNorm layers",
  "jaxbn exact BN": "full_batch_step(..., bn_mode='exact') with jaxbn.linen.BatchNorm layers, default loop: batch "
  "norm over the WHOLE dataset (another objective: not compared with hand-written; time and memory against "
  "jaxbn + jaxbn BN)",
  "jaxbn exact BN host loop": "the same on loop='host' (diagnostic)",
  "hand-written + jaxbn BN": "the hand-written step with jaxbn.linen.BatchNorm layers (diagnostic)",
  "jaxbn guard=False": "full_batch_step(..., guard=False) (diagnostic: cost of the guard)",
  "jaxbn no interception": "full_batch_step with a plain loss (no linen_loss interceptor, no mask in the batch "
  "norms, running statistics not updated) (diagnostic: cost of linen_loss)",
}

NUM_CLASSES = 10
MOMENTUM = 0.9
LEARNING_RATE = 0.05
# Agreement with the baseline after the check updates (max |a - b| / max |b| over the parameters,
# and over the losses): the mean gradient is the same, so only float rounding may differ.
TOLERANCE = 1e-3


# ------------------------------------------------------------------------------------------------
# Data and model
# ------------------------------------------------------------------------------------------------


def make_data(examples: int, length: int, seed: int = 0, mnist1d: bool = False) -> dict[str, jax.Array]:
  """``{"x": (examples, length, 1) float32, "y": (examples,) int32}``.

  By default random sequences of MNIST-1D's shape: a per-class template plus noise, so that the
  loss has something to learn. ``mnist1d=True`` builds the real MNIST-1D training set instead
  (needs the ``mnist1d`` package; 4000 examples of length 40).
  """
  if mnist1d:
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state()  # noqa: NPY002 (make_dataset reseeds NumPy's global generator)
    d = make_dataset(get_dataset_args())
    np.random.set_state(state)  # noqa: NPY002
    x, y = d["x"][:examples], d["y"][:examples]
  else:
    rng = np.random.default_rng(seed)
    templates = rng.standard_normal((NUM_CLASSES, length))
    y = rng.integers(0, NUM_CLASSES, examples)
    x = templates[y] + 1.5 * rng.standard_normal((examples, length))
  return {"x": jnp.asarray(x[..., None], jnp.float32), "y": jnp.asarray(y, jnp.int32)}


class CNN(nn.Module):
  """MNIST-1D's small CNN with batch norm: three strided convolutions, each followed by batch norm and
  relu, global average pooling and a dense classifier."""

  norm: Callable[..., nn.Module] = nn.BatchNorm
  channels: int = 32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    for kernel in (5, 3, 3):
      x = nn.Conv(self.channels, (kernel,), strides=(2,), padding="SAME", use_bias=False)(x)
      x = self.norm(use_running_average=not train, momentum=MOMENTUM)(x)
      x = nn.relu(x)
    return nn.Dense(NUM_CLASSES)(jnp.mean(x, axis=1))


def _xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def make_optimizer() -> optax.GradientTransformation:
  return optax.sgd(LEARNING_RATE, momentum=0.9, nesterov=True)


# ------------------------------------------------------------------------------------------------
# Contenders. Each is a fresh state and an update that applies ONE full-batch step to it.
# ------------------------------------------------------------------------------------------------


class FlaxState(train_state.TrainState):
  """Flax's TrainState with the running statistics, as in Flax's ImageNet example."""

  batch_stats: Any = None


@dataclasses.dataclass
class Contender:
  """One way to run a full-batch update.

  Attributes:
    name: label in the tables.
    init: ``init(params, batch_stats) -> state``, a fresh state with its own buffers.
    update: ``update(state) -> (state, losses)``: one full-batch update through the programs in
      ``fns``; ``losses`` as returned by the call(s), averaged by :func:`mean_loss`.
    fns: the jitted functions an update calls, by label; :func:`compile_contender` replaces them by
      their compiled executables, so that each program compiles once.
    program_args: ``program_args(state) -> {label: (args, calls per update)}``, example arguments.
    params: ``params(state)``; batch_stats: ``batch_stats(state)``; opt_state: ``opt_state(state)``.
    data_bytes: device bytes of the dataset (resident during an update, counted once).
    transient: ``transient(state)``: the buffers, besides the state and the dataset, that stay alive
      between the programs of one update (the host loop's donated accumulators); None if none.
    same_objective: False for a contender that minimizes another objective (exact batch norm): it
      is checked for finite losses instead of agreement with the baseline.
  """

  name: str
  init: Callable[[Any, Any], Any]
  update: Callable[[Any], tuple[Any, Any]]
  fns: dict[str, Any]
  program_args: Callable[[Any], dict[str, tuple[tuple[Any, ...], int]]]
  params: Callable[[Any], Any]
  batch_stats: Callable[[Any], Any]
  opt_state: Callable[[Any], Any]
  data_bytes: int = 0
  transient: Callable[[Any], Any] | None = None
  same_objective: bool = True


def _copy(tree: Any) -> Any:
  return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


def _flax_state(model: nn.Module, params: Any, batch_stats: Any, tx: optax.GradientTransformation) -> FlaxState:
  return FlaxState.create(apply_fn=model.apply, params=_copy(params), tx=tx, batch_stats=_copy(batch_stats))


def hand_written(model: nn.Module, data: dict[str, jax.Array], micro: int, name: str = BASELINE) -> Contender:
  """The idiomatic jitted step: scan over micro-batches, sum gradients, one optimizer update."""
  n = data["x"].shape[0]
  if n % micro:
    raise ValueError(f"the hand-written loop needs micro_batch_size ({micro}) to divide the examples ({n})")
  k = n // micro
  tx = make_optimizer()

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state: FlaxState, x: jax.Array, y: jax.Array) -> tuple[FlaxState, jax.Array]:
    def micro_step(carry, batch):
      grads, batch_stats, loss_sum = carry
      bx, by = batch

      def loss_fn(params):
        logits, updates = state.apply_fn(
          {"params": params, "batch_stats": batch_stats}, bx, train=True, mutable=["batch_stats"]
        )
        return jnp.mean(_xent(logits, by)), updates["batch_stats"]

      (loss, batch_stats), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      return (jax.tree.map(jnp.add, grads, g), batch_stats, loss_sum + loss), None

    batches = (x.reshape(k, micro, *x.shape[1:]), y.reshape(k, micro))
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, batch_stats, loss_sum), _ = lax.scan(micro_step, (zeros, state.batch_stats, 0.0), batches)
    grads = jax.tree.map(lambda g: g / k, grads)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss_sum / k

  fns = {"step": train_step}
  return Contender(
    name=name,
    init=lambda params, batch_stats: _flax_state(model, params, batch_stats, tx),
    update=lambda state: fns["step"](state, data["x"], data["y"]),
    fns=fns,
    program_args=lambda state: {"step": ((state, data["x"], data["y"]), 1)},
    params=lambda s: s.params,
    batch_stats=lambda s: s.batch_stats,
    opt_state=lambda s: s.opt_state,
    data_bytes=_tree_bytes(data),
  )


def multi_steps(model: nn.Module, data: dict[str, jax.Array], micro: int) -> Contender:
  """``optax.MultiSteps``: k jitted micro-batch steps per update, the data split once on the device."""
  n = data["x"].shape[0]
  if n % micro:
    raise ValueError(f"MultiSteps needs micro_batch_size ({micro}) to divide the examples ({n})")
  k = n // micro
  tx = optax.MultiSteps(make_optimizer(), every_k_schedule=k)
  batches = [(data["x"][i * micro : (i + 1) * micro], data["y"][i * micro : (i + 1) * micro]) for i in range(k)]
  batches = jax.block_until_ready(jax.device_put(batches))

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state: FlaxState, x: jax.Array, y: jax.Array) -> tuple[FlaxState, jax.Array]:
    def loss_fn(params):
      logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"]
      )
      return jnp.mean(_xent(logits, y)), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss

  fns = {"micro step": train_step}

  def update(state):
    losses = []
    for x, y in batches:
      state, loss = fns["micro step"](state, x, y)
      losses.append(loss)
    return state, losses

  return Contender(
    name="optax.MultiSteps",
    init=lambda params, batch_stats: _flax_state(model, params, batch_stats, tx),
    update=update,
    fns=fns,
    program_args=lambda state: {"micro step": ((state, *batches[0]), k)},
    params=lambda s: s.params,
    batch_stats=lambda s: s.batch_stats,
    opt_state=lambda s: s.opt_state,
    data_bytes=_tree_bytes(data),  # the micro-batches are the dataset, split once
  )


def _jaxbn_contender(
  name: str, step: Callable[..., Any], data: dict[str, jax.Array], tx: optax.GradientTransformation, **kw: Any
) -> Contender:
  """A contender running ``step``: one compiled program (``loop="scan"``) or the host loop's programs."""
  init = lambda params, batch_stats: training.TrainState.create(params, batch_stats, tx)
  if step.loop == "host":
    fns: dict[str, Any] = {}  # copies of step.programs, which compile_contender replaces; the step keeps its own
    run = lambda state: step(state, data)
  else:
    fns = {"step": step}
    run = lambda state: fns["step"](state, data)

  def update(state):
    state, metrics = run(state)
    return state, metrics.loss

  def program_args(state):
    """Per program, the arguments the step passes it (for the host loop, as its last update did:
    the state's parts, the WHOLE dataset that every call slices on the device, the donated
    accumulators, the micro-batch index) and its calls per update."""
    if step.loop != "host":
      return {"step": ((state, data), 1)}
    if not step.calls:
      step(init(*_fresh_variables(state)), data)  # a first update, on copies, makes the programs and records the calls
    fns.update({label: step.programs[label] for label in step.calls if label not in fns})
    return {label: (args, calls) for label, (args, calls) in step.calls.items()}

  def accumulators(state):
    """The host loop's buffers alive between its programs, sized as its largest carry (the donated
    gradient accumulators; the per-micro-batch outputs are small)."""
    del state
    args = [a for label, (a, _) in step.calls.items() if label != "update"]
    carry = max((_tree_bytes(a[1]) for a in args), default=0)
    return [jnp.zeros((carry // 4,), jnp.float32)]

  return Contender(
    name=name,
    init=init,
    update=update,
    fns=fns,
    program_args=program_args,
    params=lambda s: s.params,
    batch_stats=lambda s: s.batch_stats,
    opt_state=lambda s: s.opt_state,
    data_bytes=_tree_bytes(data),
    transient=accumulators if step.loop == "host" else None,
    **kw,
  )


def _fresh_variables(state: Any) -> tuple[Any, Any]:
  return _copy(state.params), _copy(state.batch_stats)


def jaxbn_step(model: nn.Module, data: dict[str, jax.Array], micro: int, name: str = "jaxbn", **kw: Any) -> Contender:
  """``full_batch_step(linen_loss(model))``: what a jaxbn user writes (``kw``: e.g. ``loop``, ``bn_mode``)."""
  tx = make_optimizer()
  loss_fn = training.linen_loss(model, _xent, train=True)
  step = training.full_batch_step(
    loss_fn, tx, micro_batch_size=micro, update_batch_stats=loss_fn.update_batch_stats, **kw
  )
  return _jaxbn_contender(name, step, data, tx, same_objective=kw.get("bn_mode", "ghost") == "ghost")


def jaxbn_plain_loss(model: nn.Module, data: dict[str, jax.Array], micro: int) -> Contender:
  """``full_batch_step`` with a plain loss: no interceptor, no masks, running statistics kept as they are.

  Valid only when ``micro`` divides the examples (every row of every micro-batch is valid). A
  diagnostic: it shows what ``linen_loss`` costs on top of the step itself.
  """
  tx = make_optimizer()

  def loss_fn(params, batch_stats, batch, mask):
    del mask  # every row is valid: micro divides the examples
    logits, _ = model.apply(
      {"params": params, "batch_stats": batch_stats}, batch["x"], train=True, mutable=["batch_stats"]
    )
    return jnp.mean(_xent(logits, batch["y"])), training.LossAux()

  step = training.full_batch_step(loss_fn, tx, micro_batch_size=micro)
  return _jaxbn_contender("jaxbn no interception", step, data, tx)


def build_contenders(
  names: Sequence[str], data: dict[str, jax.Array], micro: int, channels: int
) -> tuple[dict[str, Contender], dict[str, nn.Module]]:
  """The contenders asked for, and the models they train (flax or jaxbn batch norm)."""
  models = {"flax": CNN(nn.BatchNorm, channels), "jaxbn": CNN(jaxbn.linen.BatchNorm, channels)}
  factories: dict[str, Callable[[], Contender]] = {
    "hand-written": lambda: hand_written(models["flax"], data, micro),
    "optax.MultiSteps": lambda: multi_steps(models["flax"], data, micro),
    "jaxbn": lambda: jaxbn_step(models["flax"], data, micro),
    "jaxbn + jaxbn BN": lambda: jaxbn_step(models["jaxbn"], data, micro, name="jaxbn + jaxbn BN"),
    "jaxbn host loop": lambda: jaxbn_step(models["flax"], data, micro, "jaxbn host loop", loop="host"),
    "jaxbn host loop + jaxbn BN": lambda: jaxbn_step(
      models["jaxbn"], data, micro, "jaxbn host loop + jaxbn BN", loop="host"
    ),
    # Same (default) loop and layers as "jaxbn + jaxbn BN", batch norm over the whole dataset.
    EXACT: lambda: jaxbn_step(models["jaxbn"], data, micro, name=EXACT, bn_mode="exact"),
    "jaxbn exact BN host loop": lambda: jaxbn_step(
      models["jaxbn"], data, micro, "jaxbn exact BN host loop", bn_mode="exact", loop="host"
    ),
    "hand-written + jaxbn BN": lambda: hand_written(models["jaxbn"], data, micro, name="hand-written + jaxbn BN"),
    "jaxbn guard=False": lambda: jaxbn_step(models["flax"], data, micro, name="jaxbn guard=False", guard=False),
    "jaxbn no interception": lambda: jaxbn_plain_loss(models["flax"], data, micro),
  }
  unknown = [n for n in names if n not in factories]
  if unknown:
    raise SystemExit(f"unknown contenders {unknown}; choose from {list(factories)}")
  return {n: factories[n]() for n in names}, models


# ------------------------------------------------------------------------------------------------
# Agreement, memory, timing
# ------------------------------------------------------------------------------------------------


def mean_loss(losses: Any) -> float:
  return float(np.mean([float(v) for v in (losses if isinstance(losses, list) else [losses])]))


def _rel(a: Any, b: Any) -> float:
  errs = [
    float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))))
    / max(float(np.max(np.abs(np.asarray(v, np.float64)))), 1e-30)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  ]
  return max(errs)


def check_agreement(contenders: dict[str, Contender], params: Any, batch_stats: Any, steps: int) -> dict[str, Any]:
  """Runs ``steps`` updates of every contender from the same start; the losses and parameters must agree.

  A contender with another objective (``same_objective=False``, exact batch norm) must only run and
  keep its losses finite; its differences to the baseline are recorded, not checked.
  """
  runs = {}
  for name, c in contenders.items():
    state = c.init(params, batch_stats)
    losses = []
    for _ in range(steps):
      state, loss = c.update(state)
      losses.append(mean_loss(loss))
    runs[name] = (losses, c.params(state), c.batch_stats(state))
  ref_losses, ref_params, ref_stats = runs[BASELINE]
  out = {}
  for name, (losses, p, s) in runs.items():
    loss_err = max(abs(a - b) for a, b in zip(losses, ref_losses)) / max(abs(b) for b in ref_losses)
    out[name] = {
      "losses": losses,
      "loss_rel_diff": loss_err,
      "params_rel_diff": _rel(p, ref_params),
      # Not checked: the running statistics are updated differently by design (see the docstring).
      "batch_stats_rel_diff": _rel(s, ref_stats),
      "checked": "agreement" if contenders[name].same_objective else "finite",
    }
  bad = {
    n: r
    for n, r in out.items()
    if contenders[n].same_objective and not (r["loss_rel_diff"] <= TOLERANCE and r["params_rel_diff"] <= TOLERANCE)
  }
  if bad:
    raise AssertionError(
      f"contenders disagree with {BASELINE} after {steps} updates (tolerance {TOLERANCE}): "
      + "; ".join(f"{n}: loss {r['loss_rel_diff']:.2e}, params {r['params_rel_diff']:.2e}" for n, r in bad.items())
    )
  nonfinite = [
    n
    for n, (losses, p, _) in runs.items()
    if not (all(math.isfinite(v) for v in losses) and all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(p)))
  ]
  if nonfinite:
    raise AssertionError(f"contenders with non-finite losses or parameters after {steps} updates: {nonfinite}")
  return out


def _tree_bytes(tree: Any) -> int:
  return int(sum(np.size(a) * np.dtype(jnp.result_type(a)).itemsize for a in jax.tree.leaves(tree)))


def compile_contender(c: Contender, state: Any) -> dict[str, Any]:
  """Compiles the contender's programs (once; later calls use the executables) and returns their memory.

  Returns:
    Per program the compiled argument, output, aliased (donated) and temporary bytes, the bytes alive
    when it starts (``live_bytes``: the state, the dataset once and the update's transient buffers,
    at least its arguments), its peak estimate ``live + outputs - aliased + temporaries``, its HLO
    module name and its number of ``while`` loops (sweeps over the micro-batches); the bytes of the
    state kept between updates (and of MultiSteps' accumulator within it); and the peak estimate
    of one update, the largest over its programs (see the module docstring).
  """
  opt_state = c.opt_state(state)
  state_bytes = _tree_bytes((c.params(state), c.batch_stats(state), opt_state))
  program_args = c.program_args(state)  # first: the host loop's transient buffers are known after it
  transient_bytes = _tree_bytes(c.transient(state)) if c.transient is not None else 0
  programs = {}
  for label, (args, calls) in program_args.items():
    c.fns[label] = compiled = c.fns[label].lower(*args).compile()
    text = compiled.as_text()
    info: dict[str, Any] = {
      "calls_per_update": calls,
      "module": text.split(None, 2)[1].rstrip(",") if text.startswith("HloModule") else None,
      "while_loops": len(re.findall(r"\bwhile\(", text)),
    }
    analysis = compiled.memory_analysis()
    if analysis is not None:
      arg = int(analysis.argument_size_in_bytes)
      live = max(arg, state_bytes + c.data_bytes + transient_bytes)
      info.update(
        argument_bytes=arg,
        output_bytes=int(analysis.output_size_in_bytes),
        alias_bytes=int(analysis.alias_size_in_bytes),
        temp_bytes=int(analysis.temp_size_in_bytes),
        live_bytes=live,
      )
      info["peak_bytes"] = live + info["output_bytes"] - info["alias_bytes"] + info["temp_bytes"]
    programs[label] = info
  acc = opt_state.acc_grads if isinstance(opt_state, optax.MultiStepsState) else None
  return {
    "programs": programs,
    "state_bytes": state_bytes,
    "accumulator_bytes": _tree_bytes(acc) if acc is not None else 0,
    "transient_bytes": transient_bytes,
    "temp_bytes": max((p.get("temp_bytes", -1) for p in programs.values()), default=-1),
    "peak_bytes": max((p.get("peak_bytes", -1) for p in programs.values()), default=-1),
  }


def _time_updates(c: Contender, state: Any, number: int) -> tuple[Any, float]:
  start = time.perf_counter()
  for _ in range(number):
    state, _ = c.update(state)
  jax.block_until_ready(state)
  return state, (time.perf_counter() - start) / number


def time_contenders(
  contenders: dict[str, Contender], params: Any, batch_stats: Any, repeats: int, min_time: float
) -> tuple[dict[str, list[float]], dict[str, int]]:
  """Seconds per full-batch update of every contender, ``repeats`` times, in a rotating order, and the number
  of updates each timing averages: each contender's own, so that every timing lasts about ``min_time`` (a
  contender 10x faster than the baseline would otherwise be timed on single updates, and its ratios would
  be mostly noise)."""
  states = {n: c.init(params, batch_stats) for n, c in contenders.items()}
  for n, c in contenders.items():  # warm-up (compiles)
    states[n], _ = _time_updates(c, states[n], 1)
  numbers = {}
  for n, c in contenders.items():  # a first estimate, compiled
    states[n], t = _time_updates(c, states[n], 1)
    numbers[n] = max(1, math.ceil(min_time / max(t, 1e-6)))
  times: dict[str, list[float]] = {n: [] for n in contenders}
  names = list(contenders)
  for r in range(repeats):
    for n in names[r % len(names) :] + names[: r % len(names)]:
      states[n], t = _time_updates(contenders[n], states[n], numbers[n])
      times[n].append(t)
    print(f"  repeat {r + 1}/{repeats} done", file=sys.stderr, flush=True)
  return times, numbers


# ------------------------------------------------------------------------------------------------
# Peak resident-set growth and the compiler's buffer assignment, one fresh process per contender
# ------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def rss_growth(c: Contender, state: Any, updates: int = 3) -> int:
  """Bytes by which the resident set's high-water mark grows during an update (the largest of ``updates``).

  Meaningful when the process runs with ``MALLOC_MMAP_THRESHOLD_`` small (as :func:`measure_in_subprocesses`
  sets it): every large buffer is then mapped when allocated and unmapped when freed, so the resident
  set follows the live buffers instead of what the allocator keeps cached.
  """
  state, _ = c.update(state)
  jax.block_until_ready(state)
  growth = 0
  for _ in range(updates):
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
    state, _ = c.update(state)
    jax.block_until_ready(state)
    growth = max(growth, (_status_kib("VmHWM") - before) * 1024)
  return growth


def buffer_peak(dump_dir: str | os.PathLike[str], module: str, top: int = 8) -> dict[str, Any] | None:
  """The peak of the LIVE temporaries of a compiled module, from XLA's dumped buffer assignment.

  ``memory_analysis()`` reports the size of the temporary heap, whose layout XLA's heap simulator
  packs: two programs with the same live buffers can differ by the holes it leaves. This reads the
  module's ``*-buffer-assignment.txt`` (each value's offset and size in the temporary allocation)
  and ``*-live-range.txt`` (each value's first and last position in the schedule) that
  ``XLA_FLAGS=--xla_dump_to=DIR`` writes, and finds the schedule position where the occupied bytes
  (the union of the live values' byte ranges, so values sharing a buffer count once) are largest.

  Args:
    dump_dir: the ``--xla_dump_to`` folder.
    module: the HLO module name, e.g. ``jit_host_micro``.
    top: how many of the largest values live at the peak to list.

  Returns:
    ``{"heap_bytes", "live_temp_bytes", "at", "top": [[bytes, shape, value], ...]}``, or None when
    the dump files are missing.
  """
  files = sorted(pathlib.Path(dump_dir).glob(f"*.{module}.*after_optimizations-buffer-assignment.txt"))
  if not files:
    return None
  assignment = files[0].read_text()
  live_range = pathlib.Path(str(files[0]).replace("-buffer-assignment.txt", "-live-range.txt")).read_text()
  values: dict[str, tuple[int, int, int, str]] = {}  # value -> (allocation, offset, size, shape)
  allocation, temp = -1, False
  for line in assignment.splitlines():
    if line.startswith("allocation "):
      allocation, temp = int(line.split()[1].rstrip(":")), "preallocated-temp" in line
      continue
    m = re.match(r"\s*value: <\d+ (\S+) @\S+> \(size=(\d+),offset=(\d+)\): (\S+)", line)
    if m and temp:
      name = m.group(1) if "{" in m.group(1) else m.group(1) + "{}"
      values[name] = (allocation, int(m.group(3)), int(m.group(2)), m.group(4))
  ranges = {
    m.group(1): (int(m.group(2)), int(m.group(3)))
    for m in re.finditer(r"^\s+(\S+\{[^}]*\}):(\d+)-(\d+)$", live_range, re.M)
    if m.group(1) in values
  }
  schedule = dict(re.findall(r"^\s+(\d+):(\S+)$", live_range, re.M))
  heap = sum(max(o + n for a, o, n, _ in values.values() if a == alloc) for alloc in {v[0] for v in values.values()})

  def occupied(t: int) -> tuple[int, list[str]]:
    spans = sorted((values[v][:2], values[v][1] + values[v][2], v) for v, (s, e) in ranges.items() if s <= t <= e)
    total, end, alloc, names = 0, -1, None, []
    for (a, lo), hi, v in spans:
      if a != alloc:
        alloc, end = a, -1
      if hi > end:
        total += hi - max(lo, end)
        end = hi
        names.append(v)
    return total, names

  if not ranges:
    return {"heap_bytes": heap, "live_temp_bytes": 0, "at": None, "top": []}
  t_max = max(e for _, e in ranges.values())
  best = max(range(t_max + 1), key=lambda t: occupied(t)[0])
  total, names = occupied(best)
  largest = sorted(names, key=lambda v: -values[v][2])[:top]
  return {
    "heap_bytes": heap,
    "live_temp_bytes": total,
    "at": schedule.get(str(best)),
    "top": [[values[v][2], values[v][3], v] for v in largest],
  }


def child_measure(c: Contender, params: Any, batch_stats: Any, rss: bool, dump_dir: str | None) -> dict[str, Any]:
  """What :func:`measure_in_subprocesses` asks of a fresh process: RSS growth and/or the buffer peaks."""
  state = c.init(params, batch_stats)
  mem = compile_contender(c, state)
  out: dict[str, Any] = {}
  if rss:
    out["rss_growth_bytes"] = rss_growth(c, state)
  if dump_dir:
    out["buffers"] = {label: buffer_peak(dump_dir, p["module"]) for label, p in mem["programs"].items()}
  return out


def measure_in_subprocesses(
  names: Sequence[str], argv: Sequence[str], rss: bool, buffers: bool, rss_runs: int = 3
) -> dict[str, dict[str, Any]]:
  """Runs :func:`child_measure` for each contender in a fresh process (its own allocator and XLA dump folder).

  The RSS growth is the median over ``rss_runs`` fresh processes per dispatch mode (every run's value is kept,
  under ``*_runs``): from one process to the next it can take one of two levels, depending on how the
  allocator's mappings fall, for MultiSteps as for jaxbn.
  """
  import tempfile

  def run(name: str, flags: list[str], dump: str | None) -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "16384"}
    if dump:
      flags = [*flags, "--child-dump", dump]
      env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_dump_to={dump}".strip()
    proc = subprocess.run(
      [sys.executable, __file__, *argv, "--child", name, *flags], capture_output=True, text=True, check=False, env=env
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("child-result ")]
    if proc.returncode or not lines:
      print(f"note: measurement of {name} in a subprocess failed: {proc.stderr[-500:]}", file=sys.stderr)
      return {}
    return json.loads(lines[-1].split(" ", 1)[1])

  out: dict[str, dict[str, Any]] = {}
  for name in names:
    with tempfile.TemporaryDirectory(prefix="jaxbn_full_batch_") as dump:
      out[name] = run(name, ["--child-rss"] if rss else [], dump if buffers else None)
    if not rss:
      continue
    runs = {
      "rss_growth_bytes": [out[name].pop("rss_growth_bytes", None)]
      + [run(name, ["--child-rss"], None).get("rss_growth_bytes") for _ in range(rss_runs - 1)],
      # synchronous dispatch: one call's buffers at a time
      "rss_growth_sync_bytes": [
        run(name, ["--child-rss", "--child-sync"], None).get("rss_growth_bytes") for _ in range(rss_runs)
      ],
    }
    for key, values in runs.items():
      values = [v for v in values if v is not None]  # a failed measurement (noted on stderr)
      if values:
        out[name][key], out[name][f"{key}_runs"] = int(np.median(values)), values
  return out


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
  return _machine.machine_info(("jax", "jaxlib", "flax", "optax", "jaxbn"))


def summarize(
  times: dict[str, list[float]], mem: dict[str, Any], agree: dict[str, Any], child: dict[str, dict[str, Any]]
) -> dict[str, Any]:
  """Per contender: time (median and per-repeat ratios to the baseline), memory, agreement, subprocess measurements.

  The exact batch-norm contender also gets its time ratio to jaxbn's ghost step on the same layers
  and loop (``time_ratio_vs_ghost``) and its number of sweeps over the micro-batches per update.
  """
  base = np.asarray(times[BASELINE])
  out = {}
  for name, ts in times.items():
    ratios = np.asarray(ts) / base
    m = mem[name]
    r = {
      "time_s": float(np.median(ts)),
      "steps_per_s": float(1.0 / np.median(ts)),
      "time_ratio": float(np.median(ratios)),
      "time_ratio_q25": float(np.percentile(ratios, 25)),
      "time_ratio_q75": float(np.percentile(ratios, 75)),
      "times_s": [float(t) for t in ts],
      **m,
      "peak_ratio": m["peak_bytes"] / mem[BASELINE]["peak_bytes"] if mem[BASELINE]["peak_bytes"] > 0 else None,
      "agreement": agree[name],
    }
    if name.startswith("jaxbn") and MULTISTEPS in times:
      vs = np.asarray(ts) / np.asarray(times[MULTISTEPS])
      r["time_ratio_vs_multisteps"] = float(np.median(vs))
      r["time_ratio_vs_multisteps_q25"] = float(np.percentile(vs, 25))
      r["time_ratio_vs_multisteps_q75"] = float(np.percentile(vs, 75))
    measured = child.get(name, {})
    for key in ("rss_growth_bytes", "rss_growth_sync_bytes", "rss_growth_bytes_runs", "rss_growth_sync_bytes_runs"):
      if key in measured:
        r[key] = measured[key]
    buffers = measured.get("buffers") or {}
    if buffers and all(buffers.get(label) for label in m["programs"]):
      for label, b in buffers.items():
        p = r["programs"][label]
        p["buffers"] = b
        p["peak_live_bytes"] = p["live_bytes"] + p["output_bytes"] - p["alias_bytes"] + b["live_temp_bytes"]
      r["peak_live_bytes"] = max(p["peak_live_bytes"] for p in r["programs"].values())
    out[name] = r
  if EXACT in out:
    programs = out[EXACT]["programs"]
    if "update" in programs:  # the host loop: start/each/finish programs per sweep, and the update
      out[EXACT]["sweeps"] = len({label.rsplit(" ", 1)[0] for label in programs if label != "update"})
    else:
      out[EXACT]["sweeps"] = sum(p["while_loops"] * p["calls_per_update"] for p in programs.values())
    if EXACT_REFERENCE in times:
      ghost = np.asarray(times[EXACT]) / np.asarray(times[EXACT_REFERENCE])
      out[EXACT]["time_ratio_vs_ghost"] = float(np.median(ghost))
      out[EXACT]["time_ratio_vs_ghost_q25"] = float(np.percentile(ghost, 25))
      out[EXACT]["time_ratio_vs_ghost_q75"] = float(np.percentile(ghost, 75))
      ref = out[EXACT_REFERENCE]
      out[EXACT]["peak_ratio_vs_ghost"] = out[EXACT]["peak_bytes"] / ref["peak_bytes"]
      if "peak_live_bytes" in out[EXACT] and "peak_live_bytes" in ref:
        out[EXACT]["peak_live_ratio_vs_ghost"] = out[EXACT]["peak_live_bytes"] / ref["peak_live_bytes"]
  return out


TARGET_CONTENDERS = ("jaxbn", "jaxbn + jaxbn BN", "jaxbn host loop", "jaxbn host loop + jaxbn BN")


def evaluate_targets(results: dict[str, Any], layers: int = 0) -> dict[str, dict[str, Any]]:
  """The targets for jaxbn's step: no slower than the hand-written loop; the default loop no slower than
  optax.MultiSteps; less memory than MultiSteps (compiled peak; peak of live buffers when measured;
  state between updates); exact batch norm at most ``(2L + 1) / 2`` times its ghost step, plus 15%."""
  out = {}
  ms = results.get(MULTISTEPS)
  for lib in TARGET_CONTENDERS:
    r = results.get(lib)
    if r is None:
      continue
    # "No slower": within the noise of interleaved medians on a shared machine.
    t = {"time_ratio_vs_hand_written<=1.05": {"value": r["time_ratio"], "ok": r["time_ratio"] <= 1.05}}
    if lib in DEFAULTS and "time_ratio_vs_multisteps" in r:
      v = r["time_ratio_vs_multisteps"]
      t["time_ratio_vs_multisteps<=1.05"] = {"value": v, "ok": v <= 1.05}
    if ms is not None and ms["peak_bytes"] > 0:
      for key in ("peak_bytes", "peak_live_bytes", "state_bytes", "rss_growth_bytes", "rss_growth_sync_bytes"):
        if key in r and key in ms:
          if not (r[key] and ms[key]):  # a failed measurement
            continue
          ratio = r[key] / ms[key]
          t[f"{key}_vs_multisteps<1"] = {"value": ratio, "ok": ratio < 1.0}
    out[lib] = t
  ex = results.get(EXACT)
  if ex is not None and "time_ratio_vs_ghost" in ex and layers:
    bound = (2 * layers + 1) / 2 * 1.15
    v = ex["time_ratio_vs_ghost"]
    out[EXACT] = {f"time_ratio_vs_ghost<=(2L+1)/2*1.15={bound:.2f}": {"value": v, "ok": v <= bound}}
  return out


def _kib(b: int | None) -> str:
  return "n/a" if b is None or b < 0 else f"{b / 1024:.0f}"


def _vs_multisteps(r: dict[str, Any]) -> str:
  if "time_ratio_vs_multisteps" not in r:
    return ""
  q = f"{r['time_ratio_vs_multisteps_q25']:.2f}-{r['time_ratio_vs_multisteps_q75']:.2f}"
  return f"{r['time_ratio_vs_multisteps']:.2f} ({q})"


def _largest_program(r: dict[str, Any], key: str = "peak_bytes") -> tuple[str, dict[str, Any]]:
  return max(r["programs"].items(), key=lambda kv: kv[1].get(key, -1))


def _shapes(top: list[list[Any]]) -> str:
  counts: dict[str, int] = {}
  for _, shape, _ in top:
    shape = shape.split("{")[0]
    counts[shape] = counts.get(shape, 0) + 1
  return ", ".join(f"{n}x {shape}" if n > 1 else shape for shape, n in counts.items())


def markdown(result: dict[str, Any]) -> str:
  m, cfg, res = result["machine"], result["config"], result["results"]
  load = m.get("load_average_1min")
  live = any("peak_live_bytes" in r for r in res.values())
  lines = [
    f"Machine: {m['device']} ({m['backend']}; {m['cpu']}, {m['cpu_count']} cores"
    + (f", load average {load:.1f}" if load is not None else "")
    + f"), jax {m['versions']['jax']}, flax {m['versions']['flax']}, optax {m['versions']['optax']}; {m['date']}.",
    "",
    f"Data: {cfg['examples']} x {cfg['length']} x 1 ({cfg['data']}), {NUM_CLASSES} classes; CNN with "
    f"{cfg['channels']} channels; micro-batches of {cfg['micro_batch_size']} ({cfg['micro_batches']} per update); "
    f"{cfg['repeats']} interleaved repeats, each timing {min(result['number'].values())}-"
    f"{max(result['number'].values())} updates (each contender as many as last about {cfg['min_time']} s); "
    f"medians of per-repeat ratios to {BASELINE}.",
    "",
    "| contender | updates/s | time ratio (q25-q75) | vs MultiSteps | peak est. KiB | peak ratio | "
    + ("peak live KiB | " if live else "")
    + "state KiB (accum.) | largest temp KiB | RSS growth KiB (sync) | loss diff | params diff |",
    "|---|---:|---:|---:|---:|---:|" + ("---:|" if live else "") + "---:|---:|---:|---:|---:|",
  ]
  for name, r in res.items():
    a = r["agreement"]
    acc = f" ({_kib(r['accumulator_bytes'])})" if r["accumulator_bytes"] else ""
    pr = "n/a" if r["peak_ratio"] is None else f"{r['peak_ratio']:.2f}"
    diffs = (
      f"{a['loss_rel_diff']:.1e} | {a['params_rel_diff']:.1e}"
      if a.get("checked", "agreement") == "agreement"
      else "other objective | other objective"
    )
    lines.append(
      f"| {name} | {r['steps_per_s']:.1f} | {r['time_ratio']:.2f} ({r['time_ratio_q25']:.2f}-{r['time_ratio_q75']:.2f}) "
      f"| {_vs_multisteps(r)} | {_kib(r['peak_bytes'])} | {pr} | "
      + (f"{_kib(r.get('peak_live_bytes'))} | " if live else "")
      + f"{_kib(r['state_bytes'])}{acc} | {_kib(r['temp_bytes'])} | {_kib(r.get('rss_growth_bytes'))}"
      + (f" ({_kib(r['rss_growth_sync_bytes'])})" if "rss_growth_sync_bytes" in r else "")
      + f" | {diffs} |"
    )
  lines += [
    "",
    "Peak est.: the largest, over the compiled programs of an update, of the bytes alive when the program starts "
    "(state, the dataset once, the host loop's accumulators; at least the program's arguments) + its outputs not "
    "written in place + its temporaries (memory_analysis). "
    + (
      "Peak live: the same with the temporaries' heap replaced by the peak of the temporaries actually live at "
      "one time (XLA's buffer assignment and live ranges), i.e. without the holes of the heap's packing. "
      if live
      else ""
    )
    + "RSS growth: peak resident-set growth of an update in a fresh process (every buffer over 16 KiB mapped "
    "separately), with the default asynchronous dispatch, which lets the next call of a multi-call update "
    "allocate before the previous one has freed, and (in brackets) with synchronous dispatch; the median of "
    f"{cfg.get('rss_runs', 1)} processes each (every value in the JSON). "
    "State: params, batch statistics and optimizer state kept between updates (MultiSteps' gradient accumulator "
    f"in brackets). Loss/params diff: max relative difference to {BASELINE} after {cfg['check_steps']} updates "
    "from the same start. Running statistics differ by design (EMA per micro-batch vs one exact update per step); "
    "their relative difference: "
    + ", ".join(
      f"{n} {r['agreement']['batch_stats_rel_diff']:.2f}"
      for n, r in res.items()
      if n != BASELINE and r["agreement"].get("checked", "agreement") == "agreement"
    )
    + ".",
    "",
  ]
  if live:
    lines += [
      "**Temporaries of the largest program** (heap = memory_analysis' temp size; live = peak of the buffers live "
      "at one time; the largest buffers live at that point)",
      "",
      "| contender | program | heap KiB | live KiB | holes KiB | largest live buffers at the peak |",
      "|---|---|---:|---:|---:|---|",
    ]
    for name, r in res.items():
      label, p = _largest_program(r, "peak_live_bytes")
      b = p.get("buffers")
      if b:
        lines.append(
          f"| {name} | {label} | {_kib(b['heap_bytes'])} | {_kib(b['live_temp_bytes'])} "
          f"| {_kib(b['heap_bytes'] - b['live_temp_bytes'])} | {_shapes(b['top'])} |"
        )
    lines.append("")
  ex = res.get(EXACT)
  if ex is not None and "time_ratio_vs_ghost" in ex:
    lines += [
      f"**Exact batch norm** ({EXACT}: bn_mode='exact', statistics over all {cfg['examples']} rows) against "
      f"{EXACT_REFERENCE} (ghost batch norm per micro-batch, same layers and loop):",
      "",
      f"- time per update: {ex['time_ratio_vs_ghost']:.2f}x ({ex['time_ratio_vs_ghost_q25']:.2f}-"
      f"{ex['time_ratio_vs_ghost_q75']:.2f}), {ex['time_s']:.2f} s;",
      f"- sweeps over the micro-batches per update: {ex['sweeps']} (sweep programs of the host loop, or while "
      "loops in the compiled step; "
      f"2L + 1 = {2 * cfg['batch_norm_layers'] + 1} for L = {cfg['batch_norm_layers']} batch-norm layers);",
      f"- compiled peak: {_kib(ex['peak_bytes'])} KiB, {ex['peak_ratio_vs_ghost']:.2f}x"
      + (
        f"; peak live {_kib(ex['peak_live_bytes'])} KiB, {ex['peak_live_ratio_vs_ghost']:.2f}x"
        if "peak_live_ratio_vs_ghost" in ex
        else ""
      )
      + ";",
      f"- losses over {cfg['check_steps']} updates: "
      + ", ".join(f"{v:.4f}" for v in ex["agreement"]["losses"])
      + f" (finite; {BASELINE}: "
      + ", ".join(f"{v:.4f}" for v in res[BASELINE]["agreement"]["losses"])
      + ").",
      "",
    ]
  if result.get("targets"):
    for lib, targets in result["targets"].items():
      lines += [f"**Targets ({lib})**", ""]
      for name, t in targets.items():
        lines.append(f"- {name}: {t['value']:.3f} {'met' if t['ok'] else 'NOT met'}")
      lines.append("")
  lines += ["Contenders:", ""] + [f"- {n}: {NOTES[n]}" for n in res]
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true", help="smaller data and fewer repeats (smoke run, < 20 s)")
  p.add_argument(
    "--streaming", action="store_true", help="run benchmarks/streaming.py instead (data on disk, streamed)"
  )
  p.add_argument(
    "--communication",
    action="store_true",
    help="run benchmarks/communication.py instead (bytes per step on 8 devices, M = 1, 4, 16)",
  )
  p.add_argument("--diagnose", action="store_true", help=f"add the diagnostic variants {', '.join(DIAGNOSTICS)}")
  p.add_argument("--contenders", type=lambda s: tuple(s.split(",")), help="comma-separated subset (baseline kept)")
  p.add_argument("--examples", type=int, help="dataset size (4000)")
  p.add_argument("--length", type=int, default=40, help="sequence length (40)")
  p.add_argument("--micro-batch", type=int, help="micro-batch size (500)")
  p.add_argument("--channels", type=int, help="CNN channels (32)")
  p.add_argument("--repeats", type=int, help="interleaved repeats")
  p.add_argument("--check-steps", type=int, default=3, help="updates compared before timing")
  p.add_argument("--mnist1d", action="store_true", help="train on the real MNIST-1D (needs the mnist1d package)")
  p.add_argument(
    "--rss", action=argparse.BooleanOptionalAction, default=None, help="measure RSS growth (Linux; default: full run)"
  )
  p.add_argument(
    "--buffers",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="peak of the live temporaries from XLA's dumped buffer assignment (default: full run)",
  )
  p.add_argument("--rss-runs", type=int, default=3, help="fresh processes per RSS measurement, median reported (3)")
  p.add_argument("--child", help=argparse.SUPPRESS)
  p.add_argument("--child-rss", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--child-dump", help=argparse.SUPPRESS)
  p.add_argument("--child-sync", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--out", type=pathlib.Path, default=_HERE / "results", help="folder for the JSON and Markdown")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--streaming" in argv:  # a data set on disk through the streamed step: its own script and options
    import streaming

    return streaming.main([a for a in argv if a != "--streaming"])
  if "--communication" in argv:  # bytes moved between 8 devices per step: its own process (8 virtual devices)
    script = pathlib.Path(__file__).with_name("communication.py")
    rest = [a for a in argv if a != "--communication"]
    raise SystemExit(subprocess.call([sys.executable, str(script), *rest]))
  args = parse_args(argv)
  if args.child_sync:  # before the backend starts
    jax.config.update("jax_cpu_enable_async_dispatch", False)
  if args.quick:
    mode, defaults = "quick", dict(examples=512, micro=128, channels=8, repeats=3, min_time=0.02, rss=False)
  else:
    mode, defaults = "full", dict(examples=4000, micro=500, channels=32, repeats=9, min_time=0.3, rss=True)
  defaults["buffers"] = defaults["rss"]
  examples = args.examples or defaults["examples"]
  micro = args.micro_batch or defaults["micro"]
  channels = args.channels or defaults["channels"]
  repeats = args.repeats or defaults["repeats"]
  names = list(args.contenders or CONTENDERS) + (list(DIAGNOSTICS) if args.diagnose else [])
  names = [BASELINE] + [n for n in dict.fromkeys(names) if n != BASELINE]
  if args.child:
    names = [args.child]

  data = make_data(examples, args.length, mnist1d=args.mnist1d)
  length = int(data["x"].shape[1])  # MNIST-1D's own length with --mnist1d
  contenders, models = build_contenders(names, data, micro, channels)
  variables = jax.jit(functools.partial(models["flax"].init, train=False))(jax.random.key(0), data["x"][:2])
  params, batch_stats = variables["params"], variables["batch_stats"]

  if args.child:
    measured = child_measure(contenders[args.child], params, batch_stats, args.child_rss, args.child_dump)
    print("child-result " + json.dumps(measured))
    return measured

  start = time.perf_counter()
  print("compiling", file=sys.stderr, flush=True)
  mem = {name: compile_contender(c, c.init(params, batch_stats)) for name, c in contenders.items()}
  print(f"checking agreement over {args.check_steps} updates", file=sys.stderr, flush=True)
  agree = check_agreement(contenders, params, batch_stats, args.check_steps)
  print(f"compiled and checked in {time.perf_counter() - start:.0f} s; timing", file=sys.stderr, flush=True)
  times, numbers = time_contenders(contenders, params, batch_stats, repeats, defaults["min_time"])
  measure_rss = (defaults["rss"] if args.rss is None else args.rss) and sys.platform.startswith("linux")
  measure_buffers = defaults["buffers"] if args.buffers is None else args.buffers
  child: dict[str, dict[str, Any]] = {}
  if measure_rss or measure_buffers:
    what = " and ".join(w for w, on in (("RSS growth", measure_rss), ("buffer peaks", measure_buffers)) if on)
    print(f"measuring {what}, one process per contender", file=sys.stderr, flush=True)
    child_argv = [a for a in argv if a not in ("--rss", "--no-rss", "--buffers", "--no-buffers")]
    child = measure_in_subprocesses(list(contenders), child_argv, measure_rss, measure_buffers, args.rss_runs)
  results = summarize(times, mem, agree, child)

  result: dict[str, Any] = {
    "machine": machine_info(),
    "config": {
      "mode": mode,
      "examples": examples,
      "length": length,
      "data": "MNIST-1D" if args.mnist1d else "random, MNIST-1D-shaped",
      "micro_batch_size": micro,
      "micro_batches": math.ceil(examples / micro),
      "channels": channels,
      "optimizer": f"sgd(lr={LEARNING_RATE}, momentum=0.9, nesterov=True)",
      "batch_norm_momentum": MOMENTUM,
      "batch_norm_layers": len(batch_stats),
      "repeats": repeats,
      "min_time": defaults["min_time"],
      "check_steps": args.check_steps,
      "rss_runs": args.rss_runs if measure_rss else 0,
    },
    "baseline": BASELINE,
    "contenders": list(contenders),
    "number": numbers,
    "results": results,
    "targets": evaluate_targets(results, len(batch_stats)),
  }
  result["wall_s"] = time.perf_counter() - start
  _machine.write_results(args.out, "full_batch_quick" if args.quick else "full_batch", result, markdown)
  return result


if __name__ == "__main__":
  main()
