"""The code is clean under the ruff configuration in pyproject.toml (pyflakes, pycodestyle, import order)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                           str(REPO)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, ("ruff check found problems (ruff is in the test extra: bash setup.sh --tests; "
                                  f"`.venv/bin/ruff check --fix .` sorts imports):\n{proc.stdout}{proc.stderr}")
