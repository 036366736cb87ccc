"""How a step runs its sweeps over the micro-batches: inside one compiled program, or from Python.

A sweep runs ``body(consts, i) -> (terms, outputs)`` for micro-batches ``i = 0 .. k-1``, sums the
``terms`` (onto ``init()``, zeros that type the scanned loop's carry), stacks the ``outputs`` along a
new leading axis and returns ``finish(consts, terms, outputs)``. Every objective a
step differentiates (the ghost-batch gradient, exact batch norm's statistics, loss and adjoint sweeps,
and through forward-mode autodiff their Hessian-vector products) is written once in terms of sweeps;
a loop decides how a sweep executes:

* :class:`ScanLoop` (``loop="scan"``): a ``lax.scan`` inside the caller's trace, so the whole step is
  one compiled program (traceable into ``jax.pmap``/``jax.shard_map``).
* :class:`HostLoop` (``loop="host"``): compiled programs called once per micro-batch from Python,
  the running sum and the stacked outputs donated from call to call; the first micro-batch's program
  starts them, the last one's ends with ``finish``, so nothing but the calls runs from Python.
  ``jax.jvp`` through a sweep (Hessian-vector products for the sharpness) calls compiled JVPs of the
  same programs, traced in forward mode so that jaxbn's batch norms take their twice-differentiable
  path there.

Both give the same numbers up to float rounding. They differ in speed: XLA:CPU leaves some
convolutions inside a ``while`` loop's body in a layout its slow generic emitter runs
(jax-ml/jax#12868), several times slower than the same convolutions in a program of their own, which
is what :class:`HostLoop` runs (``benchmarks/full_batch.py``). ``loop="auto"`` picks the host loop on
the CPU backend and the scanned one elsewhere (:func:`resolve_loop`).

A body (and ``finish``) must be a function of its arguments only: :class:`HostLoop` compiles it the
first time a sweep of that label runs and reuses the program for every later sweep of the label, so
an array it closed over would be frozen at its first value. :class:`HostLoop` refuses a body or
``finish`` that closes over an array.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.core import Tracer
from jax.custom_derivatives import SymbolicZero
from jax.sharding import NamedSharding

Body = Callable[[Any, jax.Array], tuple[Any, Any]]
"""``body(consts, i) -> (terms, outputs)`` for micro-batch ``i``."""

Finish = Callable[[Any, Any, Any], Any]
"""``finish(consts, terms, outputs)``: the sweep's result from the summed terms and the stacked outputs."""

LOOPS = ("auto", "scan", "host")


def resolve_loop(fn: str, loop: Any, *, traced: bool) -> str:
  """``"scan"`` or ``"host"`` for a step's ``loop`` argument; ``traced``: the step is traced into pmap/shard_map.

  ``"auto"`` is the host loop on the CPU backend (where XLA runs convolutions inside loops slowly)
  unless the step must be one traceable function, and the scanned loop on GPU and TPU, where one
  program per step saves the per-call dispatch.
  """
  if loop not in LOOPS:
    raise ValueError(f"{fn}: loop must be one of {LOOPS}, got {loop!r}.")
  if loop == "auto":
    return "host" if jax.default_backend() == "cpu" and not traced else "scan"
  return loop


def _pair(consts: Any, terms: Any, outputs: Any) -> tuple[Any, Any]:
  del consts
  return terms, outputs


class ScanLoop:
  """Sweeps as ``lax.scan`` loops inside the caller's trace (see the module)."""

  def sweep(
    self,
    label: str,
    k: int,
    body: Body,
    consts: Any,
    init: Callable[[], Any] | None = None,
    finish: Finish = _pair,
  ) -> Any:
    """``finish(consts, terms, outputs)`` of ``body``'s summed terms and stacked outputs over micro-batches ``0..k-1``."""
    del label  # one program for the whole step: nothing to name
    if k == 1:
      # No loop for one micro-batch: XLA:CPU leaves a convolution's kernel gradient inside a while
      # loop in a slow, uncanonicalized form (30x slower for a Conv1D), even at trip count 1.
      terms, outputs = body(consts, jnp.int32(0))
      return finish(consts, terms, jax.tree.map(lambda a: jnp.expand_dims(a, 0), outputs))

    def step(carry, i):
      terms, outputs = body(consts, i)
      return (None if carry is None else jax.tree.map(jnp.add, carry, terms)), outputs

    terms, outputs = lax.scan(step, None if init is None else init(), jnp.arange(k))
    return finish(consts, terms, outputs)


class HostLoop:
  """Sweeps as compiled programs called per micro-batch from Python (see the module).

  Attributes:
    programs: the compiled programs by label: a sweep's label with ``first``, ``next`` or ``last``
      (the micro-batch it runs for; ``only`` for a single one), `` jvp`` appended for its forward-mode
      derivative; and the step's ``update``.
    calls: per program, the argument types of its first call and its calls per sweep.
    memos: what the step works out from the loss's trace (e.g. its batch-norm calls), per input types.
  """

  def __init__(self) -> None:
    self.programs: dict[str, Any] = {}
    self.calls: dict[str, tuple[Any, int]] = {}
    self.memos: dict[Any, Any] = {}  # trace-time results by input types (MicroBatches.memo)
    self._compiled: dict[Any, Any] = {}

  def sweep(
    self,
    label: str,
    k: int,
    body: Body,
    consts: Any,
    init: Callable[[], Any] | None = None,
    finish: Finish = _pair,
  ) -> Any:
    """``finish(consts, terms, outputs)`` of ``body``'s summed terms and stacked outputs over micro-batches ``0..k-1``.

    ``init`` is not needed: the first micro-batch's terms start the sum.
    """
    del init
    if not any(isinstance(leaf, Tracer) for leaf in jax.tree.leaves(consts)):
      return self._run(label, k, body, finish, consts)
    run = jax.custom_jvp(functools.partial(self._run, label, k, body, finish))
    run.defjvp(functools.partial(self._run_jvp, label, k, body, finish), symbolic_zeros=True)
    return run(consts)

  def _program(self, label: str, k: int, body: Body, finish: Finish, i: int, active: Any = None) -> Any:
    """The compiled program for micro-batch ``i`` of ``k`` (first, next, last or only); with ``active``,
    its JVP along the consts' leaves marked there."""
    part = "only" if k == 1 else "first" if i == 0 else "last" if i == k - 1 else "next"
    name = f"{label} {part}" + ("" if active is None else f" jvp {sum(active[1])}")
    key = (name, k, active)
    program = self._compiled.get(key)
    if program is None:
      _refuse_closed_over_arrays(label, body, finish)
      fn = functools.partial(_call, body, finish, k, i == 0, i == k - 1)
      carried = 0 < i < k - 1  # the running sum and stacked outputs pass through in place; the last ends them
      if active is None:
        program = jax.jit(_named(fn, name), donate_argnums=(1,) if carried else ())
      else:
        program = jax.jit(
          _named(functools.partial(_call_jvp, fn, active), name), donate_argnums=(2, 3) if carried else ()
        )
      self._compiled[key] = self.programs[name] = program
    return program, name

  def _run(self, label: str, k: int, body: Body, finish: Finish, consts: Any) -> Any:
    carry = None
    for i in range(k):
      program, name = self._program(label, k, body, finish, i)
      if name not in self.calls:
        self.calls[name] = (types_of((consts, carry, np.int32(i))), max(k - 2, 1) if name.endswith("next") else 1)
      carry = program(consts, carry, np.int32(i))
    return carry

  def _run_jvp(self, label: str, k: int, body: Body, finish: Finish, primals: Any, tangents: Any) -> tuple[Any, Any]:
    """The sweep and its tangent through compiled JVPs of the programs, differentiating only the consts'
    leaves whose tangent is not a symbolic zero (the data, the counts and the key stay constant)."""
    (consts,), (t_consts,) = primals, tangents
    leaves, tree = jax.tree.flatten(consts)
    t_leaves = tree.flatten_up_to(t_consts)
    active = tuple(not isinstance(t, SymbolicZero) for t in t_leaves)
    moving = [t for t, a in zip(t_leaves, active, strict=True) if a]
    carry = t_carry = None
    for i in range(k):
      program, _ = self._program(label, k, body, finish, i, (tree, active))
      carry, t_carry = program(leaves, moving, carry, t_carry, np.int32(i))
    return carry, t_carry


def _call(body: Body, finish: Finish, k: int, first: bool, last: bool, consts: Any, carry: Any, i: Any) -> Any:
  """Micro-batch ``i``: its terms added to the running sum and its outputs written into the stacked ones;
  the first one starts both, the last one returns ``finish`` of them."""
  terms, outputs = body(consts, i)
  if first:
    stacked = jax.tree.map(lambda o: jnp.zeros((k, *jnp.shape(o)), o.dtype).at[0].set(o), outputs)
  else:
    total, stacked = carry
    terms = None if terms is None else jax.tree.map(jnp.add, total, terms)
    stacked = jax.tree.map(lambda s, o: lax.dynamic_update_index_in_dim(s, o, i, 0), stacked, outputs)
  return finish(consts, terms, stacked) if last else (terms, stacked)


def _call_jvp(fn: Any, active: Any, leaves: list[Any], moving: list[Any], carry: Any, t_carry: Any, i: Any) -> Any:
  """``fn(consts, carry, i)`` and its JVP along the tangents ``moving`` of the ``active`` leaves of the consts."""
  tree, mask = active

  def f(primals: list[Any], carry: Any) -> Any:
    it = iter(primals)
    full = [next(it) if a else leaf for leaf, a in zip(leaves, mask, strict=True)]
    return fn(tree.unflatten(full), carry, i)

  primals = [leaf for leaf, a in zip(leaves, mask, strict=True) if a]
  if carry is None:
    return jax.jvp(lambda p: f(p, None), (primals,), (moving,))
  return jax.jvp(f, (primals, carry), (moving, t_carry))


def _named(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
  """``fn`` under ``name`` (as an identifier), which names its compiled program (``jit_<name>``) in profiles and dumps."""

  def program(*args: Any) -> Any:
    return fn(*args)

  program.__name__ = program.__qualname__ = "".join(c if c.isalnum() else "_" for c in name)
  return program


def types_of(tree: Any) -> Any:
  """``tree``'s arrays as ``jax.ShapeDtypeStruct`` (with their mesh shardings), e.g. to compile a program ahead of time."""

  def struct(a: Any) -> jax.ShapeDtypeStruct:
    sharding = getattr(a, "sharding", None)
    return jax.ShapeDtypeStruct(
      np.shape(a), a.dtype, sharding=sharding if isinstance(sharding, NamedSharding) else None
    )

  return jax.tree.map(struct, tree)


def _refuse_closed_over_arrays(label: str, *fns: Callable[..., Any]) -> None:
  """A body or finish that closes over an array would be compiled with that array's first value: refuse it."""
  for fn in fns:
    cells = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())]
    if isinstance(fn, functools.partial):
      cells += [fn.func, *fn.args, *fn.keywords.values()]
    for value in cells:
      if any(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in jax.tree.leaves(value)):
        raise AssertionError(f"sweep {label!r}: a function closes over an array; pass it in consts instead.")
