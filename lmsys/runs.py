"""The run directory: every file of a run is written here, by the main process only, through `RunDir.write`."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

FINISHED_MARKER = "metrics.json"
STATE_DIR = "state"
SECRET_VARIABLES = ("WANDB_API_KEY", "KAGGLE_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


class RunDirError(RuntimeError):
    """A run directory that would be overwritten."""


class RunDir:
    def __init__(self, path: str | Path, is_main: bool) -> None:
        self.path = Path(path)
        self.is_main = is_main

    def claim(self, overwrite: bool, resume: bool) -> None:
        """Refuse to reuse a directory that holds another run (finished, or unfinished with a training state),
        unless resuming it or told to overwrite it; on overwrite its old files go first."""
        finished = (self.path / FINISHED_MARKER).exists()
        unfinished = any((self.path / name).exists() for name in (STATE_DIR, f".{STATE_DIR}.old"))
        if finished and not overwrite:
            raise RunDirError(
                f"{self.path} already holds a finished run; choose another hydra.run.dir or seed, or pass "
                f"overwrite=true"
            )
        if unfinished and not (resume or overwrite):
            raise RunDirError(
                f"{self.path} holds an unfinished run's training state; pass resume=true to continue it or "
                f"overwrite=true to start again"
            )
        if self.is_main:
            if overwrite and self.path.exists():
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, produce: Callable[[Path], None]) -> Path | None:
        """Atomically create file or directory `name`: `produce` writes to a temporary path that is then renamed."""
        if not self.is_main:
            return None
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent)) / target.name
        try:
            produce(tmp)
        except BaseException:
            shutil.rmtree(tmp.parent, ignore_errors=True)  # a failed write leaves nothing behind
            raise
        old = target.with_name(f".{target.name}.old")
        _remove(old)  # left by a kill after the last swap; `target` is complete, so it is the one to keep
        if target.exists():
            os.replace(target, old) if target.is_file() else target.rename(old)
        os.replace(tmp, target)
        shutil.rmtree(tmp.parent, ignore_errors=True)
        _remove(old)
        return target

    def write_text(self, name: str, text: str) -> Path | None:
        return self.write(name, lambda p: p.write_text(redact_secrets(text)))

    def append_line(self, name: str, line: str) -> None:
        """Logs grow line by line (a crash keeps every complete line), main process only."""
        if self.is_main:
            with open(self.path / name, "a", encoding="utf-8") as handle:
                handle.write(redact_secrets(line) + "\n")

    def write_json(self, name: str, payload: dict) -> Path | None:
        return self.write_text(name, json.dumps(payload, indent=2, default=str) + "\n")


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
