"""The validation split when no validation file is given: a fold column, or a prompt-grouped stratified split."""

from __future__ import annotations

import hashlib

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
    n_prompts = len(set(groups.tolist()))
    if n_prompts < n_splits:
        raise DataError(
            f"data.train_path: {len(pairs)} pair(s) with {n_prompts} distinct prompt(s) cannot be split for "
            f"validation with data.valid_fraction={valid_fraction} (needs at least {n_splits} distinct prompts); "
            f"add rows, raise data.valid_fraction or give data.valid_path"
        )
    # imported here: sklearn.model_selection takes ~2 s to import, which every run and predict would pay at start-up
    from sklearn.model_selection import StratifiedGroupKFold

    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, valid_idx = next(folds.split(np.zeros(len(pairs)), labels, groups))
    return [pairs[i] for i in train_idx], [pairs[i] for i in valid_idx]


def _split_by_fold(pairs: list[Pair], valid_fold: int, source: str) -> tuple[list[Pair], list[Pair]]:
    missing = [pair.id for pair in pairs if "fold" not in pair.meta]
    if len(missing) == len(pairs):
        raise DataError(f"{source}: data.valid_fold={valid_fold} needs a 'fold' column, and the file has none "
                        f"(add one with python -m lmsys.prepare, or validate on a file with data.valid_path)")
    if missing:
        raise DataError(f"{source}: row id={missing[0]} column 'fold': no value, but data.valid_fold={valid_fold} "
                        f"splits by it ({len(missing)} row(s) without one)")
    folds = sorted({int(pair.meta["fold"]) for pair in pairs})
    valid = [pair for pair in pairs if int(pair.meta["fold"]) == valid_fold]
    if not valid:
        raise DataError(f"{source}: data.valid_fold={valid_fold}: no row has that fold (the 'fold' column holds {folds})")
    return [pair for pair in pairs if int(pair.meta["fold"]) != valid_fold], valid
