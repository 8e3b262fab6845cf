"""Reading battles from Kaggle LMSYS CSV, WSDM Cup and parquet files into validated `Pair`s.

Every problem is reported as a `DataError` naming the file, the row id and the column, before any model loads.

How the text cells are read is decided once per file (`plain_text_schema`), from the label columns:
- a `winner` column (WSDM Cup train): plain text, one turn per cell (a cell holding a JSON list of strings is
  read as that list);
- Kaggle label columns (`winner_model_*`) or `label`: every cell is a JSON list of turns (or a list, in parquet),
  and a cell that is not one, e.g. `["unterminated`, is an error;
- no label columns (a test file): JSON lists when most text cells are (then every cell must be one: a Kaggle
  test file), else plain text (a WSDM test file, whose answers may include a JSON list of strings, read as that
  list as in the WSDM train schema). Other columns, such as `language`, never change the rule.

A JSON string may escape half of a UTF-16 surrogate pair (`"\\ud83d"`: a cut emoji), which decodes to a code point
that no UTF-8 text can hold and that tokenizers refuse; such a half becomes U+FFFD, with one warning per file, so
that every row still trains or gets its prediction.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from lmsys.data.schema import TARGET_COLUMNS, Pair

TEXT_COLUMNS = ("prompt", "response_a", "response_b")
WSDM_WINNERS = {"model_a": (1.0, 0.0, 0.0), "model_b": (0.0, 1.0, 0.0)}
META_COLUMNS = ("source", "language", "model_a", "model_b", "fold", "original_source")
PROB_TOLERANCE = 1e-4
TEACHER_COLUMN = "teacher_logits"  # a teacher's logits of the (A, B) orientation, beside the labels
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins valid pairs: any surrogate left is a lone half

log = logging.getLogger("lmsys")


class DataError(ValueError):
    """Bad input data; the message names the file, the row id and the column."""


class EncodingError(DataError):
    """A file that is not UTF-8 text; lenient preparation skips the whole file."""


def read_table(path: str | Path) -> pd.DataFrame:
    """Load a CSV or parquet file as a frame, refusing missing and empty files."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".parquet":
        try:
            frame = pd.read_parquet(path)
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError: not parquet, cut short
            raise DataError(f"{path}: not a readable parquet file ({err})") from err
    elif path.suffix == ".csv":
        frame = _read_csv(path)
    else:
        raise DataError(f"{path}: unsupported file type '{path.suffix}' (use .csv or .parquet)")
    if frame.empty:
        raise DataError(f"{path}: the file has no rows")
    return frame


def _read_csv(path: Path) -> pd.DataFrame:
    """Every cell as written (no NA guessing; ids and texts as strings: an answer "007" or "2.50" is no number);
    a row with more fields than the header fails."""
    # index_col=False: when every data row has more fields than the header (a trailing comma), pandas would take the
    # first column(s) as the index and shift every column left, ids included; it warns instead, made an error here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(path, keep_default_na=False, na_values=[], index_col=False,
                               dtype=dict.fromkeys(("id", *TEXT_COLUMNS), str))
    except pd.errors.EmptyDataError as err:
        raise DataError(f"{path}: the file is empty") from err
    except UnicodeDecodeError as err:
        raise _encoding_error(path) from err
    except pd.errors.ParserError as err:  # e.g. "Expected 4 fields in line 3, saw 5"
        raise DataError(f"{path}: not a valid CSV table: {str(err).strip()}") from err
    except pd.errors.ParserWarning as err:
        header = pd.read_csv(path, nrows=0).columns
        raise DataError(f"{path}: the data rows have more fields than the header's {len(header)} columns (a "
                        f"trailing comma at the end of each row?)") from err


def finite_values(frame: pd.DataFrame, columns: list[str], ids: list[str], path: str | Path) -> np.ndarray:
    """(N, len(columns)) float64 of a table's number columns, rows named by `ids`: a cell that is not a finite
    number ('' or 'abc' in a CSV, NaN, or past float32's range, which the model computes in) fails naming the
    file, the first such row's id and its column."""
    values = frame[columns].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = ~within_float32(values)
    if bad.any():
        row, column = np.argwhere(bad)[0]
        cell = frame[columns[column]].iloc[row]
        raise DataError(f"{path}: row id={ids[row]} column '{columns[column]}': not a finite (float32) number "
                        f"({getattr(cell, 'item', lambda: cell)()!r}; {int(bad.any(axis=1).sum())} row(s))")
    return values


def _encoding_error(path: Path) -> EncodingError:
    """Where the first byte that is not UTF-8 is: pandas' own offset counts from the start of a read chunk."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return EncodingError(f"{path}: not UTF-8 text: byte {data[err.start]:#04x} at byte offset {err.start} "
                             f"(line {line}); convert the file to UTF-8")
    return EncodingError(f"{path}: not UTF-8 text")


def read_pairs(path: str | Path, require_labels: bool) -> list[Pair]:
    """Read and validate every row of `path`; labels must be present and valid when `require_labels`."""
    frame = read_table(path)
    return pairs_from_frame(frame, str(path), require_labels)


def pairs_from_frame(
    frame: pd.DataFrame, name: str, require_labels: bool, plain_text: bool | None = None
) -> list[Pair]:
    """Validate a frame in any accepted schema and convert it; `name` labels the errors. `plain_text`: how the
    text cells are read (None: decided from this frame, see `plain_text_schema`; a caller validating a file row
    by row passes the whole file's decision)."""
    _check_columns(frame, name, require_labels)
    check_present_ids(frame["id"], name)
    ids = frame["id"].astype(str).tolist()
    _check_unique_ids(ids, name)
    plain_text = plain_text_schema(frame) if plain_text is None else plain_text
    has_labels = _has_label_columns(frame)
    has_teacher = TEACHER_COLUMN in frame.columns
    pairs, repaired, missing = [], [], []
    for row_id, row in zip(ids, frame.to_dict("records"), strict=True):
        texts = []
        for col in TEXT_COLUMNS:
            where = f"row id={row_id} column '{col}'"
            cell = _present_text(row[col], plain_text, missing, where)
            texts.append(_repaired(_parse_turns(cell, name, row_id, col, plain_text), repaired, where))
        target = _parse_target(row, name, row_id) if has_labels else None
        meta = {key: row[key] for key in META_COLUMNS if key in row and not _is_missing(row[key])}
        teacher = _parse_teacher_logits(row[TEACHER_COLUMN], name, row_id) if has_teacher else None
        pairs.append(Pair(row_id, *texts, target=target, meta=meta, teacher_logits=teacher))
    _warn_repaired(name, repaired)
    if missing:
        log.warning("%s: %d text cell(s) missing (null), read as empty text like a Kaggle file's null turn; the "
                    "first: %s", name, len(missing), missing[0])
    _warn_uneven_turns(name, pairs)
    return pairs


def _present_text(cell: object, plain_text: bool, missing: list[str], where: str) -> object:
    """A plain-text file's missing cell (a parquet null) as empty text, noted in `missing`; other cells as they are."""
    if plain_text and _is_missing(cell):
        missing.append(where)
        return ""
    return cell


def _warn_uneven_turns(name: str, pairs: list[Pair]) -> None:
    """Conversations whose prompt and responses differ in turn count: formatting pads the shorter ones with empty
    turns (lmsys.data.formatting); said once per file, since a cut or merged conversation may be a data error."""
    uneven = [p for p in pairs if len({len(p.prompts), len(p.responses_a), len(p.responses_b)}) > 1]
    if uneven:
        first = uneven[0]
        log.warning("%s: %d row(s) whose prompt and responses differ in their number of turns, the shorter padded "
                    "with empty turns; the first: row id=%s (prompt %d, response_a %d, response_b %d turns)", name,
                    len(uneven), first.id, len(first.prompts), len(first.responses_a), len(first.responses_b))


def _warn_repaired(name: str, repaired: list[str]) -> None:
    if repaired:
        log.warning("%s: %d text cell%s held lone UTF-16 surrogates (half of a cut emoji or other character), "
                    "replaced by U+FFFD; the first: %s", name, len(repaired), "s" if len(repaired) > 1 else "",
                    repaired[0])


def _repaired(turns: tuple[str, ...], repaired: list[str], where: str) -> tuple[str, ...]:
    """`turns` with every lone surrogate replaced by U+FFFD; `where` noted in `repaired` when one was."""
    if not any(LONE_SURROGATE.search(turn) for turn in turns):
        return turns
    repaired.append(where)
    return tuple(LONE_SURROGATE.sub("\ufffd", turn) for turn in turns)


def within_float32(values: np.ndarray) -> np.ndarray:
    """Elementwise: finite, and finite still as float32 (1e39 is inf in a float32 tensor); NaN is not."""
    return np.abs(values) <= np.finfo(np.float32).max


def _parse_teacher_logits(cell: object, name: str, row_id: str) -> tuple[float, ...]:
    """A teacher's logits for the (A, B) orientation: 3 (or, for a two-class run, 2) finite floats."""
    where = f"{name}: row id={row_id} column '{TEACHER_COLUMN}'"
    cell = _decoded(cell, where, "a list of 2 or 3 logits")
    values = np.asarray(cell, dtype=float) if isinstance(cell, (list, tuple, np.ndarray)) else np.array([])
    if values.shape not in ((2,), (3,)) or not within_float32(values).all():
        raise DataError(f"{where}: expected a list of 2 or 3 finite (float32) logits, got {cell!r}")
    return tuple(float(v) for v in values)


def plain_text_schema(frame: pd.DataFrame) -> bool:
    """Whether the text cells are plain text (WSDM) rather than lists of turns (Kaggle): the module docstring's rule."""
    if "winner" in frame.columns:
        return True
    if _has_label_columns(frame):
        return False
    cells = [cell for column in TEXT_COLUMNS if column in frame.columns for cell in frame[column]
             if isinstance(cell, (str, list, tuple, np.ndarray))]
    as_lists = sum(not isinstance(cell, str) or _is_json_turn_list(cell) for cell in cells)
    return 2 * as_lists <= len(cells)  # a WSDM answer may itself be a JSON list of strings: the majority decides


def check_present_ids(ids: pd.Series, name: str) -> None:
    """No row without an id: the submission would get a row with an empty id."""
    blank = ids.isna() | (ids.astype(str).str.strip() == "")
    if blank.any():
        raise DataError(f"{name}: data row {int(np.flatnonzero(blank.to_numpy())[0])} (counting from 0) column 'id': "
                        f"missing id")


def _has_label_columns(frame: pd.DataFrame) -> bool:
    return "label" in frame.columns or "winner" in frame.columns or set(TARGET_COLUMNS) <= set(frame.columns)


def _check_columns(frame: pd.DataFrame, name: str, require_labels: bool) -> None:
    missing = [col for col in ("id", *TEXT_COLUMNS) if col not in frame.columns]
    if missing:
        raise DataError(f"{name}: missing column(s) {missing}; found {list(frame.columns)}")
    partial = [col for col in TARGET_COLUMNS if col in frame.columns]
    if partial and len(partial) < 3:
        absent = [col for col in TARGET_COLUMNS if col not in frame.columns]
        raise DataError(f"{name}: label column(s) {absent} missing (found {partial})")
    if require_labels and not _has_label_columns(frame):
        raise DataError(
            f"{name}: no label columns: need {list(TARGET_COLUMNS)}, 'label' (0/1/2 or three probabilities) "
            f"or 'winner' (model_a/model_b)"
        )


def _check_unique_ids(ids: list[str], name: str) -> None:
    seen: set[str] = set()
    for row_id in ids:
        if row_id in seen:
            raise DataError(f"{name}: row id={row_id} column 'id': duplicate id")
        seen.add(row_id)


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _parse_turns(cell: object, name: str, row_id: str, column: str, plain_text: bool) -> tuple[str, ...]:
    """A cell is a JSON list of turns (Kaggle), a list/array (parquet) or, in the WSDM schema, one plain string."""
    where = f"{name}: row id={row_id} column '{column}'"
    if plain_text and isinstance(cell, str) and not _is_json_turn_list(cell, allow_null=False):
        return (cell,)

    if isinstance(cell, (list, tuple, np.ndarray)):
        turns = list(cell)
    elif isinstance(cell, str):
        try:
            turns = json.loads(cell)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: malformed JSON ({err.msg}: char {err.pos}): {cell[:80]!r}") from err
        if not isinstance(turns, list):
            raise DataError(f"{where}: expected a JSON list of strings, got {type(turns).__name__}")
    else:
        raise DataError(f"{where}: expected a JSON list of strings, got {cell!r}")
    if not turns:
        raise DataError(f"{where}: empty list of turns")
    for turn in turns:
        if not (turn is None or isinstance(turn, str)):
            raise DataError(f"{where}: turns must be strings or null, got {turn!r}")
    return tuple("" if turn is None else turn for turn in turns)


def _is_json_turn_list(cell: str, allow_null: bool = True) -> bool:
    """A JSON list of turns: strings, or nulls where `allow_null` (Kaggle's cells hold them; in plain text a cell
    such as `[null]` is an answer)."""
    if not cell.startswith("["):
        return False
    try:
        turns = json.loads(cell)
    except json.JSONDecodeError:
        return False
    # `[]` is no list of turns (a conversation has at least one): in plain text it is an answer, e.g. an empty array
    return isinstance(turns, list) and bool(turns) and all((allow_null and t is None) or isinstance(t, str)
                                                           for t in turns)


def _parse_target(row: dict, name: str, row_id: str) -> tuple[float, float, float]:
    if "winner" in row:
        winner = row["winner"]
        if winner not in WSDM_WINNERS:
            raise DataError(f"{name}: row id={row_id} column 'winner': expected model_a or model_b, got {winner!r}")
        return WSDM_WINNERS[winner]
    if "label" in row:
        return _parse_label_cell(row["label"], name, row_id)
    return _parse_one_hot(row, name, row_id)


def _parse_one_hot(row: dict, name: str, row_id: str) -> tuple[float, float, float]:
    values = []
    for col in TARGET_COLUMNS:
        try:
            values.append(float(row[col]))
        except (TypeError, ValueError) as err:
            raise DataError(f"{name}: row id={row_id} column '{col}': not a number: {row[col]!r}") from err
    if any(v not in (0.0, 1.0) for v in values) or sum(values) != 1.0:
        raise DataError(
            f"{name}: row id={row_id} columns {list(TARGET_COLUMNS)}: labels must be one-hot, got {values}"
        )
    return tuple(values)


def _decoded(cell: object, where: str, expected: str) -> object:
    """A JSON string cell decoded (parquet cells come decoded already)."""
    if not isinstance(cell, str):
        return cell
    try:
        return json.loads(cell)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: expected {expected}, got {cell[:80]!r}") from err


def _parse_label_cell(cell: object, name: str, row_id: str) -> tuple[float, float, float]:
    """`label` is a class index 0/1/2 or three probabilities (soft labels, pseudo-labels)."""
    where = f"{name}: row id={row_id} column 'label'"
    cell = _decoded(cell, where, "0/1/2 or three probabilities")
    if isinstance(cell, (list, tuple, np.ndarray)):
        probs = np.asarray(cell, dtype=float)
        if probs.shape != (3,) or not np.isfinite(probs).all() or (probs < 0).any():
            raise DataError(f"{where}: expected three non-negative probabilities, got {list(np.ravel(probs))}")
        if abs(probs.sum() - 1.0) > PROB_TOLERANCE:
            raise DataError(f"{where}: probabilities sum to {probs.sum():.6f}, not 1")
        return tuple(float(p) for p in probs / probs.sum())
    if isinstance(cell, (int, np.integer, float, np.floating)) and float(cell) in (0.0, 1.0, 2.0):
        target = [0.0, 0.0, 0.0]
        target[int(cell)] = 1.0
        return tuple(target)
    raise DataError(f"{where}: expected 0/1/2 or three probabilities, got {cell!r}")


def pairs_to_frame(pairs: list[Pair]) -> pd.DataFrame:
    """The trainer's parquet schema, which `read_pairs` reads back: `id, prompt, response_a, response_b` (lists of
    turns), `label` when labelled (class indices when every target is one-hot, else each row's probabilities), the
    meta columns any pair has, and `teacher_logits` when the pairs carry them."""
    frame = pd.DataFrame({
        "id": [pair.id for pair in pairs],
        "prompt": [list(pair.prompts) for pair in pairs],
        "response_a": [list(pair.responses_a) for pair in pairs],
        "response_b": [list(pair.responses_b) for pair in pairs],
    })
    if pairs and pairs[0].target is not None:
        frame["label"] = _label_column(pairs)
    for key in META_COLUMNS:
        values = [pair.meta.get(key) for pair in pairs]
        if any(value is not None for value in values):
            frame[key] = values
    with_teacher = [pair.teacher_logits is not None for pair in pairs]
    if any(with_teacher):
        if not all(with_teacher):
            raise ValueError("teacher logits on some pairs only: a student reads them for every row")
        frame[TEACHER_COLUMN] = [list(pair.teacher_logits) for pair in pairs]
    return frame


def _label_column(pairs: list[Pair]) -> list:
    """Class indices when every target is one-hot; else every row's probabilities (one type per column)."""
    if all(set(pair.target) <= {0.0, 1.0} for pair in pairs):
        return [pair.label for pair in pairs]
    return [list(pair.target) for pair in pairs]


def read_prompts(path: str | Path) -> list[tuple[str, tuple[str, ...]]]:
    """(id, user turns) for every prompt of a CSV/parquet file with a `prompt` column (a JSON list of turns or
    plain text; ids from an `id` column, else the row position) or of a .txt file (one single-turn prompt per
    non-blank line; ids are the positions among those lines)."""
    path = Path(path)
    if path.suffix == ".txt":
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        prompts = [(str(i), (line,)) for i, line in enumerate(line for line in lines if line)]
        if not prompts:
            raise DataError(f"{path}: no prompts (every line is blank)")
        return prompts
    frame = read_table(path)
    if "prompt" not in frame.columns:
        raise DataError(f"{path}: missing column 'prompt'; found {list(frame.columns)}")
    if "id" in frame.columns:
        check_present_ids(frame["id"], str(path))  # a blank id would reach the pairs, which training refuses
    ids = frame["id"].astype(str).tolist() if "id" in frame.columns else [str(i) for i in range(len(frame))]
    _check_unique_ids(ids, str(path))
    prompts, repaired = [], []
    for row_id, cell in zip(ids, frame["prompt"].tolist(), strict=True):
        turns = _repaired(_parse_turns(cell, str(path), row_id, "prompt", plain_text=True), repaired,
                          f"row id={row_id} column 'prompt'")
        if not any(turn.strip() for turn in turns):
            raise DataError(f"{path}: row id={row_id} column 'prompt': every turn is empty")
        prompts.append((row_id, turns))
    _warn_repaired(str(path), repaired)
    return prompts
