"""Shared setup of the tests (tests/) and the doctests (jaxbn/, --doctest-modules): 8 virtual CPU devices,
implicit rank promotion as an error, one compilation cache per run, and the hypothesis profiles.

It lives at the repository root, outside the package, so that it applies to both and never ships in the wheel.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")  # for the subprocesses some tests start
# One persistent compilation cache for every process of a test run (xdist workers and the scripts,
# notebooks, mutants and multi-process workers the tests start inherit the variable): a program that
# several tests or processes compile alike (an oracle, the unmutated code around a mutant) compiles
# once. Its key is the program's full HLO, compile options and versions, so a changed program never
# hits. Made by the first process of the run, which removes it at exit; JAX_COMPILATION_CACHE_DIR=""
# turns it off, any other value uses that folder and keeps it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache = tempfile.mkdtemp(prefix="jaxbn-test-xla-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
# The tests' programs are small and run once or a few times: most of their time is compilation. JAX's
# "disable most optimizations" turns off LLVM's optimization passes only (XLA's HLO passes, and so
# every fusion, layout and collective the tests inspect, are those users get), which roughly halves
# compile times here; the suite passes either way. JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs it fully optimized.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
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
