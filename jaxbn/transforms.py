"""Optax gradient transformations against gradient explosion and for scale-invariant weights.

Each factory returns an ``optax.GradientTransformation`` whose state is a NamedTuple, so it chains with
any Optax optimizer (``optax.chain``), runs under ``jax.jit``, accepts ``optax.inject_hyperparams`` and
works on sharded parameters (all reductions are ordinary ``jnp`` reductions; XLA inserts the collectives).

Two ideas live here:

* **Running statistics of the gradient norm** (``clip_by_running_norm``): batch norm's explicit running
  mean and variance, applied to the global gradient norm to find spikes, as ZClip does.
* **Scale invariance** (``project_scale_invariant``, ``adamp``, ``sgdp``): a weight that feeds a batch
  norm only matters through its direction, so the radial part of its update only shrinks the effective
  learning rate; AdamP/SGDP remove it. ``scale_invariant_mask`` finds those weights from the model's
  dataflow and ``batch_norm_mask`` finds the batch-norm parameters (to exclude from weight decay).

What Optax already has is composed with, not re-implemented: ``optax.clip_by_global_norm`` (a hard cap),
``optax.adaptive_grad_clip``, ``optax.apply_if_finite`` (skip non-finite steps), ``optax.MultiSteps``
(gradient accumulation), ``optax.masked`` / ``optax.partition`` (apply to a subset of leaves) and
``optax.lars``. The docstrings below show how.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbn import _checks
from jaxbn._trees import accumulation_dtype, global_norm

__all__ = [
  "ClipByRunningNormState",
  "ProjectScaleInvariantState",
  "adamp",
  "batch_norm_mask",
  "clip_by_running_norm",
  "project_scale_invariant",
  "register_batch_norm",
  "scale_by_norm_damping",
  "scale_invariant_mask",
  "sgdp",
]

_NAME = "jaxbn.transforms"


def _static_axis(fn: str, channel_axis: Any) -> int:
  """``channel_axis`` as a Python int (None: -1, the last axis)."""
  if channel_axis is None:
    return -1
  if isinstance(channel_axis, (bool, np.bool_)):
    raise TypeError(f"{fn}: channel_axis must be an int, got {channel_axis!r}.")
  try:
    value = int(channel_axis)
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise TypeError(
      f"{fn}: channel_axis must be an int known at trace time, got {channel_axis!r}. Under "
      "optax.inject_hyperparams pass static_args=('channel_axis',), or leave it None (the last axis)."
    ) from None
  if value != channel_axis:
    raise TypeError(f"{fn}: channel_axis must be an int, got {channel_axis!r}.")
  return value


def _require_params(fn: str, params: Any) -> None:
  if params is None:
    raise ValueError(
      f"{fn}: the update needs the current parameters, got params=None. "
      f"Call tx.update(grads, opt_state, params) (nnx.Optimizer does this for you)."
    )


# --------------------------------------------------------------------------------------------------
# Running statistics of the gradient norm (ZClip).


class ClipByRunningNormState(NamedTuple):
  """State of ``clip_by_running_norm``.

  Attributes:
    count: int32 scalar, the number of finite norms folded into the statistics.
    mean: float32 scalar, the debiased running mean of the (effective) global gradient norm.
    var: float32 scalar, the debiased running variance of the (effective) global gradient norm.
    num_clipped: int32 scalar, how many updates were rescaled so far (for logging).
  """

  count: jax.Array
  mean: jax.Array
  var: jax.Array
  num_clipped: jax.Array


ClipMode = Literal["adaptive", "mean", "threshold"]
_CLIP_MODES = ("adaptive", "mean", "threshold")


def clip_by_running_norm(
  decay: float = 0.97,
  z_threshold: float = 2.5,
  *,
  warmup_steps: int = 25,
  mode: ClipMode = "adaptive",
  eps: float = 1e-6,
) -> optax.GradientTransformation:
  r"""Batch norm for the gradient norm: rescales updates whose norm is an outlier of its running statistics.

  Keeps a running mean :math:`\mu` and variance :math:`\sigma^2` of the global norm
  :math:`n = \lVert u \rVert_2` of the incoming updates and, once ``warmup_steps`` finite norms have been
  seen, treats a norm with z-score :math:`z = (n - \mu) / (\sigma + \text{eps}) > z_\text{thr}` as a spike
  and rescales the whole update to the norm :math:`n^*`:

  * ``mode="adaptive"`` (ZClip's default, "adaptive scaling"): :math:`n^* = \mu + z_\text{thr}^2\,\sigma / z`,
    so the larger the spike the closer the clipped norm is to the mean;
  * ``mode="mean"``: :math:`n^* = \mu`;
  * ``mode="threshold"`` (ZClip's "percentile" mode): :math:`n^* = \mu + z_\text{thr}\,\sigma`.

  The statistics are then updated with the effective norm (:math:`n^*` after a spike, :math:`n` otherwise),
  so one spike does not inflate the threshold for the next. They are a debiased exponential moving average
  (the zero-initialised EMA with decay :math:`\alpha` divided by :math:`1-\alpha^t`, written directly on the
  debiased values, as ``jaxbn.batch_norm(..., running_average="debiased_ema")``): with weight
  :math:`w_t = (1-\alpha)/(1-\alpha^t)` and :math:`d = n - \mu_{t-1}`,

  .. math::
     \mu_t = \mu_{t-1} + w_t d, \qquad \sigma^2_t = (1 - w_t)(\sigma^2_{t-1} + w_t d^2)

  (the exponentially weighted mean and variance of Finch 2009). At :math:`t=1` this is the first norm with
  variance 0, at :math:`t=2` the mean and biased variance of the first two norms when :math:`\alpha\to 1`,
  so the statistics are usable from the first steps and the warm-up only waits for them to settle. ZClip
  instead buffers the first 25 norms and initialises its (non-debiased) EMA from them; the two agree in
  spirit, not bit for bit.

  A non-finite norm (inf or NaN in the gradients) never enters the statistics and is passed through
  unchanged: wrap the chain in ``optax.apply_if_finite`` to skip such steps.

  Args:
    decay: the EMA decay :math:`\alpha` in [0, 1] (ZClip's ``alpha``, 0.97). ``decay=1`` gives the
      cumulative mean and variance of all norms.
    z_threshold: the z-score above which a norm is a spike (> 0; ZClip uses 2.5).
    warmup_steps: no clipping until this many finite norms are in the statistics (>= 1; ZClip uses 25).
    mode: how far a spike is scaled down: ``"adaptive"``, ``"mean"`` or ``"threshold"`` (see above).
    eps: added to the running standard deviation in the z-score, so a constant norm does not divide by 0.

  Returns:
    An ``optax.GradientTransformation`` with state ``ClipByRunningNormState``.

  Raises:
    TypeError: for a hyperparameter that is no number, or a fractional ``warmup_steps``.
    ValueError: for a ``decay`` outside [0, 1], a non-positive ``z_threshold`` or ``eps``,
      ``warmup_steps < 1`` or an unknown ``mode`` (NaN is out of every range).

  Examples:
    Place it first, where the updates are still gradients, and compose it with what Optax has: a hard
    cap (``optax.clip_by_global_norm``) and skipping of non-finite steps (``optax.apply_if_finite``):

    >>> import jax, jax.numpy as jnp, optax
    >>> from jaxbn import transforms
    >>> tx = optax.apply_if_finite(
    ...   optax.chain(transforms.clip_by_running_norm(warmup_steps=3), optax.clip_by_global_norm(10.0),
    ...               optax.sgd(0.1)),
    ...   max_consecutive_errors=5)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> for g in [1.0, 1.2, 0.8, 1.1, 50.0]:  # the last one is a spike
    ...   updates, state = tx.update({"w": jnp.array([g, 0.0])}, state, params)
    >>> updates["w"]  # -0.1 * n* with n* = mu + 2.5**2 * sigma / z, far below 0.1 * 50
    Array([-0.10..., -0.      ], dtype=float32)
    >>> clip_state = state.inner_state[0]
    >>> int(clip_state.count), int(clip_state.num_clipped)
    (5, 1)

    With gradient accumulation, put it inside ``optax.MultiSteps`` so that it sees the accumulated
    gradient: ``optax.MultiSteps(optax.chain(transforms.clip_by_running_norm(), optax.adam(1e-3)), 4)``.
    The hyperparameters can be scheduled: ``optax.inject_hyperparams(transforms.clip_by_running_norm)(
    z_threshold=3.0)``.

  References:
    Kumar, Owen, Chowdhury, Güra, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", arXiv:2504.02507,
    2025. Finch, "Incremental calculation of weighted mean and variance", University of Cambridge, 2009.
  """
  fn = f"{_NAME}.clip_by_running_norm"
  _checks.in_range(fn, "decay", decay, 0.0, 1.0)
  _checks.positive(fn, "z_threshold", z_threshold)
  _checks.positive(fn, "eps", eps)
  _checks.at_least(fn, "warmup_steps", warmup_steps, 1)
  if isinstance(warmup_steps, (float, np.floating)) and not float(warmup_steps).is_integer():
    raise TypeError(f"{fn}: warmup_steps must be an int (a number of norms), got {warmup_steps!r}.")
  if mode not in _CLIP_MODES:
    raise ValueError(f"{fn}: mode must be one of {_CLIP_MODES}, got {mode!r}.")

  def init_fn(params):
    del params
    zero = jnp.zeros((), jnp.float32)
    return ClipByRunningNormState(jnp.zeros((), jnp.int32), zero, zero, jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    norm = global_norm(updates).astype(jnp.float32)
    finite = jnp.isfinite(norm)
    std = jnp.sqrt(jnp.maximum(state.var, 0.0))
    zt = jnp.asarray(z_threshold, jnp.float32)
    z = (norm - state.mean) / (std + jnp.asarray(eps, jnp.float32))
    spike = finite & (state.count >= jnp.asarray(warmup_steps)) & (z > zt)
    if mode == "adaptive":
      target = state.mean + zt * zt * std / jnp.where(spike, z, 1.0)
    elif mode == "mean":
      target = state.mean
    else:
      target = state.mean + zt * std
    # z > z_threshold > 0 makes norm > mean >= 0 on a spike, so the division is safe there.
    scale = jnp.where(spike, jnp.minimum(target / jnp.where(spike, norm, 1.0), 1.0), 1.0)
    effective = jnp.where(spike, norm * scale, norm)

    count = state.count + finite.astype(jnp.int32)
    a = jnp.asarray(decay, jnp.float32)
    t = jnp.maximum(count, 1).astype(jnp.float32)
    denom = 1.0 - a**t
    weight = jnp.where(denom > 0, (1.0 - a) / jnp.where(denom > 0, denom, 1.0), 1.0 / t)
    d = effective - state.mean
    mean = jnp.where(finite, state.mean + weight * d, state.mean)
    var = jnp.where(finite, (1.0 - weight) * (state.var + weight * d * d), state.var)
    new_state = ClipByRunningNormState(count, mean, var, state.num_clipped + spike.astype(jnp.int32))
    updates = jax.tree.map(lambda u: (u * scale.astype(accumulation_dtype(u.dtype))).astype(u.dtype), updates)
    return updates, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_norm_damping(beta: float) -> optax.GradientTransformation:
  r"""Damps updates by their global norm: :math:`u \leftarrow u / (1 + \beta \lVert u \rVert_2)`.

  This is the damping proposed in the source material against exploding gradients in deep batch-norm
  networks. Placed first in a chain the incoming updates are the gradients, so it is
  :math:`u \leftarrow g / (1 + \beta \lVert g \rVert)`. It is a soft version of
  ``optax.clip_by_global_norm(1 / beta)``: the output norm :math:`n / (1 + \beta n)` is always below
  :math:`1/\beta`, is :math:`\approx n(1 - \beta n)` for small norms and never switches abruptly; unlike a
  clip it also shrinks ordinary steps (by 9% at :math:`\beta n = 0.1`), so ``beta`` trades some speed for
  safety. It keeps no state: the damping depends only on the current norm.

  Measured on the explosion example, ``examples/gradient_explosion.py`` (default settings: deep ReLU MLPs
  of width 64 on 512 MNIST-1D examples, 50 full-batch steps at learning rate 1, ``beta=1``, seed 0), whose
  batch-norm stacks without skip connections show the exponential gradient growth of Yang et al. (2019):
  the first hidden kernel's gradient is 14.8x the last one's at depth 16, 297x at 32, 8.8e4x at 64.
  Training loss after 50 steps (chance is 2.303; "nan": diverged):

  ===================  =======  =====================  ===========================
  network, depth       GD       GD + damping (beta=1)  GD + clip_by_global_norm(1)
  ===================  =======  =====================  ===========================
  batch norm, 16       1.43     0.643                  0.548
  batch norm, 32       1.86     2.36                   2.39
  batch norm, 64       2.2      2.48                   2.45
  no norm, 16          nan      1.91                   2.25
  no norm, 32          nan      2.3                    2.3
  bn + residual, 32    0.0219   0.0703                 0.0229
  ===================  =======  =====================  ===========================

  So the damping does what it promises, bounding every step (it turns the divergence of the
  unnormalized nets into a finite loss and helps batch norm at depth 16, much like a hard clip at the
  same level), but it does not cure the explosion: at depth 32 and 64 the damped and clipped runs stall
  where plain GD still makes some progress, and only the residual connections train well at every depth,
  as Yang et al. (2019) predict. Because it also shrinks ordinary steps, it slows the residual network.

  Args:
    beta: the damping strength, >= 0 (``beta=0`` is the identity); ``1/beta`` bounds the update norm.

  Returns:
    An ``optax.GradientTransformation`` with state ``optax.EmptyState`` (a NamedTuple).

  Raises:
    TypeError: for a ``beta`` that is no number.
    ValueError: for a negative or NaN ``beta``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from jaxbn import transforms
    >>> tx = transforms.scale_by_norm_damping(0.5)
    >>> u, _ = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(None))  # norm 5 -> 5 / 3.5
    >>> u["w"]
    Array([0.857..., 1.142...], dtype=float32)
    >>> opt = optax.chain(transforms.scale_by_norm_damping(1.0), optax.sgd(0.1, momentum=0.9))

  References:
    Yang, Pennington, Rao, Sohl-Dickstein, Schoenholz, "A Mean Field Theory of Batch Normalization",
    ICLR 2019.
  """
  fn = f"{_NAME}.scale_by_norm_damping"
  _checks.at_least(fn, "beta", beta, 0.0)

  def update_fn(updates, state, params=None):
    del params
    norm = global_norm(updates)
    factor = 1.0 / (1.0 + jnp.asarray(beta, norm.dtype) * norm)
    return jax.tree.map(lambda u: (u * factor.astype(accumulation_dtype(u.dtype))).astype(u.dtype), updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


# --------------------------------------------------------------------------------------------------
# Scale-invariant weights: AdamP / SGDP.


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
  fn = f"{_NAME}.project_scale_invariant"
  _check_projection(fn, delta, wd_ratio, weight_decay, eps)
  channel_axis = _static_axis(fn, channel_axis)
  if inner is not None and not isinstance(inner, optax.GradientTransformation):
    raise TypeError(f"{fn}: inner must be an optax.GradientTransformation or None, got {type(inner).__name__}.")

  def init_fn(params):
    inner_state = inner.init(params) if inner is not None else optax.EmptyState()
    return ProjectScaleInvariantState(inner_state, jax.tree.map(lambda _: jnp.zeros((), jnp.int32), params))

  def update_fn(grads, state, params=None):
    _require_params(fn, params)
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
    t = count.astype(jnp.float32)
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
  """
  fn = f"{_NAME}.adamp"
  _check_learning_rate(fn, learning_rate)
  for arg, value in (("b1", b1), ("b2", b2)):
    _checks.in_range(fn, arg, value, 0.0, 1.0, hi_open=True)  # 1 - b**t is 0 for b = 1: no debiasing
  _check_projection(fn, delta, wd_ratio, weight_decay, eps)
  _static_axis(fn, channel_axis)
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
  fn = f"{_NAME}.sgdp"

  def init_fn(params):
    views = jax.tree.map(lambda _: jnp.zeros((), jnp.int32), params)
    return ProjectScaleInvariantState(optax.TraceState(trace=jax.tree.map(jnp.zeros_like, params)), views)

  def update_fn(grads, state, params=None):
    _require_params(fn, params)
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
  """
  fn = f"{_NAME}.sgdp"
  _check_learning_rate(fn, learning_rate)
  _checks.in_range(fn, "momentum", momentum, 0.0, 1.0, hi_open=True)  # the weight decay divides by 1 - momentum
  _checks.finite(fn, "dampening", dampening)
  _check_projection(fn, delta, wd_ratio, weight_decay, eps)
  nesterov = _checks.static_bool(fn, "nesterov", nesterov)
  return optax.chain(
    _scale_by_sgdp(momentum, dampening, nesterov, weight_decay, eps, delta, wd_ratio, _static_axis(fn, channel_axis)),
    optax.scale_by_learning_rate(learning_rate),
  )


# --------------------------------------------------------------------------------------------------
# Masks derived from the model.

_REGISTERED_BATCH_NORMS: list[type] = []
_LOCK = threading.Lock()


def register_batch_norm(cls: type) -> type:
  """Makes ``batch_norm_mask`` and ``scale_invariant_mask`` treat ``cls`` (a linen or nnx module class) as a batch norm.

  Subclasses of the registered classes count too. Flax's ``BatchNorm`` classes and jaxbn's are registered
  already. Usable as a class decorator.

  Args:
    cls: a module class whose ``__call__(x, ...)`` normalizes ``x`` with batch statistics over all axes but
      its ``axis`` attribute (-1 when it has none).

  Returns:
    ``cls`` unchanged.

  Raises:
    TypeError: when ``cls`` is not a class.

  Examples:
    >>> import flax.linen as nn
    >>> from jaxbn import transforms
    >>> @transforms.register_batch_norm
    ... class MyNorm(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return (x - x.mean(0)) / x.std(0)
  """
  if not isinstance(cls, type):
    raise TypeError(f"{_NAME}.register_batch_norm: cls must be a module class, got {cls!r}.")
  with _LOCK:
    if cls not in _REGISTERED_BATCH_NORMS:
      _REGISTERED_BATCH_NORMS.append(cls)
  return cls


def _batch_norm_types(fn: str, batch_norm_types: Sequence[type] | None) -> tuple[type, ...]:
  if batch_norm_types is not None:
    types = tuple(batch_norm_types) if not isinstance(batch_norm_types, type) else (batch_norm_types,)
    if not types or not all(isinstance(t, type) for t in types):
      raise TypeError(f"{fn}: batch_norm_types must be a non-empty tuple of module classes, got {batch_norm_types!r}.")
    return types
  import importlib

  import flax.linen as nn
  from flax import nnx

  types: list[type] = [nn.BatchNorm, nnx.BatchNorm]
  for module_name in ("jaxbn.linen", "jaxbn.nnx"):
    try:
      cls = getattr(importlib.import_module(module_name), "BatchNorm", None)
    except ImportError:
      cls = None
    if isinstance(cls, type):
      types.append(cls)
  with _LOCK:
    types.extend(_REGISTERED_BATCH_NORMS)
  return tuple(dict.fromkeys(types))


def _key_names(path: tuple[Any, ...]) -> tuple[Hashable, ...]:
  """A pytree key path as plain names/indices: (DictKey('a'), SequenceKey(0)) -> ('a', 0)."""
  names = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        names.append(getattr(k, attr))
        break
    else:
      names.append(k)
  return tuple(names)


def _mask_by_path(tree: Any, predicate: Callable[[tuple[Hashable, ...]], bool]) -> Any:
  return jax.tree_util.tree_map_with_path(lambda path, _: bool(predicate(_key_names(path))), tree)


def _nnx_params(model: Any) -> Any:
  from flax import nnx

  return nnx.as_pure(nnx.state(model, nnx.Param))


def _is_nnx_module(obj: Any) -> bool:
  from flax import nnx

  return isinstance(obj, nnx.Module)


def _is_linen_module(obj: Any) -> bool:
  import flax.linen as nn

  return isinstance(obj, nn.Module)


def batch_norm_mask(params: Any, batch_stats: Any = None, *, batch_norm_types: Sequence[type] | None = None) -> Any:
  """A boolean pytree marking the batch-norm parameters (scale and bias), e.g. to exclude them from weight decay.

  Found from the model, not from names:

  * ``batch_norm_mask(nnx_model)``: the ``nnx.Param`` leaves of the submodules that are instances of
    ``batch_norm_types`` (by default ``flax.nnx.BatchNorm``, ``jaxbn.nnx.BatchNorm`` and the classes given
    to ``register_batch_norm``, subclasses included). The mask has the structure of
    ``nnx.as_pure(nnx.state(model, nnx.Param))``, which is what ``nnx.Optimizer(model, tx, wrt=nnx.Param)``
    hands to ``tx``.
  * ``batch_norm_mask(variables)`` or ``batch_norm_mask(variables["params"], variables["batch_stats"])``
    (linen): the parameters of the modules that keep running statistics, i.e. whose ``batch_stats``
    collection holds ``mean`` and ``var`` (the variables of ``flax.linen.BatchNorm`` and
    ``jaxbn.linen.BatchNorm``). The mask has the structure of ``variables["params"]`` in both forms.

  Parameters alone cannot tell a batch norm from a layer norm; a ``ValueError`` says so.

  Args:
    params: an ``nnx.Module``, linen ``variables`` (with ``"params"`` and ``"batch_stats"``), or linen
      ``params`` together with ``batch_stats``.
    batch_stats: the linen ``batch_stats`` collection when ``params`` is the ``params`` collection.
    batch_norm_types: for nnx, the module classes that count as batch norms (replaces the defaults).

  Returns:
    A pytree of Python bools, True on batch-norm scale and bias leaves.

  Raises:
    TypeError: when ``params`` or ``batch_stats`` is neither a model nor a mapping.
    ValueError: when the batch-norm modules cannot be found from what was passed.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax
    >>> from jaxbn import transforms
    >>> model = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=False), nn.Dense(1)])
    >>> variables = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((8, 3)))  # shapes are enough
    >>> bn = transforms.batch_norm_mask(variables)  # the structure of variables["params"]
    >>> bn["layers_1"], bn["layers_0"]["kernel"]
    ({'bias': True, 'scale': True}, False)
    >>> tx = optax.adamw(1e-3, weight_decay=1e-4, mask=jax.tree.map(lambda m: not m, bn))
  """
  fn = f"{_NAME}.batch_norm_mask"
  if _is_nnx_module(params):
    if batch_stats is not None:
      raise ValueError(
        f"{fn}: with an nnx model pass no batch_stats (they live in the model), got {type(batch_stats)}."
      )
    from flax import nnx

    types = _batch_norm_types(fn, batch_norm_types)
    bn_paths = {tuple(path) for path, m in nnx.iter_modules(params) if isinstance(m, types)}
    return _mask_by_path(_nnx_params(params), lambda path: path[:-1] in bn_paths)
  if not isinstance(params, Mapping):
    raise TypeError(
      f"{fn}: params must be an nnx.Module, linen variables (with 'params' and 'batch_stats') or the linen "
      f"'params' collection, got {type(params).__name__}."
    )
  if batch_stats is None and "params" in params:
    params, batch_stats = params["params"], params.get("batch_stats")
  if batch_stats is not None and not isinstance(batch_stats, Mapping):
    raise TypeError(
      f"{fn}: batch_stats must be the linen 'batch_stats' collection (a mapping), got {type(batch_stats).__name__}."
    )
  if batch_stats is None:
    raise ValueError(
      f"{fn}: cannot tell batch-norm parameters from parameters alone (a LayerNorm has the same scale and bias). "
      "Consider one of the following options:\n"
      "  1. pass the full linen variables: batch_norm_mask(variables) with variables['batch_stats'];\n"
      "  2. pass the collections separately: batch_norm_mask(variables['params'], variables['batch_stats']);\n"
      "  3. pass the nnx model: batch_norm_mask(model)."
    )
  bn_paths: set[tuple[Hashable, ...]] = set()

  def walk(node: Any, path: tuple[Hashable, ...]) -> None:
    if not isinstance(node, Mapping):
      return
    if "mean" in node and "var" in node and not isinstance(node["mean"], Mapping):
      bn_paths.add(path)
    for k, v in node.items():
      walk(v, (*path, k))

  walk(batch_stats, ())
  return _mask_by_path(params, lambda path: path[:-1] in bn_paths)


class _Dataflow:
  """What a traced call of the model showed: kernel-module outputs and batch-norm inputs."""

  def __init__(self) -> None:
    self.kernel_calls: list[tuple[Hashable, Any, int]] = []  # (module key, output, bias ndim or 0)
    self.bn_inputs: list[tuple[Any, frozenset[int] | None]] = []  # (input, feature axes; None: running stats)

  def invariant(self) -> set[Hashable]:
    """Keys of the kernel modules every output of which goes, unchanged, into a batch norm that uses batch
    statistics and, when the module adds a bias, normalizes per the bias's axes."""
    calls: dict[Hashable, list[tuple[Any, int]]] = {}
    for key, out, bias_ndim in self.kernel_calls:
      calls.setdefault(key, []).append((out, bias_ndim))
    keys = set()
    for key, outs in calls.items():
      ok = True
      for out, bias_ndim in outs:
        consumers = [axes for x, axes in self.bn_inputs if x is out]
        bias_axes = set(range(out.ndim - bias_ndim, out.ndim))
        if not consumers or any(axes is None or not bias_axes <= axes for axes in consumers):
          ok = False
          break
      if ok:
        keys.add(key)
    return keys


def _bn_feature_axes(module: Any, args: tuple, kwargs: dict, ndim: int) -> frozenset[int] | None:
  """The feature axes a batch-norm call keeps, or None when it normalizes with its running statistics."""
  ura = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
  if ura is None:
    ura = getattr(module, "use_running_average", False)
  # Batch renormalization (jaxbn's renorm=True) corrects towards the running statistics: its output
  # changes with the kernel's scale even though its gradient stays orthogonal to the kernel.
  if ura or getattr(module, "renorm", False):
    return None
  axis = getattr(module, "axis", -1)
  axes = (axis,) if _checks.is_int(axis) else tuple(axis)
  return frozenset(int(a) % ndim for a in axes)


def _linear_bias_ndim(own_params: Mapping[str, Any]) -> int | None:
  """For a module's own parameters: None unless it is a linear map (a ``kernel``, at most a ``bias``);
  else the bias's ndim (0 without a bias)."""
  kernel = own_params.get("kernel")
  if kernel is None or np.ndim(kernel) < 2 or not set(own_params) <= {"kernel", "bias"}:
    return None
  return int(np.ndim(own_params["bias"])) if own_params.get("bias") is not None else 0


_DYNAMIC = (jax.Array, np.ndarray, jax.ShapeDtypeStruct)


def _trace(f: Callable[..., None], tree: Any, args: tuple, kwargs: dict) -> None:
  """Traces ``f(tree, args, kwargs)`` abstractly; non-array arguments (flags) stay Python values."""
  leaves, treedef = jax.tree.flatten((args, kwargs))
  is_dyn = [isinstance(x, _DYNAMIC) for x in leaves]
  dyn = [x for x, d in zip(leaves, is_dyn, strict=True) if d]

  def g(tree, dyn):
    it = iter(dyn)
    a, k = treedef.unflatten([next(it) if d else x for x, d in zip(leaves, is_dyn, strict=True)])
    f(tree, a, k)
    return ()

  jax.eval_shape(g, tree, dyn)


_RECORDER: contextvars.ContextVar[_Dataflow | None] = contextvars.ContextVar("jaxbn_dataflow", default=None)
_RECORDING_CLASSES: dict[tuple[type, str], type] = {}


def _recording_class(cls: type, role: str) -> type:
  """A subclass of an nnx module class whose ``__call__`` reports to the active ``_Dataflow``.

  nnx has no method interceptors, so the traced copy of the model gets its instances' classes swapped;
  the user's model and the original classes are never touched.
  """
  with _LOCK:
    sub = _RECORDING_CLASSES.get((cls, role))
    if sub is not None:
      return sub

    def __call__(self, *args, **kwargs):
      flow = _RECORDER.get()
      if flow is not None and role == "bn" and args and isinstance(args[0], jax.Array):
        flow.bn_inputs.append((args[0], _bn_feature_axes(self, args, kwargs, args[0].ndim)))
      out = cls.__call__(self, *args, **kwargs)
      if flow is not None and role == "kernel" and isinstance(out, jax.Array):
        flow.kernel_calls.append((id(self), out, _linear_bias_ndim(_nnx_own_params(self))))
      return out

    sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
    _RECORDING_CLASSES[(cls, role)] = sub
    return sub


def _nnx_own_params(module: Any) -> dict[str, Any]:
  from flax import nnx

  return {k: v.get_value() for k, v in vars(module).items() if isinstance(v, nnx.Param)}


def scale_invariant_mask(model: Any, *args: Any, batch_norm_types: Sequence[type] | None = None, **kwargs: Any) -> Any:
  r"""A boolean pytree marking the kernels that feed a batch norm, found by tracing the model's dataflow.

  The model is traced abstractly (``jax.eval_shape``: no computation, nothing in the model changes) on the
  given inputs, recording which linear modules (those owning a ``kernel`` and at most a ``bias``:
  ``Dense``, ``DenseGeneral``, ``Conv``, ``ConvTranspose``, ``Einsum``, ``nnx.Linear``, ``nnx.Conv``, ...)
  pass their output *unchanged* to a batch norm (an instance of ``batch_norm_types``, by default Flax's and
  jaxbn's ``BatchNorm`` and the classes given to ``register_batch_norm``). Linen calls are observed with
  ``flax.linen.intercept_methods``; nnx calls on a traced copy of the model. A kernel is marked when every
  one of its calls feeds a batch norm that uses batch statistics (so trace with the flags of a training
  step): then :math:`\text{BN}(x \cdot \alpha W) = \text{BN}(x W)` for :math:`\alpha > 0` and the training
  loss does not depend on the kernel's norm.

  A bias before the batch norm. :math:`\text{BN}(\alpha x W + b)` subtracts the batch mean of every
  normalized feature, which removes a bias that is constant along the reduced axes, so the kernel alone is
  still exactly scale-invariant (and the bias gets a zero gradient) when the bias's axes are among the
  batch norm's feature axes: ``Conv(use_bias=True)`` then ``BatchNorm(axis=-1)`` is marked. When they are
  not (e.g. a ``Dense`` on ``(batch, time, features)`` followed by a batch norm over ``axis=1``), the bias
  does change the normalized output as :math:`W` scales, and the kernel is not marked.

  Batch norms that normalize with running statistics (``use_running_average=True``, or batch
  renormalization, ``renorm=True`` in jaxbn's modules) make nothing scale-invariant. Not detected (so not
  marked): an output that passes through other operations first, even positively
  homogeneous ones (ReLU, pooling, reshape), and modules called inside ``nn.scan``/``nnx.scan`` and
  similar lifted transforms. Uses of a marked output outside module calls (e.g. in a residual sum next to
  the batch norm) are not seen either.

  Args:
    model: a ``flax.linen.Module`` or an ``nnx.Module``.
    *args: linen: ``variables`` (with ``"params"``) then the inputs of ``model.apply``; nnx: the inputs of
      ``model(...)``. Arrays or ``jax.ShapeDtypeStruct``; other values (flags) are passed as they are.
    batch_norm_types: the module classes that count as batch norms (replaces the defaults).
    **kwargs: keyword arguments of ``model.apply`` (linen, e.g. ``train=True``) or of ``model(...)`` (nnx).

  Returns:
    A pytree of Python bools with the structure of ``variables["params"]`` (linen) or of
    ``nnx.as_pure(nnx.state(model, nnx.Param))`` (nnx), True on the scale-invariant kernels.

  Raises:
    TypeError: when ``model`` is not a Flax module, linen variables are missing, or ``kwargs`` that the
      model's ``__call__`` does not take.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax
    >>> from jaxbn import transforms
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train: bool = True):
    ...     x = nn.Conv(8, (3, 3))(x)
    ...     x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    ...     return nn.Dense(10)(x.mean((1, 2)))
    >>> x = jnp.ones((4, 8, 8, 3))
    >>> variables = jax.eval_shape(Net().init, jax.random.key(0), x)  # shapes are enough
    >>> mask = transforms.scale_invariant_mask(Net(), variables, x, train=True)
    >>> mask["Conv_0"]["kernel"], mask["Conv_0"]["bias"], mask["Dense_0"]["kernel"]
    (True, False, False)
    >>> labels = jax.tree.map(lambda m: "invariant" if m else "other", mask)
    >>> tx = optax.partition(
    ...   {"invariant": transforms.sgdp(0.1, 0.9, weight_decay=5e-4), "other": optax.sgd(0.1, 0.9)}, labels)
  """
  fn = f"{_NAME}.scale_invariant_mask"
  types = _batch_norm_types(fn, batch_norm_types)
  if _is_linen_module(model) or _is_nnx_module(model):
    _checks.call_kwargs(fn, model.__call__, kwargs, f"the model's __call__ ({type(model).__name__})")
  flow = _Dataflow()
  if _is_linen_module(model):
    import flax.linen as nn

    if not args or not isinstance(args[0], Mapping) or "params" not in args[0]:
      raise TypeError(
        f"{fn}: for a linen model pass its variables (a dict with 'params') first, then its inputs: "
        f"scale_invariant_mask(model, variables, x, ...); got {type(args[0]).__name__ if args else 'nothing'}."
      )
    variables, inputs = args[0], args[1:]
    invariant: set[Hashable] = set()

    def interceptor(next_fun, a, k, context):
      module = context.module
      if isinstance(module, types):
        if a and isinstance(a[0], jax.Array):
          flow.bn_inputs.append((a[0], _bn_feature_axes(module, a, k, a[0].ndim)))
        return next_fun(*a, **k)
      out = next_fun(*a, **k)
      if isinstance(out, jax.Array):
        own = {n: v for n, v in module.variables.get("params", {}).items() if not isinstance(v, Mapping)}
        bias_ndim = _linear_bias_ndim(own)
        if bias_ndim is not None:
          flow.kernel_calls.append((tuple(module.path), out, bias_ndim))
      return out

    def run(variables, a, k):
      with nn.intercept_methods(interceptor):
        model.apply(variables, *a, mutable=True, **k)
      invariant.update(flow.invariant())

    _trace(run, variables, inputs, kwargs)
    return _mask_by_path(variables["params"], lambda path: path[-1] == "kernel" and tuple(path[:-1]) in invariant)

  if _is_nnx_module(model):
    from flax import nnx

    graphdef, state = nnx.split(model)
    invariant_paths: set[tuple[Hashable, ...]] = set()

    def run(state, a, k):
      copy = nnx.merge(graphdef, state)
      paths = {}
      for path, module in nnx.iter_modules(copy):
        if isinstance(module, types):
          object.__setattr__(module, "__class__", _recording_class(type(module), "bn"))
        elif _linear_bias_ndim(_nnx_own_params(module)) is not None:
          object.__setattr__(module, "__class__", _recording_class(type(module), "kernel"))
          paths[id(module)] = tuple(path)
      token = _RECORDER.set(flow)
      try:
        copy(*a, **k)
      finally:
        _RECORDER.reset(token)
      invariant_paths.update(paths[key] for key in flow.invariant() if key in paths)

    _trace(run, state, args, kwargs)
    return _mask_by_path(_nnx_params(model), lambda path: path[-1] == "kernel" and tuple(path[:-1]) in invariant_paths)
  raise TypeError(f"{fn}: model must be a flax.linen.Module or a flax.nnx.Module, got {type(model).__name__}.")
