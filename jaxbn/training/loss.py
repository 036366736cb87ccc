"""The loss protocol of a full-batch step as one typed record, and the one place that reads it from a plain function."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jaxbn import _checks
from jaxbn.training.state import LossAux, LossFn, TrainState, UpdateStatsFn


@dataclasses.dataclass(frozen=True)
class Loss:
  """A loss function of :func:`full_batch_step`, with what the step needs to know about it.

  A record of functions, as Optax's ``GradientTransformation`` is the record of its ``init`` and
  ``update``: the loss itself, the running-statistics update that goes with it, and whether it draws
  random numbers. :func:`linen_loss` and :func:`nnx_loss` build one from a Flax model. A ``Loss`` is
  called as its ``loss``, so it is used wherever a loss function is (``jax.grad``, ``jax.jit``,
  ``jax.eval_shape``); it is a frozen dataclass rather than a NamedTuple because JAX's
  transformations keep weak references to the functions they trace, which a tuple cannot have.

  :func:`full_batch_step` and :func:`sharpness` also take a plain function, read as
  ``Loss(fn, fn.update_batch_stats, fn.takes_key)`` where it has those attributes (None and False
  where it has not).

  Attributes:
    loss: ``loss(params, batch_stats, batch, mask) -> (loss, LossAux)``, the mean loss over the
      micro-batch's valid rows (``mask`` a boolean row vector, or None when all rows are valid; see
      :func:`full_batch_step`); with ``takes_key``, a fifth argument ``key``.
    update_batch_stats: ``update_batch_stats(batch_stats, merged_stats) -> batch_stats``, which
      folds a step's merged statistics (from ``LossAux.stats``) into the running ones; None for a
      loss that reports no statistics.
    takes_key: whether ``loss`` draws random numbers (dropout) from a fifth argument ``key``: a
      fresh key per micro-batch and step, derived from ``TrainState.key``.
    init_state: optional ``init_state(optimizer, key=None) -> TrainState`` for the model the loss
      was built from (:func:`nnx_loss` provides it).

  Raises:
    TypeError: ``loss``, ``update_batch_stats`` or ``init_state`` is not callable, or ``takes_key``
      not a bool.

  Examples:
    A loss with dropout on its inputs, which needs a key per micro-batch:

    >>> import jax, jax.numpy as jnp, optax, jaxbn
    >>> def noisy_mse(params, batch_stats, batch, mask, key):
    ...   x = batch["x"] * jax.random.bernoulli(key, 0.9, batch["x"].shape) / 0.9
    ...   err = (x @ params["w"] - batch["y"]) ** 2
    ...   valid = jnp.ones(err.shape, bool) if mask is None else mask  # None: every row is valid
    ...   return jnp.sum(jnp.where(valid, err, 0)) / jnp.sum(valid), jaxbn.training.LossAux()
    >>> loss_fn = jaxbn.training.Loss(noisy_mse, takes_key=True)
    >>> opt = optax.sgd(0.1)
    >>> state = jaxbn.training.TrainState.create({"w": jnp.zeros(2)}, {}, opt, key=jax.random.key(0))
    >>> data = {"x": jnp.arange(20.0).reshape(10, 2) / 10, "y": jnp.ones(10)}
    >>> state, metrics = jaxbn.training.full_batch_step(loss_fn, opt, micro_batch_size=4)(state, data)
    >>> int(state.step), bool(metrics.skipped), loss_fn.update_batch_stats is None
    (1, False, True)
  """

  loss: LossFn
  update_batch_stats: UpdateStatsFn | None = None
  takes_key: bool = False
  init_state: Callable[..., TrainState] | None = None

  def __post_init__(self) -> None:
    fn = "jaxbn.training.Loss"
    _checks.callable_arg(fn, "loss", self.loss)
    for name in ("update_batch_stats", "init_state"):
      if getattr(self, name) is not None:
        _checks.callable_arg(fn, name, getattr(self, name))
    object.__setattr__(self, "takes_key", _checks.static_bool(fn, "takes_key", self.takes_key))

  def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, LossAux]:
    """``self.loss(*args, **kwargs)``."""
    return self.loss(*args, **kwargs)


def as_loss(fn: str, loss_fn: Any, update_batch_stats: Any = None) -> Loss:
  """``loss_fn`` as a :class:`Loss`, with ``update_batch_stats`` in place of its own where given.

  A ``Loss`` is taken as it is. A plain function keeps the protocol of earlier versions: its
  ``update_batch_stats``, ``takes_key`` and ``init_state`` attributes, read here and nowhere else.

  Raises:
    TypeError: ``loss_fn`` or ``update_batch_stats`` is not callable.
  """
  _checks.callable_arg(fn, "loss_fn", loss_fn)
  if update_batch_stats is not None:
    _checks.callable_arg(fn, "update_batch_stats", update_batch_stats)
  if not isinstance(loss_fn, Loss):
    loss_fn = Loss(
      loss_fn,
      getattr(loss_fn, "update_batch_stats", None),
      bool(getattr(loss_fn, "takes_key", False)),
      getattr(loss_fn, "init_state", None),
    )
  if update_batch_stats is not None:
    loss_fn = dataclasses.replace(loss_fn, update_batch_stats=update_batch_stats)
  return loss_fn
