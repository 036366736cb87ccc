"""The records a full-batch step reads and writes: its state, what a loss reports, the step's metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxbn.training._args import check_optimizer


class TrainState(NamedTuple):
  """Everything a step reads and writes; a pytree, so it jits, shards and checkpoints as is.

  Attributes:
    params: model parameters.
    batch_stats: running statistics of the model's batch norms (``{}`` for a model without).
    opt_state: the Optax optimizer's state.
    step: int32, number of steps applied (skipped steps not counted).
    skipped: int32, number of steps the guard skipped (a loss, gradient, update or batch statistic
      that was not finite).
    key: the random key of a loss function that draws random numbers (dropout), as raw ``uint32``
      key data, or None. Step ``t`` (counting skipped ones, so a skipped step is not retried with
      the same draws) uses ``fold_in(key, t)``, folded again with the micro-batch index (and the
      device index under ``axis_name``).
  """

  params: Any
  batch_stats: Any
  opt_state: Any
  step: jax.Array
  skipped: jax.Array
  key: Any = None

  @classmethod
  def create(
    cls, params: Any, batch_stats: Any, optimizer: optax.GradientTransformation, *, key: Any = None
  ) -> TrainState:
    """A state at step 0 with a fresh optimizer state.

    Args:
      params: the model parameters.
      batch_stats: the running statistics (None or ``{}`` for a model without batch norm).
      optimizer: the Optax transformation whose state to initialize.
      key: for a loss function that draws random numbers (dropout): a ``jax.random.key(seed)`` or
        raw ``uint32`` key data; stored as raw key data (so checkpoints hold plain arrays).

    Returns:
      The ``TrainState``, with buffers of its own (the step may donate them).

    Raises:
      TypeError: ``key`` is neither a typed PRNG key nor raw ``uint32`` key data, or ``optimizer`` is no
        Optax transformation.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxbn.training import TrainState
      >>> state = TrainState.create({"w": jnp.zeros(3)}, {}, optax.adam(1e-3), key=jax.random.key(0))
      >>> int(state.step), state.key.dtype, state.step_key().shape
      (0, dtype('uint32'), (2,))
    """
    check_optimizer("jaxbn.training.TrainState.create", optimizer)
    # Distinct buffers throughout: the step donates every leaf of the state.
    copy = lambda tree: jax.tree.map(lambda a: jnp.array(a, copy=True), tree)
    params, batch_stats = copy(params), copy({} if batch_stats is None else batch_stats)
    opt_state = copy(optimizer.init(params))
    if key is not None:
      typed = isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
      if typed and str(jax.random.key_impl(key)) != str(jax.random.key_impl(jax.random.key(0))):
        raise TypeError(
          "jaxbn.training.TrainState.create: key must use the default PRNG implementation "
          f"({jax.random.key_impl(jax.random.key(0))}), which the state's raw key data is read with; got "
          f"{jax.random.key_impl(key)}."
        )
      if not typed and not (hasattr(key, "dtype") and key.dtype == jnp.uint32 and jnp.ndim(key) >= 1):
        raise TypeError(
          f"jaxbn.training.TrainState.create: key must be a jax.random.key(seed) or raw uint32 key data, got {key!r}."
        )
      key = jnp.array(jax.random.key_data(key) if typed else key, copy=True)
    zero = jnp.zeros((), jnp.int32)
    return cls(params, batch_stats, opt_state, zero, jnp.zeros((), jnp.int32), key)

  def step_key(self) -> jax.Array | None:
    """The key of this state's next step (None without a key)."""
    return None if self.key is None else jax.random.fold_in(self.key, self.step + self.skipped)


class LossAux(NamedTuple):
  """What a loss function returns beside the loss.

  Attributes:
    stats: per-layer raw batch statistics (a pytree of :class:`jaxbn.Stats`) of this micro-batch,
      or None for a model without batch norm. A layer called more than once in the forward pass
      (weights shared) reports a tuple with one ``Stats`` per call, in call order, and gets one
      running update per call, as ``model.apply`` applies them.
    metrics: optional pytree of per-micro-batch values to average (count-weighted) into the step's
      metrics, e.g. accuracy.
  """

  stats: Any = None
  metrics: Any = None


class StepMetrics(NamedTuple):
  """Per-step metrics.

  Attributes:
    loss: mean loss over all rows.
    grad_norm: global norm of the full-batch gradient.
    update_norm: global norm of the optimizer's update.
    skipped: whether the guard skipped the step.
    extra: count-weighted means of the loss function's ``LossAux.metrics``.
    layer_grad_norms: with ``layer_norms=True``, the gradient's norm per layer
      (:func:`jaxbn.norms_by_layer`).
    layer_param_norms: with ``layer_norms=True``, the new parameters' norm per layer.
    sharpness: with ``sharpness_every=k``, the top Hessian eigenvalue of the full-batch objective at
      the step's starting parameters on steps where ``state.step % k == 0``, NaN on the others;
      compare it with :func:`jaxbn.stability_threshold`.
    gradient_penalty: with ``gradient_penalty=alpha`` in the step, the penalty's value
      ``(alpha / 4) * sum_k (n_k / N) ||grad L_k||^2`` at the step's starting parameters (``loss`` is the
      mean loss without it); None otherwise.
  """

  loss: jax.Array
  grad_norm: jax.Array
  update_norm: jax.Array
  skipped: jax.Array
  extra: Any = None
  layer_grad_norms: Any = None
  layer_param_norms: Any = None
  sharpness: Any = None
  gradient_penalty: Any = None


LossFn = Callable[..., tuple[jax.Array, LossAux]]
"""``loss_fn(params, batch_stats, batch, mask[, key]) -> (loss, LossAux)``, the mean over a micro-batch's valid rows."""

UpdateStatsFn = Callable[[Any, Any], Any]
"""``update_batch_stats(batch_stats, merged_stats) -> batch_stats``: one running update from a step's statistics."""
