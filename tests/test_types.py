"""attmask/ type-checks clean with mypy under the settings in pyproject.toml ([tool.mypy]; the
modules still listed there as not clean are skipped), and the check can fail."""
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("mypy")


def mypy(*args: str, cache) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file",
                           str(ROOT / "pyproject.toml"), "--cache-dir", str(cache), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_the_library_type_checks_clean(tmp_path):
    proc = mypy(cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Success" in proc.stdout


def test_a_type_error_fails_the_check(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from attmask.config import load_config\n\nsteps: int = load_config()\n")
    proc = mypy(str(bad), cache=tmp_path / "cache")
    assert proc.returncode == 1 and "Incompatible types in assignment" in proc.stdout
