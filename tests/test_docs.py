"""The documentation site (docs/): it builds with warnings as errors, its links resolve, and it renders.

The slow test builds the whole site once into a temporary folder (``sphinx-build -W``: a broken
cross-reference, a docstring Sphinx cannot parse or a public name missing from the API reference fails
it), follows every internal link of every page, looks for ``full_batch_step`` in the search index, and
opens the home page, an API page and a rendered notebook in headless Chromium, as a person would, saving
screenshots beside the build. The notebooks are rendered from the outputs stored in docs/notebooks/
(nothing is executed at build time); the quick tests check that those stored copies hold exactly the
cells of notebooks/.
"""

import html.parser
import pathlib
import re
import shutil
import subprocess
import sys
import urllib.parse

import nbformat
import pytest
from _deadlines import scaled

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NOTEBOOKS = ("quickstart", "full_batch_training", "multi_device", "full_batch_vs_sgd")
BUILD_TIMEOUT_S = 300  # about 25 s on 2 idle cores


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_notebook_has_the_cells_of_the_notebook(name):
  source = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
  stored = nbformat.read(DOCS / "notebooks" / f"{name}.ipynb", as_version=4)
  assert [(c.cell_type, c.source) for c in stored.cells] == [(c.cell_type, c.source) for c in source.cells], (
    f"docs/notebooks/{name}.ipynb is stale: run `python docs/render_notebooks.py {name}`"
  )
  code = [cell for cell in stored.cells if cell.cell_type == "code"]
  assert sum(bool(cell.outputs) for cell in code) >= len(code) // 2, "stored without outputs"
  assert not [out for cell in code for out in cell.outputs if out.output_type == "error"]


def test_readme_links_resolve():
  # The README is the landing page: each of its links into the repository (docs/ pages, notebooks/) exists.
  readme = (ROOT / "README.md").read_text()
  targets = [t for t in re.findall(r"\]\(([^)#\s]+)[^)]*\)", readme) if "://" not in t]
  assert "docs/getting_started.md" in targets
  assert not [t for t in targets if not (ROOT / t).exists()]


class _Page(html.parser.HTMLParser):
  """The title, the element ids and the local link targets of one HTML page."""

  def __init__(self):
    super().__init__()
    self.title, self.ids, self.links, self._in_title = "", set(), [], False

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if attrs.get("id"):
      self.ids.add(attrs["id"])
    if tag == "title":
      self._in_title = True
    for key in ("href", "src"):
      target = attrs.get(key)
      if target and not urllib.parse.urlparse(target).scheme and not target.startswith(("//", "mailto:")):
        self.links.append(target)

  def handle_endtag(self, tag):
    self._in_title = self._in_title and tag != "title"

  def handle_data(self, data):
    if self._in_title:
      self.title += data


def _parse(path: pathlib.Path) -> _Page:
  page = _Page()
  page.feed(path.read_text(encoding="utf-8"))
  return page


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  out = tmp_path_factory.mktemp("docs")
  html_dir, doctrees = out / "html", out / "doctrees"
  cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-E", "-d", str(doctrees), "-b", "html"]
  result = subprocess.run(
    [*cmd, str(DOCS), str(html_dir)], capture_output=True, text=True, timeout=scaled(BUILD_TIMEOUT_S), check=False
  )
  assert result.returncode == 0, f"the documentation has warnings or errors:\n{result.stderr[-6000:]}"
  return html_dir


@pytest.mark.slow
def test_site_builds_links_resolve_and_pages_render(site, tmp_path):
  skipped = {"_modules", "_static", "_sources"}  # highlighted source, the theme's own templates
  pages = {path: _parse(path) for path in site.rglob("*.html") if not skipped & set(path.relative_to(site).parts)}
  broken = []
  for path, page in pages.items():
    for link in page.links:
      parts = urllib.parse.urlparse(link)
      target, anchor = urllib.parse.unquote(parts.path), urllib.parse.unquote(parts.fragment)
      file = (path.parent / target).resolve() if target else path
      if not file.exists():
        broken.append(f"{path.relative_to(site)} -> {link}")
      elif anchor and file.suffix == ".html" and anchor not in (pages.get(file) or _parse(file)).ids:
        broken.append(f"{path.relative_to(site)} -> {link} (no such anchor)")
  assert not broken, "\n".join(broken)

  assert "full_batch_step" in (site / "searchindex.js").read_text()
  shown = {
    "index.html": "jaxbn",
    "api/_generated/jaxbn.training.full_batch_step.html": "jaxbn.training.full_batch_step",
    "notebooks/full_batch_training.html": "Full-batch training with batch norm: MNIST-1D",
  }
  for page, title in shown.items():
    assert pages[site / page].title.startswith(title), (page, pages[site / page].title)
  # The notebook is rendered with its stored outputs: the loss curves are images.
  assert (site / "notebooks" / "full_batch_training.html").read_text().count("<img") >= 2

  chromium = shutil.which("chromium") or shutil.which("chromium-browser")
  if chromium is None:
    pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it): screenshots not taken")
  headless = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,900"]
  for page, title in shown.items():
    shot = tmp_path / (page.replace("/", "_") + ".png")
    # One run per page: the screenshot, and the DOM after the page's scripts ran (its title and heading).
    dom = subprocess.run(
      [*headless, f"--screenshot={shot}", "--dump-dom", (site / page).as_uri()],
      capture_output=True,
      text=True,
      timeout=scaled(60),
      check=True,
    ).stdout
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000, page
    assert f"<title>{title}" in dom and "<h1>" in dom, page
