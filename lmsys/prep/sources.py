"""One input file of any accepted source format, read into validated `Pair`s plus the rows it had to reject.

Formats, told apart by their columns:
- arena: Kaggle LMSYS train.csv / test.csv (no labels), parquet with `label` (0/1/2, or three probabilities as the
  pseudo-label step writes them);
- wsdm: WSDM Cup parquet, `winner` = model_a/model_b and plain-string texts;
- hh_dialogues: `chosen`/`rejected` full dialogues ("\\n\\nHuman: ...\\n\\nAssistant: ..."), HH-RLHF style;
- prompt_chosen_rejected: `prompt`, `chosen`, `rejected` columns (a string, or a list of strings per turn).
Chosen/rejected rows are placed in a random A/B order drawn with a fixed seed; the label follows the chosen
response. Every row is converted to the arena schema and validated by `lmsys.data.io.pairs_from_frame`, so the
rows that pass are exactly the rows the trainer accepts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path

import numpy as np
import pandas as pd

from lmsys.data.io import DataError, EncodingError, pairs_from_frame, plain_text_schema, read_table
from lmsys.data.schema import Pair

# Columns of a chosen/rejected file that describe the row rather than one side, kept with the pair.
CARRIED_COLUMNS = ("source", "language")
# The parts of an io.DataError message after "row id=...": io names the column as column 'x' or columns [...].
_IO_PROBLEM = re.compile(r"row id=.*? (?:column '(?P<column>[^']*)'|columns (?P<columns>\[[^\]]*\])): (?P<reason>.*)", re.DOTALL)
_DIALOGUE_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant): ?")


class SourceFormat(str, Enum):
    arena = "arena"
    wsdm = "wsdm"
    hh_dialogues = "hh_dialogues"
    prompt_chosen_rejected = "prompt_chosen_rejected"


@dataclass(frozen=True)
class Reject:
    """A row left out in lenient mode, and why."""

    file: str
    row_id: str
    column: str
    reason: str

    def message(self) -> str:
        return f"{self.file}: row id={self.row_id} column '{self.column}': {self.reason}"


@dataclass
class SourceRows:
    """What one input file gave: its valid pairs (each with meta `source`) and its rejected rows."""

    path: str
    source: str
    format: SourceFormat
    n_read: int
    pairs: list[Pair]
    rejects: list[Reject]
    generated_ids: bool  # the file had no `id` column; ids are `<source>-<row number from 0>`
    skipped: Reject | None = None  # lenient mode: why the whole file was skipped (it is not UTF-8 text)


class RowProblem(ValueError):
    """A problem in one cell found while converting a chosen/rejected row; becomes a `Reject`."""

    def __init__(self, column: str, reason: str) -> None:
        super().__init__(reason)
        self.column = column
        self.reason = reason


def detect_format(frame: pd.DataFrame) -> SourceFormat:
    columns = set(frame.columns)
    if {"chosen", "rejected"} <= columns:
        return SourceFormat.prompt_chosen_rejected if "prompt" in columns else SourceFormat.hh_dialogues
    if "winner" in columns:
        return SourceFormat.wsdm
    return SourceFormat.arena


def read_source(path: str | Path, source: str, seed: int, strict: bool) -> SourceRows:
    """Read, convert and validate every row of `path`; strict mode raises `DataError` at the first bad row."""
    name = str(path)
    try:
        frame = read_table(path)
    except EncodingError as err:
        if strict:
            raise
        return SourceRows(name, source, SourceFormat.arena, n_read=0, pairs=[], rejects=[], generated_ids=False,
                          skipped=Reject(name, "", "", f"{err} (the whole file is skipped)".removeprefix(f"{name}: ")))
    source_format = detect_format(frame)
    is_chosen_rejected = source_format in (SourceFormat.hh_dialogues, SourceFormat.prompt_chosen_rejected)
    generated_ids = is_chosen_rejected and "id" not in frame.columns
    if generated_ids:
        frame = frame.assign(id=[f"{source}-{row}" for row in range(len(frame))])
    # Drawn for every row before any is rejected, so that a row's A/B order does not depend on other rows.
    chosen_is_b = np.random.default_rng(seed).random(len(frame)) < 0.5
    frame, rejects = _drop_bad_ids(frame.assign(_chosen_is_b=chosen_is_b), name)
    if is_chosen_rejected:
        frame, conversion_rejects = _chosen_rejected_to_arena(frame, source_format, name)
        rejects += conversion_rejects
    if strict and rejects:
        raise DataError(rejects[0].message())
    pairs, validation_rejects = _validate(frame.drop(columns="_chosen_is_b", errors="ignore"), name, strict)
    pairs = [_with_source(pair, source) for pair in pairs]
    return SourceRows(name, source, source_format, n_read=len(chosen_is_b), pairs=pairs,
                      rejects=rejects + validation_rejects, generated_ids=generated_ids)


def _drop_bad_ids(frame: pd.DataFrame, name: str) -> tuple[pd.DataFrame, list[Reject]]:
    """Rows without an id, and repeats of an id (the first occurrence stays), are rejected."""
    if "id" not in frame.columns:
        return frame, []  # io names the missing column for the whole file
    ids = frame["id"]
    blank = ids.isna() | (ids.astype(str).str.strip() == "")
    repeated = ids.duplicated() & ~blank
    rejects = [
        Reject(name, "", "id", f"missing id (data row {position} of the file, counting from 0)")
        for position in np.flatnonzero(blank.to_numpy())
    ]
    first_row = {value: position for position, value in reversed(list(enumerate(ids)))}
    rejects += [
        Reject(name, str(value), "id", f"duplicate id (first used in data row {first_row[value]}, counting from 0)")
        for value in ids[repeated]
    ]
    return frame[~(blank | repeated)], rejects


def _chosen_rejected_to_arena(
    frame: pd.DataFrame, source_format: SourceFormat, name: str
) -> tuple[pd.DataFrame, list[Reject]]:
    convert = _dialogue_row if source_format == SourceFormat.hh_dialogues else _prompt_chosen_rejected_row
    rows, rejects = [], []
    for record in frame.to_dict("records"):
        try:
            prompts, chosen, rejected = convert(record)
        except RowProblem as problem:
            rejects.append(Reject(name, str(record["id"]), problem.column, problem.reason))
            continue
        response_a, response_b, label = (rejected, chosen, 1) if record["_chosen_is_b"] else (chosen, rejected, 0)
        carried = {key: record[key] for key in CARRIED_COLUMNS if key in record}
        rows.append({"id": record["id"], "prompt": prompts, "response_a": response_a, "response_b": response_b,
                     "label": label, **carried})
    columns = ["id", "prompt", "response_a", "response_b", "label", *[c for c in CARRIED_COLUMNS if c in frame]]
    return pd.DataFrame(rows, columns=columns), rejects


def _prompt_chosen_rejected_row(record: dict) -> tuple[list[str], list[str], list[str]]:
    return tuple(_turns(record[column], column) for column in ("prompt", "chosen", "rejected"))


def _turns(cell: object, column: str) -> list[str]:
    """A plain string is one turn; a list holds one string per turn."""
    if isinstance(cell, str):
        return [cell]
    if isinstance(cell, (list, tuple, np.ndarray)) and len(cell) and all(isinstance(t, str) for t in cell):
        return list(cell)
    raise RowProblem(column, f"expected a string or a non-empty list of strings, got {_short(cell)}")


def _dialogue_row(record: dict) -> tuple[list[str], list[str], list[str]]:
    """The shared turns are the conversation; the two final Assistant turns are what the pair compares."""
    chosen = _parse_dialogue(record["chosen"], "chosen")
    rejected = _parse_dialogue(record["rejected"], "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise RowProblem("rejected", "the dialogue differs from 'chosen' before the final Assistant turn")
    prompts = [text for role, text in chosen if role == "Human"]
    answers = [text for role, text in chosen[:-1] if role == "Assistant"]
    return prompts, [*answers, chosen[-1][1]], [*answers, rejected[-1][1]]


def _parse_dialogue(cell: object, column: str) -> list[tuple[str, str]]:
    """`[(role, text), ...]` of a "\\n\\nHuman: ...\\n\\nAssistant: ..." dialogue, checked to alternate."""
    if not isinstance(cell, str):
        raise RowProblem(column, f"expected a dialogue string, got {_short(cell)}")
    parts = _DIALOGUE_MARKER.split(cell.strip())
    if parts[0].strip():
        raise RowProblem(column, f"text before the first 'Human:' turn: {_short(parts[0])}")
    turns = [(role, text.strip()) for role, text in zip(parts[1::2], parts[2::2], strict=True)]
    roles = [role for role, _ in turns]
    if not turns or len(turns) % 2 or roles != ["Human", "Assistant"] * (len(turns) // 2):
        raise RowProblem(
            column, f"expected alternating 'Human:'/'Assistant:' turns ending with Assistant, got {roles or 'none'}"
        )
    return turns


def _short(value: object) -> str:
    return repr(value)[:80]


def _validate(frame: pd.DataFrame, name: str, strict: bool) -> tuple[list[Pair], list[Reject]]:
    """All rows through io's validation; in lenient mode a failing file is re-checked row by row."""
    pairs_from_frame(frame.iloc[:0], name, require_labels=False)  # a missing column stops every mode
    plain_text = plain_text_schema(frame)  # the whole file's text schema, also when its rows are checked one by one
    try:
        return pairs_from_frame(frame, name, require_labels=False, plain_text=plain_text), []
    except DataError:
        if strict:
            raise
    pairs, rejects = [], []
    for position in range(len(frame)):
        row = frame.iloc[position : position + 1]
        try:
            pairs += pairs_from_frame(row, name, require_labels=False, plain_text=plain_text)
        except DataError as err:
            rejects.append(_reject_from_error(err, name, str(row["id"].iloc[0])))
    return pairs, rejects


def _reject_from_error(err: DataError, name: str, row_id: str) -> Reject:
    found = _IO_PROBLEM.search(str(err))
    if found is None:
        return Reject(name, row_id, "", str(err))
    return Reject(name, row_id, found["column"] or found["columns"], found["reason"])


def _with_source(pair: Pair, source: str) -> Pair:
    """Every row gets the input's source name; a file's own different `source` value stays as `original_source`.

    An input `fold` is dropped: the folds are recomputed over all inputs together.
    """
    meta = {key: value for key, value in pair.meta.items() if key not in ("source", "fold")}
    original = pair.meta.get("source")
    if original is not None and str(original) != source:
        meta["original_source"] = str(original)
    return replace(pair, meta={**meta, "source": source})
