"""Scale-invariant weights: ``project_scale_invariant`` and the optimizers built on it, ``adamp`` and ``sgdp``.

A weight that feeds a batch norm only matters through its direction, so the radial part of its update only
shrinks the effective learning rate. The transformations here detect such weights on the fly, as AdamP and
SGDP do, and remove that part; ``jaxbn.transforms.masks.scale_invariant_mask`` finds them from the model
instead, to restrict the projection to them.

References:
  Heo, Chun, Oh, Han, Yun, Kim, Uh, Ha, "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
  Scale-invariant Weights", ICLR 2021.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbn import _checks
from jaxbn._trees import accumulation_dtype
from jaxbn.transforms._common import NAME, require_params, static_axis

__all__ = ["ProjectScaleInvariantState", "adamp", "project_scale_invariant", "sgdp"]


class ProjectScaleInvariantState(NamedTuple):
  """State of ``project_scale_invariant``.

  Attributes:
    inner_state: the state of the wrapped transformation (``optax.EmptyState()`` without one).
    view: per parameter leaf, an int32 scalar saying what the last update did: 0 no projection (and full
      weight decay), 1 projected per output channel, 2 projected on the whole tensor.
  """

  inner_state: Any
  view: Any


def _cosine_max(g: jax.Array, p: jax.Array, axes: tuple[int, ...], eps: jax.Array) -> jax.Array:
  """max |cos(g, p)| over the rows of a view, each norm clamped below at eps (as torch.cosine_similarity)."""
  gn = jnp.maximum(jnp.sqrt(jnp.sum(g * g, axis=axes, keepdims=True)), eps)
  pn = jnp.maximum(jnp.sqrt(jnp.sum(p * p, axis=axes, keepdims=True)), eps)
  return jnp.max(jnp.abs(jnp.sum((g / gn) * (p / pn), axis=axes)))


def _remove_radial(u: jax.Array, p: jax.Array, axes: tuple[int, ...], eps: jax.Array) -> jax.Array:
  """u - p_n <p_n, u> per row of the view, with p_n = p / (||p|| + eps)."""
  pn = p / (jnp.sqrt(jnp.sum(p * p, axis=axes, keepdims=True)) + eps)
  return u - pn * jnp.sum(pn * u, axis=axes, keepdims=True)


def _project_leaf(g, u, p, *, delta, wd_ratio, weight_decay, eps, channel_axis, fn):
  """One leaf: (projected update + decay, projected update, view), the updates in ``u``'s dtype."""
  cdt = accumulation_dtype(jnp.result_type(u, p))
  u32 = u.astype(cdt)
  p32 = p.astype(cdt)
  wd = jnp.asarray(weight_decay, cdt)
  if p.ndim <= 1:
    return (u32 + wd * p32).astype(u.dtype), u, jnp.zeros((), jnp.int32)
  if not -p.ndim <= channel_axis < p.ndim:
    raise ValueError(
      f"{fn}: channel_axis={channel_axis} is out of range for a parameter of shape {p.shape} "
      f"(valid axes are {-p.ndim}..{p.ndim - 1}); Flax kernels keep output channels last (channel_axis=None)."
    )
  if g.shape != p.shape or u.shape != p.shape:
    raise ValueError(
      f"{fn}: gradients, updates and params must have the same shapes, got {g.shape}, {u.shape} and {p.shape}."
    )
  g32 = g.astype(cdt)
  e = jnp.asarray(eps, cdt)
  d = jnp.asarray(delta, cdt)
  c = channel_axis % p.ndim
  channel = tuple(a for a in range(p.ndim) if a != c)
  layer = tuple(range(p.ndim))
  channel_size = int(np.prod([p.shape[a] for a in channel]))
  # AdamP's order: the channel view first, the layer view only when the channel test fails.
  use_channel = _cosine_max(g32, p32, channel, e) < d / np.sqrt(channel_size)
  use_layer = jnp.logical_not(use_channel) & (_cosine_max(g32, p32, layer, e) < d / np.sqrt(p.size))
  projected = jnp.where(
    use_channel, _remove_radial(u32, p32, channel, e), jnp.where(use_layer, _remove_radial(u32, p32, layer, e), u32)
  )
  ratio = jnp.where(use_channel | use_layer, jnp.asarray(wd_ratio, cdt), jnp.ones((), cdt))
  out = projected + wd * ratio * p32
  view = jnp.where(use_channel, 1, jnp.where(use_layer, 2, 0)).astype(jnp.int32)
  return out.astype(u.dtype), projected.astype(u.dtype), view


def _project_tree(fn: str, grads: Any, updates: Any, params: Any, **kwargs: Any) -> tuple[Any, Any, Any]:
  """``_project_leaf`` over the tree of ``params``: (updates with decay, projected updates, views)."""
  triples = jax.tree.map(lambda g, u, p: _project_leaf(g, u, p, fn=fn, **kwargs), grads, updates, params)
  treedef = jax.tree.structure(params)
  flat = treedef.flatten_up_to(triples)
  return tuple(treedef.unflatten([t[i] for t in flat]) for i in range(3))


def _check_projection(fn: str, delta: Any, wd_ratio: Any, weight_decay: Any, eps: Any) -> None:
  _checks.positive(fn, "eps", eps)
  for arg, value in (("delta", delta), ("wd_ratio", wd_ratio), ("weight_decay", weight_decay)):
    _checks.at_least(fn, arg, value, 0.0)


def _check_learning_rate(fn: str, learning_rate: Any) -> None:
  """A finite number (or array), or a schedule: a function of the step."""
  if not callable(learning_rate):
    _checks.finite(fn, "learning_rate", learning_rate)


def project_scale_invariant(
  delta: float = 0.1,
  wd_ratio: float = 0.1,
  *,
  inner: optax.GradientTransformation | None = None,
  weight_decay: float = 0.0,
  eps: float = 1e-8,
  channel_axis: int | None = None,
) -> optax.GradientTransformation:
  r"""Removes the radial part of the updates of scale-invariant weights, as AdamP and SGDP do.

  A weight :math:`w` that feeds a batch norm only matters through its direction: the loss satisfies
  :math:`L(\alpha w) = L(w)` for :math:`\alpha > 0`. Its gradient is then orthogonal to :math:`w`, but the
  momentum of an optimizer is not, and its radial component only grows :math:`\lVert w\rVert`, which
  shrinks the effective step size. Heo et al. detect such weights on the fly and project the update
  onto the tangent space: for every parameter with ``ndim > 1``,

  1. *channel view*: the rows are the output channels (the ``channel_axis`` slices of the tensor). If
     :math:`\max_\text{rows} |\cos(g, w)| < \delta / \sqrt{\text{row size}}`, every row of the update
     loses its component along :math:`w_n = w / (\lVert w\rVert + \epsilon)`:
     :math:`u \leftarrow u - w_n \langle w_n, u\rangle`;
  2. otherwise the *layer view* (one row, the whole tensor) gets the same test and projection;
  3. a projected weight gets weight decay ``weight_decay * wd_ratio``, the others ``weight_decay``.

  The cosine test uses the raw gradient :math:`g`, while the projection applies to the update of the
  optimizer. So the optimizer is passed as ``inner``: this transformation gives it the gradients, takes
  its updates and returns :math:`\text{proj}(\text{inner}(g)) + \text{weight\_decay} \cdot r \cdot w`
  (decoupled weight decay, in the units of ``inner``'s output, before any learning rate that follows it
  in a chain). Without ``inner`` the incoming updates serve as both gradient and update, which is exact
  when it comes first in the chain (plain SGD) or after transformations that only rescale them.

  What matches the reference PyTorch package ``adamp`` 0.3.0 exactly: the two views in that order, the
  threshold ``delta / sqrt(view_dim)``, the cosine with each norm clamped at ``eps``
  (``torch.nn.functional.cosine_similarity``), :math:`w_n = w/(\lVert w\rVert+\epsilon)`, the
  ``wd_ratio`` rule, and skipping parameters with ``ndim <= 1``. The one deliberate difference is the
  layout: the reference's output channels are axis 0 (PyTorch OIHW, ``(out, in)``), Flax kernels put them
  last (HWIO, ``(in, out)``), hence the default ``channel_axis=None``, the last axis.

  Args:
    delta: the cosine threshold :math:`\delta` (0.1 in the paper).
    wd_ratio: the weight decay multiplier for projected weights (0.1 in the paper).
    inner: the transformation whose updates are projected (e.g. ``optax.scale_by_adam()``), or None.
    weight_decay: decoupled weight decay added after the projection, in ``inner``'s output units.
    eps: the :math:`\epsilon` of the norms, as in the reference.
    channel_axis: the output-channel axis of the parameters with ``ndim > 1``; None (the default) is the
      last axis, Flax's layout; 0 is PyTorch's. With ``optax.inject_hyperparams`` an explicit int needs
      ``static_args=("channel_axis",)``.

  Returns:
    An ``optax.GradientTransformation`` with state ``ProjectScaleInvariantState``. Its update requires
    ``params``.

  Raises:
    TypeError: for a hyperparameter that is no number, or an ``inner`` that is no transformation.
    ValueError: for a negative (or NaN) ``delta``, ``wd_ratio`` or ``weight_decay``, a non-positive
      ``eps``; at trace time for ``params=None``, mismatched shapes or a ``channel_axis`` out of range.

  Examples:
    ``adamp`` and ``sgdp`` are this transformation around Adam's and SGD's updates. To restrict it to the
    weights known to be scale-invariant (instead of AdamP's on-the-fly test on every matrix), use
    ``optax.partition`` with ``scale_invariant_mask``; to keep weight decay off the batch-norm parameters
    use ``optax.masked``/``optax.adamw(mask=...)`` with ``batch_norm_mask``:

    >>> import jax, jax.numpy as jnp, optax
    >>> from jaxbn import transforms
    >>> tx = optax.chain(transforms.project_scale_invariant(inner=optax.scale_by_adam()),
    ...                  optax.scale_by_learning_rate(1e-3))
    >>> w = jnp.array([[3.0, 0.0], [4.0, 1.0]])  # (in, out): two output channels
    >>> g = jnp.array([[4.0, 0.0], [-3.0, 0.0]])  # orthogonal to channel 0, zero on channel 1
    >>> updates, state = tx.update(g, tx.init(w), w)
    >>> int(state[0].view)  # projected per output channel
    1
    >>> abs(float(jnp.sum(updates[:, 0] * w[:, 0]))) < 1e-8  # no radial component left
    True

  References:
    Heo, Chun, Oh, Han, Yun, Kim, Uh, Ha, "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
    Scale-invariant Weights", ICLR 2021.
  """
  fn = f"{NAME}.project_scale_invariant"
  _check_projection(fn, delta, wd_ratio, weight_decay, eps)
  channel_axis = static_axis(fn, channel_axis)
  if inner is not None and not isinstance(inner, optax.GradientTransformation):
    raise TypeError(f"{fn}: inner must be an optax.GradientTransformation or None, got {type(inner).__name__}.")

  def init_fn(params):
    inner_state = inner.init(params) if inner is not None else optax.EmptyState()
    return ProjectScaleInvariantState(inner_state, jax.tree.map(lambda _: jnp.zeros((), jnp.int32), params))

  def update_fn(updates, state, params=None):  # optax's parameter names: `updates` are the gradients here
    require_params(fn, params)
    grads = updates
    if inner is not None:
      updates, inner_state = inner.update(grads, state.inner_state, params)
    else:
      updates, inner_state = grads, state.inner_state
    new_updates, _, views = _project_tree(
      fn,
      grads,
      updates,
      params,
      delta=delta,
      wd_ratio=wd_ratio,
      weight_decay=weight_decay,
      eps=eps,
      channel_axis=channel_axis,
    )
    return new_updates, ProjectScaleInvariantState(inner_state, views)

  return optax.GradientTransformation(init_fn, update_fn)


def _scale_by_adamp_nesterov(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  """Adam's scaling with AdamP's Nesterov step: (b1*m_t + (1-b1)*g_t) / (1-b1^t) / (sqrt(v_t/(1-b2^t)) + eps).

  ``optax.scale_by_adam(nesterov=True)`` debiases the momentum term with ``1 - b1^(t+1)`` instead, which
  is a different (if close) trajectory, so the reference's variant is written out here.
  """

  def init_fn(params):
    return optax.ScaleByAdamState(
      jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.zeros_like, params)
    )

  def update_fn(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda m, g: (b1 * m + (1 - b1) * g).astype(m.dtype), state.mu, updates)
    nu = jax.tree.map(lambda v, g: (b2 * v + (1 - b2) * g * g).astype(v.dtype), state.nu, updates)
    count = optax.safe_increment(state.count)
    t = jnp.asarray(count, jnp.float32)
    bc1 = 1 - jnp.asarray(b1, jnp.float32) ** t
    bc2 = 1 - jnp.asarray(b2, jnp.float32) ** t

    def step(m, v, g):
      return ((b1 * m + (1 - b1) * g) / bc1 / (jnp.sqrt(v) / jnp.sqrt(bc2) + eps)).astype(g.dtype)

    return jax.tree.map(step, mu, nu, updates), optax.ScaleByAdamState(count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def adamp(
  learning_rate: optax.ScalarOrSchedule = 1e-3,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  *,
  weight_decay: float = 0.0,
  delta: float = 0.1,
  wd_ratio: float = 0.1,
  nesterov: bool = False,
  channel_axis: int | None = None,
) -> optax.GradientTransformation:
  r"""AdamP: Adam whose updates of scale-invariant weights lose their radial part (Heo et al., 2021).

  ``chain(project_scale_invariant(delta, wd_ratio, inner=scale_by_adam(b1, b2, eps), weight_decay,
  eps), scale_by_learning_rate(learning_rate))``: per step,
  :math:`w \leftarrow w - \eta\,(\text{proj}(\hat m / (\sqrt{\hat v} + \epsilon)) + \lambda r w)` with
  :math:`r` = ``wd_ratio`` for projected weights and 1 otherwise. With ``nesterov=True`` the momentum is
  AdamP's :math:`(\beta_1 m_t + (1-\beta_1) g_t)/(1-\beta_1^t)`. The same ``eps`` serves Adam's
  denominator and the projection, as in the reference.

  It reproduces the trajectories of ``adamp.AdamP`` 0.3.0 (PyTorch) within 1e-5 over 20 steps, with weight
  decay and with Nesterov, given the same parameters with Flax layouts (output channels last, see
  ``project_scale_invariant``); ``tests/peers/test_adamp.py`` checks it.

  Args:
    learning_rate: a float or an Optax schedule.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the denominator and to the norms of the projection.
    weight_decay: decoupled weight decay :math:`\lambda` (multiplied by the learning rate, as AdamW).
    delta: the cosine threshold of the scale-invariance test.
    wd_ratio: the weight decay multiplier of projected weights.
    nesterov: AdamP's Nesterov momentum.
    channel_axis: the output-channel axis of parameters with ``ndim > 1``; None: the last (Flax kernels).

  Returns:
    An ``optax.GradientTransformation``; it needs ``params`` in ``update``.

  Raises:
    TypeError: for a hyperparameter that is no number, or a ``nesterov`` that is no bool.
    ValueError: for ``b1`` or ``b2`` outside [0, 1), a learning rate that is not finite, or the ranges
      of :func:`project_scale_invariant`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from jaxbn import transforms
    >>> params = {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}
    >>> tx = optax.inject_hyperparams(transforms.adamp)(learning_rate=1e-3, weight_decay=1e-2)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
    >>> round(float(state.hyperparams["weight_decay"]), 6)
    0.01

  References:
    Heo, Chun, Oh, Han, Yun, Kim, Uh, Ha, "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
    Scale-invariant Weights", ICLR 2021.
    Kingma, Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015. Loshchilov, Hutter, "Decoupled Weight
    Decay Regularization", ICLR 2019.
  """
  fn = f"{NAME}.adamp"
  _check_learning_rate(fn, learning_rate)
  for arg, value in (("b1", b1), ("b2", b2)):
    _checks.in_range(fn, arg, value, 0.0, 1.0, hi_open=True)  # 1 - b**t is 0 for b = 1: no debiasing
  _check_projection(fn, delta, wd_ratio, weight_decay, eps)
  static_axis(fn, channel_axis)
  if _checks.static_bool(fn, "nesterov", nesterov):
    moments = _scale_by_adamp_nesterov(b1, b2, eps)
  else:
    moments = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  return optax.chain(
    project_scale_invariant(
      delta, wd_ratio, inner=moments, weight_decay=weight_decay, eps=eps, channel_axis=channel_axis
    ),
    optax.scale_by_learning_rate(learning_rate),
  )


def _scale_by_sgdp(
  momentum: Any,
  dampening: Any,
  nesterov: bool,
  weight_decay: Any,
  eps: Any,
  delta: Any,
  wd_ratio: Any,
  channel_axis: int,
) -> optax.GradientTransformation:
  """SGDP's step before the learning rate, with the reference's momentum buffer (see ``sgdp``)."""
  fn = f"{NAME}.sgdp"

  def init_fn(params):
    views = jax.tree.map(lambda _: jnp.zeros((), jnp.int32), params)
    return ProjectScaleInvariantState(optax.TraceState(trace=jax.tree.map(jnp.zeros_like, params)), views)

  def update_fn(updates, state, params=None):  # optax's parameter names: `updates` are the gradients here
    require_params(fn, params)
    grads = updates
    # optax.trace has no dampening, and Nesterov adds back the undamped gradient: not a rescaled trace.
    trace = jax.tree.map(
      lambda b, g: (momentum * b + (1 - dampening) * g).astype(b.dtype), state.inner_state.trace, grads
    )
    step = jax.tree.map(lambda g, b: (g + momentum * b).astype(g.dtype), grads, trace) if nesterov else trace
    updates, projected, views = _project_tree(
      fn,
      grads,
      step,
      params,
      delta=delta,
      wd_ratio=wd_ratio,
      weight_decay=weight_decay / (1 - momentum),
      eps=eps,
      channel_axis=channel_axis,
    )
    if not nesterov:
      # The reference projects its step in place, and without Nesterov the step is the buffer itself.
      trace = jax.tree.map(lambda b, q: q.astype(b.dtype), trace, projected)
    return updates, ProjectScaleInvariantState(optax.TraceState(trace=trace), views)

  return optax.GradientTransformation(init_fn, update_fn)


def sgdp(
  learning_rate: optax.ScalarOrSchedule,
  momentum: float = 0.0,
  *,
  dampening: float = 0.0,
  weight_decay: float = 0.0,
  nesterov: bool = False,
  eps: float = 1e-8,
  delta: float = 0.1,
  wd_ratio: float = 0.1,
  channel_axis: int | None = None,
) -> optax.GradientTransformation:
  r"""SGDP: SGD whose updates of scale-invariant weights lose their radial part (Heo et al., 2021).

  As ``adamp.SGDP`` 0.3.0: the momentum buffer :math:`b \leftarrow \mu b + (1 - \text{dampening})\, g`,
  the step :math:`d = g + \mu b` (Nesterov) or :math:`d = b`, projected by
  ``project_scale_invariant``, and the reference's decoupled weight decay
  :math:`w \leftarrow w\,(1 - \eta \lambda r / (1 - \mu))` with :math:`r` = ``wd_ratio`` for projected
  weights and 1 otherwise. Checked against the reference in ``tests/peers/test_adamp.py``.

  One behaviour of the reference is kept on purpose because its trajectories depend on it: it projects the
  step in place, and without Nesterov the step *is* the momentum buffer, so the buffer that carries over
  to the next step is the projected one (the paper's Algorithm keeps the unprojected momentum). With
  Nesterov the step is a new tensor and the buffer stays unprojected. ``adamp`` has no such aliasing.

  Args:
    learning_rate: a float or an Optax schedule.
    momentum: :math:`\mu` in [0, 1).
    dampening: dampening of the gradient in the momentum buffer.
    weight_decay: :math:`\lambda`, decoupled and divided by :math:`1 - \mu` as in the reference.
    nesterov: Nesterov momentum.
    eps: the :math:`\epsilon` of the projection.
    delta: the cosine threshold of the scale-invariance test.
    wd_ratio: the weight decay multiplier of projected weights.
    channel_axis: the output-channel axis of parameters with ``ndim > 1``; None: the last (Flax kernels).

  Returns:
    An ``optax.GradientTransformation``; it needs ``params`` in ``update``. Its first state is a
    ``ProjectScaleInvariantState`` whose ``inner_state`` is an ``optax.TraceState`` (the buffer).

  Raises:
    TypeError: for a hyperparameter that is no number, or a ``nesterov`` that is no bool.
    ValueError: for ``momentum`` outside [0, 1), a learning rate or ``dampening`` that is not finite, or
      the ranges of :func:`project_scale_invariant`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from jaxbn import transforms
    >>> tx = transforms.sgdp(0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    >>> w = {"kernel": jnp.array([[1.0], [0.0]])}
    >>> u, state = tx.update({"kernel": jnp.array([[0.0], [1.0]])}, tx.init(w), w)
    >>> u["kernel"]  # the gradient is tangent: projected, weight decay 5e-4 * 0.1 / (1 - 0.9)
    Array([[-5.0...e-05], [-1.9...e-01]], dtype=float32)

  References:
    Heo, Chun, Oh, Han, Yun, Kim, Uh, Ha, "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
    Scale-invariant Weights", ICLR 2021.
  """
  fn = f"{NAME}.sgdp"
  _check_learning_rate(fn, learning_rate)
  _checks.in_range(fn, "momentum", momentum, 0.0, 1.0, hi_open=True)  # the weight decay divides by 1 - momentum
  _checks.finite(fn, "dampening", dampening)
  _check_projection(fn, delta, wd_ratio, weight_decay, eps)
  nesterov = _checks.static_bool(fn, "nesterov", nesterov)
  return optax.chain(
    _scale_by_sgdp(momentum, dampening, nesterov, weight_decay, eps, delta, wd_ratio, static_axis(fn, channel_axis)),
    optax.scale_by_learning_rate(learning_rate),
  )
