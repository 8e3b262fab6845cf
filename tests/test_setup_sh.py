"""setup.sh, run on a copy in a temporary directory (never on the repo's models/ or data/), with a stub `lmsys`
whose commands record each call: a second run with everything present repeats no step's work and exits 0, and
a run without a reachable package index fails with a clear message."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUB_ASSETS = '''import pathlib, sys
out = pathlib.Path("models/tiny")
if (out / "done").exists():
    print("models/tiny is complete, skipping")
else:
    open("calls.log", "a").write("assets\\n")
    out.mkdir(parents=True)
    (out / "done").write_text("")
'''
STUB_SYNTHETIC = '''import pathlib
open("calls.log", "a").write("synthetic\\n")
pathlib.Path("data/default").mkdir(parents=True)
for name in ("train.csv", "valid.csv"):
    pathlib.Path("data/default", name).write_text("id\\n")
'''


def setup_copy(root: Path, requirements: str) -> Path:
    shutil.copy(REPO / "setup.sh", root / "setup.sh")
    (root / "requirements.txt").write_text(requirements)
    (root / "lmsys").mkdir()
    (root / "lmsys" / "__init__.py").write_text("")
    (root / "lmsys" / "assets.py").write_text(STUB_ASSETS)
    (root / "lmsys" / "synthetic.py").write_text(STUB_SYNTHETIC)
    return root


def run_setup(root: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(root), "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                   **env}
    return subprocess.run(["bash", str(root / "setup.sh")], capture_output=True, text=True, cwd=root, env=environment,
                          timeout=120, check=False)


def test_second_run_does_no_work_and_exits_zero(tmp_path):
    root = setup_copy(tmp_path, "")  # no packages: pip has nothing to do on either run
    first = run_setup(root)
    assert first.returncode == 0, first.stderr
    assert (root / "calls.log").read_text().split() == ["assets", "synthetic"]
    second = run_setup(root)
    assert second.returncode == 0, second.stderr
    assert (root / "calls.log").read_text().split() == ["assets", "synthetic"]  # nothing new was made
    assert "data/default/train.csv and valid.csv exist, skipping" in second.stdout
    assert "models/tiny is complete, skipping" in second.stdout
    assert not (REPO / "calls.log").exists()


def test_no_network_fails_clearly(tmp_path):
    root = setup_copy(tmp_path, "lmsys-setup-test-absent-package==1.0\n")
    result = run_setup(root, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_NO_CACHE_DIR="1", PIP_RETRIES="0",
                       PIP_TIMEOUT="2", PIP_FIND_LINKS="", PIP_EXTRA_INDEX_URL="")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "setup.sh: pip could not install requirements.txt (no network or no package index?" in result.stderr
    assert not (root / "calls.log").exists()  # it stopped before any model or data step
