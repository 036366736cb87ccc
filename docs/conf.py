"""Sphinx configuration of the jaxbn documentation (the toolchain Flax and Optax use).

Build: ``pip install -e ".[docs]" && python -m sphinx -W --keep-going -b html docs docs/_build/html``.
The notebooks under ``docs/notebooks/`` are copies of ``notebooks/`` with stored outputs
(``python docs/render_notebooks.py`` refreshes them); the build renders them without executing.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import jaxbn  # noqa: E402

project = "jaxbn"
author = "the jaxbn authors"
copyright = "2026, the jaxbn authors"
release = version = jaxbn.__version__

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "sphinx.ext.viewcode",
  "sphinx_copybutton",
  "myst_nb",
]

source_suffix = {
  ".rst": "restructuredtext",
  ".md": "myst-nb",
  ".ipynb": "myst-nb",
}  # .rst first: autosummary writes its stubs in it
exclude_patterns = ["_build", "README.md", "**.ipynb_checkpoints"]
html_theme = "sphinx_book_theme"
html_title = "jaxbn"
html_static_path: list[str] = []
html_theme_options = {
  "show_toc_level": 2,
  "navigation_with_keys": False,
  "use_download_button": True,
  # The repository has no public address yet (see getting_started.md): no repository button.
}

# Markdown and notebooks.
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # docs/notebooks/ hold stored outputs (docs/render_notebooks.py)
nb_merge_streams = True

# The API reference: one page per public name, generated from the Google-style docstrings.
templates_path = ["_templates"]
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
add_module_names = False

# Every cross-reference into jaxbn must resolve; references to other libraries' names (types in
# signatures, mostly) stay plain text, since the build must not depend on the network
# (no intersphinx).
nitpicky = True
nitpick_ignore_regex = [
  (
    "py:.*",
    r"(jax|jaxlib|jnp|flax|nn|nnx|optax|numpy|np|orbax|ocp|chex|typing|collections|enum|types|os|pathlib)(\..*)?",
  ),
  ("py:.*", r"(Array|ArrayLike|DTypeLike|PRNGKey|PyTree|Any|Callable|Sequence|Mapping|Iterable|Iterator|Hashable)"),
  ("py:.*", r"(int|float|bool|str|bytes|None|tuple|list|dict|object|type|callable|optional|Ellipsis|NoneType)"),
]
nitpick_ignore: list[tuple[str, str]] = []

# The public modules the reference covers, with the page that lists them.
API_PAGES = {
  "jaxbn": "api/jaxbn",
  "jaxbn.linen": "api/linen",
  "jaxbn.nnx": "api/nnx",
  "jaxbn.training": "api/training",
  "jaxbn.transforms": "api/transforms",
  "jaxbn.diagnostics": "api/diagnostics",
}


def _public_names(module_name: str) -> set[str]:
  """The names of ``module.__all__`` the reference must list (submodules have pages of their own)."""
  module = importlib.import_module(module_name)
  return {name for name in module.__all__ if not inspect.ismodule(getattr(module, name))}


def _check_reference(app) -> None:
  """Warns (an error under -W) for each public name that no API page lists."""
  from sphinx.util import logging

  logger = logging.getLogger("jaxbn.api")
  for module_name, page in API_PAGES.items():
    text = (HERE / f"{page}.md").read_text()
    listed = set(re.findall(r"^\s{0,4}([A-Za-z_][A-Za-z0-9_]*)\s*$", text, flags=re.M))
    for name in sorted(_public_names(module_name) - listed):
      logger.warning(f"{module_name}.{name} is public (in __all__) but missing from {page}.md", location=page)


def setup(app):
  app.connect("builder-inited", _check_reference)
