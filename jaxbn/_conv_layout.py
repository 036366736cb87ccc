"""Convolutions in the layout XLA:CPU runs fast, for functions traced into a loop's body.

XLA:CPU runs a convolution through its fast (Eigen) kernel only when its operands are in the
canonical layout: input ``(batch, spatial..., feature)``, kernel ``(spatial..., in, out)``, output
``(batch, spatial..., feature)``. Its ``ConvCanonicalization`` pass puts every other convolution in that
layout with transposes around it, but it visits only a program's entry computation
(``xla/service/cpu/conv_canonicalization.cc``), so a convolution inside a ``while`` loop's body keeps
its layout and runs on the slow generic emitter. Autodiff makes such convolutions: the gradient of a
``(batch, spatial, feature)`` convolution with respect to its kernel contracts over the batch, a
``(feature, spatial, batch)`` input (jax-ml/jax#12868). A CNN's gradient inside ``lax.scan`` then runs
tens of times slower on CPU than the same gradient in a program of its own.

:func:`canonical_convolutions` re-traces a function with each such convolution written as XLA's
pass would write it: the operands transposed to the canonical layout, the canonical convolution, the
output transposed back. The mathematics is unchanged (the same products and sums; the fast kernel
may add them in another order, as it does in a program of its own). The jaxprs of nested calls
(``jax.jit`` inside the function), loops, conditionals and rematerialized blocks are rewritten in
place, their other parameters (shardings, donation, policies) kept. Only the CPU backend needs it;
elsewhere :func:`canonical_convolutions` returns the function as it is. The scanned loop of
:mod:`jaxbn.training.loops` applies it to its body, :func:`jaxbn.top_hessian_eigenvalue` to the
Hessian-vector products inside its Lanczos or power-iteration loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax import lax
from jax.core import eval_jaxpr
from jax.extend import core as jcore


def canonical_convolutions(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` with its convolutions (and those of what it calls) in XLA:CPU's canonical layout.

  ``fn`` itself off the CPU backend, whose compilers lay convolutions out in every computation. On
  CPU, ``fn`` is traced once per call and its jaxpr evaluated, rewritten where a convolution is not in
  the canonical layout, as traced where none is (so a second application changes nothing); every
  array it reads (arguments and closed-over values, tracers of an enclosing trace included) becomes an
  input of the rewritten computation, so the result is ``fn``'s.
  """
  if jax.default_backend() != "cpu":
    return fn

  def wrapped(*args: Any) -> Any:
    closed, shape = jax.make_jaxpr(lambda: fn(*args), return_shape=True)()
    if _needs_rewrite(closed.jaxpr):
      out = _evaluate(closed.jaxpr, closed.consts, ())
    else:  # evaluated as traced: no second trace of fn
      out = eval_jaxpr(closed.jaxpr, closed.consts)
    return jax.tree.unflatten(jax.tree.structure(shape), out)

  return wrapped


def _canonical_specs(n: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """``lax.ConvDimensionNumbers`` specs of the canonical layout for ``n`` spatial dimensions."""
  spatial = tuple(range(1, n + 1))
  return (0, n + 1, *spatial), (n + 1, n, *range(n)), (0, n + 1, *spatial)


def _is_canonical(dn: lax.ConvDimensionNumbers) -> bool:
  return (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) == _canonical_specs(len(dn.lhs_spec) - 2)


def _convolution(lhs: Any, rhs: Any, **params: Any) -> Any:
  """``conv_general_dilated`` with ``params``, run in the canonical layout between transposes."""
  dn = params["dimension_numbers"]
  if _is_canonical(dn):
    return lax.conv_general_dilated_p.bind(lhs, rhs, **params)
  n = len(dn.lhs_spec) - 2
  canonical = _canonical_specs(n)
  # Spatial dimensions keep their order, so the window parameters stay as they are.
  lhs = lax.transpose(lhs, (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))
  rhs = lax.transpose(rhs, (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0]))
  params = dict(params, dimension_numbers=lax.ConvDimensionNumbers(*canonical))
  out = lax.conv_general_dilated_p.bind(lhs, rhs, **params)
  back = [0] * (n + 2)  # output dimension d of the original is dimension back[d] of the canonical one
  back[dn.out_spec[0]], back[dn.out_spec[1]] = 0, n + 1
  for i, d in enumerate(dn.out_spec[2:]):
    back[d] = i + 1
  return lax.transpose(out, tuple(back))


def _sub_jaxprs(value: Any) -> list[jcore.Jaxpr]:
  if isinstance(value, jcore.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jcore.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def _needs_rewrite(jaxpr: jcore.Jaxpr) -> bool:
  """Whether ``jaxpr`` (or one of its sub-jaxprs) holds a convolution outside the canonical layout."""
  return any(
    not _is_canonical(eqn.params["dimension_numbers"])
    if eqn.primitive is lax.conv_general_dilated_p
    else any(_needs_rewrite(j) for p in eqn.params.values() for j in _sub_jaxprs(p))
    for eqn in jaxpr.eqns
  )


def _retrace(jaxpr: jcore.Jaxpr, consts: Sequence[Any]) -> jcore.ClosedJaxpr:
  avals: list[Any] = [v.aval for v in jaxpr.invars]  # ShapedArrays
  specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type) for a in avals]
  return jax.make_jaxpr(lambda *a: _evaluate(jaxpr, consts, a))(*specs)


def _same_outputs(a: jcore.Jaxpr, b: jcore.Jaxpr) -> bool:
  return [v.aval for v in a.outvars] == [v.aval for v in b.outvars]


def _rewrite_param(value: Any) -> Any:
  """A higher-order primitive's parameter with the convolutions of its jaxprs rewritten; unchanged if
  none needs it, or if the rewrite would change its type (an open jaxpr that gained constants)."""
  if isinstance(value, jcore.ClosedJaxpr) and _needs_rewrite(value.jaxpr):
    new = _retrace(value.jaxpr, value.consts)
    return new if _same_outputs(new.jaxpr, value.jaxpr) else value
  if isinstance(value, jcore.Jaxpr) and not value.constvars and _needs_rewrite(value):
    new = _retrace(value, ())
    return new.jaxpr if not new.consts and _same_outputs(new.jaxpr, value) else value
  if isinstance(value, tuple) and any(isinstance(v, (jcore.ClosedJaxpr, jcore.Jaxpr)) for v in value):
    return tuple(_rewrite_param(v) for v in value)
  return value


def _evaluate(jaxpr: jcore.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
  """``jaxpr`` evaluated in the current trace, its convolutions (and its sub-jaxprs') rewritten."""
  env: dict[Any, Any] = {}

  def read(v: Any) -> Any:
    return v.val if isinstance(v, jcore.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    inputs = [read(v) for v in eqn.invars]
    with eqn.ctx.manager:
      if eqn.primitive is lax.conv_general_dilated_p:
        outs = [_convolution(*inputs, **eqn.params)]
      else:
        params = eqn.primitive.get_bind_params({k: _rewrite_param(v) for k, v in eqn.params.items()})
        outs = eqn.primitive.bind(*inputs, **params)
        outs = outs if eqn.primitive.multiple_results else [outs]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]
