"""The one place that says where jaxbn's source lives publicly; the notebooks follow it.

While ``REPOSITORY`` is None the notebooks carry no "Open in Colab" badge (a badge to a placeholder address
leads nowhere) and their install cell installs ``JAXBN_SOURCE = "jaxbn"``, the package name for when jaxbn is
published. Once the repository is public, set ``REPOSITORY`` (``"owner/jaxbn"`` on GitHub) and run

    python notebooks/badges.py

which puts the badge into each notebook's first cell and points each install cell at the repository;
``tests/test_notebooks.py`` checks that the notebooks agree with this file.
"""

from __future__ import annotations

import pathlib
import re
import sys

import nbformat

REPOSITORY: str | None = None  # e.g. "owner/jaxbn" on GitHub, once public
HERE = pathlib.Path(__file__).resolve().parent
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"


def badge(name: str) -> str | None:
  """The Colab badge of notebooks/<name>.ipynb in Markdown, or None while there is no public repository."""
  if REPOSITORY is None:
    return None
  return f"[![Open In Colab]({BADGE_IMAGE})](https://colab.research.google.com/github/{REPOSITORY}/blob/main/notebooks/{name}.ipynb)"


def source() -> str:
  """What the notebooks' install cell installs jaxbn from when it is missing."""
  return "jaxbn" if REPOSITORY is None else f"jaxbn @ git+https://github.com/{REPOSITORY}.git"


def apply(nb: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
  """Sets the badge under the notebook's title and the install cell's JAXBN_SOURCE from REPOSITORY."""
  title, *rest = [line for line in nb.cells[0].source.split("\n\n") if BADGE_IMAGE not in line]
  nb.cells[0].source = "\n\n".join([title, *([badge(name)] if badge(name) else []), *rest])
  install = next(cell for cell in nb.cells if cell.cell_type == "code")
  install.source = re.sub(r'^JAXBN_SOURCE = ".*?"', f'JAXBN_SOURCE = "{source()}"', install.source, count=1, flags=re.M)
  return nb


def main(argv: list[str]) -> int:
  for path in sorted(HERE.glob("*.ipynb")):
    nb = nbformat.read(path, as_version=4)
    nbformat.write(apply(nb, path.stem), path)
    print(f"{path.name}: badge {'set' if REPOSITORY else 'none'}, JAXBN_SOURCE = {source()!r}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
