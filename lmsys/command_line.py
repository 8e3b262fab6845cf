"""`key=value` commands checked against a dataclass schema: `--help` prints the usage (exit 0); a typo, an
unknown key, a bad value or a broken cross-field rule prints ONE line and exits 2, before anything is loaded."""

from __future__ import annotations

import sys
from typing import TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class UsageError(SystemExit):
    """Bad input found by a command: the message on stderr as one line, exit status 2."""

    def __init__(self, message: str) -> None:
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
        super().__init__(2)


def parse(schema: type[T], argv: list[str], usage: str) -> T:
    """The schema's object from `key=value` arguments; `__post_init__` rules run here too."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(usage.strip())
        raise SystemExit(0)
    try:
        return load(schema, argv)
    except ValueError as err:
        raise UsageError(str(err)) from err


def load(schema: type[T], argv: list[str]) -> T:
    """The schema's object, or a ValueError of one line naming the key."""
    bad = [arg for arg in argv if "=" not in arg]
    if bad:
        raise ValueError(f"expected key=value arguments, got {bad[0]!r} (see --help)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_cli(argv))
        return OmegaConf.to_object(merged)
    except (OmegaConfBaseException, ValueError) as err:
        raise ValueError(first_line(err)) from err


def first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
