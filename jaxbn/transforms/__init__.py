"""Optax gradient transformations against gradient explosion and for scale-invariant weights.

Each factory returns an ``optax.GradientTransformation`` whose state is a NamedTuple, so it chains with
any Optax optimizer (``optax.chain``), runs under ``jax.jit``, accepts ``optax.inject_hyperparams`` and
works on sharded parameters (all reductions are ordinary ``jnp`` reductions; XLA inserts the collectives).

Two ideas live here, in three submodules; every public name is importable from ``jaxbn.transforms`` itself:

* **Running statistics of the gradient norm** (``jaxbn.transforms.clipping``): ``clip_by_running_norm``
  applies batch norm's explicit running mean and variance to the global gradient norm to find spikes, as
  ZClip does; ``scale_by_norm_damping`` damps every update by its norm instead.
* **Scale invariance** (``jaxbn.transforms.projection``: ``project_scale_invariant``, ``adamp``, ``sgdp``):
  a weight that feeds a batch norm only matters through its direction, so the radial part of its update only
  shrinks the effective learning rate; AdamP/SGDP remove it. The masks of ``jaxbn.transforms.masks`` come
  from the model: ``scale_invariant_mask`` finds those weights from the model's dataflow and
  ``batch_norm_mask`` finds the batch-norm parameters (to exclude from weight decay).

What Optax already has is composed with, not re-implemented: ``optax.clip_by_global_norm`` (a hard cap),
``optax.adaptive_grad_clip``, ``optax.apply_if_finite`` (skip non-finite steps), ``optax.MultiSteps``
(gradient accumulation), ``optax.masked`` / ``optax.partition`` (apply to a subset of leaves) and
``optax.lars``. The docstrings of the factories show how.

References:
  Kumar, Owen, Chowdhury, Güra, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", arXiv:2504.02507, 2025.
  Heo, Chun, Oh, Han, Yun, Kim, Uh, Ha, "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
  Scale-invariant Weights", ICLR 2021.
"""

from jaxbn.transforms.clipping import ClipByRunningNormState, clip_by_running_norm, scale_by_norm_damping
from jaxbn.transforms.clipping import ClipMode as ClipMode
from jaxbn.transforms.masks import batch_norm_mask, register_batch_norm, scale_invariant_mask
from jaxbn.transforms.projection import ProjectScaleInvariantState, adamp, project_scale_invariant, sgdp

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
