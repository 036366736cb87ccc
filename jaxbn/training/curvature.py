"""The sharpness (top Hessian eigenvalue) of the full-batch objective, through its accumulated gradient."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from jaxbn import _checks, diagnostics
from jaxbn.training._args import check_bn_mode, iterations_and_method, positive_int_or_none
from jaxbn.training.exact import objective_gradient
from jaxbn.training.loops import HostLoop, resolve_loop
from jaxbn.training.loss import Loss, as_loss
from jaxbn.training.penalty import GradientPenalty
from jaxbn.training.state import LossFn, TrainState
from jaxbn.training.stream import HostData, HostDataRouted
from jaxbn.training.sweep import SCAN, GradientFn, MicroBatches, device_gradient


def top_eigenpair(
  gradient: GradientFn, params: Any, batch_stats: Any, data: Any, axis_name: Any, key: Any = None, **options: Any
) -> tuple[jax.Array, Any]:
  """Top Hessian eigenvalue (and vector) of the full-batch objective whose gradient ``gradient`` accumulates.

  ``options`` go to :func:`jaxbn.top_hessian_eigenvalue`.
  """

  def grad_fn(p):
    return device_gradient(gradient, p, batch_stats, data, key, axis_name)[1]

  return diagnostics.top_hessian_eigenvalue(grad_fn, params, **options)


def sharpness(
  loss_fn: Loss | LossFn,
  *,
  micro_batch_size: int | None = None,
  bn_mode: str = "ghost",
  axis_name: Any = None,
  num_iters: int = 20,
  method: str = "lanczos",
  jit: bool = True,
  loop: str = "auto",
  gradient_penalty: float = 0.0,
  penalty_block_size: int | None = None,
  penalty_method: str = "hvp",
) -> Callable[..., tuple[jax.Array, Any]]:
  """The sharpness of the full-batch objective that :func:`full_batch_step` minimizes.

  The top Hessian eigenvalue of the mean loss over all of ``data``, by
  :func:`jaxbn.top_hessian_eigenvalue` on Hessian-vector products of the same accumulated gradient
  (micro-batches, devices and ``bn_mode`` as in the step). Full-batch gradient descent with
  learning rate ``lr`` is stable on a quadratic while it stays below ``2 / lr``
  (:func:`jaxbn.stability_threshold`); Cohen et al. (2021) show networks rise to that edge.

  Args:
    loss_fn: the step's loss function (a :class:`Loss`, e.g. from :func:`linen_loss`, or a plain
      function as :func:`full_batch_step` takes it).
    micro_batch_size: as in :func:`full_batch_step`.
    bn_mode: ``"ghost"`` or ``"exact"``, as in :func:`full_batch_step`.
    axis_name: as in :func:`full_batch_step`, for pmap-style use (then pass ``jit=False``).
    num_iters: Lanczos iterations (Hessian-vector products).
    method: ``"lanczos"`` (Lanczos 1950) or ``"power"`` (power iteration).
    jit: return the function compiled with ``jax.jit``.
    loop: ``"auto"``, ``"scan"`` or ``"host"``, as in :func:`full_batch_step`: with the host loop the
      Lanczos iterations run from Python and every Hessian-vector product is a sweep of compiled
      per-micro-batch programs. A :class:`HostData` streams on the host loop, which ``"auto"`` picks
      for it on every backend.
    gradient_penalty, penalty_block_size, penalty_method: as in :func:`full_batch_step`: the sharpness
      of the mean loss plus the gradient penalty, the objective a step with the same arguments
      minimizes (the penalty's own Hessian is then differentiated too).

  Returns:
    ``fn(state, data, init=None) -> (eigenvalue, eigenvector)``; ``init`` warm-starts from a
    previous eigenvector.

  Raises:
    ValueError: bad ``micro_batch_size``, ``bn_mode``, ``num_iters``, ``method``, ``loop``,
      ``gradient_penalty``, ``penalty_block_size`` or ``penalty_method`` (as :func:`full_batch_step`);
      ``loop="host"`` with ``axis_name`` or ``jit=False``.
    TypeError: ``loss_fn`` is not callable, or ``jit`` not a bool.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, jaxbn
    >>> def loss_fn(params, batch_stats, batch, mask):  # 3 rows in micro-batches of 2: a mask
    ...   err = (batch["x"] @ params["w"]) ** 2
    ...   return jnp.sum(jnp.where(mask, err, 0)) / jnp.sum(mask), jaxbn.training.LossAux()
    >>> data = {"x": jnp.diag(jnp.array([1.0, 2.0, 3.0]))}
    >>> state = jaxbn.training.TrainState.create({"w": jnp.ones(3)}, {}, optax.sgd(0.1))
    >>> value, _ = jaxbn.training.sharpness(loss_fn, micro_batch_size=2)(state, data)
    >>> round(float(value), 4)  # Hessian 2/3 * diag(1, 4, 9)
    6.0

  References:
    Cohen, Kaur, Li, Kolter & Talwalkar, "Gradient Descent on Neural Networks Typically Occurs at the
    Edge of Stability", ICLR 2021.
    Lanczos, "An Iteration Method for the Solution of the Eigenvalue Problem of Linear Differential
    and Integral Operators", Journal of Research of the National Bureau of Standards, 1950.
  """
  fn = "jaxbn.training.sharpness"
  loss = as_loss(fn, loss_fn)
  iterations_and_method(fn, "num_iters", num_iters, method)
  jit = _checks.static_bool(fn, "jit", jit)
  check_bn_mode(fn, bn_mode)
  micro_batch_size = positive_int_or_none(fn, "micro_batch_size", micro_batch_size)
  penalty = GradientPenalty.from_args(fn, gradient_penalty, penalty_block_size, penalty_method, micro_batch_size)
  traced = axis_name is not None or not jit
  if loop == "host" and traced:
    raise ValueError(f"{fn}: loop='host' runs compiled pieces from Python: it takes no axis_name and jit=True.")
  requested, loop = loop, resolve_loop(fn, loop)

  def build(host: bool) -> Callable[..., tuple[jax.Array, Any]]:
    batches = MicroBatches(fn, loss, micro_batch_size, axis_name, HostLoop() if host else SCAN, penalty)
    gradient = objective_gradient(batches, bn_mode)

    def run(state: TrainState, data: Any, init: Any = None) -> tuple[jax.Array, Any]:
      if isinstance(data, HostData):
        data = batches.stream(data)  # the host loop's (HostDataRouted keeps it from the scanned one)
      return top_eigenpair(
        gradient,
        state.params,
        state.batch_stats,
        data,
        axis_name,
        key=state.step_key(),
        num_iters=num_iters,
        method=method,
        init=init,
        jit=not host,
      )

    return run if host or not jit else jax.jit(run)

  if loop == "host":
    return build(True)
  # Host data streams on the host loop, whatever the backend, where loop="auto" lets it.
  return HostDataRouted(
    fn, build(False), (lambda: build(True)) if requested == "auto" and not traced else None, requested
  )
