"""The run directory: every file of a run is written here, by the main process only, through `RunDir.write`."""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

FINISHED_MARKER = "metrics.json"
STATE_DIR = "state"
# Written when a run claims its directory: what tells a run dir from any other (not a dot file: those are the
# temporaries of atomic writes).
RUN_MARKER = "lmsys_run.txt"
MARKER_TEXT = "This directory belongs to an lmsys run; overwrite=true removes only the files a run writes.\n"
# Everything a run writes into its directory; overwrite=true removes these (and their temporaries), nothing else.
RUN_ENTRIES = (RUN_MARKER, "config.yaml", "run_info.json", "train.log", "metrics.jsonl", FINISHED_MARKER, "oof.csv",
               "reliability.png", "checkpoint", STATE_DIR, "wandb")
# A directory written by an lmsys run from before RUN_MARKER existed is recognised by one of these.
LEGACY_RUN_EVIDENCE = (FINISHED_MARKER, STATE_DIR, f".{STATE_DIR}.old", "run_info.json")
# Locked (flock) by the process that claimed the run dir while it lives, never removed: a live run's directory is
# refused to a second run; the kernel releases a killed run's lock.
LOCK_FILE = ".lmsys_run.lock"
_HELD_LOCKS: dict[Path, object] = {}  # run dir -> the open lock file of this process
SECRET_VARIABLES = ("WANDB_API_KEY", "KAGGLE_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


class RunDirError(RuntimeError):
    """A run directory (or an output) that would be overwritten."""


def is_run_dir(path: Path, legacy: bool = True) -> bool:
    """Whether `path` is a run's directory: its marker, or (`legacy`) the files of a run from before the marker,
    which a directory of other tools may hold too (a metrics.json, a state/ folder)."""
    names = (RUN_MARKER, *LEGACY_RUN_EVIDENCE) if legacy else (RUN_MARKER,)
    return any((path / name).exists() for name in names)


class FinishedRun(RunDirError):
    """resume=true on a run that has finished: nothing to do (a resumed sweep skips its finished jobs).
    `plan_changes`: how this config's plan differs from the run's (None: not compared)."""

    plan_changes: list[str] | None = None


def release_lock(path: str | Path) -> None:
    """The run in `path` is over in this process (finished, skipped, stopped or failed): the next job of an
    in-process sweep, or a resume from another shell, may take the directory. Nothing when this process holds
    no lock on it (a rank other than the main one)."""
    handle = _HELD_LOCKS.pop(Path(path).resolve(), None)
    if handle is not None:
        handle.close()  # closing the file releases its flock


class RunDir:
    def __init__(self, path: str | Path, is_main: bool) -> None:
        self.path = Path(path)
        self.is_main = is_main

    def claim(self, overwrite: bool, resume: bool) -> None:
        """Take the directory for this run. Refused: a non-empty directory that is not a run's; another run
        (finished, unfinished with a training state, or killed before its first state) unless resuming it or told
        to overwrite it. Overwriting, or resuming a run that has no state, removes only the files a run writes,
        so the new run starts with fresh logs."""
        if self.is_main:  # before anything is read: another process may be writing it
            self._check_is_a_run_or_empty()
            self._hold_lock()
        finished = (self.path / FINISHED_MARKER).exists()
        unfinished = any((self.path / name).exists() for name in (STATE_DIR, f".{STATE_DIR}.old"))
        if finished and resume and not overwrite:
            raise FinishedRun(f"{self.path} holds a finished run: nothing to resume (its results are in "
                              f"{FINISHED_MARKER})")
        if finished and not overwrite:
            raise RunDirError(f"{self.path} already holds a finished run; choose another hydra.run.dir or seed, or "
                              f"pass overwrite=true")
        if unfinished and not (resume or overwrite):
            raise RunDirError(
                f"{self.path} holds an unfinished run's training state; pass resume=true to continue it or "
                f"overwrite=true to start again"
            )
        if not self.is_main:
            return  # the main process alone inspects and changes the directory: it writes the marker checked below
        killed = self.is_run() and not finished and not unfinished
        if killed and not (resume or overwrite):
            raise RunDirError(
                f"{self.path} holds a run that stopped before saving a training state; pass overwrite=true (or "
                f"resume=true) to start it again with fresh logs, or choose another hydra.run.dir"
            )
        if overwrite or killed:
            self._remove_run_files()
        self.remove_temporaries()
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_text(RUN_MARKER, MARKER_TEXT)

    def is_run(self) -> bool:
        return is_run_dir(self.path)

    def _check_is_a_run_or_empty(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path} is a file, not a run directory")
        if not self.path.exists() or self.is_run():
            return
        foreign = sorted(entry.name for entry in self.path.iterdir() if entry.name != LOCK_FILE)
        if foreign:
            raise RunDirError(
                f"{self.path} is not a run directory and is not empty (holds {foreign[:5]}); a run only writes "
                f"into a new, empty or earlier run directory: choose another hydra.run.dir"
            )

    def _hold_lock(self) -> None:
        """This process's exclusive lock on the run dir until its run is over (release_lock); refused while another
        process holds it (a run still going, whose files a second run or a resume would mix with or remove)."""
        key = self.path.resolve()
        if key in _HELD_LOCKS:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / LOCK_FILE, "a")  # noqa: SIM115 (held open while the process lives)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            handle.close()
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                return  # a file system without locks (some network mounts): the other checks still hold
            raise RunDirError(f"{self.path} is in use by a run that is still going (another process holds its "
                              f"{LOCK_FILE}); wait for it to end, or choose another hydra.run.dir") from None
        _HELD_LOCKS[key] = handle

    def forget_unstarted(self) -> None:
        """A run that failed before its first training state (wandb could not start) leaves no run behind, so that
        the corrected command is not refused as a killed run's."""
        started = any((self.path / name).exists() for name in (STATE_DIR, f".{STATE_DIR}.old", FINISHED_MARKER))
        if self.is_main and not started:
            self._remove_run_files()

    def _remove_run_files(self) -> None:
        """What a run wrote (the entries of RUN_ENTRIES and the temporaries of their atomic writes), nothing else:
        the marker and the other evidence of a run last, so that a kill midway leaves a directory still known as a
        run's, which overwrite=true (or resume=true) cleans up again."""
        if not self.path.is_dir():
            return
        evidence = (*LEGACY_RUN_EVIDENCE, RUN_MARKER)
        for name in [*(n for n in RUN_ENTRIES if n not in evidence), *evidence]:
            remove_temporaries(self.path, name)
            _remove(self.path / name)

    def remove_temporaries(self) -> None:
        """The temporaries of the run's atomic writes that a kill left behind (hidden `.<name>.<8 chars>`), e.g.
        before a resume; the state's `.state.old` stays (a resume may need it)."""
        if self.is_main and self.path.is_dir():
            for name in RUN_ENTRIES:
                remove_temporaries(self.path, name, keep_old=True)

    def write(self, name: str, produce: Callable[[Path], None]) -> Path | None:
        """Atomically create file or directory `name` of the run dir (see `write_file`)."""
        return write_file(self.path / name, produce, self.is_main)

    def write_text(self, name: str, text: str) -> Path | None:
        return self.write(name, lambda p: p.write_text(redact_secrets(text)))

    def append_line(self, name: str, line: str) -> None:
        """Logs grow line by line (a crash keeps every complete line), main process only."""
        if self.is_main:
            with open(self.path / name, "a", encoding="utf-8") as handle:
                handle.write(redact_secrets(line) + "\n")

    def write_json(self, name: str, payload: dict) -> Path | None:
        return write_json(self.path / name, payload, self.is_main)


def json_safe(value: object) -> object:
    """NaN and inf as null (JSON has neither; Python would write the bare tokens NaN / Infinity, which strict
    readers such as jq refuse), in nested dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_json(target: Path, payload: dict, is_main: bool = True) -> Path | None:
    """Atomically write `payload` as indented JSON, secrets redacted."""
    text = redact_secrets(json.dumps(json_safe(payload), indent=2, default=str) + "\n")
    return write_file(target, lambda p: p.write_text(text), is_main)


def write_file(target: Path, produce: Callable[[Path], None], is_main: bool = True) -> Path | None:
    """Atomically create file or directory `target`, on the main process only: `produce` writes to a temporary
    path beside it, which is then renamed into place (a kill never leaves a half-written `target`)."""
    if not is_main:
        return None
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_temporaries(target.parent, target.name, keep_old=True)  # an earlier write's, killed before its cleanup
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent)) / target.name
    try:
        produce(tmp)
        flush_to_disk(tmp)  # a machine stopped hard after the rename must not find the name on empty blocks
        if target.exists() and target.is_dir() != tmp.is_dir():
            kinds = ("directory", "file") if target.is_dir() else ("file", "directory")
            raise RunDirError(f"{target} is an existing {kinds[0]}; refusing to replace it with a {kinds[1]}")
        if tmp.is_file():  # one atomic rename replaces a file; nothing beside it is touched
            os.replace(tmp, target)
            flush_to_disk(target.parent)
            return target
        # A directory cannot be renamed over a non-empty one: the old one steps aside first, as .<name>.old (which a
        # resume reads when a kill came between the two renames: lmsys.training.state)
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            _remove(old)  # left by a kill after the last swap; `target` is complete, so it is the one to keep
            target.rename(old)
        # without `target`, a kill came between the two renames: `old` is the only complete copy until tmp is in
        os.replace(tmp, target)
        flush_to_disk(target.parent)
        _remove(old)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return target


def flush_to_disk(path: Path) -> None:
    """fsync a file, or every file of a directory and the directory itself (its entries): after a process kill
    the page cache holds the data anyway, after a machine's hard stop only what was synced is there."""
    paths = [path] if path.is_file() else [*sorted(path.rglob("*")), path]  # files and folders, the top one last
    for item in paths:
        descriptor = os.open(item, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def remove_temporaries(directory: Path, name: str, keep_old: bool = False) -> None:
    """`write_file`'s temporaries of `directory/name` that a kill left: `.<name>.<8 chars of mkdtemp>` and, unless
    `keep_old`, `.<name>.old`; never another file whose name merely starts alike (a user's `.<name>.bak`)."""
    pattern = re.compile(rf"\.{re.escape(name)}\.(?:[a-z0-9_]{{8}}{'' if keep_old else '|old'})")
    for path in directory.glob(f".{name}.*"):
        if pattern.fullmatch(path.name):
            _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def redact_secrets(text: str) -> str:
    """Secrets from the environment never reach a file of the run, whatever path they took into the text."""
    for variable in SECRET_VARIABLES:
        value = os.environ.get(variable)
        if value and len(value) >= 4:
            text = text.replace(value, f"<{variable}>")
    return text
