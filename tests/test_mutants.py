"""The mutation check (tests/mutants/run.py): every listed mutant of jaxbn's key mechanisms is caught.

Slow (about two minutes on 2 cores: one targeted pytest run per mutant); the suite runs the same tests
unmutated, so the check skips its own unmutated run.
"""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # subprocesses or whole scripts: CI runs them; -m 'not slow' skips them

RUNNER = pathlib.Path(__file__).with_name("mutants") / "run.py"


def test_every_mutant_is_caught():
  proc = subprocess.run([sys.executable, str(RUNNER), "--no-baseline"], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
  assert "SURVIVED" not in proc.stdout and " mutants caught" in proc.stdout


def test_every_mutant_applies_to_the_current_code():
  # Cheap guard for contributors: a mutant whose snippet moved fails here at once, not after a run.
  spec = importlib.util.spec_from_file_location("jaxbn_mutants_run", RUNNER)
  runner = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = runner  # dataclasses look their module up while the file executes
  spec.loader.exec_module(runner)
  root = RUNNER.parents[2]
  for m in runner.MUTANTS:
    mutated = runner.mutate((root / m.path).read_text(), m)
    assert mutated != (root / m.path).read_text()
    compile(mutated, m.path, "exec")
