"""Shared setup of the tests (tests/) and the doctests (jaxbn/, --doctest-modules): 8 virtual CPU devices,
implicit rank promotion as an error, and the hypothesis profiles.

It lives at the repository root, outside the package, so that it applies to both and never ships in the wheel.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")  # for the subprocesses some tests start
import jax
from hypothesis import HealthCheck, settings

# Must happen before JAX initializes its backend; every test process (xdist workers included)
# imports this file first.
jax.config.update("jax_num_cpu_devices", 8)
# Implicit rank promotion is an error, as in Flax's CI (JAX_NUMPY_RANK_PROMOTION=raise): the library
# must broadcast explicitly to work in such programs.
jax.config.update("jax_numpy_rank_promotion", "raise")

# Hypothesis: "ci" (the default) runs a fixed set of examples, the same on every run and machine, with
# no example database; `pytest --hypothesis-profile=long` explores many more, with random seeds.
settings.register_profile(
  "ci", max_examples=25, derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("long", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")
