"""The one command-line style of lmsys: `python -m lmsys.<command> key=value ...`, every key checked against the
command's dataclass schema (a typo fails at once, naming the key), `--help` printing the usage and every option,
and expected errors (bad data, config, checkpoint, run dir) printed as one `error:` line with exit status 2.
A traceback only with LMSYS_DEBUG=1 (or HYDRA_FULL_ERROR=1, as for the Hydra commands).

Training (`python -m lmsys.train`, `lmsys/code/train_r_*.py`) and the bench compose experiment files with Hydra
(`--config-name NAME key=value ...`), validated by the same kind of schema (lmsys/config.py).
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import os
import sys
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from typing import TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class CommandError(ValueError):
    """Bad input to a command that is not a data, config or checkpoint error: printed as one line, exit 2."""


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: their message says what and where, a traceback adds nothing."""
    from lmsys.config import ConfigError
    from lmsys.data.io import DataError
    from lmsys.modeling.checkpoint import CheckpointError
    from lmsys.modeling.families import FamilyError
    from lmsys.modeling.model_facts import ModelLoadError
    from lmsys.runs import RunDirError
    from lmsys.training.state import ResumeError

    return (CommandError, ConfigError, DataError, CheckpointError, FamilyError, ModelLoadError, RunDirError, ResumeError,
            OmegaConfBaseException, FileNotFoundError, FileExistsError, FloatingPointError)


def debugging() -> bool:
    return os.environ.get("LMSYS_DEBUG", "") not in ("", "0") or os.environ.get("HYDRA_FULL_ERROR", "") == "1"


# A file system that refuses a write: full, read-only, over quota, or not ours to write (the user's to fix).
STORAGE_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM)


@contextmanager
def command_errors() -> Iterator[None]:
    """Turn an expected error into `error: <message>` on stderr and exit status 2."""
    try:
        yield
    except expected_errors() as err:
        if debugging():
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as err:
        if err.errno not in STORAGE_ERRORS or debugging():
            raise
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where} (nothing half-written is left: every output is written "
              f"atomically)", file=sys.stderr)
        raise SystemExit(2) from None


def one_line(err: BaseException) -> str:
    """The first line of the message; OmegaConf's errors prefixed with the key they are about."""
    lines = str(err).strip().splitlines()
    first = lines[0] if lines else type(err).__name__
    key = getattr(err, "full_key", None) if isinstance(err, OmegaConfBaseException) else None
    return f"{key}: {first}" if key and key not in first else first


def parse_config(schema: type[T], argv: list[str]) -> T:
    """`key=value` arguments merged into `schema` and validated (its __post_init__ rules run); raises on an
    unknown key (ConfigKeyError), a bad value (ValidationError) or a broken rule (ConfigError)."""
    from lmsys.config import ConfigError, check_list_items

    bad = [arg for arg in argv if "=" not in arg]
    if bad:
        raise ConfigError(f"arguments are key=value, got {bad[0]!r} (see --help)")
    _check_read_as_written(argv)
    merged = OmegaConf.merge(OmegaConf.structured(schema), _from_cli(argv))
    check_list_items(merged)
    return OmegaConf.to_object(merged)


def _from_cli(argv: list[str]):
    """The arguments as a config; a value that is no YAML (`formats=[pab`, a list inside a list left unquoted)
    raises ConfigError naming the argument (each is parsed alone only then, to find it)."""
    import yaml

    try:
        return OmegaConf.from_cli(argv)
    except yaml.YAMLError:
        for arg in argv:
            _parse_alone(arg)
        raise


def _check_read_as_written(argv: list[str]) -> None:
    """YAML reads ' #' (or a leading '#') as a comment and ': ' as a mapping: a path holding either would arrive
    cut short or as a mapping, and the error would name another path. Refused with the quoting that keeps it."""
    from lmsys.config import ConfigError

    for arg in argv:
        key, _, value = arg.partition("=")
        if value.startswith(("[", "{", "'", '"')):
            continue  # a list, a mapping or a quoted value: YAML as written
        if value.startswith("#") or " #" in value or ": " in value or value.endswith(":"):
            raise ConfigError(f"{arg!r}: YAML would read '#' as a comment or ': ' as a mapping; quote the value "
                              f"(single quotes keep it as written): \"{key_value(key, value)}\"")


def key_value(key: str, value: object) -> str:
    """`key='value'`: an argument that `parse_config` reads back as the value written (a path with ' #', ': ' or
    backslashes included; YAML's single quotes take no escapes but a doubled quote)."""
    text = str(value).replace("'", "''")
    return f"{key}='{text}'"


def _parse_alone(arg: str) -> None:
    import yaml

    from lmsys.config import ConfigError

    try:
        OmegaConf.from_cli([arg])
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or type(err).__name__
        key, _, value = arg.partition("=")
        hint = (f"; quote each setting of a list that holds brackets: {key}=['formats=[pab,papb]']"
                if value.startswith("[") and "=" in value else "")
        raise ConfigError(f"{arg!r} is not key=value with a YAML value ({problem}){hint}") from err


def parse_command(schema: type[T], argv: list[str], usage: str) -> T:
    """`parse_config` for a command line: `--help` prints `usage` and the options (exit 0); errors as one line."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(usage.strip() + "\n\noptions (key=value; lists as [a,b]):\n" + options_text(schema))
        raise SystemExit(0)
    with command_errors():
        return parse_config(schema, argv)


def options_text(schema: type, prefix: str = "") -> str:
    """One line per leaf option: name, type and default (??? for required)."""
    lines = []
    hints = typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            lines.append(options_text(kind, f"{prefix}{field.name}."))
            continue
        lines.append(f"  {prefix}{field.name}: {_type_name(kind)} = {_default(field)}")
    return "\n".join(lines)


def _type_name(kind: object) -> str:
    if isinstance(kind, type) and issubclass(kind, Enum):
        return "|".join(member.value for member in kind)
    return str(kind).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "???"
    return getattr(value, "value", value) if value != "???" else "??? (required)"


def run_command(schema: type[T], usage: str, run: Callable[[T], object] | str, argv: list[str] | None = None) -> object:
    """Parse, then run with expected errors as one line: the body of every `key=value` command's `main`. `run` as
    "module:function" is imported only after the arguments are checked: a command whose work imports torch,
    transformers and peft (~10 s) answers --help and a typo at once."""
    config = parse_command(schema, sys.argv[1:] if argv is None else argv, usage)
    with command_errors():
        if isinstance(run, str):
            module, name = run.split(":")
            run = getattr(importlib.import_module(module), name)
        return run(config)
