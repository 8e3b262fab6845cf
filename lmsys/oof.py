"""Out-of-fold predictions of a k-fold sweep joined into one file that covers the training set.

    python -m lmsys.oof join RUN_DIR... --out FILE.csv|FILE.parquet [--train TRAIN_FILE]

Each run dir of `-m data.valid_fold=0,1,...` holds the oof.csv of its best evaluation: one row per id of its
validation fold with the probabilities, the label and the logits (`logit_a, logit_b, logit_tie`, and with TTA the
(B, A) pass mapped back to (A, B, tie) as `swapped_logit_*`). The joined file keeps those columns and holds every
id exactly once: an id in two runs' oof.csv fails, naming it and both runs. With `--train` (the training file the
folds were cut from) it also fails on a training id that no run validated and on an oof id the training file lacks,
and the rows follow the training file's order. It is the input of `python -m lmsys.ensemble --oof` and the source
of out-of-fold teacher logits.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from lmsys.cli import command_errors
from lmsys.data.io import DataError, check_present_ids, finite_values, read_pairs, read_table
from lmsys.data.labels import without_unscored_ties
from lmsys.data.schema import SOFT_TARGET_COLUMNS, class_columns
from lmsys.evaluation.predict_loop import LOGIT_COLUMNS, SWAPPED_LOGIT_COLUMNS
from lmsys.logs import setup_logging
from lmsys.output_paths import check_output_paths
from lmsys.runs import write_file
from lmsys.teachers import format_suffixes

log = logging.getLogger("lmsys")
OOF_FILE = "oof.csv"
OUTPUT_SUFFIXES = (".csv", ".parquet")


def read_run_oof(run_dir: Path) -> pd.DataFrame:
    """A run's oof.csv with the columns the join keeps (the swapped logits only when the run evaluated with TTA)."""
    path = run_dir / OOF_FILE
    if not path.is_file():
        raise DataError(f"{run_dir}: no {OOF_FILE} (not a run dir, or the run never finished an evaluation)")
    frame = read_table(path)
    probs = list(class_columns(frame.columns))  # (A, B) in a two-class run's oof.csv
    logits = list(LOGIT_COLUMNS[: len(probs)])
    required = ["id", *probs, "label", *logits]
    missing = [col for col in required if col not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} (an oof.csv written before oof files carried logits?)")
    targets = _all_or_none(frame, path, SOFT_TARGET_COLUMNS[: len(probs)])
    swapped = _all_or_none(frame, path, SWAPPED_LOGIT_COLUMNS[: len(probs)])
    # a multi-format run's logits of each format (logit_a_papb, swapped_logit_a_papb, ...), which teachers average
    per_format = [name + suffix for suffix in format_suffixes(frame.columns)
                  for name in (*logits, *SWAPPED_LOGIT_COLUMNS[: len(probs)]) if name + suffix in frame.columns]
    check_present_ids(frame["id"], path)
    frame["id"] = frame["id"].astype(str)
    finite_values(frame, [*probs, *logits, *targets, *swapped, *per_format], frame["id"].tolist(), path)
    return frame[[*required, *targets, *swapped, *per_format]]


def _all_or_none(frame: pd.DataFrame, path: Path, names: tuple[str, ...]) -> list[str]:
    """Soft targets (a run validated on soft labels) or swapped logits (one with TTA): all of them, or none."""
    present = [name for name in names if name in frame.columns]
    if present and len(present) < len(names):
        raise DataError(f"{path}: only {present} of the columns {list(names)}")
    return present


def join_oof(run_dirs: list[Path], train: Path | None = None) -> pd.DataFrame:
    """The runs' oof rows, every id once; in the training file's order with `train`, else in run order."""
    if not run_dirs:
        raise DataError("no run dirs to join")
    frames = with_targets_everywhere([read_run_oof(run_dir) for run_dir in run_dirs])
    for run_dir, frame in zip(run_dirs, frames, strict=True):
        if list(frame.columns) != list(frames[0].columns):
            raise DataError(f"{run_dir / OOF_FILE}: columns {list(frame.columns)} differ from "
                            f"{run_dirs[0] / OOF_FILE}'s {list(frames[0].columns)} "
                            f"({_column_difference(frames[0].columns, frame.columns)})")
    owners = _id_owners(run_dirs, frames)
    joined = pd.concat(frames, ignore_index=True)
    if train is None:
        return joined
    train_ids = read_table(train)["id"].astype(str).tolist()
    if "winner_tie" not in joined.columns and any(row_id not in owners for row_id in train_ids):
        train_ids = [pair.id for pair in without_unscored_ties(read_pairs(train, require_labels=True), set(owners),
                                                               str(train))]
    _check_covers(train, train_ids, owners)
    return joined.set_index("id").loc[train_ids].reset_index()


def with_targets_everywhere(frames: list[pd.DataFrame]) -> list[pd.DataFrame]:
    """The soft targets (target_a ...) in every fold's rows when one fold has them: an oof.csv carries them only
    when its targets are not all one-hot, so a two-class data.ties=split fold that drew no tie has none, and its
    one-hot labels are its targets."""
    full = next((frame for frame in frames if SOFT_TARGET_COLUMNS[0] in frame.columns), None)
    if full is None:
        return frames
    names = [name for name in SOFT_TARGET_COLUMNS if name in full.columns]
    completed = []
    for frame in frames:
        if names[0] not in frame.columns and set(frame.columns) | set(names) == set(full.columns):
            one_hot = np.eye(len(names))[frame["label"].to_numpy(dtype=int)]  # (N, C)
            frame = frame.assign(**dict(zip(names, one_hot.T, strict=True)))[list(full.columns)]
        completed.append(frame)
    return completed


def _column_difference(first: pd.Index, other: pd.Index) -> str:
    if list(class_columns(first)) != list(class_columns(other)):
        return "a two-class run and a three-class one: join the folds of one model"
    if format_suffixes(first) != format_suffixes(other):
        return "runs of other data.formats: join the folds of one model"
    if (SWAPPED_LOGIT_COLUMNS[0] in first) != (SWAPPED_LOGIT_COLUMNS[0] in other):
        return "evaluate every fold with the same trainer.eval_tta"
    return "evaluate every fold on the same kind of labels"


def _id_owners(run_dirs: list[Path], frames: list[pd.DataFrame]) -> dict[str, Path]:
    """id -> the run whose fold validated it; an id validated twice fails, naming both runs."""
    owners: dict[str, Path] = {}
    for run_dir, frame in zip(run_dirs, frames, strict=True):
        for row_id in frame["id"]:
            if row_id in owners:
                raise DataError(f"id={row_id} is in the {OOF_FILE} of both {owners[row_id]} and {run_dir}: "
                                f"the folds overlap (or a run dir is given twice)")
            owners[row_id] = run_dir
    return owners


def _check_covers(train: Path, train_ids: list[str], owners: dict[str, Path]) -> None:
    """Every training id in exactly one fold, and no oof id from outside the training file."""
    missing = [row_id for row_id in train_ids if row_id not in owners]
    if missing:
        raise DataError(f"{train}: row id={missing[0]} is in no run's {OOF_FILE} ({len(missing)} of the "
                        f"{len(train_ids)} training ids are in none; join the runs of every fold)")
    known = set(train_ids)
    extra = [row_id for row_id in owners if row_id not in known]
    if extra:
        raise DataError(f"{owners[extra[0]] / OOF_FILE}: id={extra[0]} is not in {train} ({len(extra)} such "
                        f"id(s): were the folds cut from another training file?)")


def write_joined(frame: pd.DataFrame, out: Path) -> None:
    if out.suffix == ".parquet":
        write_file(out, lambda tmp: frame.to_parquet(tmp, index=False))
    else:
        write_file(out, lambda tmp: frame.to_csv(tmp, index=False))


def check_output(out: Path, run_dirs: list[Path], train: Path | None) -> None:
    """The joined file never replaces one of its inputs, nor goes into a run's directory."""
    if out.suffix not in OUTPUT_SUFFIXES:
        raise DataError(f"--out {out}: must end in .csv or .parquet")
    inputs = {f"{run_dir}/{OOF_FILE}": run_dir / OOF_FILE for run_dir in run_dirs}
    check_output_paths({**inputs, "--train": train}, {"--out": out})


def run_join(run_dirs: list[Path], out: Path, train: Path | None) -> pd.DataFrame:
    setup_logging()
    check_output(out, run_dirs, train)
    joined = join_oof(run_dirs, train)
    write_joined(joined, out)
    log.info("wrote %s: %d ids from %d run(s)%s", out, len(joined), len(run_dirs),
             f", every id of {train} once" if train is not None else "")
    return joined


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmsys.oof", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    join = commands.add_parser("join", help="join the oof.csv of a k-fold sweep's run dirs into one file",
                               description=__doc__.split("\n\n", 2)[2])
    join.add_argument("run_dirs", nargs="+", type=Path, help="run dirs, one per fold, each with oof.csv")
    join.add_argument("--out", type=Path, required=True, help="the joined file (.csv or .parquet), written atomically")
    join.add_argument("--train", type=Path, help="the training file the folds were cut from: every id of it once")
    args = parser.parse_args(argv)
    with command_errors():
        run_join(args.run_dirs, args.out, args.train)


if __name__ == "__main__":
    main()
