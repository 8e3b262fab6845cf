"""`key=value` commands: arguments checked against a dataclass schema, `--help`, one-line errors with exit 2.

Used by the commands added with issue 16 (generate, warmup); meant to become the one CLI helper (`lmsys/cli.py`).
"""

from __future__ import annotations

import sys
from typing import TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmsys.config import ConfigError

T = TypeVar("T")
USAGE_EXIT, BAD_INPUT_EXIT = 0, 2


class CommandError(SystemExit):
    """Bad input: the one-line message goes to stderr and the command exits with status 2."""

    def __init__(self, message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        super().__init__(BAD_INPUT_EXIT)


def parse_command(schema: type[T], argv: list[str], usage: str) -> T:
    """The schema-checked config object: unknown keys, wrong types, unset required keys and broken cross-field
    rules (`__post_init__`) fail here, before anything is loaded."""
    if any(arg in ("-h", "--help", "help") for arg in argv):
        print(usage.strip())
        raise SystemExit(USAGE_EXIT)
    bare = [arg for arg in argv if "=" not in arg]
    if bare:
        raise CommandError(f"expected key=value arguments, got {bare[0]!r} (see --help)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_cli(argv))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        first_line = str(err).splitlines()[0]
        raise CommandError(f"{err.full_key}: {first_line}" if err.full_key else first_line) from err
    except ConfigError as err:
        raise CommandError(str(err)) from err
