"""The README's generated sections (the config table and the file tree) match what the code says today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_generated_sections_are_up_to_date():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "readme_sections.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, (
        f"scripts/readme_sections.py --check exited {result.returncode}; run `python scripts/readme_sections.py`\n"
        f"{result.stdout}{result.stderr}"
    )
