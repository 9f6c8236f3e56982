"""Every script answers --help as a new user would type it: its usage text on stdout, exit code 0."""

import subprocess
import sys

import pytest

from conftest import REPO

SCRIPTS = sorted(p.stem for p in (REPO / "scripts").glob("*.py"))


def test_every_script_is_covered():
    assert {"generate", "rank", "train", "evaluate", "export_answers", "freeze_recipe", "run", "summarize"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_prints_usage_and_exits_0(name):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / f"{name}.py"), "--help"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower()
