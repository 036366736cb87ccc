"""Spike clipping and damping: transformations that rescale the whole update by its global norm.

``clip_by_running_norm`` keeps batch norm's explicit running mean and variance of the global gradient norm and
rescales the updates whose norm is an outlier of them (a spike), as ZClip does; ``scale_by_norm_damping`` damps
every update by its norm, ``u / (1 + beta * ||u||)``. Both compute the norm in at least float32, whatever
the dtype of the updates.

References:
  Kumar, Owen, Chowdhury, Güra, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", arXiv:2504.02507, 2025.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbn import _checks
from jaxbn._trees import accumulation_dtype, global_norm
from jaxbn.transforms._common import NAME

__all__ = ["ClipByRunningNormState", "ClipMode", "clip_by_running_norm", "scale_by_norm_damping"]


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
  fn = f"{NAME}.clip_by_running_norm"
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

  This is the damping that the article jaxbn started from proposes against exploding gradients in deep
  batch-norm networks ("Batch normalization and batch gradient descent: how to efficiently solve the
  gradient explosion problem"; ``examples/gradient_explosion.py`` measures it). Placed first in a chain the incoming updates are the gradients, so it is
  :math:`u \leftarrow g / (1 + \beta \lVert g \rVert)`. It is a soft version of
  ``optax.clip_by_global_norm(1 / beta)``: the output norm :math:`n / (1 + \beta n)` is always below
  :math:`1/\beta`, is :math:`\approx n(1 - \beta n)` for small norms and never switches abruptly; unlike a
  clip it also shrinks ordinary steps (by 9% at :math:`\beta n = 0.1`), so ``beta`` trades some speed for
  safety. It keeps no state: the damping depends only on the current norm.

  ``python examples/gradient_explosion.py`` measures it against plain gradient descent and a hard clip
  at the same level, on deep batch-norm MLPs without skip connections (whose gradients grow
  exponentially towards the input, Yang et al., "A Mean Field Theory of Batch Normalization", ICLR 2019),
  unnormalized ones and residual ones, and prints the table of training losses with its settings. What
  it shows: the damping bounds every step (it turns the divergence of the unnormalized networks into a
  finite loss, much like the hard clip), but it does not cure the explosion, which only residual
  connections do; and since it also shrinks ordinary steps, it slows a network that trains well anyway.

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
  fn = f"{NAME}.scale_by_norm_damping"
  _checks.at_least(fn, "beta", beta, 0.0)

  def update_fn(updates, state, params=None):
    del params
    norm = global_norm(updates)
    factor = 1.0 / (1.0 + jnp.asarray(beta, norm.dtype) * norm)
    return jax.tree.map(lambda u: (u * factor.astype(accumulation_dtype(u.dtype))).astype(u.dtype), updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)
