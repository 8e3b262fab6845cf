"""The one logging setup of every command: the `lmsys` logger, INFO on the main process (WARNING elsewhere),
to stderr and, for a training run, to its train.log."""

from __future__ import annotations

import logging
from pathlib import Path

FORMAT, DATE_FORMAT = "%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"


def setup_logging(is_main: bool = True, log_file: Path | None = None) -> logging.Logger:
    logger = logging.getLogger("lmsys")
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    logger.propagate = False
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if is_main and log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
        logger.addHandler(handler)
    return logger
