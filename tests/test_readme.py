"""The README's Python examples run as written."""

import pathlib
import re

import pytest

pytestmark = pytest.mark.slow  # whole README programs: CI runs them; -m "not slow" skips them

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index):
  exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})
