"""Reductions over pytrees that the transforms and the training steps share, in at least float32."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ["accumulation_dtype", "global_norm"]


def accumulation_dtype(dtype: Any) -> jnp.dtype:
  """float32, or float64 for float64 leaves: the precision norms and projections are computed in."""
  return jnp.promote_types(dtype, jnp.float32)


def global_norm(tree: Any) -> jax.Array:
  """The global l2 norm of ``tree``, accumulated in at least float32 (bf16 gradients included)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return optax.tree.norm(jax.tree.map(lambda x: jnp.asarray(x).astype(accumulation_dtype(jnp.result_type(x))), tree))
