"""Every command explains itself: --help says what it does, its main fields, an example, and
points to a docs page that exists."""
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("cmd", ["search", "retrain", "evaluate", "export", "profile", "demo",
                                 "bench"])
def test_help_says_what_the_command_does(cmd):
    r = subprocess.run([sys.executable, "-m", f"ernas.cli.{cmd}", "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert out.startswith(f"ernas-{cmd}: ") and "Main fields" in out and f"  ernas-{cmd}" in out
    assert "Powered by Hydra" not in out  # not Hydra's generic page
    assert (DOCS / f"{cmd}.md").is_file()
