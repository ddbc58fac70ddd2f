"""scripts/setup.sh keeps the torch a venv already has (any torch >= 2.4) and pins the rest."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import ROOT


def pip_versions(python: Path) -> dict[str, str]:
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"],
                            capture_output=True, text=True, check=True).stdout
    return {p["name"].lower(): p["version"] for p in json.loads(listed)}


@pytest.mark.slow  # three pip runs over the local package index: about a minute
def test_setup_keeps_the_venvs_own_torch_and_pins_the_rest(tmp_path):
    """setup.sh in a copy of the project whose .venv sees this venv's packages (a .pth file)
    under a torch 2.5.0 and torchvision 0.20.0 of the user's own: in pip's eyes only, as
    metadata in front of this venv's torch (no other pair that imports installs here). Before,
    the constraints pinned torch==2.14.1, so pip tried to replace the user's torch and failed."""
    repo = tmp_path / "repo"
    for name in ("pyproject.toml", "README.md", "requirements-cluster.txt", "scripts/setup.sh"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, repo / name)
    for package in ("cmg", "tune", "analysis"):
        shutil.copytree(ROOT / package, repo / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(repo / ".venv")],
                   check=True)
    python = repo / ".venv" / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; "
                                "print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "this-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for name, version in (("torch", "2.5.0"), ("torchvision", "0.20.0")):
        info = site / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\n"
                                       f"Version: {version}\n")
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    proc = subprocess.run(["bash", str(repo / "scripts" / "setup.sh")], capture_output=True,
                          text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    versions = pip_versions(python)
    assert (versions["torch"], versions["torchvision"]) == ("2.5.0", "0.20.0")  # kept
    assert versions["optuna"] == "5.0.0"  # the rest as requirements-cluster.txt pins it
    shown = subprocess.run([str(python), "-m", "pip", "show", "cmg-sweep"], capture_output=True,
                           text=True, check=True).stdout
    assert f"Editable project location: {repo}" in shown  # installed into the copy's venv
