"""Shared test setup: 8 virtual CPU devices and float64 available where a test asks for it."""

import os

os.environ.setdefault("XLA_FLAGS", "")
import jax

# Must happen before JAX initializes its backend; every test process (xdist workers included)
# imports this file first.
jax.config.update("jax_num_cpu_devices", 8)
