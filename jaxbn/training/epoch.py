"""One epoch of mini-batch SGD with a full-batch step, resumable in the middle."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import _checks
from jaxbn.training._args import num_rows, positive_int_or_none
from jaxbn.training.state import StepMetrics, TrainState
from jaxbn.training.stream import HostData


def minibatch_epoch(
  step: Callable[[TrainState, Any], tuple[TrainState, StepMetrics]],
  state: TrainState,
  data: Any,
  *,
  batch_size: int,
  key: jax.Array,
  start: int = 0,
  on_update: Callable[[int, TrainState, StepMetrics], None] | None = None,
) -> tuple[TrainState, list[StepMetrics]]:
  """One epoch of mini-batch SGD with the same step: shuffle, then one update per batch.

  The last batch holds the remainder (never dropped); it has another size, so it compiles once.
  Use a step built with ``micro_batch_size=None`` (or >= ``batch_size``) for plain mini-batch SGD.

  The epoch is fixed by ``key`` (the order of the rows) and ``batch_size``; ``start`` and
  ``on_update`` resume it in the middle. Checkpoint the state and the position ``on_update`` is given
  (with the epoch's key, or the epoch number it is derived from); after a kill, call again with the
  restored state and ``start=position``: the epoch ends bit for bit as the uninterrupted one.

  Args:
    step: a step from :func:`full_batch_step`.
    state: the state to start from.
    data: the pytree of examples, with a leading example axis, or a :class:`HostData` (one process):
      each mini-batch's rows are then read from its source and put on its devices (split over them
      like the data where their number divides the batch), so the data set need not fit in device
      memory. The numbers are those of the same epoch on the rows in device memory.
    batch_size: rows per mini-batch, a positive int.
    key: PRNG key of the shuffle.
    start: number of this epoch's batches already applied (0 to ``ceil(n / batch_size)``): the call
      applies the rest.
    on_update: optional ``on_update(position, state, metrics)``, called after each update with the
      number of this epoch's batches applied so far, e.g. to checkpoint; it must be done reading
      ``state`` when it returns (the next step may donate its buffers).

  Returns:
    ``(state, history)``: the state after the epoch and the metrics of this call's updates, in order.

  Raises:
    ValueError: a bad ``batch_size``, ``start`` or ``data``; a :class:`HostData` over several processes.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, jaxbn
    >>> def loss_fn(params, batch_stats, batch, mask):
    ...   return jnp.mean((batch["x"] @ params["w"] - 1.0) ** 2), jaxbn.training.LossAux()
    >>> opt, data = optax.sgd(0.1), {"x": jnp.arange(20.0).reshape(10, 2) / 10}
    >>> step = jaxbn.training.full_batch_step(loss_fn, opt, donate=False)
    >>> fresh = jaxbn.training.TrainState.create({"w": jnp.zeros(2)}, {}, opt)
    >>> saved = {}
    >>> def checkpoint(position, state, metrics):
    ...   saved.update(position=position, state=state) if position == 2 else None
    >>> whole, _ = jaxbn.training.minibatch_epoch(
    ...   step, fresh, data, batch_size=3, key=jax.random.key(0), on_update=checkpoint)
    >>> resumed, history = jaxbn.training.minibatch_epoch(
    ...   step, saved["state"], data, batch_size=3, key=jax.random.key(0), start=saved["position"])
    >>> len(history), bool(jnp.array_equal(resumed.params["w"], whole.params["w"]))
    (2, True)
  """
  fn = "jaxbn.training.minibatch_epoch"
  _checks.callable_arg(fn, "step", step)
  typed = isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  if not typed and not (hasattr(key, "dtype") and key.dtype == jnp.uint32 and np.shape(key)[-1:] == (2,)):
    raise TypeError(f"{fn}: key must be a jax.random.key(seed) (or raw uint32 key data), got {key!r}.")
  host = isinstance(data, HostData)  # its rows are gathered on the host, each batch put on the devices
  if host:
    if jax.process_count() > 1:
      raise ValueError(
        f"{fn}: data is a jaxbn.training.HostData over {jax.process_count()} processes, each holding its own "
        "rows, and a shuffled mini-batch draws rows from every process. Shuffle within each process instead: "
        "run the epoch on each process's rows (jax.process_count() == 1), or pass global arrays "
        "(jaxbn.parallel.global_batch) that fit in device memory."
      )
    n = data.rows
  else:
    n = num_rows(fn, data)
  size = positive_int_or_none(fn, "batch_size", batch_size)
  if size is None:
    raise ValueError(f"{fn}: batch_size must be a positive int, got None.")
  batch_size = size
  num_batches = -(-n // batch_size)
  if not _checks.is_int(start) or not 0 <= start <= num_batches:
    raise ValueError(
      f"{fn}: start must be an int from 0 to the epoch's {num_batches} batches ({n} rows in batches of "
      f"{batch_size}), got {start!r}."
    )
  if on_update is not None and not callable(on_update):
    raise TypeError(f"{fn}: on_update must be callable as on_update(position, state, metrics), got {on_update!r}.")
  order = jax.random.permutation(key, n)
  order = np.asarray(order) if host else order
  history = []
  for b in range(int(start), num_batches):
    rows = order[b * batch_size : (b + 1) * batch_size]
    batch = data.take(rows) if host else jax.tree.map(lambda a, idx=rows: a[idx], data)
    state, metrics = step(state, batch)
    history.append(metrics)
    if on_update is not None:
      on_update(b + 1, state, metrics)
  return state, history
