"""Test work started when the suite starts and read at its end: a process that keeps one core busy for a minute or
more (g++ compiling inductor's kernels; a shell pipeline of single-threaded commands; the benchmark's processes, one
per mode) runs beside the other tests instead of after them. conftest's hooks start and stop the jobs; a job's
test (moved to the end of its worker's share) waits for it and checks what it wrote.

A job is `PYTHONPATH=<repo>:tests python <script> OUT_DIR` (lmsys and the tests' helpers such as tiny.py
importable, as in the tests), started only when its test file's tests are selected. The suite runs in pytest-xdist
workers (pyproject's addopts): every worker collects every test, so the jobs live in one directory that the
controlling process creates (`create_root`, its path passed on in LMSYS_TEST_BACKGROUND) and removes at the end;
the first worker to create a job's directory starts the job, and whichever worker runs the job's tests waits for
the exit status that the job's runner writes there (`python background.py SCRIPT OUT_DIR`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
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
ROOT_VARIABLE = "LMSYS_TEST_BACKGROUND"
EXIT_FILE, PID_FILE, LOG_FILE = "exit_status", "pid", "log.txt"


def create_root(config: pytest.Config) -> None:
    """The jobs' directory, made by the controlling process (xdist's controller, or the only process) before any
    worker starts; workers inherit its path."""
    if not hasattr(config, "workerinput"):
        os.environ[ROOT_VARIABLE] = tempfile.mkdtemp(prefix="lmsys_background_")


def job_dir(test_file: str) -> Path:
    return Path(os.environ[ROOT_VARIABLE]) / Path(test_file).stem


def start(test_file: str) -> None:
    """Start the job of `test_file` unless another process of the session has: its directory is the claim."""
    out_dir = job_dir(test_file)
    try:
        out_dir.mkdir()
    except FileExistsError:
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR.parent), str(TESTS_DIR)])}
    with open(out_dir / LOG_FILE, "w") as log:
        process = subprocess.Popen([sys.executable, __file__, str(JOBS[test_file]), str(out_dir)], stdout=log,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
    (out_dir / PID_FILE).write_text(str(process.pid))


def finished(test_file: str) -> Path:
    """Wait for the job of `test_file` (starting it if no process of the session did); its output directory."""
    start(test_file)
    out_dir = job_dir(test_file)
    deadline = time.monotonic() + TIMEOUT_S
    while not (out_dir / EXIT_FILE).exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{JOBS[test_file].name} still running after {TIMEOUT_S} s")
        time.sleep(0.5)
    status = int((out_dir / EXIT_FILE).read_text())
    if status != 0:
        log = (out_dir / LOG_FILE).read_text()
        raise AssertionError(f"{JOBS[test_file].name} exited {status}:\n{log[-6000:]}")
    return out_dir


def stop(config: pytest.Config) -> None:
    """In the controlling process, at the end: kill the jobs still running (their tests did not run: -x after a
    failure) with their children, and remove the jobs' directory."""
    if hasattr(config, "workerinput") or ROOT_VARIABLE not in os.environ:
        return
    root = Path(os.environ[ROOT_VARIABLE])
    for out_dir in root.iterdir() if root.is_dir() else ():
        if (out_dir / PID_FILE).exists() and not (out_dir / EXIT_FILE).exists():
            try:
                os.killpg(int((out_dir / PID_FILE).read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    shutil.rmtree(root, ignore_errors=True)


def run_job(script: str, out_dir: str) -> None:
    """The job's runner: the script, then its exit status written where every worker can read it (atomically)."""
    status = subprocess.call([sys.executable, script, out_dir])
    partial = Path(out_dir) / f"{EXIT_FILE}.partial"
    partial.write_text(str(status))
    partial.replace(Path(out_dir) / EXIT_FILE)


if __name__ == "__main__":
    run_job(sys.argv[1], sys.argv[2])
