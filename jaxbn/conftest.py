"""Doctests in the package run with the same 8 virtual CPU devices as the test suite."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
# Implicit rank promotion is an error, as in Flax's CI (JAX_NUMPY_RANK_PROMOTION=raise): the library
# must broadcast explicitly to work in such programs.
jax.config.update("jax_numpy_rank_promotion", "raise")
