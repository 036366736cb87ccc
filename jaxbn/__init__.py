"""jaxbn: batch normalization and full-batch training for JAX."""

from jaxbn.functional import BatchNormState as BatchNormState
from jaxbn.functional import batch_norm as batch_norm
from jaxbn.functional import init_state as init_state
from jaxbn.parallel import batch_map as batch_map
from jaxbn.parallel import sync_state as sync_state
from jaxbn.stats import Stats as Stats
from jaxbn.stats import moments as moments

__version__ = "0.1.0"

__all__ = [
  "BatchNormState",
  "Stats",
  "batch_map",
  "batch_norm",
  "init_state",
  "moments",
  "sync_state",
]
