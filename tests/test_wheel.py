"""The built wheel carries what `diffssl reproduce` reads: every published-result config and the `diffssl`
command. (`.ci/wheel_check.sh` installs the wheel into a fresh virtualenv and runs the configs from it.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import diffssl_plugin
from diffssl_plugin.methods.reference_configs import CONFIG_DIR

SOURCE = Path(diffssl_plugin.__file__).resolve().parents[1]


def test_wheel_lists_every_config_and_the_command(tmp_path):
    pytest.importorskip("setuptools")
    if not (SOURCE / "pyproject.toml").is_file():
        pytest.skip("the package is installed from a wheel here, not from its source tree")
    src = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(SOURCE / name, src / name)
    shutil.copytree(
        SOURCE / "diffssl_plugin", src / "diffssl_plugin", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("diffssl_plugin-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    configs = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    assert configs and all(f"diffssl_plugin/configs/{c}" in names for c in configs), configs
    assert "diffssl = diffssl_plugin.cli:main" in entry_points
