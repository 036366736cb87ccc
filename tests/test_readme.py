"""The Python examples of the README and of the documentation pages (docs/*.md) run as written.

Each block runs on its own, in a fresh namespace, so that xdist spreads the long ones over its workers;
on the pages in GROUPED a block may go on from the one before (the side-by-side pairs), so there each
group of consecutive blocks runs in order in one namespace. Blocks that need a peer library (torch, haiku, equinox: the `peers` extra) skip
without it, naming it.
"""

import pathlib
import re

import pytest

pytestmark = pytest.mark.slow  # whole programs: CI runs them; -m "not slow" skips them

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PEERS = ("torch", "haiku", "equinox")


def _blocks(page: pathlib.Path) -> list[str]:
  return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


PAGES_WITH_CODE = [page for page in PAGES if _blocks(page)]
GROUPED = {"docs/coming_from.md": 2}  # each library's block, then jaxbn's on the same data
CASES = [
  (page, range(start, start + GROUPED.get(page.relative_to(ROOT).as_posix(), 1)))
  for page in PAGES_WITH_CODE
  for start in range(0, len(_blocks(page)), GROUPED.get(page.relative_to(ROOT).as_posix(), 1))
]


def test_the_pages_that_held_the_readme_examples_still_have_them():
  names = {page.relative_to(ROOT).as_posix() for page in PAGES_WITH_CODE}
  for page in ("README.md", "docs/getting_started.md", "docs/multiple_devices.md", "docs/full_batch_training.md"):
    assert page in names, page
  for page in ("docs/flax_modules.md", "docs/coming_from.md", "docs/masks.md", "docs/pure_function.md"):
    assert page in names, page


@pytest.mark.parametrize(
  ("page", "indices"),
  CASES,
  ids=[f"{p.relative_to(ROOT).as_posix()}[{i[0]}{'' if len(i) == 1 else f'-{i[-1]}'}]" for p, i in CASES],
)
def test_page_python_blocks_run(page, indices):
  blocks = [_blocks(page)[index] for index in indices]
  for peer in PEERS:
    if any(re.search(rf"^import {peer}\b", block, flags=re.M) for block in blocks):
      pytest.importorskip(peer, reason=f"{page.name} compares with {peer} (pip install -e '.[peers]')")
  namespace = {}
  for index, block in zip(indices, blocks):
    exec(compile(block, f"{page.relative_to(ROOT)}[python block {index}]", "exec"), namespace)
