"""The type checker is part of the test command: ``mypy`` over ``edge/`` must report nothing.

Its settings live in pyproject.toml (``[tool.mypy]``); ``warn_unused_ignores`` keeps every
``# type: ignore[code]`` left in the tree necessary.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_finds_no_errors_in_edge(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"mypy reported:\n{result.stdout}{result.stderr}"


IGNORE = re.compile(r"# type: ignore(\[[a-z-]+(?:, *[a-z-]+)*\])?(.*)$")


def test_every_ignore_names_its_error_code_and_says_why() -> None:
    """A bare ``# type: ignore`` would hide any error on its line, including ones added later; and
    an ignore is only as good as its reason: a comment after it, or on the line above."""
    unexplained = []
    for path in sorted((ROOT / "edge").rglob("*.py")):
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            found = IGNORE.search(line)
            if found is None:
                continue
            named = found.group(1) is not None
            reason = "#" in found.group(2) or (number > 1 and lines[number - 2].strip().startswith("#"))
            if not (named and reason):
                unexplained.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not unexplained, "ignores without an error code or a reason:\n" + "\n".join(unexplained)
