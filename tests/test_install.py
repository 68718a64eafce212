"""An installed copy (``pip install .``, as a cluster image or a Ray runtime environment does it)
resolves every preset and search space without the checkout."""
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import attmask
from attmask.config import PRESET_DIR, SEARCH_DIR
from conftest import ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A virtual environment (reusing this one's packages) with the attmask wheel installed."""
    root = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(root / "dist"), str(ROOT)], check=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(root / "venv")],
                   check=True)
    python = root / "venv" / "bin" / "python"
    # --system-site-packages sees the base interpreter's packages only: where the tests run in
    # a virtual environment of their own (a new user's), its packages are added by a .pth file.
    # Paths listed in a .pth are not scanned for .pth files, so its editable attmask stays out.
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path("
                              "'purelib'))"], check=True, capture_output=True, text=True)
    (Path(purelib.stdout.strip()) / "outer-environment.pth").write_text(
        "\n".join(site.getsitepackages()) + "\n")
    wheel = next((root / "dist").glob("attmask-*.whl"))
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True)
    return python, root


def test_every_preset_and_search_space_resolves_from_an_installed_copy(installed):
    python, root = installed
    presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    benchmarks = sorted(p.stem for p in (PRESET_DIR / "benchmark").glob("*.yaml"))
    searches = sorted(p.name for p in SEARCH_DIR.glob("*.yaml"))
    script = textwrap.dedent(f"""
        import attmask, pipelines.tune as tune
        from attmask.config import PRESET_DIR, load_config
        assert "site-packages" in attmask.__file__, attmask.__file__
        for name in {presets!r}:
            load_config(name)
        assert sorted(p.stem for p in (PRESET_DIR / "benchmark").glob("*.yaml")) == {benchmarks!r}
        for name in {searches!r}:
            tune.load_spec("tune_configs/" + name)
        print("resolved", PRESET_DIR)
    """)
    out = subprocess.run([str(python), "-c", script], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "share/attmask/configs" in out.stdout
    cli = subprocess.run([str(root / "venv" / "bin" / "attmask"), "benchmark", "--dry-run"],
                         cwd=root, capture_output=True, text=True)
    assert cli.returncode == 0 and "dry run" in cli.stdout, cli.stderr[-2000:]
    version = subprocess.run([str(root / "venv" / "bin" / "attmask"), "--version"],
                             capture_output=True, text=True)
    assert version.stdout.strip() == f"attmask {attmask.__version__}", version  # one source
