"""Test work started when the suite starts and read at its end: a process that is mostly one core of g++ (the
torch.compile check) runs beside the other tests instead of after them. conftest's hooks start and stop it."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parent
COMPILE_CHECK = TESTS_DIR / "modeling" / "compile_check.py"
COMPILE_TEST_FILE = "test_compile.py"
TIMEOUT_S = 1800
_KEY = pytest.StashKey[tuple[subprocess.Popen, Path]]()


def start_compile_check(config: pytest.Config) -> None:
    """Start tests/modeling/compile_check.py (once per session); its results and log go to a new temporary dir."""
    if _KEY in config.stash:
        return
    out_dir = Path(tempfile.mkdtemp(prefix="lmsys_compile_check_"))
    with open(out_dir / "log.txt", "w") as log:
        process = subprocess.Popen([sys.executable, str(COMPILE_CHECK), str(out_dir / "results.pt")],
                                   stdout=log, stderr=subprocess.STDOUT)
    config.stash[_KEY] = (process, out_dir)


def compile_check_results(config: pytest.Config) -> dict:
    """Wait for the check (starting it if the session did not) and load what it wrote."""
    start_compile_check(config)
    process, out_dir = config.stash[_KEY]
    returncode = process.wait(timeout=TIMEOUT_S)
    log = (out_dir / "log.txt").read_text()
    assert returncode == 0, f"compile_check.py exited {returncode}:\n{log[-4000:]}"
    return torch.load(out_dir / "results.pt")


def stop(config: pytest.Config) -> None:
    """Kill the check if the session ends before its test read it (the test deselected by a failure with -x)."""
    if _KEY in config.stash:
        process, out_dir = config.stash[_KEY]
        if process.poll() is None:
            process.kill()
            process.wait()
        for path in out_dir.iterdir():
            path.unlink()
        out_dir.rmdir()
