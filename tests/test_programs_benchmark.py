"""``benchmarks/programs.py``: its fingerprint ignores what moves with the source and sees what changes the program."""

import jax
import jax.numpy as jnp
from _benchmark_scripts import load as _load_script


def _fingerprint(f, *args):
  programs = _load_script("programs")
  return programs.normalized(jax.jit(f).lower(*args).compile().as_text())


def test_same_program_from_other_source_lines_same_fingerprint():
  x = jnp.arange(6.0)

  def first(x):
    return jnp.sin(x) * 2.0

  # Another function, another line, a trace after others (other instruction counters): same program.
  jax.jit(lambda x: jnp.cos(x) + 1.0).lower(x).compile()

  def second(y):
    return jnp.sin(y) * 2.0

  assert _fingerprint(first, x) == _fingerprint(second, x)


def test_another_program_another_fingerprint():
  x = jnp.arange(6.0)
  assert _fingerprint(lambda x: jnp.sin(x) * 2.0, x) != _fingerprint(lambda x: jnp.sin(x) * 3.0, x)
