"""Without pymilter (an optional extra), ``smtp-tracker milter`` says what to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROGRAM = """
import sys
sys.modules["Milter"] = None  # as if pymilter were not installed
from smtp_tracker.cli import main
sys.exit(main(["milter", "--data-dir", sys.argv[1]]))
"""


def test_milter_without_pymilter_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "install smtp-tracker[milter]" in lines[0]
    assert "libmilter-dev" in lines[0]
    assert not (tmp_path / "data").exists()
