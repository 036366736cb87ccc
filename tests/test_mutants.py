"""The mutation check (tests/mutants/run.py): every listed mutant of jaxbn's key mechanisms is caught.

Slow (about a minute and a half of CPU in all: one targeted pytest run per mutant, each a fork of a
runner that has imported JAX, Flax and pytest once); the suite runs the same tests unmutated, so the
check skips its own unmutated run. The mutants run in three parts of similar length, separate tests
so that xdist spreads them over its workers instead of one worker running them all at the end.
"""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # subprocesses or whole scripts: CI runs them; -m 'not slow' skips them

RUNNER = pathlib.Path(__file__).with_name("mutants") / "run.py"


def _load_runner():
  spec = importlib.util.spec_from_file_location("jaxbn_mutants_run", RUNNER)
  runner = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = runner  # dataclasses look their module up while the file executes
  spec.loader.exec_module(runner)
  return runner


runner = _load_runner()


def _part(m) -> str:
  """The float64 Hessian oracle alone takes about as long as each of the other two parts."""
  if any("test_derivative_oracles.py" in t for t in m.tests):
    return "float64 Hessians"
  return "training" if m.path.startswith("jaxbn/training/") else "layers and optimizers"


PARTS = {}
for _m in runner.MUTANTS:
  PARTS.setdefault(_part(_m), []).append(_m.name)


@pytest.mark.parametrize("part", sorted(PARTS))
def test_every_mutant_is_caught(part):
  only = [arg for name in PARTS[part] for arg in ("--only", name)]
  proc = subprocess.run([sys.executable, str(RUNNER), "--no-baseline", *only], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
  assert "SURVIVED" not in proc.stdout and f"{len(PARTS[part])} of {len(PARTS[part])} mutants caught" in proc.stdout


def test_every_mutant_applies_to_the_current_code():
  # Cheap guard for contributors: a mutant whose snippet moved fails here at once, not after a run.
  root = RUNNER.parents[2]
  for m in runner.MUTANTS:
    mutated = runner.mutate((root / m.path).read_text(), m)
    assert mutated != (root / m.path).read_text()
    compile(mutated, m.path, "exec")
