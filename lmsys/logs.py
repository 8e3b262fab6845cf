"""The one logging setup of every command: the `lmsys` logger, INFO on the main process (WARNING elsewhere),
to stderr and, for a training run, to its train.log."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FORMAT, DATE_FORMAT = "%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"


def setup_logging(is_main: bool = True, log_file: Path | None = None, waits: bool = False) -> logging.Logger:
    """`waits`: the log file is written from `start_log_file` on (the records before kept for it), so that a run
    refused after its log was set up (a resume under another plan) leaves its train.log as it was."""
    logger = logging.getLogger("lmsys")
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    logger.propagate = False
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if is_main and log_file is not None:
        handlers.append(WaitingFileHandler(log_file, waits))
    for handler in handlers:
        logger.addHandler(formatted(handler))
    return logger


def start_log_file() -> None:
    """Write the records a waiting log file kept, and every later one, to the file."""
    for handler in logging.getLogger("lmsys").handlers:
        if isinstance(handler, WaitingFileHandler):
            handler.start()


class WaitingFileHandler(logging.FileHandler):
    """A log file opened at its first write, which waits for `start` when `waits`."""

    def __init__(self, path: Path, waits: bool) -> None:
        super().__init__(path, delay=True)
        self.waiting: list[logging.LogRecord] | None = [] if waits else None

    def emit(self, record: logging.LogRecord) -> None:
        if self.waiting is None:
            super().emit(record)
        else:
            self.waiting.append(record)

    def start(self) -> None:
        waiting, self.waiting = self.waiting or [], None
        for record in waiting:
            super().emit(record)


def formatted(handler: logging.Handler) -> logging.Handler:
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    return handler


class HeldRecords(logging.Handler):
    """The records logged before a run's log exists (reading and checking its data comes before its run dir is
    claimed), kept so that `replay` sends them where the run's later records go: stderr and train.log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def replay(self) -> None:
        """Through the `lmsys` logger as set up now (its level: a non-main process replays only warnings)."""
        logger = logging.getLogger("lmsys")
        for record in self.records:
            if record.levelno >= logger.getEffectiveLevel():
                logger.handle(record)
        self.records.clear()


@contextmanager
def held_records() -> Iterator[HeldRecords]:
    """Hold the `lmsys` records logged inside (INFO and up) for a later `replay`; on an error they are printed
    at once, before the error propagates, so its context is not lost."""
    logger = logging.getLogger("lmsys")
    held, saved = HeldRecords(), (logger.level, logger.propagate, list(logger.handlers))
    logger.handlers, logger.propagate = [held], False
    logger.setLevel(logging.INFO)
    try:
        yield held
    except BaseException:
        logger.propagate = saved[1]
        logger.handlers = saved[2] or [formatted(logging.StreamHandler())]  # none yet: print as setup_logging would
        held.replay()
        raise
    finally:
        logger.setLevel(saved[0])
        logger.propagate, logger.handlers = saved[1], saved[2]
