"""Doctests in the package run with the same 8 virtual CPU devices as the test suite."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
