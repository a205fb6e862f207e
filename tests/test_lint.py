"""ruff (pyflakes + syntax, pyproject.toml [tool.ruff]) over the whole tree: an unused import or an
undefined name fails CI here rather than at run time."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
  ruff = Path(sys.executable).with_name("ruff")
  out = subprocess.run([str(ruff), "check", "--output-format", "concise", "."], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"})
  assert out.returncode == 0, out.stdout + out.stderr
