"""`python -m lmsys.prepare inputs=[FILE,...] output_dir=DIR`: one training parquet from many sources.

Options (`key=value`; schema `PrepareConfig` in lmsys/prep/config.py): `sources=[NAME,...]` (one per
input; default: each file's stem), `k_folds=5`, `seed=0`, `strict=true` (false = lenient: bad rows are skipped and
listed in rejects.csv), `tokenizer_path=DIR` (lengths in the family's tokens), `max_length=1600`,
`folds_from=EARLIER/train.parquet` (keep its prompts' folds).
Input formats: see lmsys/prep/sources.py.

Written to output_dir, which must not contain an input (files of an earlier run there are replaced, other files
are left alone; all outputs are written beside it first and moved in only when the run succeeds):
- train.parquet: every labelled row that survives de-duplication; `id, prompt, response_a, response_b` (lists of
  turns), `label` (0/1/2, or three probabilities on every row when any row has soft labels), `source`, `fold`
  (0..k_folds-1: stratified by source and label, grouped by prompt so no prompt is in two folds), and `language`,
  `model_a`, `model_b`, `original_source` when an input has them; with `folds_from=EARLIER/train.parquet` a pair
  whose prompt is in that file keeps its fold there, and only new prompts are assigned (stratified, grouped). Train with
  `data.train_path=DIR/train.parquet data.valid_fold=K`.
- unlabeled.parquet (when an input has no labels, e.g. Kaggle test.csv): the same columns without label and fold,
  for prediction and the pseudo-label step.
- duplicates.csv: every exact duplicate removed (same prompt and responses, either A/B order; the first kept).
- rejects.csv (lenient mode): each skipped row's file, row id, column and reason; a file that is not UTF-8 text
  is skipped whole (one line with an empty row id and column).
- report.md and lengths_<column>.png: see lmsys/prep/report.py.
Ids are unique across the output files: an id used by two sources gets the prefix `<source>:` in both.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from lmsys.data.io import TEACHER_COLUMN, DataError, pairs_to_frame, read_pairs
from lmsys.data.schema import Pair, swap_pair
from lmsys.data.split import fold_of, prompt_group
from lmsys.output_paths import check_output_paths
from lmsys.prep.config import PrepareConfig
from lmsys.prep.report import LengthCounter, markdown_table, tokenizer_counter, word_counter, write_report
from lmsys.prep.sources import SourceFormat, SourceRows, read_source
from lmsys.runs import RunDir, remove_temporaries

OUTPUT_FILES = ("train.parquet", "unlabeled.parquet", "duplicates.csv", "rejects.csv", "report.md")


class Entry(NamedTuple):
    """A kept pair, the input it came from (position in `inputs`, file), and whether its id got a source prefix."""

    input: int
    file: str
    pair: Pair
    id_prefixed: bool = False


def prepare(config: PrepareConfig) -> pd.DataFrame:
    """Run the whole step; returns the per-input row accounting (read = rejected + duplicates + kept).

    Every output is written into a temporary sibling of output_dir and moved in only when all of them are complete:
    a failing run leaves the previous outputs (and, as output_dir may not contain an input, the inputs) untouched.
    """
    output_dir = Path(config.output_dir)
    check_output_paths({**{f"inputs[{i}]": path for i, path in enumerate(config.inputs)},
                        "tokenizer_path": config.tokenizer_path, "folds_from": config.folds_from},
                       {"output_dir": output_dir}, directory_outputs=frozenset({"output_dir"}))
    counter = tokenizer_counter(config.tokenizer_path) if config.tokenizer_path else word_counter()  # checked first
    kept_folds = earlier_folds(config.folds_from, config.k_folds) if config.folds_from else {}
    names = config.sources or [Path(path).stem for path in config.inputs]
    inputs = [read_source(path, name, config.seed, config.strict) for path, name in zip(config.inputs, names)]
    check_teacher_logits(inputs)
    kept, duplicates = remove_duplicates(inputs)
    kept = make_ids_unique(kept)
    rejects = [reject for rows in inputs for reject in ([rows.skipped] if rows.skipped else []) + rows.rejects]
    if not kept:
        first = f"; the first rejected row: {rejects[0].message()}" if rejects else ""
        raise DataError(f"no valid rows in {list(config.inputs)}{first}")
    with staging_dir(output_dir) as staging:
        if not config.strict:
            pd.DataFrame([vars(reject) for reject in rejects], columns=["file", "row_id", "column", "reason"]).to_csv(
                staging / "rejects.csv", index=False)
        duplicates.to_csv(staging / "duplicates.csv", index=False)
        frame = _write_parquets(kept, FoldPlan(config.k_folds, config.seed, kept_folds), staging)
        accounting = input_accounting(inputs, duplicates, kept)
        notes = _notes(config, inputs, kept, counter) + _fold_notes(config.folds_from, kept_folds, kept)
        write_report(staging, frame, accounting, duplicates, notes, counter, config.max_length)
        publish(staging, output_dir)
    return accounting


def check_teacher_logits(inputs: list[SourceRows]) -> None:
    """Teacher logits come with every input or with none: a student's distillation loss reads them for every row
    (one input's alone would be dropped, or leave rows without them)."""
    carry = {rows.path: any(pair.teacher_logits is not None for pair in rows.pairs) for rows in inputs if rows.pairs}
    if any(carry.values()) and not all(carry.values()):
        with_logits = [path for path, has in carry.items() if has]
        without = [path for path, has in carry.items() if not has]
        raise DataError(f"{with_logits[0]}: column '{TEACHER_COLUMN}' is given, but not in {without}; prepare the "
                        f"inputs without it, then attach the teachers' logits to train.parquet with "
                        f"`python -m lmsys.teachers`")


@contextmanager
def staging_dir(output_dir: Path) -> Iterator[Path]:
    """A temporary directory beside output_dir (the same file system, so moving a file out of it is a rename)."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_temporaries(output_dir.parent, f"{output_dir.name}.staging")  # an earlier run's, killed before its cleanup
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.staging.", dir=output_dir.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, output_dir: Path) -> None:
    """Move this run's complete outputs into output_dir, each by an atomic rename (`RunDir.write`), after removing
    the earlier run's outputs that this run does not write again (a stale file would be read as this run's).
    Other files in output_dir stay."""
    output_dir.mkdir(parents=True, exist_ok=True)
    produced = {path.name for path in staging.iterdir()}
    previous = [output_dir / name for name in OUTPUT_FILES] + list(output_dir.glob("lengths_*.png"))
    for stale in previous:
        if stale.name not in produced and stale.is_file():
            stale.unlink()
    run = RunDir(output_dir, is_main=True)
    for path in sorted(staging.iterdir()):
        run.write(path.name, lambda tmp, source=path: os.replace(source, tmp))


def remove_duplicates(inputs: list[SourceRows]) -> tuple[list[Entry], pd.DataFrame]:
    """Keep the first of the pairs with the same prompt and the same two responses in either order.

    Labelled and unlabeled rows are compared separately, so that an unlabeled copy never displaces a labelled one.
    """
    first: dict[tuple, Entry] = {}
    kept, removed = [], []
    for position, rows in enumerate(inputs):
        for pair in rows.pairs:
            entry = Entry(position, rows.path, pair)
            key = (pair.target is None, pair.prompts, *sorted((pair.responses_a, pair.responses_b)))
            if key in first:
                removed.append(_duplicate_record(entry, first[key]))
            else:
                first[key] = entry
                kept.append(entry)
    columns = ["input", "file", "source", "id", "kept_file", "kept_id", "same_label"]
    return kept, pd.DataFrame(removed, columns=columns)


def _duplicate_record(removed: Entry, kept: Entry) -> dict:
    """Ids as in the input files, `input` = position in `inputs`; `same_label` compares the targets with the removed
    pair put in the kept pair's A/B order."""
    same_label = None
    if removed.pair.target is not None:
        aligned = removed.pair if removed.pair.responses_a == kept.pair.responses_a else swap_pair(removed.pair)
        same_label = bool(np.allclose(aligned.target, kept.pair.target))
    return {"input": removed.input, "file": removed.file, "source": removed.pair.meta["source"], "id": removed.pair.id,
            "kept_file": kept.file, "kept_id": kept.pair.id, "same_label": same_label}


def make_ids_unique(kept: list[Entry]) -> list[Entry]:
    """Prefix `<source>:` to every id that two sources share; ids repeated within one source name are an error."""
    sources_of = defaultdict(set)
    for entry in kept:
        sources_of[entry.pair.id].add(entry.pair.meta["source"])
    renamed = [
        entry._replace(pair=replace(entry.pair, id=f"{entry.pair.meta['source']}:{entry.pair.id}"), id_prefixed=True)
        if len(sources_of[entry.pair.id]) > 1 else entry
        for entry in kept
    ]
    counts = Counter(entry.pair.id for entry in renamed)
    repeated = next((row_id for row_id, n in counts.items() if n > 1), None)
    if repeated is not None:
        holders = [entry for entry in renamed if entry.pair.id == repeated]
        files = ", ".join(sorted({entry.file for entry in holders}))
        if any(entry.id_prefixed for entry in holders):  # the prefix made an id that a row already has
            raise DataError(f"{files}: row id={repeated} column 'id': a row's own id, and the id given to a row "
                            f"whose id several sources share (`<source>:<id>`); an input whose ids already carry "
                            f"source prefixes (an earlier prepared output?) goes with none of its sources")
        raise DataError(f"{files}: row id={repeated} column 'id': the same id in inputs with the same source name; "
                        f"give them distinct names with sources=[...]")
    return renamed


class FoldPlan(NamedTuple):
    """How folds are assigned: `kept` maps a prompt group to its fold in an earlier output (folds_from)."""

    k_folds: int
    seed: int
    kept: dict[str, int]


def earlier_folds(path: str, k_folds: int) -> dict[str, int]:
    """prompt group -> fold of an earlier train.parquet (`folds_from`): every row with a fold in 0..k_folds-1, and
    one fold per prompt (as this command writes them)."""
    folds: dict[str, int] = {}
    for pair in read_pairs(path, require_labels=False):
        fold = fold_of(pair, path)
        if fold is None or not 0 <= fold < k_folds:
            raise DataError(f"{path}: row id={pair.id} column 'fold': {fold!r} is not a fold of k_folds={k_folds} "
                            f"(folds_from needs a train.parquet of this command with the same k_folds)")
        group = prompt_group(pair)
        if folds.setdefault(group, fold) != fold:
            raise DataError(f"{path}: row id={pair.id} column 'fold': {fold}, but its prompt is in fold {folds[group]} "
                            f"too (folds_from needs each prompt in one fold)")
    n_earlier = max(folds.values(), default=-1) + 1
    if n_earlier < k_folds:  # the new prompts alone would fill the folds past the earlier file's
        raise DataError(f"{path}: column 'fold': folds 0..{n_earlier - 1} only, not a train.parquet of k_folds="
                        f"{k_folds} (folds_from needs the earlier file's k_folds: {n_earlier}?)")
    return folds


def assign_folds(pairs: list[Pair], plan: FoldPlan) -> np.ndarray:
    """Fold of each pair: its prompt's fold in `plan.kept`, else split among the new prompts (`split_folds`)."""
    groups = [prompt_group(pair) for pair in pairs]
    folds = np.array([plan.kept.get(group, -1) for group in groups], dtype=int)
    new = np.flatnonzero(folds < 0)
    if len(new) == 0:
        return folds
    new_groups = [groups[i] for i in new]
    if plan.kept and len(set(new_groups)) < plan.k_folds:  # too few new prompts to stratify: fill the smallest folds
        return _fill_smallest_folds(folds, new_groups, new, plan.k_folds)
    folds[new] = split_folds([pairs[i] for i in new], new_groups, plan.k_folds, plan.seed)
    return folds


def split_folds(pairs: list[Pair], groups: list[str], k_folds: int, seed: int) -> np.ndarray:
    """Folds stratified by source and label (small strata pooled), grouped by prompt."""
    if len(set(groups)) < k_folds:
        raise DataError(f"k_folds={k_folds} but the labelled rows hold only {len(set(groups))} distinct prompts")
    strata = [f"{pair.meta['source']}|{pair.label}" for pair in pairs]
    # A stratum smaller than k cannot reach every fold; pooling the small ones keeps sklearn's split possible.
    sizes = Counter(strata)
    strata = [stratum if sizes[stratum] >= k_folds else "pooled small strata" for stratum in strata]
    folds = np.empty(len(pairs), dtype=int)
    splitter = StratifiedGroupKFold(n_splits=k_folds, shuffle=True, random_state=seed)
    for fold, (_, fold_rows) in enumerate(splitter.split(np.zeros(len(pairs)), strata, groups)):
        folds[fold_rows] = fold
    return folds


def _fill_smallest_folds(folds: np.ndarray, new_groups: list[str], new: np.ndarray, k_folds: int) -> np.ndarray:
    """Each new prompt (in order of appearance) to the fold holding the fewest pairs so far, ties to the lower."""
    sizes = np.bincount(folds[folds >= 0], minlength=k_folds)
    placed: dict[str, int] = {}
    for row, group in zip(new, new_groups, strict=True):
        if group not in placed:
            placed[group] = int(np.argmin(sizes))
        folds[row] = placed[group]
        sizes[folds[row]] += 1
    return folds


def _write_parquets(kept: list[Entry], plan: FoldPlan, output_dir: Path) -> pd.DataFrame:
    """Write train.parquet (with folds) and unlabeled.parquet; return what the report needs, one row per pair."""
    labelled = [entry.pair for entry in kept if entry.pair.target is not None]
    unlabeled = [entry.pair for entry in kept if entry.pair.target is None]
    folds = assign_folds(labelled, plan) if labelled else np.empty(0, dtype=int)
    if labelled:
        pairs_to_frame(labelled).assign(fold=folds).to_parquet(output_dir / "train.parquet", index=False)
    if unlabeled:
        pairs_to_frame(unlabeled).to_parquet(output_dir / "unlabeled.parquet", index=False)
    ordered = labelled + unlabeled
    return pd.DataFrame({
        "source": [pair.meta["source"] for pair in ordered],
        "target": [pair.target for pair in ordered],
        "n_turns": [pair.n_turns for pair in ordered],
        "fold": pd.array([*folds, *[None] * len(unlabeled)], dtype="Int64"),
        "prompt": [pair.prompts for pair in ordered],
        "response_a": [pair.responses_a for pair in ordered],
        "response_b": [pair.responses_b for pair in ordered],
    })


def input_accounting(inputs: list[SourceRows], duplicates: pd.DataFrame, kept: list[Entry]) -> pd.DataFrame:
    """Per input: rows read = rejected + duplicates removed + kept."""
    removed = Counter(duplicates["input"])
    kept_per_input = Counter(entry.input for entry in kept)
    prefixed = Counter(entry.input for entry in kept if entry.id_prefixed)
    return pd.DataFrame([{
        "file": rows.path, "format": rows.format.value, "source": rows.source, "rows read": rows.n_read,
        "rejected": len(rows.rejects), "duplicates removed": removed[position],
        "kept": kept_per_input[position], "ids prefixed": prefixed[position],
    } for position, rows in enumerate(inputs)])


def _notes(config: PrepareConfig, inputs: list[SourceRows], kept: list[Entry], counter: LengthCounter) -> list[str]:
    """What the reader of the report must know to interpret it: how rows were changed or counted."""
    notes = [f"Mode: {'strict (any bad row stops the run)' if config.strict else 'lenient: skipped rows are in rejects.csv'}."]
    notes += [f"`{rows.path}` was skipped: {rows.skipped.reason}." for rows in inputs if rows.skipped]
    notes += [f"`{rows.path}` has no `id` column: its ids are `{rows.source}-<data row number from 0>`."
              for rows in inputs if rows.generated_ids]
    if any(rows.format in (SourceFormat.hh_dialogues, SourceFormat.prompt_chosen_rejected) for rows in inputs):
        notes.append(f"Chosen/rejected rows are placed in a random A/B order (seed={config.seed}); the label follows "
                     f"the chosen response.")
    if any(entry.id_prefixed for entry in kept):
        notes.append("Some ids were used by more than one source: those rows' ids carry the prefix `<source>:`.")
    if any("original_source" in entry.pair.meta for entry in kept):
        notes.append("An input's own `source` values, where they differ from its source name, are kept in "
                     "`original_source`.")
    notes.append(f"Lengths are counted in {counter.unit}" + (
        "" if config.tokenizer_path else " (no tokenizer_path given; model tokens are usually more numerous)") + ".")
    return notes


def _fold_notes(folds_from: str | None, kept_folds: dict[str, int], kept: list[Entry]) -> list[str]:
    if not folds_from:
        return []
    labelled = [entry.pair for entry in kept if entry.pair.target is not None]
    same = sum(prompt_group(pair) in kept_folds for pair in labelled)
    note = (f"Folds from `{folds_from}`: {same} of the {len(labelled)} labelled pairs have a prompt there and keep "
            f"its fold; the other {len(labelled) - same} were assigned folds.")
    return [note]


def run_prepare(config: PrepareConfig) -> pd.DataFrame:
    accounting = prepare(config)
    print(markdown_table(accounting))
    print(f"written to {config.output_dir}; see report.md there")
    return accounting
