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
  the running sum and the reduced outputs donated from call to call; a small program makes them
  empty (zeros of the types a micro-batch gives, found by an abstract trace), one program serves every
  micro-batch (the first one's sum starts where a later one adds), and a small one ends the sweep with
  ``finish``, so nothing but the calls runs from Python and the body is compiled once whatever the
  number of micro-batches. Its ``finish`` is :class:`Folded`: the
  outputs are reduced as they come (the statistics merged, the rest summed), so what a program
  carries does not grow with the number of micro-batches. Streamed data
  (:mod:`jaxbn.training.stream`) reaches the program for micro-batch ``i`` as its rows, the next
  micro-batch read from the host while that program runs.
  ``jax.jvp`` through a sweep (Hessian-vector products for the sharpness) calls compiled JVPs of the
  same programs, traced in forward mode so that jaxbn's batch norms take their twice-differentiable
  path there.

Both give the same numbers up to float rounding. :class:`ScanLoop` runs a step as one program, with no
dispatch per micro-batch, and is what ``loop="auto"`` picks (:func:`resolve_loop`); :class:`HostLoop`
is the one that streams data from the host. On CPU, XLA leaves the convolutions inside a ``while``
loop's body in the layout autodiff gave them, which its slow generic emitter runs (jax-ml/jax#12868),
tens of times slower than the same convolutions in a program of their own; :class:`ScanLoop`
therefore traces its body with every convolution in the layout XLA:CPU runs fast
(:mod:`jaxbn._conv_layout`), faster than the host loop (``benchmarks/full_batch.py``).

A body (and ``finish``) must be a function of its arguments only: :class:`HostLoop` compiles it the
first time a sweep of that label runs and reuses the program for every later sweep of the label, so
an array it closed over would be frozen at its first value. :class:`HostLoop` refuses a body or
``finish`` that closes over an array.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.core import Tracer
from jax.custom_derivatives import SymbolicZero
from jax.sharding import NamedSharding, PartitionSpec

from jaxbn import _conv_layout, _hooks
from jaxbn.training.stream import Rows, fed, is_stream, prefetch

Body = Callable[[Any, jax.Array], tuple[Any, Any]]
"""``body(consts, i) -> (terms, outputs)`` for micro-batch ``i``."""

Finish = Callable[[Any, Any, Any], Any]
"""``finish(consts, terms, outputs)``: the sweep's result from the summed terms and the stacked outputs."""

LOOPS = ("auto", "scan", "host")


@dataclasses.dataclass(frozen=True)
class Folded:
  """A sweep's ``finish`` whose outputs may be reduced as they come: ``reduce(stacked)`` turns outputs stacked
  along a leading axis of parts into one part (a leading axis of 1) that ``finish`` reads as it reads all of
  them. :class:`HostLoop` then carries one part from program to program, whatever the number of
  micro-batches; :class:`ScanLoop` stacks them all."""

  finish: Finish
  reduce: Callable[[Any], Any]

  def __call__(self, consts: Any, terms: Any, outputs: Any) -> Any:
    return self.finish(consts, terms, outputs)


def resolve_loop(fn: str, loop: Any) -> str:
  """``"scan"`` or ``"host"`` for a step's ``loop`` argument.

  ``"auto"`` is the scanned loop on every backend: one program per step, no per-call dispatch (its
  convolutions put in the layout XLA:CPU runs fast on CPU, :mod:`jaxbn._conv_layout`). Data on
  the host (:class:`jaxbn.training.HostData`) streams on the host loop instead, which the step routes
  when it sees it.
  """
  if loop not in LOOPS:
    raise ValueError(f"{fn}: loop must be one of {LOOPS}, got {loop!r}.")
  return "scan" if loop == "auto" else loop


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
      # No loop for one micro-batch: its convolutions are at the program's top level, where XLA puts
      # them in its fast layout itself.
      terms, outputs = body(consts, jnp.int32(0))
      return finish(consts, terms, jax.tree.map(lambda a: jnp.expand_dims(a, 0), outputs))

    body = _conv_layout.canonical_convolutions(body)  # as it is off CPU

    def step(carry, i):
      terms, outputs = body(consts, i)
      return (None if carry is None else jax.tree.map(jnp.add, carry, terms)), outputs

    terms, outputs = lax.scan(step, None if init is None else init(), jnp.arange(k))
    return finish(consts, terms, outputs)

  def memo(self, label: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``: a trace-time computation runs once per compilation of the step anyway."""
    del label
    return fn(*args)

  def local_rows(self, data: Any, n: int) -> int:
    """The rows of ``data`` (``n``) a sweep reads: all of them."""
    del data
    return n


class HostLoop:
  """Sweeps as compiled programs called per micro-batch from Python (see the module).

  With ``devices = (mesh, axes)``, every program runs per device, inside ``jax.shard_map`` over the
  mesh ``axes`` (see :meth:`per_device`): the sweeps then read one device's rows and keep each
  device's sums apart, and their programs are named with `` per device`` appended.

  Attributes:
    programs: the compiled programs by label: a sweep's label with ``start`` (the empty running sums),
      ``each`` (every micro-batch), ``finish`` (ending the sweep), or ``only`` for a single micro-batch,
      `` jvp`` appended for its forward-mode derivative; and the step's ``update``.
    calls: per program, the argument types of its first call and its calls per sweep.
    memos: what the step works out from the loss's trace (e.g. its batch-norm calls), per input types.
  """

  def __init__(self, devices: tuple[Any, tuple[str, ...]] | None = None, parent: HostLoop | None = None) -> None:
    self.programs: dict[str, Any] = {} if parent is None else parent.programs
    self.calls: dict[str, tuple[Any, int]] = {} if parent is None else parent.calls
    self.memos: dict[Any, Any] = {}  # trace-time results by input types (memo)
    self.devices = devices
    self.rows: frozenset[int] = frozenset()  # ids of the arrays whose rows are split over the devices
    self._compiled: dict[Any, Any] = {}
    self._children: dict[Any, HostLoop] = {}

  def per_device(self, mesh: Any, axes: tuple[str, ...]) -> HostLoop:
    """The loop whose programs run per device over ``mesh``'s ``axes`` (one per mesh and axes, sharing
    this loop's ``programs`` and ``calls``).

    Between its programs, a per-device value travels as a global array with a new leading axis, one
    entry per device, split over ``axes``; the data travels as the caller's arrays, whose rows
    are split over ``axes`` (``rows``, their ids, set by the caller for each evaluation); a NumPy
    scalar (the micro-batch index) is the same on every device.
    """
    key = (mesh, axes)
    if key not in self._children:
      self._children[key] = HostLoop((mesh, axes), parent=self)
    return self._children[key]

  def local_rows(self, data: Any, n: int) -> int:
    """The rows of ``data`` (``n``) a sweep reads: one device's share where ``data`` is the caller's arrays
    split over the devices, as seen from Python before the per-device programs run."""
    if self.devices is None or not any(id(a) in self.rows for a in jax.tree.leaves(data)):
      return n
    mesh, axes = self.devices
    return n // math.prod(mesh.shape[a] for a in axes)

  def call(self, name: str, fn: Callable[..., Any], args: Any, **jit_options: Any) -> Any:
    """``fn(args)`` as the compiled program ``name`` (compiled at its first call, with ``jit_options``)."""
    program = self._compiled.get(name)
    if program is None:
      program = self._compiled[name] = self.programs[name] = jax.jit(named(fn, name), **jit_options)
    if name not in self.calls:
      self.calls[name] = ((types_of(args),), 1)
    return program(args)

  def memo(self, label: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, remembered per ``label`` and the types and shardings of ``args``; per device, evaluated
    abstractly inside ``jax.shard_map`` (``fn`` must then return no arrays). Streamed data reaches ``fn`` as
    the types of one micro-batch."""
    args = fed(args, None)
    types = tuple((np.shape(a), a.dtype, getattr(a, "sharding", None)) for a in jax.tree.leaves(args))
    key = (label, jax.tree.structure(args), types)
    if key not in self.memos:
      if self.devices is None:
        self.memos[key] = fn(*args)
      else:
        found = []
        jax.eval_shape(self._spmd(lambda *local: found.append(fn(*local)), args), *args)
        self.memos[key] = found[0]
    return self.memos[key]

  def _spmd(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Callable[..., Any]:
    """``fn`` run per device inside ``jax.shard_map``, for arguments laid out as ``args`` (see :meth:`per_device`);
    its results come back with a leading device axis."""
    assert self.devices is not None
    mesh, axes = self.devices
    split = PartitionSpec(axes)
    leaves, tree = jax.tree.flatten(args)
    rows = self.rows | {id(a) for r in _rows_in(args) for a in jax.tree.leaves(r)}
    kinds = ["rows" if id(a) in rows else "same" if isinstance(a, (np.ndarray, np.generic)) else "each" for a in leaves]
    in_specs = tree.unflatten([PartitionSpec() if k == "same" else split for k in kinds])

    def local(*global_args: Any) -> Any:
      flat = [a[0] if k == "each" else a for a, k in zip(tree.flatten_up_to(global_args), kinds, strict=True)]
      with _hooks.split_batch(axes):
        out = fn(*tree.unflatten(flat))
      return jax.tree.map(lambda a: jnp.expand_dims(a, 0), out)

    return jax.shard_map(local, mesh=mesh, in_specs=tuple(in_specs), out_specs=split, axis_names=frozenset(axes))

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

    ``init`` is not needed: the first micro-batch's terms start the sum. ``finish`` must be :class:`Folded`.
    """
    del init
    if not isinstance(finish, Folded):
      raise TypeError(f"sweep {label!r}: the host loop reduces outputs as they come, so finish must be Folded.")
    if not any(isinstance(leaf, Tracer) for leaf in jax.tree.leaves(consts)):
      return self._run(label, k, body, finish, consts)
    run = jax.custom_jvp(functools.partial(self._run, label, k, body, finish))
    run.defjvp(functools.partial(self._run_jvp, label, k, body, finish), symbolic_zeros=True)
    return run(consts)

  def _program(self, label: str, body: Body, finish: Folded, part: str, args: Any, active: Any = None) -> Any:
    """The compiled program ``part`` of a sweep taking ``args``: ``"only"`` (the single micro-batch, then
    ``finish``), ``"start"`` (the empty sums), ``"each"`` (every micro-batch of several), ``"finish"``; with
    ``active``, its JVP along the consts' leaves marked there."""
    name = f"{label} {part}" + ("" if active is None else f" jvp {sum(active[1])}")
    name += "" if self.devices is None else " per device"
    # Per device, the program's shard_map specs follow the arguments' structure (in-memory or streamed data).
    key = (name, active, None if self.devices is None else jax.tree.structure(args))
    program = self._compiled.get(key)
    if program is None:
      _refuse_closed_over_arrays(label, body, finish.finish, finish.reduce)
      fn = {
        "start": functools.partial(_start, body, finish),
        "each": functools.partial(_call, body, finish, False),
        "only": functools.partial(_call, body, finish, True),
        "finish": functools.partial(_finish, finish),
      }[part]
      carried = part == "each"  # the running sums pass through in place ("finish" makes other shapes of them)
      if active is not None:
        fn = functools.partial(_call_jvp, fn, active)
      if self.devices is not None:
        fn = self._spmd(fn, args)
      donated = ((2, 3) if active is not None else (1,)) if carried else ()
      program = jax.jit(named(fn, name), donate_argnums=donated)
      self._compiled[key] = self.programs[name] = program
    return program, name

  def _run(self, label: str, k: int, body: Body, finish: Folded, consts: Any) -> Any:
    """One compiled program per micro-batch: the body is compiled once ("each", or "only"), whatever ``k``;
    small programs start ("start") and end ("finish") a sweep of several."""
    carry, current, streamed = None, consts, _streams(consts)
    for i, part in _parts(k):
      # Streamed data: micro-batch i's rows, put on the devices while micro-batch i - 1's program ran ("start"
      # and "finish" take the first or last micro-batch's: they read only the types of the data).
      current = fed(consts, i) if streamed and _reads(i, part) else current
      args = (current, carry, np.int32(i))
      program, name = self._program(label, body, finish, part, args)
      if name not in self.calls:
        self.calls[name] = (types_of(args), k if part == "each" else 1)
      carry = program(*args)
      if streamed and part in ("each", "only"):
        prefetch(consts, i, carry)  # streamed data: the next micro-batch, read while this program runs
    return carry

  def _run_jvp(self, label: str, k: int, body: Body, finish: Folded, primals: Any, tangents: Any) -> tuple[Any, Any]:
    """The sweep and its tangent through compiled JVPs of the programs, differentiating only the consts'
    leaves whose tangent is not a symbolic zero (the data, the counts and the key stay constant)."""
    (consts,), (t_consts,) = primals, tangents
    leaves, tree = jax.tree.flatten(consts, is_leaf=is_stream)
    t_leaves = tree.flatten_up_to(t_consts)
    active = tuple(not isinstance(t, SymbolicZero) and not is_stream(t) for t in t_leaves)
    moving = [t for t, a in zip(t_leaves, active, strict=True) if a]
    carry, t_carry, current, streamed = None, None, leaves, _streams(leaves)
    for i, part in _parts(k):
      current = fed(leaves, i) if streamed and _reads(i, part) else current
      args = (current, moving, carry, t_carry, np.int32(i))
      program, _ = self._program(label, body, finish, part, args, (tree, active))
      carry, t_carry = program(*args)
      if streamed and part in ("each", "only"):
        prefetch(leaves, i, (carry, t_carry))
    return carry, t_carry


def _streams(tree: Any) -> bool:
  """Whether ``tree`` holds streamed data (:class:`jaxbn.training.stream.Stream`), fed to a sweep's programs
  one micro-batch at a time; without, the programs take ``tree`` as it is (no per-call search)."""
  return any(is_stream(leaf) for leaf in jax.tree.leaves(tree, is_leaf=is_stream))


def _parts(k: int) -> list[tuple[int, str]]:
  """A sweep's programs in order: ``(micro-batch index, part)``; "start" and "finish" take the first and the
  last micro-batch's rows (for their types only)."""
  if k == 1:
    return [(0, "only")]
  return [(0, "start"), *((i, "each") for i in range(k)), (k - 1, "finish")]


def _reads(i: int, part: str) -> bool:
  """Whether the program ``part`` for micro-batch ``i`` needs the rows read for it (streamed data): the first
  micro-batch's are read once, for "start", and reused by its "each"; "finish" reuses the last's."""
  return part in ("start", "only") or (part == "each" and i > 0)


def _first(body: Body, finish: Folded, consts: Any, i: Any) -> Any:
  """Micro-batch ``i``'s terms and reduced outputs: the running sum and part it starts (and its outputs)."""
  terms, outputs = body(consts, i)
  outputs = jax.tree.map(lambda o: jnp.expand_dims(o, 0), outputs)
  return (terms, finish.reduce(outputs)), outputs


def _start(body: Body, finish: Folded, consts: Any, carry: Any, i: Any) -> Any:
  """The empty running sum and part: zeros of the types a micro-batch gives (traced abstractly, not computed)."""
  del carry
  types, _ = jax.eval_shape(functools.partial(_first, body, finish), consts, i)
  return jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), types)


def _call(body: Body, finish: Folded, only: bool, consts: Any, carry: Any, i: Any) -> Any:
  """Micro-batch ``i``: its terms added to the running sum and its outputs reduced with the part so far; a
  single micro-batch ends with ``finish`` of them. The first micro-batch's (``i == 0``) replace the empty
  ones from :func:`_start`, so that one program serves every micro-batch, with the numbers of a sum that
  starts at the first."""
  (terms, part), outputs = _first(body, finish, consts, i)
  if only:
    return finish(consts, terms, part)
  total, stacked = carry
  first = i == 0
  if terms is not None:
    terms = jax.tree.map(lambda s, t: jnp.where(first, t, s + t), total, terms)
  merged = finish.reduce(jax.tree.map(lambda s, o: jnp.concatenate([s, o]), stacked, outputs))
  return terms, jax.tree.map(lambda p, m: jnp.where(first, p, m), part, merged)


def _finish(finish: Folded, consts: Any, carry: Any, i: Any) -> Any:
  """The sweep's result from the running sum and the reduced outputs."""
  del i
  terms, part = carry
  return finish(consts, terms, part)


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


def _rows_in(tree: Any) -> list[Rows]:
  """The streamed micro-batches among ``tree``'s nodes (their rows are split over the devices)."""
  return [r for r in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, Rows)) if isinstance(r, Rows)]


def named(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
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
