"""Executes notebooks/*.ipynb at their CPU sizes and stores them, outputs included, under docs/notebooks/.

The documentation renders these stored copies without executing anything, so building the site takes
seconds; tests/test_docs.py checks that their cells are the notebooks' own. Rerun after editing a
notebook (about 2 minutes on 2 CPU cores):

    python docs/render_notebooks.py                 # all four
    python docs/render_notebooks.py quickstart      # one
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile
import time

import nbformat
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE, TARGET = ROOT / "notebooks", ROOT / "docs" / "notebooks"
NAMES = ("quickstart", "full_batch_training", "multi_device", "full_batch_vs_sgd")
# The multi-device notebook makes its own 8 CPU devices in a fresh kernel; the others run on one device.
ENV = {"XLA_FLAGS": "", "PYTHONPATH": str(ROOT), "JAXBN_NOTEBOOK_SMOKE": "0", "PYTHONHASHSEED": "0"}


def hide_install_cell(nb: nbformat.NotebookNode) -> None:
  """The site folds the install cell away (a click shows it): a reader of the site has jaxbn already."""
  first = next(cell for cell in nb.cells if cell.cell_type == "code")
  tags = first.metadata.setdefault("tags", [])
  if "hide-input" not in tags:
    tags.append("hide-input")


def render(name: str, kernels: pathlib.Path) -> float:
  nb = nbformat.read(SOURCE / f"{name}.ipynb", as_version=4)
  km = KernelManager(kernel_name="jaxbn-docs", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
  client = NotebookClient(nb, km=km, timeout=1200, allow_errors=False, resources={"metadata": {"path": str(ROOT)}})
  start = time.perf_counter()
  env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
  client.execute(env={**env, **ENV})
  elapsed = time.perf_counter() - start
  nb.metadata.pop("widgets", None)
  hide_install_cell(nb)
  TARGET.mkdir(exist_ok=True)
  nbformat.write(nb, TARGET / f"{name}.ipynb")
  return elapsed


def main(argv: list[str]) -> int:
  names = argv or list(NAMES)
  with tempfile.TemporaryDirectory() as tmp:
    kernels = pathlib.Path(tmp)
    (kernels / "jaxbn-docs").mkdir()
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"], "language": "python"}
    (kernels / "jaxbn-docs" / "kernel.json").write_text(json.dumps({**spec, "display_name": "jaxbn docs"}))
    for name in names:
      print(f"{name}: executing...", flush=True)
      print(f"{name}: {render(name, kernels):.0f} s, written to {TARGET / name}.ipynb", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
