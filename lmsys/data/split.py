"""The validation split when no validation file is given: a fold column, or a prompt-grouped stratified split."""

from __future__ import annotations

import hashlib
import math

import numpy as np

from lmsys.data.io import DataError
from lmsys.data.schema import Pair


def prompt_group(pair: Pair) -> str:
    """Pairs with the same prompt share a group, so that no prompt sits on both sides of a split."""
    return hashlib.sha1("\x1f".join(pair.prompts).encode("utf-8")).hexdigest()


def split_train_valid(
    pairs: list[Pair], valid_fold: int | None, valid_fraction: float, seed: int, source: str = "data.train_path"
) -> tuple[list[Pair], list[Pair]]:
    """`source` names the file the pairs came from, for the errors."""
    if valid_fold is not None:
        return _split_by_fold(pairs, valid_fold, source)
    n_splits = max(2, round(1.0 / valid_fraction))
    labels = np.array([pair.label for pair in pairs])
    groups = np.array([prompt_group(pair) for pair in pairs])
    n_prompts, largest_class = len(set(groups.tolist())), int(np.bincount(labels).max())
    if min(n_prompts, largest_class) < n_splits:  # sklearn's stratified folds need a class as large as the folds
        raise DataError(
            f"{source}: {len(pairs)} pair(s) with {n_prompts} distinct prompt(s), {largest_class} in the largest "
            f"class, cannot be split for validation with data.valid_fraction={valid_fraction} (needs at least "
            f"{n_splits} of both); add rows, raise data.valid_fraction or give data.valid_path"
        )
    # imported here: sklearn.model_selection takes ~2 s to import, which every run and predict would pay at start-up
    from sklearn.model_selection import StratifiedGroupKFold

    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, valid_idx = next(folds.split(np.zeros(len(pairs)), labels, groups))
    return [pairs[i] for i in train_idx], [pairs[i] for i in valid_idx]


def fold_of(pair: Pair, source: str) -> int | None:
    """The pair's `fold` as an int (a whole float such as parquet's 1.0 included); None when the cell is empty."""
    value = pair.meta.get("fold")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number == int(number)):
        raise DataError(f"{source}: row id={pair.id} column 'fold': {value!r} is not a whole number")
    return int(number)


def _split_by_fold(pairs: list[Pair], valid_fold: int, source: str) -> tuple[list[Pair], list[Pair]]:
    if all("fold" not in pair.meta for pair in pairs):
        raise DataError(f"{source}: data.valid_fold={valid_fold} needs a 'fold' column, and the file has none "
                        f"(add one with python -m lmsys.prepare, or validate on a file with data.valid_path)")
    folds = [fold_of(pair, source) for pair in pairs]
    missing = [pair.id for pair, fold in zip(pairs, folds, strict=True) if fold is None]
    if missing:
        raise DataError(f"{source}: row id={missing[0]} column 'fold': no value, but data.valid_fold={valid_fold} "
                        f"splits by it ({len(missing)} row(s) without one)")
    valid = [pair for pair, fold in zip(pairs, folds, strict=True) if fold == valid_fold]
    if not valid:
        raise DataError(f"{source}: data.valid_fold={valid_fold}: no row has that fold (the 'fold' column holds "
                        f"{sorted(set(folds))})")
    return [pair for pair, fold in zip(pairs, folds, strict=True) if fold != valid_fold], valid
