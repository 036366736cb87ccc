"""Builds the documentation site with warnings as errors, then serves it at http://localhost:8000.

    pip install -e ".[docs]" && python docs/serve.py            # build, then serve until Ctrl-C
    python docs/serve.py --no-serve                              # build only (as CI's tests/test_docs.py does)

The site goes to docs/_build/html/. Notebooks are rendered from their stored outputs in docs/notebooks/
(``python docs/render_notebooks.py`` refreshes them after a notebook changes).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import pathlib
import subprocess
import sys

DOCS = pathlib.Path(__file__).resolve().parent
HTML = DOCS / "_build" / "html"


def build(out: pathlib.Path = HTML) -> int:
  """``sphinx-build -W --keep-going``: every warning (a broken reference, a missing public name) fails."""
  cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(out)]
  return subprocess.run(cmd, check=False).returncode


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--no-serve", action="store_true", help="build only")
  parser.add_argument("--port", type=int, default=8000)
  args = parser.parse_args(argv)
  if rc := build():
    print("the documentation did not build: see the warnings above", file=sys.stderr)
    return rc
  print(f"built {HTML}/index.html")
  if args.no_serve:
    return 0
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(HTML))
  with http.server.ThreadingHTTPServer(("localhost", args.port), handler) as server:
    print(f"serving at http://localhost:{args.port} (Ctrl-C stops)")
    try:
      server.serve_forever()
    except KeyboardInterrupt:
      pass
  return 0


if __name__ == "__main__":
  sys.exit(main())
