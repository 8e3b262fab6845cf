"""Runs an entry point on every rank and records what each rank did to the file system, for tests/test_ddp.py:

    ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2 tests/ddp_audit.py REPORT_DIR SCRIPT ARG...

Each rank writes REPORT_DIR/rank<k>.json: the run dirs it opened (`RunDir(path, is_main)`) and every file-system
write Python made (open for writing, mkdir, rename, remove, temp dirs; from audit hooks, so library code counts too).
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

from lmsys import runs

WRITE_MODES = set("wax+")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree", "tempfile.mkdtemp",
               "shutil.copyfile", "os.link", "os.symlink"}


class Recorder:
    def __init__(self) -> None:
        self.writes: list[list[str]] = []
        self.run_dirs: list[list] = []
        self.active = True

    def hook(self, event: str, args: tuple) -> None:
        if not self.active or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        if event == "open":
            _, mode, flags = args
            writes = WRITE_MODES & set(mode) if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
        else:
            writes = event in PATH_EVENTS
        if writes:
            self.writes.append([event, os.path.abspath(os.fsdecode(args[0]))])

    def record_run_dirs(self) -> None:
        """Wrap RunDir.__init__ so that every run dir a rank opens is on record."""
        original = runs.RunDir.__init__
        recorder = self

        def init(run_dir: runs.RunDir, path, is_main: bool) -> None:
            original(run_dir, path, is_main)
            recorder.run_dirs.append([str(run_dir.path.resolve()), is_main])

        runs.RunDir.__init__ = init


def main(report_dir: Path, script: str, args: list[str]) -> None:
    recorder = Recorder()
    recorder.record_run_dirs()
    sys.addaudithook(recorder.hook)
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        recorder.active = False
        report = {"rank": int(os.environ["RANK"]), "run_dirs": recorder.run_dirs, "writes": recorder.writes}
        (report_dir / f"rank{os.environ['RANK']}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
