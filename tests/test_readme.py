"""The Python examples of the README and of the documentation pages (docs/*.md) run as written.

The blocks of one page run in order in one namespace, as a reader pastes them; a page whose blocks need
a peer library (torch, haiku, equinox: the `peers` extra) skips without it, naming it.
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


def test_the_pages_that_held_the_readme_examples_still_have_them():
  names = {page.relative_to(ROOT).as_posix() for page in PAGES_WITH_CODE}
  for page in ("README.md", "docs/getting_started.md", "docs/multiple_devices.md", "docs/full_batch_training.md"):
    assert page in names, page
  for page in ("docs/flax_modules.md", "docs/coming_from.md", "docs/masks.md", "docs/pure_function.md"):
    assert page in names, page


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_page_python_blocks_run(page):
  blocks = _blocks(page)
  for peer in PEERS:
    if any(re.search(rf"^import {peer}\b", block, flags=re.M) for block in blocks):
      pytest.importorskip(peer, reason=f"{page.name} compares with {peer} (pip install -e '.[peers]')")
  namespace = {}
  for index, block in enumerate(blocks):
    exec(compile(block, f"{page.relative_to(ROOT)}[python block {index}]", "exec"), namespace)
