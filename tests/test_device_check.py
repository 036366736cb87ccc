"""``benchmarks/device_check.sh``, the one-call accelerator check, stays in step with what it runs.

A machine with an accelerator is lent only now and then, for minutes: the script must run there at the
first try. This checks, without running it, that bash parses it, that both of its settings (the full run
and ``--smoke``) pass arguments the benchmark scripts accept and contenders they know, that its test files
exist, and that its time limits fit the budget its header states. ``JAX_PLATFORMS=cpu bash
benchmarks/device_check.sh --smoke`` runs every step here.
"""

import re
import subprocess

import pytest
from _benchmark_scripts import ROOT
from _benchmark_scripts import load as _load_script

SCRIPT = ROOT / "benchmarks" / "device_check.sh"
ARRAYS = ("FULL_BATCH_ARGS", "BATCH_NORM_ARGS", "TEST_FILES", "LIMITS")


def _settings(mode: str) -> dict:
  """The script's settings as bash evaluates them, for its full run (``mode=""``) or ``--smoke``."""
  block = re.search(r"^CONTENDERS=.*?^fi$", SCRIPT.read_text(), re.M | re.S).group(0)
  show = "".join(f'printf "%s\\0" {name} "${{#{name}[@]}}" "${{{name}[@]}}"\n' for name in ARRAYS)
  program = f'set -- {mode}\n{block}\nprintf "%s\\0" "$CONTENDERS"\n{show}'
  fields = subprocess.run(["bash", "-c", program], check=True, capture_output=True, text=True).stdout.split("\0")
  settings, rest = {"CONTENDERS": fields[0].split(",")}, fields[1:]
  for name in ARRAYS:
    assert rest[0] == name
    count = int(rest[1])
    settings[name], rest = rest[2 : 2 + count], rest[2 + count :]
  return settings


def test_bash_parses_the_script():
  subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.parametrize("mode", ["", "--smoke"])
def test_its_arguments_contenders_and_test_files_exist(mode, tmp_path):
  settings = _settings(mode)
  full_batch, batch_norm = _load_script("full_batch"), _load_script("batch_norm")
  known = set(full_batch.CONTENDERS) | set(full_batch.DIAGNOSTICS)
  assert set(settings["CONTENDERS"]) <= known, set(settings["CONTENDERS"]) - known
  assert full_batch.MULTISTEPS in settings["CONTENDERS"] and set(full_batch.DEFAULTS) <= set(settings["CONTENDERS"])
  args = full_batch.parse_args(["--contenders", ",".join(settings["CONTENDERS"]), *settings["FULL_BATCH_ARGS"]])
  assert args.rss is False and args.buffers is False  # host-memory measurements say nothing about an accelerator
  args = batch_norm.parse_args([*settings["BATCH_NORM_ARGS"], "--out", str(tmp_path)])
  assert args.gpu
  assert settings["TEST_FILES"] and all((ROOT / f).is_file() for f in settings["TEST_FILES"])
  assert len(settings["LIMITS"]) == 3


def test_its_time_limits_fit_the_budget_it_states():
  limits = [int(s) for s in _settings("")["LIMITS"]]
  stated = re.search(r"The step limits add up to ([\d.]+) minutes", SCRIPT.read_text())
  assert stated and sum(limits) == float(stated.group(1)) * 60
  assert sum(limits) <= 7 * 60  # a lent machine gives 15 minutes: its start, this run and one rerun
