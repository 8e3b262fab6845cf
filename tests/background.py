"""Test work started when the suite starts and read at its end: a process that keeps one core busy for a minute or
more (g++ compiling inductor's kernels; a shell pipeline of single-threaded commands; the benchmark's processes, one
per mode) runs beside the in-process tests, which use one thread of two cores, instead of after them. conftest's
hooks start and stop the jobs; a job's test (moved to the end of the suite) waits for it and checks what it wrote.

A job is `PYTHONPATH=<repo>:tests python <script> OUT_DIR` (lmsys and the tests' helpers such as tiny.py
importable, as in the tests), started only when its test file's tests are selected, in a new temporary directory
that the session removes at its end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
# test file name -> the script whose results its test reads
JOBS = {
    "test_compile.py": TESTS_DIR / "modeling" / "compile_check.py",
    "test_distill_pipeline.py": TESTS_DIR / "distill_check.py",
    "test_bench.py": TESTS_DIR / "bench_check.py",
}
TIMEOUT_S = 1800
_KEY = pytest.StashKey[dict[str, tuple[subprocess.Popen, Path]]]()


def start(config: pytest.Config, test_file: str) -> None:
    """Start the job of `test_file` (once per session); its output and log go to a new temporary directory."""
    jobs = config.stash.setdefault(_KEY, {})
    if test_file in jobs:
        return
    out_dir = Path(tempfile.mkdtemp(prefix=f"lmsys_{Path(test_file).stem}_"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR.parent), str(TESTS_DIR)])}
    with open(out_dir / "log.txt", "w") as log:
        process = subprocess.Popen([sys.executable, str(JOBS[test_file]), str(out_dir)], stdout=log,
                                   stderr=subprocess.STDOUT, env=env)
    jobs[test_file] = (process, out_dir)


def finished(config: pytest.Config, test_file: str) -> Path:
    """Wait for the job of `test_file` (starting it if the session did not); its output directory."""
    start(config, test_file)
    process, out_dir = config.stash[_KEY][test_file]
    returncode = process.wait(timeout=TIMEOUT_S)
    if returncode != 0:
        log = (out_dir / "log.txt").read_text()
        raise AssertionError(f"{JOBS[test_file].name} exited {returncode}:\n{log[-6000:]}")
    return out_dir


def stop(config: pytest.Config) -> None:
    """Kill the jobs still running (their tests did not run: -x after a failure) and remove their directories."""
    for process, out_dir in config.stash.get(_KEY, {}).values():
        if process.poll() is None:
            process.kill()
            process.wait()
        shutil.rmtree(out_dir, ignore_errors=True)
