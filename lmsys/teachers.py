"""Attach teacher logits to training data, for distillation (`loss.kl_weight`, `loss.cosine_weight`):

    python -m lmsys.teachers train=data/train.parquet logits=[teacher1_oof.csv,teacher2_oof.csv] \\
        output=data/train_with_teachers.parquet

Each logits file has `id, logit_a, logit_b[, logit_tie]` (as `python -m lmsys.predict logits_output=` and
`python -m lmsys.oof join` write them), optionally with `swapped_logit_*` (the swapped pass mapped back to A, B
order): a file's logits are the mean of its orientations, and several teachers are averaged in logit space. Every
training id must have exactly one row in every file. The output is the training file as the trainer's parquet
(labels, folds and sources kept) with a `teacher_logits` column; swapped training orientations swap them too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import MISSING

from lmsys.cli import run_command
from lmsys.config import require
from lmsys.data.io import DataError, check_present_ids, finite_values, pairs_to_frame, read_pairs, read_table
from lmsys.data.labels import without_unscored_ties
from lmsys.data.schema import Pair
from lmsys.logs import setup_logging
from lmsys.output_paths import check_output_paths
from lmsys.runs import write_file

log = logging.getLogger("lmsys")
CLASSES = ("a", "b", "tie")


@dataclass
class TeachersConfig:
    train: str = MISSING  # the training file (any format read_pairs reads)
    logits: list[str] = MISSING  # one logits file per teacher
    output: str = MISSING  # .parquet

    def __post_init__(self) -> None:
        require(len(self.logits) > 0, "logits must name at least one file")
        require(self.output.endswith(".parquet"), "output must end in .parquet")
        check_output_paths({"train": self.train, **{f"logits[{i}]": path for i, path in enumerate(self.logits)}},
                           {"output": self.output})


def teacher_logits(frame: pd.DataFrame, path: str, ids: list[str]) -> np.ndarray:
    """(N, C) one teacher's logits (its file `path` read as `frame`) in the order of `ids`, the mean of its
    orientations and, for a teacher of several formats (columns suffixed _<format>, as a multi-format run's
    oof.csv and predict's logits_output hold them), of its formats: what its prediction averaged."""
    _require_columns(frame, path, ["id"], "")
    check_present_ids(frame["id"], path)
    frame["id"] = frame["id"].astype(str)
    duplicated = frame["id"][frame["id"].duplicated()].tolist()
    if duplicated:
        raise DataError(f"{path}: row id={duplicated[0]} column 'id': duplicate id ({len(duplicated)} in all)")
    _check_same_ids(path, set(frame["id"]), ids)
    frame = frame.set_index("id").loc[ids]
    per_format = []
    for suffix in format_suffixes(frame.columns) or [""]:
        columns, swapped = _logit_columns(frame, path, suffix)
        values = finite_values(frame, columns + swapped, ids, path)  # (N, C) or, with the swapped pass, (N, 2C)
        width = len(columns)
        per_format.append((values[:, :width] + values[:, width:]) / 2 if swapped else values)
    return np.mean(per_format, axis=0)


def format_suffixes(columns) -> list[str]:
    """The _<format> suffixes of a multi-format file's logit columns (logit_a_pab, logit_a_papb: _pab, _papb)."""
    return sorted(name.removeprefix("logit_a") for name in columns if name.startswith("logit_a_"))


def _logit_columns(frame: pd.DataFrame, path: str, suffix: str = "") -> tuple[list[str], list[str]]:
    """The (A, B[, tie]) logit columns (+ `suffix`) and their swapped_ twins (empty without TTA); a partial set
    fails, naming what is missing (a file without logit_b would otherwise pass its tie logit off as B's)."""
    classes = CLASSES if f"logit_tie{suffix}" in frame.columns else CLASSES[:2]
    columns = [f"logit_{c}{suffix}" for c in classes]
    swapped = [f"swapped_{c}" for c in columns]
    _require_columns(frame, path, columns, "")
    present = [c for c in swapped if c in frame.columns]
    if present:
        _require_columns(frame, path, swapped, " (the swapped logits: all of them, or none)")
    return columns, swapped if present else []


def _require_columns(frame: pd.DataFrame, path: str, needed: list[str], why: str) -> None:
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}{why}; a teacher file holds id, logit_a, logit_b"
                        f"[, logit_tie] (found {list(frame.columns)})")


def _check_same_ids(path: str, found: set[str], ids: list[str]) -> None:
    missing = [i for i in ids if i not in found]
    extra = sorted(found - set(ids))
    if missing or extra:
        raise DataError(f"{path}: ids differ from the training file: {len(missing)} missing (e.g. {missing[:5]}), "
                        f"{len(extra)} not in it (e.g. {extra[:5]})")


def attach_teachers(config: TeachersConfig) -> Path:
    setup_logging()
    frames = [read_table(path) for path in config.logits]  # each teacher file read once
    widths = {teacher_classes(frame) for frame in frames}
    if len(widths) > 1:  # before the ids: a two-class teacher lacks the ties it dropped
        raise DataError(f"teachers disagree on the number of classes: {sorted(widths)} ({config.logits})")
    pairs = two_class_scored(read_pairs(config.train, require_labels=True), frames, config.train)
    ids = [pair.id for pair in pairs]
    per_teacher = [teacher_logits(frame, path, ids) for frame, path in zip(frames, config.logits, strict=True)]
    mean = np.mean(per_teacher, axis=0)  # (N, C) averaged in logit space
    with_teachers = [replace(pair, teacher_logits=tuple(row)) for pair, row in zip(pairs, mean, strict=True)]
    frame: pd.DataFrame = pairs_to_frame(with_teachers)
    write_file(Path(config.output), lambda tmp: frame.to_parquet(tmp, index=False))
    log.info("wrote %s: %d rows with the mean logits of %d teacher(s)", config.output, len(pairs), len(per_teacher))
    return Path(config.output)


def teacher_classes(frame: pd.DataFrame) -> int:
    """3 for a teacher file with tie logits (any format's), else 2."""
    return 3 if any(name.startswith("logit_tie") for name in frame.columns) else 2


def two_class_scored(pairs: list[Pair], frames: list[pd.DataFrame], train: str) -> list[Pair]:
    """Without the tied rows that two-class teachers (their files read as `frames`; data.ties=drop) never scored;
    every pair otherwise."""
    if any(teacher_classes(frame) == 3 or "id" not in frame.columns for frame in frames):
        return pairs
    scored = set.intersection(*(set(frame["id"].astype(str)) for frame in frames))
    return without_unscored_ties(pairs, scored, train)


def main(argv: list[str] | None = None) -> None:
    run_command(TeachersConfig, __doc__, attach_teachers, argv)


if __name__ == "__main__":
    main()
