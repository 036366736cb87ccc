"""The Colab notebooks in notebooks/: their shape, their Colab install cell, and each one run end to end.

Every notebook runs in a fresh Jupyter kernel of this interpreter (``sys.executable``, through a
kernel spec written to a temporary folder, so no installed ``python3`` kernel spec is needed), with
``JAXBN_NOTEBOOK_SMOKE=1`` so that it uses small sizes. A cell that raises fails the test; the
notebooks assert their own claims (exact statistics, matching gradients) in their cells.
"""

import ast
import json
import os
import pathlib
import subprocess
import sys

import nbformat
import pytest
from _deadlines import scaled
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # subprocesses or whole scripts: CI runs them; -m 'not slow' skips them

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("quickstart", "full_batch_training", "multi_device", "full_batch_vs_sgd")
CELL_TIMEOUT_S = 300  # generous for a loaded CI machine; each cell takes seconds at smoke sizes
KERNEL = "jaxbn-test-python"
sys.path.insert(0, str(NOTEBOOKS))
import badges  # noqa: E402 (notebooks/badges.py: where jaxbn's source lives publicly, once it does)

# Environment of the kernel beyond the test process's. The full-batch notebook gets 2 CPU devices,
# so that its data-sharding path runs; the multi-device notebook must create its own 8 in a fresh
# kernel, so it gets no device flags at all.
EXTRA_ENV = {
  "quickstart": {},
  "full_batch_training": {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
  "multi_device": {"XLA_FLAGS": ""},
  "full_batch_vs_sgd": {},
}
# Printed lines that show which path each notebook took in the kernel.
EXPECTED_OUTPUT = {
  "quickstart": ["default backend 'cpu': CPU", "closed-form and autodiff gradients agree"],
  "full_batch_training": [
    "micro-batches on the 'scan' loop",
    "data sharded over 2 devices",
    "statistics of all 800 training examples",
  ],
  "multi_device": ["8 devices (cpu)", "jaxbn.batch_map: output, running statistics and gradients match"],
  "full_batch_vs_sgd": [
    "400 training rows, 2 passes per run, seeds (0,), penalty by 'finite_difference'",
    "SGD, batch 32, seed 0: test accuracy",
    "full batch + recipe, seed 0: test accuracy",
    "every arm trained and measured; the penalty arm reports a positive gradient penalty",
  ],
}
# Figures each notebook shows: full_batch_training the data and the loss/accuracy curves, full_batch_vs_sgd
# test accuracy against passes.
IMAGES = {"full_batch_training": 2, "full_batch_vs_sgd": 1}


def _read(name: str) -> nbformat.NotebookNode:
  return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def _code(nb: nbformat.NotebookNode) -> list[str]:
  return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def test_the_notebook_folder_holds_exactly_the_notebooks_tested():
  assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_shape(name):
  nb = _read(name)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == "python3"
  assert nb.metadata.get("accelerator") == "TPU"  # Colab opens it on a TPU runtime
  # A badge only where it leads somewhere: none while the repository has no public address.
  if badges.badge(name) is None:
    assert "colab-badge" not in nb.cells[0].source and "colab.research.google.com" not in nb.cells[0].source
  else:
    assert badges.badge(name) in nb.cells[0].source
  assert badges.apply(_read(name), name) == nb  # notebooks/badges.py has nothing left to change
  # Committed without outputs.
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None
  code = _code(nb)
  # full_batch_step's default loop="auto" (the scanned loop), never forced.
  assert not any("loop=" in source for source in code), name
  assert 'IN_COLAB = "google.colab" in sys.modules' in code[0]
  assert f'\nJAXBN_SOURCE = "{badges.source()}"\n' in code[0]  # the one place a user edits
  detect = code[1]
  for needed in ("JAXBN_NOTEBOOK_SMOKE", "jax.default_backend()", "jax.devices()", '"TPU"', '"GPU"', '"CPU"'):
    assert needed in detect, (name, needed)


@pytest.mark.parametrize("name", NAMES)
def test_install_cell_installs_only_what_is_missing_and_only_on_colab(name):
  # pip runs in the body of `if MISSING and IN_COLAB:` and nowhere else.
  tree = ast.parse(_code(_read(name))[0])
  guarded = [s for s in tree.body if isinstance(s, ast.If) and ast.unparse(s.test) == "MISSING and IN_COLAB"]
  assert len(guarded) == 1 and "pip" in ast.unparse(guarded[0]) and not guarded[0].orelse
  for stmt in tree.body:
    if stmt is not guarded[0]:
      assert not {"pip", "subprocess"} & set(ast.unparse(stmt).replace(".", " ").split()), ast.unparse(stmt)
  # The multi-device notebook's first cell also creates the virtual CPU devices, before any JAX use.
  if name == "multi_device":
    assert 'jax.config.update("jax_num_cpu_devices", 8)' in _code(_read(name))[0]


def _pip_calls(name, monkeypatch, *, jax_version, tpu=False, gpu=False, colab=True, missing=("jaxbn",), pip_ok=True):
  """Runs the install cell with pip replaced by a recorder and ``missing`` not importable until pip succeeds.

  Returns the pip argument lists.
  """
  import importlib.metadata
  import importlib.util
  import shutil
  import types

  calls, absent = [], set(missing)

  def fake_run(cmd, **kwargs):
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"] and kwargs.get("check") is False
    calls.append(cmd[4:])
    if pip_ok:
      absent.clear()
    return subprocess.CompletedProcess(cmd, 0 if pip_ok else 1)

  real_version, real_find_spec = importlib.metadata.version, importlib.util.find_spec
  monkeypatch.setattr(subprocess, "run", fake_run)
  monkeypatch.setattr(importlib.metadata, "version", lambda d: jax_version if d == "jax" else real_version(d))
  monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in absent else real_find_spec(n, *a))
  monkeypatch.setattr(shutil, "which", lambda cmd: "/usr/bin/nvidia-smi" if gpu and cmd == "nvidia-smi" else None)
  monkeypatch.delenv("TPU_ACCELERATOR_TYPE", raising=False)
  if tpu:
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v2-8")
  if colab:
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
  else:
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
  source = _code(_read(name))[0]
  namespace = {}
  exec(compile(source, f"{name}.ipynb[install]", "exec"), namespace)
  assert namespace["IN_COLAB"] is colab and namespace["MISSING"] == []
  return calls


@pytest.mark.parametrize("name", NAMES)
def test_install_cell_on_colab_keeps_a_recent_jax(name, monkeypatch):
  jaxbn = badges.source()
  assert _pip_calls(name, monkeypatch, jax_version="0.10.2", tpu=True) == [["--quiet", jaxbn]]
  assert _pip_calls(name, monkeypatch, jax_version="0.10.2", missing=("jaxbn", "mnist1d")) == [
    ["--quiet", jaxbn, "mnist1d"]
  ]
  assert _pip_calls(name, monkeypatch, jax_version="0.4.33", tpu=True) == [["--quiet", jaxbn, "jax[tpu]>=0.10"]]
  assert _pip_calls(name, monkeypatch, jax_version="0.4.33", gpu=True)[0][-1] == "jax[cuda12]>=0.10"
  assert _pip_calls(name, monkeypatch, jax_version="0.4.33")[0][-1] == "jax>=0.10"
  # jaxbn importable already (a clone, or a second run): nothing is installed, on Colab or elsewhere.
  assert _pip_calls(name, monkeypatch, jax_version="0.4.33", tpu=True, missing=()) == []
  assert _pip_calls(name, monkeypatch, jax_version="0.4.33", colab=False, missing=()) == []


@pytest.mark.parametrize("name", NAMES)
def test_install_cell_says_what_to_do_when_jaxbn_cannot_be_installed(name, monkeypatch):
  with pytest.raises(
    RuntimeError, match=r"(?s)missing jaxbn, and pip could not install.*JAXBN_SOURCE = 'jaxbn'.*python -m build.*clone"
  ):
    _pip_calls(name, monkeypatch, jax_version="0.10.2", pip_ok=False)
  with pytest.raises(RuntimeError, match=r"(?s)missing jaxbn, and this cell installs only on Colab.*pip install -e"):
    _pip_calls(name, monkeypatch, jax_version="0.10.2", colab=False)


@pytest.fixture(scope="module")
def kernel_spec_manager(tmp_path_factory):
  """A kernel spec that starts ipykernel with this very interpreter, in a folder of its own."""
  kernels = tmp_path_factory.mktemp("kernels")
  (kernels / KERNEL).mkdir()
  spec = {
    "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    "display_name": "jaxbn test kernel",
    "language": "python",
  }
  (kernels / KERNEL / "kernel.json").write_text(json.dumps(spec))
  return KernelSpecManager(kernel_dirs=[str(kernels)])


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_end_to_end(name, kernel_spec_manager, tmp_path):
  nb = _read(name)
  probe = "import sys\nprint(sys.executable)"  # appended here only: the kernel must be this interpreter
  nb.cells.append(nbformat.v4.new_code_cell(probe))
  env = {**os.environ, "JAXBN_NOTEBOOK_SMOKE": "1", "PYTHONHASHSEED": "0", **EXTRA_ENV[name]}
  env.pop("MPLBACKEND", None)  # the kernel's inline backend shows the figures
  km = AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_spec_manager)
  client = NotebookClient(
    nb, km=km, timeout=int(scaled(CELL_TIMEOUT_S)), allow_errors=False, resources={"metadata": {"path": str(tmp_path)}}
  )
  client.execute(env=env)  # raises CellExecutionError, with the cell and its traceback, if a cell fails

  outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
  assert not [out for out in outputs if out.output_type == "error"]
  text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream" and out.name == "stdout")
  for expected in EXPECTED_OUTPUT[name]:
    assert expected in text, (name, expected)
  assert nb.cells[-1].outputs[0].text.strip() == sys.executable
  if name in IMAGES:
    images = [out for out in outputs if out.output_type == "display_data" and "image/png" in out.data]
    assert len(images) == IMAGES[name]
