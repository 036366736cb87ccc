"""Full-batch (and mini-batch) gradient steps: compiled, accumulated over micro-batches, guarded.

``full_batch_step`` turns a loss function into a jitted ``step(state, data) -> (state, metrics)``
whose update uses the exact mean gradient over ALL of ``data``: micro-batches run in a ``lax.scan``
(the default) or as compiled per-micro-batch programs called from Python (``loop=``), gradients
accumulate in float32 (float64 for float64 parameters), and no per-example gradient is ever kept,
so memory is bounded by one micro-batch beyond the data itself. The loss is a :class:`Loss` (a
record of the loss function, its running-statistics update and whether it takes a key);
:func:`linen_loss` and :func:`nnx_loss` build one from a Flax model.

On one device, micro-batches are the contiguous slices ``data[k*m:(k+1)*m]`` for micro-batch size
``m`` (with ``data`` sharded over devices under ``jax.jit``, each device's block of rows is sliced
the same way, see :func:`full_batch_step`); when ``m`` does not divide the dataset size ``n``, the
last micro-batch is the slice ``data[n-m:n]`` with the rows already seen masked out, so no example
is dropped or counted twice and no padded copy of the data is made. Batch norm inside the loss
normalizes each micro-batch with its own statistics (ghost batches over that partition, Hoffer et
al. 2017); the running statistics are updated ONCE per step from the exact count-weighted merge of
every micro-batch's statistics (Chan et al. 1983), not by an EMA per micro-batch.

With ``bn_mode="exact"`` the batch norms instead normalize with their statistics over the WHOLE
dataset, and the gradient is the exact gradient of that objective (``2L + 1`` sweeps over the
micro-batches for ``L`` batch-norm layers), equal to one batch-norm pass over all the data at once.

A non-finite loss, gradient, update or batch statistic makes the step change nothing: parameters,
optimizer state AND batch statistics keep their values (``optax.apply_if_finite`` cannot protect
the batch statistics, and Flax's ImageNet example keeps the bad step's), and ``state.skipped``
counts it.

Where each mechanism lives: ``state`` (the records), ``loss`` (:class:`Loss`), ``sweep`` (the
micro-batches and their accumulation), ``loops`` (how a sweep runs: scanned or from Python),
``exact`` (full-data batch norm), ``step`` (the step and its guarded update), ``adapters`` (Flax),
``curvature`` (sharpness), ``epoch``, ``checkpoint``.

References:
  Geiping, Goldblum, Pope, Moeller & Goldstein, "Stochastic Training is Not Necessary for
  Generalization", ICLR 2022 (full-batch training with gradient accumulation and ghost batch norm).
  Hoffer, Hubara & Soudry, "Train longer, generalize better: closing the generalization gap in
  large batch training of neural networks", NeurIPS 2017 (ghost batch norm).
  Chan, Golub & LeVeque, "Algorithms for Computing the Sample Variance: Analysis and
  Recommendations", The American Statistician, 1983 (the exact merge of statistics).
"""

from jaxbn.training.adapters import linen_loss as linen_loss
from jaxbn.training.adapters import nnx_loss as nnx_loss
from jaxbn.training.checkpoint import restore_checkpoint as restore_checkpoint
from jaxbn.training.checkpoint import save_checkpoint as save_checkpoint
from jaxbn.training.curvature import sharpness as sharpness
from jaxbn.training.epoch import minibatch_epoch as minibatch_epoch
from jaxbn.training.loss import Loss as Loss
from jaxbn.training.state import LossAux as LossAux
from jaxbn.training.state import StepMetrics as StepMetrics
from jaxbn.training.state import TrainState as TrainState
from jaxbn.training.step import full_batch_step as full_batch_step
from jaxbn.training.stream import HostData as HostData

__all__ = [
  "HostData",
  "Loss",
  "LossAux",
  "StepMetrics",
  "TrainState",
  "full_batch_step",
  "linen_loss",
  "minibatch_epoch",
  "nnx_loss",
  "restore_checkpoint",
  "save_checkpoint",
  "sharpness",
]
