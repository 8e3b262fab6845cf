"""The one rule set for where a command may write: an output never replaces an input, a directory, or another
output of the same command. Every command checks its paths with `check_output_paths` before any model loads.

Paths are compared resolved (symlinks followed, relative paths against the working directory), and existing files
also by identity, so `./a.csv`, `a.csv`, a symlink to it and a hard link all count as the same file.

The rules, for `inputs` (files or directories the command reads) and `outputs` (what it creates):
- no two outputs are the same path;
- no output is an input, lies inside an input directory, or (for a directory output) contains an input;
- a file output is not an existing directory, and a directory output is not an existing file;
- no output lies inside a training run's directory (it holds only its run's files: a prediction written over its
  oof.csv, or a summary over its metrics.json, unmakes the run for every later join, sweep and ensemble);
- the nearest existing path above every output is a writable directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lmsys.config import ConfigError
from lmsys.runs import is_run_dir

PathLike = str | Path
SPEC_FILE = "lmsys_checkpoint.json"  # a checkpoint's spec (lmsys.modeling.checkpoint reads and writes it)


def check_output_paths(
    inputs: dict[str, PathLike | None],
    outputs: dict[str, PathLike | None],
    directory_outputs: frozenset[str] = frozenset(),
    run_dir_outputs: frozenset[str] = frozenset(),
) -> None:
    """Raise `ConfigError` naming the keys and the path when an output would replace something it must not.

    `inputs` and `outputs` map each config key (e.g. `data.test_path`, `output`) to its path; None entries (an
    option left unset) are skipped. Keys in `directory_outputs` name outputs that are directories; those in
    `run_dir_outputs` (training's own run dir) may be a run's directory themselves.
    """
    given_inputs = {key: _resolved(path) for key, path in inputs.items() if path is not None}
    given_outputs = {key: _resolved(path) for key, path in outputs.items() if path is not None}
    _check_distinct_outputs(given_outputs)
    for key, output in given_outputs.items():
        is_directory = key in directory_outputs
        _check_kind(key, output, is_directory)
        check_outside_runs(key, output, itself=is_directory and key not in run_dir_outputs)
        _check_writable(key, output)
        for input_key, source in given_inputs.items():
            _check_against_input(key, output, is_directory, input_key, source)


def _resolved(path: PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    return a.exists() and b.exists() and os.path.samefile(a, b)


def _inside(path: Path, directory: Path) -> bool:
    return path != directory and path.is_relative_to(directory)


def _check_distinct_outputs(outputs: dict[str, Path]) -> None:
    keys = list(outputs)
    for i, first in enumerate(keys):
        for second in keys[i + 1:]:
            if _same(outputs[first], outputs[second]):
                raise ConfigError(f"{first} and {second} name the same path {outputs[first]}; give each its own")


def _check_kind(key: str, output: Path, is_directory: bool) -> None:
    if not is_directory and output.is_dir():
        raise ConfigError(f"{key}={output} is an existing directory; name a file (it would replace the directory)")
    if is_directory and output.exists() and not output.is_dir():
        raise ConfigError(f"{key}={output} is an existing file, not a directory")


def _check_writable(key: str, output: Path) -> None:
    """The nearest existing directory of the output takes new files (not a read-only file system, nor another
    user's): found before any model loads, not at the write after hours of work."""
    existing = next(path for path in (output, *output.parents) if path.exists())
    if existing != output and not existing.is_dir():
        raise ConfigError(f"{key}={output}: {existing} is a file, so no directory can be made there; write it "
                          f"elsewhere")
    directory = existing if existing.is_dir() else existing.parent
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={output}: {directory} is not writable (a read-only file system, or another user's)")


def _check_against_input(key: str, output: Path, is_directory: bool, input_key: str, source: Path) -> None:
    if _same(output, source):
        raise ConfigError(f"{key}={output} is the input {input_key}; writing it would replace the input")
    if _inside(output, source):
        raise ConfigError(f"{key}={output} lies inside the input {input_key}={source}; write it elsewhere")
    if is_directory and _inside(source, output):
        raise ConfigError(f"{key}={output} contains the input {input_key}={source}; choose another {key}")


def check_outside_runs(key: str, output: PathLike, itself: bool = False) -> None:
    """Raise `ConfigError` when `output` would go into a training run's directory (one with the marker every run
    writes), which holds only what its run wrote; with `itself`, also when the output directory is one."""
    path = _resolved(output)
    run = enclosing_run(path, itself)
    if run == path:
        raise ConfigError(f"{key}={path} is the run dir of a training run, which holds only its run's files; "
                          f"write it beside the runs")
    if run is not None:
        raise ConfigError(f"{key}={path} lies inside the run dir {run}, which holds only its run's files; write it "
                          f"beside the runs")


def enclosing_run(path: Path, itself: bool = True) -> Path | None:
    """The training run's directory that `path` lies in (or, with `itself`, is), told by the marker every run
    writes; None when there is none."""
    return next((d for d in ((path,) if itself else ()) + tuple(path.parents) if is_run_dir(d, legacy=False)), None)


def base_model_inputs(checkpoints: dict[str, PathLike], base_model_path: PathLike | None) -> dict[str, Path | None]:
    """The base model directories a command reads, as inputs for `check_output_paths`: `base_model_path` when
    given, else the one each adapter checkpoint's spec names (a merged checkpoint reads none)."""
    if base_model_path is not None:
        return {"base_model_path": Path(base_model_path)}
    return {f"the base model of {key}": recorded_base_model(checkpoint) for key, checkpoint in checkpoints.items()}


def recorded_base_model(checkpoint: PathLike) -> Path | None:
    """The base model directory an adapter checkpoint's spec names (a relative one, as in a Kaggle bundle, from
    the checkpoint); None for a merged checkpoint or an unreadable spec (reading the spec reports that later)."""
    try:
        spec = json.loads((Path(checkpoint) / SPEC_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(spec, dict) or spec.get("merged") or not isinstance(spec.get("base_model_path"), str):
        return None
    return Path(checkpoint) / spec["base_model_path"]  # an absolute path replaces the checkpoint's
