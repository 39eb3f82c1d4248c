"""The built wheel installs only the ``lightning_sparse`` namespace, with its console script and extras."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True,
        cwd=out,
    )
    (path,) = out.glob("lightning_sparse-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_has_only_the_lightning_sparse_namespace(wheel):
    names = wheel.namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"lightning_sparse"}, top
    for sub in ("kernels", "datamodules"):
        assert f"lightning_sparse/{sub}/__init__.py" in names
        assert not any(n.startswith(f"{sub}/") for n in names)


def test_wheel_declares_console_script_and_extras(wheel):
    meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = wheel.read(meta).decode()
    for extra in ("vision", "audio", "dev", "all"):
        assert f"Provides-Extra: {extra}" in metadata
    entry_points = wheel.read(next(n for n in wheel.namelist() if n.endswith("entry_points.txt"))).decode()
    assert "lightning-sparse = lightning_sparse.cli:cli_main" in entry_points


def test_installed_console_script_runs():
    exe = Path(sys.executable).with_name("lightning-sparse")
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fit" in result.stdout and "test" in result.stdout
