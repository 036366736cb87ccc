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
NAMES = ("quickstart", "full_batch_training", "multi_device")
CELL_TIMEOUT_S = 300  # generous for a loaded CI machine; each cell takes seconds at smoke sizes
KERNEL = "jaxbn-test-python"
OWNER = "jaxbn-dev"  # placeholder owner of the repository until it is public (see notebooks/README.md)

# Environment of the kernel beyond the test process's. The full-batch notebook gets 2 CPU devices,
# so that its data-sharding path runs; the multi-device notebook must create its own 8 in a fresh
# kernel, so it gets no device flags at all.
EXTRA_ENV = {
  "quickstart": {},
  "full_batch_training": {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
  "multi_device": {"XLA_FLAGS": ""},
}
# Printed lines that show which path each notebook took in the kernel.
EXPECTED_OUTPUT = {
  "quickstart": ["default backend 'cpu': CPU", "closed-form and autodiff gradients agree"],
  "full_batch_training": ["data sharded over 2 devices", "statistics of all 800 training examples"],
  "multi_device": ["8 devices (cpu)", "jaxbn.batch_map: output, running statistics and gradients match"],
}


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
  badge = (
    "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
    f"(https://colab.research.google.com/github/{OWNER}/jaxbn/blob/main/notebooks/{name}.ipynb)"
  )
  assert nb.cells[0].cell_type == "markdown" and badge in nb.cells[0].source
  # Committed without outputs.
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None
  code = _code(nb)
  assert 'IN_COLAB = "google.colab" in sys.modules' in code[0]
  detect = code[1]
  for needed in ("JAXBN_NOTEBOOK_SMOKE", "jax.default_backend()", "jax.devices()", '"TPU"', '"GPU"', '"CPU"'):
    assert needed in detect, (name, needed)


@pytest.mark.parametrize("name", NAMES)
def test_install_cell_installs_only_on_colab(name):
  # pip runs in the body of `if IN_COLAB:` and nowhere else.
  tree = ast.parse(_code(_read(name))[0])
  guarded = [s for s in tree.body if isinstance(s, ast.If) and ast.unparse(s.test) == "IN_COLAB"]
  assert len(guarded) == 1 and "pip" in ast.unparse(guarded[0]) and not guarded[0].orelse
  for stmt in tree.body:
    if stmt is not guarded[0]:
      assert not {"pip", "subprocess"} & set(ast.unparse(stmt).replace(".", " ").split()), ast.unparse(stmt)
  # The multi-device notebook's first cell also creates the virtual CPU devices, before any JAX use.
  if name == "multi_device":
    assert 'jax.config.update("jax_num_cpu_devices", 8)' in _code(_read(name))[0]


def _pip_calls(name, monkeypatch, *, jax_version, tpu=False, gpu=False, colab=True):
  """Runs the install cell as Colab would, with pip replaced by a recorder; returns the pip argument lists."""
  import importlib.metadata
  import shutil
  import types

  calls = []

  def fake_run(cmd, **kwargs):
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"] and kwargs.get("check") is True
    calls.append(cmd[4:])

  real_version = importlib.metadata.version
  monkeypatch.setattr(subprocess, "run", fake_run)
  monkeypatch.setattr(importlib.metadata, "version", lambda d: jax_version if d == "jax" else real_version(d))
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
  assert namespace["IN_COLAB"] is colab
  return calls


@pytest.mark.parametrize("name", NAMES)
def test_install_cell_on_colab_keeps_a_recent_jax(name, monkeypatch):
  jaxbn = f"jaxbn @ git+https://github.com/{OWNER}/jaxbn.git"
  assert _pip_calls(name, monkeypatch, jax_version="0.10.2", tpu=True) == [["--quiet", jaxbn, "mnist1d"]]
  assert _pip_calls(name, monkeypatch, jax_version="0.4.33", tpu=True) == [
    ["--quiet", jaxbn, "mnist1d", "jax[tpu]>=0.10"]
  ]
  assert _pip_calls(name, monkeypatch, jax_version="0.4.33", gpu=True)[0][-1] == "jax[cuda12]>=0.10"
  assert _pip_calls(name, monkeypatch, jax_version="0.4.33")[0][-1] == "jax>=0.10"
  assert _pip_calls(name, monkeypatch, jax_version="0.4.33", tpu=True, colab=False) == []


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
  if name == "full_batch_training":  # the data and the loss/accuracy curves are plotted
    images = [out for out in outputs if out.output_type == "display_data" and "image/png" in out.data]
    assert len(images) == 2
