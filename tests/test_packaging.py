"""The wheel carries every data file the code reads at run time.

The worker image installs genimg from its wheel (scripts/build-images.sh), so a data file that is tracked
in git but missing from ``[tool.setuptools.package-data]`` only fails inside the container (a worker
without its bundled profiles refuses to start). This builds the real wheel and compares.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("genimg", "workers", "producer")


def _tracked_package_files() -> set[str]:
    out = subprocess.run(["git", "ls-files", *PACKAGES], cwd=ROOT, check=True, capture_output=True, text=True)
    return {line for line in out.stdout.splitlines() if line and (ROOT / line).is_file()}


def test_the_wheel_holds_every_tracked_file_of_the_packages(tmp_path):
    # Build from a copy of the tracked files: a stale build/ directory in the checkout would hide a gap.
    src = tmp_path / "src"
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True)
    for rel in out.stdout.splitlines():
        if (rel == "pyproject.toml" or rel == "README.md" or rel.split("/")[0] in PACKAGES) and (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = tmp_path.glob("genimg-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    tracked = _tracked_package_files()
    assert "genimg/profiles/bundled/txt2img.toml" in tracked
    missing = sorted(tracked - names)
    assert missing == [], f"tracked files left out of the wheel (add them to package-data): {missing}"
