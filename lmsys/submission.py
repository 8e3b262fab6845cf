"""The tables a prediction ends in, shared by `python -m lmsys.predict` and `python -m lmsys.ensemble` (numpy and
pandas only, so the ensemble imports no torch): the Kaggle submission and the probabilities behind it.

Probabilities are (N, C): C = 3 for LMSYS's (A, B, tie), C = 2 for a two-class (WSDM) model's (A, B).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lmsys.data.schema import TARGET_COLUMNS
from lmsys.runs import write_file


def probability_table(ids: list[str], probs: np.ndarray) -> pd.DataFrame:
    """id and the class probabilities under the submission's column names: winner_model_a, winner_model_b[,
    winner_tie]. For three classes this is the LMSYS submission itself."""
    frame = pd.DataFrame(probs, columns=list(TARGET_COLUMNS[: probs.shape[1]]))
    frame.insert(0, "id", ids)
    return frame


def kaggle_submission(ids: list[str], probs: np.ndarray) -> pd.DataFrame:
    """One row per id in the given order: LMSYS's `id, winner_model_a, winner_model_b, winner_tie` probabilities,
    or for a two-class model WSDM's `id, winner` (model_a / model_b; A on an exact tie of the two)."""
    if probs.shape[1] == 2:
        return pd.DataFrame({"id": ids, "winner": np.where(probs[:, 0] >= probs[:, 1], "model_a", "model_b")})
    return probability_table(ids, probs)


def write_table(frame: pd.DataFrame, path: str | Path, is_main: bool = True) -> None:
    """Atomic write by the main process only; the suffix picks CSV or parquet."""
    path = Path(path)
    if path.suffix == ".parquet":
        write_file(path, lambda tmp: frame.to_parquet(tmp, index=False), is_main)
    else:
        write_file(path, lambda tmp: frame.to_csv(tmp, index=False), is_main)
