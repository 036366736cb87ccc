"""Proves from a jaxpr that a loss is a function of each row on its own (no batch statistics left).

``bn_mode="exact"`` in :mod:`jaxbn.training` replaces the statistics of jaxbn's batch norms with
statistics over the whole dataset. Its gradient is exact only if nothing else in the loss mixes
rows: a batch norm that is not jaxbn's (Haiku's, Equinox's, a hand-written one) would still
normalize each micro-batch by itself. :func:`mixing_of_rows` walks the loss's jaxpr with an
abstract value per variable and finds where rows meet.

The abstract values: ``None`` (does not depend on any row), ``(axis, tag)`` (element ``j`` along
``axis`` depends on row ``j`` alone, in the row order ``tag`` names; other axes hold one row's
features), ``MIXED`` (depends on several rows, e.g. a sum over rows) and ``UNKNOWN`` (an operation
this analysis does not follow). The loss may reduce over rows (its mean is ``MIXED``); a
``MIXED`` value that meets a per-row one again (``x - mean(x)``) mixes rows, as does combining rows
in different orders. A loss whose value ends ``UNKNOWN`` cannot be proven row by row.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import numpy as np
from jax.extend import core

from jaxbn._sharding import source_location

MIXED = "mixed"
UNKNOWN = "unknown"

_COLLECTIVES = {"psum", "pmax", "pmin", "pmean", "psum_invariant"}
_IDENTITY = {
  "copy",
  "copy_p",
  "sharding_constraint",
  "mesh_cast",
  "pvary",
  "pcast",
  "optimization_barrier",
  "reduce_precision",
  "stop_gradient",
}
_SCANS = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}


class RowsMixed(Exception):
  """Raised where an operation mixes rows; ``where`` describes the operation."""

  def __init__(self, where: str):
    super().__init__(where)
    self.where = where


def _describe(eqn: Any) -> str:
  place = source_location(eqn)
  return f"{eqn.primitive.name}" + (f" at {place}" if place else "")


def _rowwise(value: Any) -> bool:
  return isinstance(value, tuple)


class _Walker:
  def __init__(self):
    self.tags = itertools.count(1)
    self.lost: str | None = None  # the first operation the analysis could not follow

  def fresh(self, axis: int) -> tuple[int, int]:
    return (axis, next(self.tags))

  def unknown(self, eqn: Any) -> str:
    if self.lost is None:
      self.lost = _describe(eqn)
    return UNKNOWN

  def jaxpr(self, jaxpr: Any, inputs: list[Any]) -> list[Any]:
    if isinstance(jaxpr, core.ClosedJaxpr):
      jaxpr = jaxpr.jaxpr
    env: dict[Any, Any] = {}
    for var in jaxpr.constvars:
      env[var] = None
    for var, value in zip(jaxpr.invars, inputs, strict=True):
      env[var] = value
    read = lambda v: None if isinstance(v, core.Literal) else env.get(v)
    for eqn in jaxpr.eqns:
      outs = self.eqn(eqn, [read(v) for v in eqn.invars])
      for var, value in zip(eqn.outvars, outs, strict=True):
        env[var] = value
    return [read(v) for v in jaxpr.outvars]

  def eqn(self, eqn: Any, ins: list[Any]) -> list[Any]:
    n_out = len(eqn.outvars)
    if all(v is None for v in ins):
      return [None] * n_out
    if any(v == UNKNOWN for v in ins):
      return [UNKNOWN] * n_out
    name = eqn.primitive.name
    shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
    out_shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars]
    params = eqn.params
    rule = getattr(self, f"_{name}", None)
    if rule is not None:
      return rule(eqn, ins, shapes, out_shapes, params)
    if name in _IDENTITY and len(ins) == n_out:
      return list(ins)
    if name in _COLLECTIVES:
      return [MIXED] * n_out  # a sum over devices' rows
    if name in _SCANS:
      (x,) = ins
      if x == MIXED or x[0] == params["axis"]:
        return [MIXED]
      return [x]
    sub = _sub_jaxpr(eqn)
    if sub is not None:
      return self.jaxpr(sub, ins)
    if "axes" in params and len(ins) == 1 and n_out == 1:  # reductions: reduce_*, argmax, argmin
      return [self._reduce(ins[0], tuple(params["axes"]))]
    # Elementwise: every operand of the output's shape, a scalar, or of its rank with sizes 1 to broadcast.
    if n_out == 1 and all(_broadcasts_to(s, out_shapes[0]) for s in shapes):
      for v, s in zip(ins, shapes, strict=True):
        if _rowwise(v) and s[v[0]] != out_shapes[0][v[0]]:
          raise RowsMixed(_describe(eqn))  # one row broadcast over all rows
      return [self.combine(eqn, ins)]
    return [self.unknown(eqn)] * n_out

  def combine(self, eqn: Any, values: list[Any]) -> Any:
    """The value of an elementwise combination; rows meeting other rows or a sum over rows mix."""
    values = [v for v in values if v is not None]
    if not values:
      return None
    rows = {v for v in values if _rowwise(v)}
    if MIXED in values and rows:
      raise RowsMixed(_describe(eqn))
    if len(rows) > 1:
      raise RowsMixed(_describe(eqn))
    return rows.pop() if rows else MIXED

  @staticmethod
  def _reduce(x: Any, axes: tuple[int, ...]) -> Any:
    if x == MIXED:
      return MIXED
    axis, tag = x
    if axis in axes:
      return MIXED
    return (axis - sum(a < axis for a in axes), tag)

  # ---- structural operations -------------------------------------------------------------------

  def _broadcast_in_dim(self, eqn, ins, shapes, out_shapes, params):
    x = ins[0]
    if x == MIXED or x is None:
      return [x]
    axis, tag = x
    if shapes[0][axis] != out_shapes[0][params["broadcast_dimensions"][axis]]:
      return [self.unknown(eqn)]  # one row copied along the row axis
    return [(params["broadcast_dimensions"][axis], tag)]

  def _reshape(self, eqn, ins, shapes, out_shapes, params):
    x = ins[0]
    if x == MIXED or params.get("dimensions") is not None:
      return [x if x == MIXED else self.unknown(eqn)]
    axis, tag = x
    before = int(np.prod(shapes[0][:axis], dtype=np.int64))
    rows = shapes[0][axis]
    out = out_shapes[0]
    for k in range(len(out)):
      if int(np.prod(out[:k], dtype=np.int64)) == before and out[k] % rows == 0:
        return [(k, tag)]  # the row axis kept, perhaps merged with the axes after it
    return [self.unknown(eqn)]  # rows split across axes (e.g. ghost batches)

  def _squeeze(self, eqn, ins, shapes, out_shapes, params):
    x = ins[0]
    if x == MIXED:
      return [x]
    axis, tag = x
    dims = [d % len(shapes[0]) for d in params["dimensions"]]
    if axis in dims:
      return [self.unknown(eqn)]
    return [(axis - sum(d < axis for d in dims), tag)]

  def _transpose(self, eqn, ins, shapes, out_shapes, params):
    x = ins[0]
    if x == MIXED:
      return [x]
    return [(list(params["permutation"]).index(x[0]), x[1])]

  def _rev(self, eqn, ins, shapes, out_shapes, params):
    x = ins[0]
    if x == MIXED:
      return [x]
    return [self.fresh(x[0]) if x[0] in params["dimensions"] else x]

  def _slice(self, eqn, ins, shapes, out_shapes, params):
    x = ins[0]
    if x == MIXED:
      return [x]
    axis, _ = x
    return [x if shapes[0][axis] == out_shapes[0][axis] else self.fresh(axis)]

  def _dynamic_slice(self, eqn, ins, shapes, out_shapes, params):
    x, *starts = ins
    if any(s is not None for s in starts) or x is None:
      return [self.unknown(eqn)]
    return self._slice(eqn, [x], shapes, out_shapes, params)

  def _pad(self, eqn, ins, shapes, out_shapes, params):
    x, fill = ins
    if fill is not None:
      return [self.unknown(eqn)]
    if x == MIXED:
      return [x]
    axis, _ = x
    lo, hi, interior = params["padding_config"][axis]
    return [x if (lo, hi, interior) == (0, 0, 0) else self.fresh(axis)]

  def _concatenate(self, eqn, ins, shapes, out_shapes, params):
    dim = params["dimension"]
    rows = [v for v in ins if v is not None]
    if any(v == MIXED for v in rows):
      return [self.combine(eqn, rows)]
    axes = {v[0] for v in rows}
    if axes == {dim}:
      return [self.fresh(dim)]
    return [self.combine(eqn, rows)]

  def _split(self, eqn, ins, shapes, out_shapes, params):
    x = ins[0]
    if x == MIXED:
      return [x] * len(out_shapes)
    return [self.fresh(x[0]) if x[0] == params["axis"] else x for _ in out_shapes]

  def _select_n(self, eqn, ins, shapes, out_shapes, params):
    return [self.combine(eqn, ins)]

  def _sort(self, eqn, ins, shapes, out_shapes, params):
    value = self.combine(eqn, ins)
    if value == MIXED or (value is not None and value[0] == params["dimension"]):
      return [MIXED] * len(out_shapes)
    return [value] * len(out_shapes)

  def _top_k(self, eqn, ins, shapes, out_shapes, params):
    x = ins[0]
    last = len(shapes[0]) - 1
    return [MIXED if x == MIXED or x[0] == last else x] * len(out_shapes)

  def _dot_general(self, eqn, ins, shapes, out_shapes, params):
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    lhs, rhs = ins
    if MIXED in (lhs, rhs):
      if _rowwise(lhs) or _rowwise(rhs):
        raise RowsMixed(_describe(eqn))  # e.g. rows times a matrix made from all rows
      return [MIXED]
    l_free = [d for d in range(len(shapes[0])) if d not in lc and d not in lb]
    r_free = [d for d in range(len(shapes[1])) if d not in rc and d not in rb]

    def position(x, contracting, batch, free, offset):
      axis, tag = x
      if axis in contracting:
        return MIXED
      if axis in batch:
        return (list(batch).index(axis), tag)
      return (offset + free.index(axis), tag)

    if lhs is not None and rhs is not None:
      if lhs[0] in lb and rhs[0] in rb and list(lb).index(lhs[0]) == list(rb).index(rhs[0]) and lhs[1] == rhs[1]:
        return [(list(lb).index(lhs[0]), lhs[1])]
      raise RowsMixed(_describe(eqn))
    if lhs is not None:
      return [position(lhs, lc, lb, l_free, len(lb))]
    return [position(rhs, rc, rb, r_free, len(lb) + len(l_free))]

  def _conv_general_dilated(self, eqn, ins, shapes, out_shapes, params):
    lhs, rhs = ins
    numbers = params["dimension_numbers"]
    if rhs is not None or params.get("batch_group_count", 1) != 1:
      return [self.unknown(eqn)]
    if lhs == MIXED:
      return [MIXED]
    if lhs[0] != numbers.lhs_spec[0]:
      return [MIXED]  # rows along an axis the convolution slides over
    return [(numbers.out_spec[0], lhs[1])]

  def _reduce_window(self, eqn, ins, shapes, out_shapes, params):
    x = ins[0]
    if x == MIXED:
      return [MIXED] * len(out_shapes)
    if x is None or any(v is not None for v in ins[1:]):
      return [self.unknown(eqn)] * len(out_shapes)
    axis = x[0]
    window = params["window_dimensions"][axis]
    stride = params["window_strides"][axis]
    pad = tuple(params["padding"][axis])
    dilation = params.get("window_dilation", (1,) * len(shapes[0]))[axis]
    if (window, stride, pad, dilation) == (1, 1, (0, 0), 1):
      return [x] * len(out_shapes)
    return [MIXED] * len(out_shapes)

  _reduce_window_sum = _reduce_window
  _reduce_window_max = _reduce_window
  _reduce_window_min = _reduce_window

  def _gather(self, eqn, ins, shapes, out_shapes, params):
    operand, indices = ins
    numbers = params["dimension_numbers"]
    out_rank = len(out_shapes[0])
    out_batch = [i for i in range(out_rank) if i not in numbers.offset_dims]
    if operand == MIXED or indices == MIXED:
      return [self.combine(eqn, [operand, indices])]
    result = None
    if indices is not None:
      axis, tag = indices
      if axis == len(shapes[1]) - 1:
        return [self.unknown(eqn)]  # rows pick the index itself
      result = (out_batch[axis], tag)
    if operand is not None:
      axis, tag = operand
      batching = list(numbers.operand_batching_dims)
      if axis in batching:
        paired = numbers.start_indices_batching_dims[batching.index(axis)]
        if indices is not None and indices != (paired, tag):
          raise RowsMixed(_describe(eqn))
        return [(out_batch[paired], tag)]
      if indices is not None:
        return [self.unknown(eqn)]
      offset = [d for d in range(len(shapes[0])) if d not in numbers.collapsed_slice_dims and d not in batching]
      if axis in numbers.start_index_map or axis not in offset or params["slice_sizes"][axis] != shapes[0][axis]:
        return [self.unknown(eqn)]
      return [(numbers.offset_dims[offset.index(axis)], tag)]
    return [result]

  # ---- control flow ------------------------------------------------------------------------------

  def _fixpoint(self, eqn, run, carry):
    for _ in range(4):
      out = run(carry)
      new = [_join(a, b) for a, b in zip(carry, out, strict=True)]
      if new == carry:
        return carry
      carry = new
    return [self.unknown(eqn)] * len(carry)

  def _scan(self, eqn, ins, shapes, out_shapes, params):
    nc, ncarry = params["num_consts"], params["num_carry"]
    consts, carry, xs = ins[:nc], ins[nc : nc + ncarry], ins[nc + ncarry :]
    sliced = []
    for x in xs:
      if _rowwise(x) and x[0] == 0:
        return [self.unknown(eqn)] * len(out_shapes)  # a loop over the rows themselves
      sliced.append((x[0] - 1, x[1]) if _rowwise(x) else x)
    body = params["jaxpr"]
    carry = self._fixpoint(eqn, lambda c: self.jaxpr(body, [*consts, *c, *sliced])[:ncarry], list(carry))
    outs = self.jaxpr(body, [*consts, *carry, *sliced])
    ys = [(y[0] + 1, y[1]) if _rowwise(y) else y for y in outs[ncarry:]]
    return [*carry, *ys]

  def _while(self, eqn, ins, shapes, out_shapes, params):
    cn, bn = params["cond_nconsts"], params["body_nconsts"]
    cconsts, bconsts, carry = ins[:cn], ins[cn : cn + bn], ins[cn + bn :]
    carry = self._fixpoint(eqn, lambda c: self.jaxpr(params["body_jaxpr"], [*bconsts, *c]), list(carry))
    (pred,) = self.jaxpr(params["cond_jaxpr"], [*cconsts, *carry])
    if pred is not None and any(c is not None for c in carry):
      return [self.unknown(eqn)] * len(carry)
    return carry

  def _cond(self, eqn, ins, shapes, out_shapes, params):
    index, *operands = ins
    outs = [self.jaxpr(branch, operands) for branch in params["branches"]]
    joined = [_join_all(vals) for vals in zip(*outs, strict=True)]
    if index is not None and any(v is not None for v in joined):
      return [self.unknown(eqn)] * len(joined)
    if UNKNOWN in joined:
      self.unknown(eqn)
    return joined


def _broadcasts_to(shape: tuple[int, ...], out: tuple[int, ...]) -> bool:
  return shape == () or (len(shape) == len(out) and all(s in (o, 1) for s, o in zip(shape, out, strict=True)))


def _join(a: Any, b: Any) -> Any:
  if a == b or b is None:
    return a
  if a is None:
    return b
  return UNKNOWN


def _join_all(values: Any) -> Any:
  out = None
  for v in values:
    out = _join(out, v)
  return out


def _sub_jaxpr(eqn: Any) -> Any:
  """The jaxpr a call-like primitive (jit, remat, custom_jvp/vjp calls) runs on its operands."""
  for value in eqn.params.values():
    if isinstance(value, (core.ClosedJaxpr, core.Jaxpr)):
      jaxpr = value.jaxpr if isinstance(value, core.ClosedJaxpr) else value
      if len(jaxpr.invars) == len(eqn.invars) and len(jaxpr.outvars) == len(eqn.outvars):
        return value
  return None


def mixing_of_rows(fun: Any, args: tuple[Any, ...], row_args: tuple[bool, ...]) -> tuple[str, str] | None:
  """Why ``fun(*args)``'s first output is not a function of each row on its own, or None if it is.

  Args:
    fun: the function (e.g. a loss on one micro-batch, with every batch norm's statistics fixed).
    args: its arguments, arrays or pytrees (abstract values welcome).
    row_args: for each argument, whether its leaves hold rows along their leading axis.

  Returns:
    None when the first output provably depends on the rows only through per-row terms reduced
    at the end; else ``("mixes", where)`` for an operation that mixes rows, or
    ``("unknown", where)`` for the first operation on rows this analysis cannot follow.
  """
  closed = jax.make_jaxpr(fun)(*args)
  inputs = []
  for arg, rows in zip(args, row_args, strict=True):
    for leaf in jax.tree.leaves(arg):
      inputs.append((0, 0) if rows and np.ndim(leaf) else None)
  walker = _Walker()
  try:
    out = walker.jaxpr(closed, inputs)[0]
  except RowsMixed as err:
    return ("mixes", err.where)
  if out == UNKNOWN:
    return ("unknown", walker.lost or "an operation on the rows")
  return None
