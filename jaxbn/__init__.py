"""jaxbn: batch normalization and full-batch training for JAX.

The core is pure functions over arrays and NamedTuple states (``batch_norm``, ``moments``); the
Flax modules live in ``jaxbn.linen`` and ``jaxbn.nnx``, Optax transformations in
``jaxbn.transforms``, full-batch steps in ``jaxbn.training``, stability diagnostics (per-layer
norms, sharpness) in ``jaxbn.diagnostics``.
"""

from jaxbn import diagnostics as diagnostics
from jaxbn import linen as linen
from jaxbn import nnx as nnx
from jaxbn import training as training
from jaxbn import transforms as transforms
from jaxbn.diagnostics import hessian_vector_product as hessian_vector_product
from jaxbn.diagnostics import norms_by_layer as norms_by_layer
from jaxbn.diagnostics import stability_threshold as stability_threshold
from jaxbn.diagnostics import top_hessian_eigenvalue as top_hessian_eigenvalue
from jaxbn.functional import BatchNormState as BatchNormState
from jaxbn.functional import batch_norm as batch_norm
from jaxbn.functional import init_state as init_state
from jaxbn.functional import normalize as normalize
from jaxbn.functional import update_running_stats as update_running_stats
from jaxbn.inference import fold_batch_norm as fold_batch_norm
from jaxbn.inference import fold_batch_norms as fold_batch_norms
from jaxbn.inference import recalibrate as recalibrate
from jaxbn.parallel import batch_map as batch_map
from jaxbn.parallel import sync_state as sync_state
from jaxbn.stats import Stats as Stats
from jaxbn.stats import moments as moments
from jaxbn.variants import RenormSchedule as RenormSchedule
from jaxbn.variants import batch_renorm as batch_renorm
from jaxbn.variants import ghost_batch_norm as ghost_batch_norm
from jaxbn.variants import paper_dmax as paper_dmax
from jaxbn.variants import paper_rmax as paper_rmax
from jaxbn.variants import renorm_schedule as renorm_schedule

__version__ = "0.1.0"

__all__ = [
  "BatchNormState",
  "RenormSchedule",
  "Stats",
  "batch_map",
  "batch_norm",
  "batch_renorm",
  "diagnostics",
  "fold_batch_norm",
  "fold_batch_norms",
  "ghost_batch_norm",
  "hessian_vector_product",
  "init_state",
  "linen",
  "moments",
  "nnx",
  "normalize",
  "norms_by_layer",
  "paper_dmax",
  "paper_rmax",
  "recalibrate",
  "renorm_schedule",
  "stability_threshold",
  "sync_state",
  "top_hessian_eigenvalue",
  "training",
  "transforms",
  "update_running_stats",
]
