"""Weighted ensemble of several runs' out-of-fold predictions, with an optional temperature.

    python -m lmsys.ensemble --oof runs/a/oof.csv runs/b/oof.csv --out ens [--temperature] \\
        [--submissions runs/a/submission.csv runs/b/submission.csv]
    python -m lmsys.ensemble --weights ens/weights.json --submissions a.csv b.csv --out ens2 [--oof a.csv b.csv]

Weights are non-negative, sum to 1 and minimise the OOF log loss of the weighted mean of probabilities; the
temperature T maps the ensemble p to softmax(log(p) / T).

Every file is validated before anything is fitted or written (a `DataError` naming the file, the column and the
ids): ids present; probabilities finite, non-negative and summing to 1 within 1e-4 per row; `label` one of the
classes 0 (A), 1 (B), 2 (tie); soft targets valid probabilities too. A weight fit that does not converge fails.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import softmax

from lmsys.config import ConfigError
from lmsys.data.io import PROB_TOLERANCE, DataError
from lmsys.data.schema import TARGET_COLUMNS
from lmsys.evaluation.metrics import accuracy, clip_probs, log_loss

SOFT_TARGET_COLUMNS = ("target_a", "target_b", "target_tie")
# Bounds on log T: beyond them the ensemble is either uniform or one-hot, so nothing is lost.
LOG_TEMPERATURE_BOUNDS = (np.log(0.05), np.log(20.0))
CLASSES = (0, 1, 2)  # label values: A wins, B wins, tie


def combine(prob_list: list[np.ndarray], weights: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Weighted mean of the models' (N, 3) probabilities, then temperature scaling; rows sum to 1."""
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in prob_list])  # (M, N, 3)
    mixed = np.tensordot(np.asarray(weights, dtype=np.float64), stacked, axes=1)  # (N, 3)
    return softmax(np.log(clip_probs(mixed)) / temperature, axis=1)


def fit_ensemble_weights(
    prob_list: list[np.ndarray], targets: np.ndarray, fit_temperature: bool = False
) -> tuple[np.ndarray, float]:
    """Simplex weights (M,) and temperature minimising the log loss of `combine` against (N, 3) `targets`.

    SLSQP on the simplex (bounds plus an equality constraint) can put a weight exactly at 0, unlike a softmax
    parametrisation; the temperature is optimised jointly as log T so it stays positive.
    """
    n_models = len(prob_list)
    targets = np.asarray(targets, dtype=np.float64)

    def objective(params: np.ndarray) -> float:
        temperature = float(np.exp(params[n_models])) if fit_temperature else 1.0
        return log_loss(combine(prob_list, params[:n_models], temperature), targets)

    start = np.full(n_models, 1.0 / n_models)
    bounds = [(0.0, 1.0)] * n_models
    if fit_temperature:
        start, bounds = np.append(start, 0.0), bounds + [LOG_TEMPERATURE_BOUNDS]
    result = minimize(
        objective,
        start,
        method="SLSQP",
        bounds=bounds,
        constraints=[{"type": "eq", "fun": lambda params: params[:n_models].sum() - 1.0}],
        options={"ftol": 1e-12, "maxiter": 500},
    )
    if not result.success or not np.isfinite(result.x).all():
        raise DataError(f"the ensemble weight fit did not converge ({result.message}); check the OOF files")
    # SLSQP may end a hair outside the simplex; project back before use.
    weights = np.clip(result.x[:n_models], 0.0, None)
    weights /= weights.sum()
    temperature = float(np.exp(result.x[n_models])) if fit_temperature else 1.0
    return weights, temperature


def _align(reference_ids: np.ndarray, frame: pd.DataFrame, path: str) -> pd.DataFrame:
    """Rows of `frame` in the order of `reference_ids`; a clear error when the id sets differ."""
    if frame["id"].duplicated().any():
        raise DataError(f"{path}: duplicated ids, e.g. {frame['id'][frame['id'].duplicated()].head(5).tolist()}")
    ids = pd.Index(frame["id"])
    reference = pd.Index(reference_ids)
    missing, extra = reference.difference(ids), ids.difference(reference)
    if len(missing) or len(extra):
        raise DataError(
            f"{path}: id set differs from the first file: {len(missing)} missing (e.g. {missing[:5].tolist()}), "
            f"{len(extra)} extra (e.g. {extra[:5].tolist()})"
        )
    return frame.set_index("id").loc[reference_ids].reset_index()


def _read_csv(path: str, required: tuple[str, ...]) -> pd.DataFrame:
    # Ids stay strings so "007" and 7 never collide and the submission echoes them verbatim.
    frame = pd.read_csv(path, dtype={"id": str})
    absent = [column for column in required if column not in frame]
    if absent:
        raise DataError(f"{path}: missing columns {absent}")
    blank = frame["id"].isna() | (frame["id"].str.strip() == "")
    if blank.any():
        raise DataError(f"{path}: data row {int(np.flatnonzero(blank)[0])} (counting from 0) column 'id': missing id")
    return frame


def _examples(ids: pd.Series, bad: np.ndarray) -> str:
    return f"{int(bad.sum())} row(s), e.g. ids {ids[bad].head(5).tolist()}"


def checked_probabilities(frame: pd.DataFrame, columns: tuple[str, ...], path: str) -> np.ndarray:
    """(N, 3) float64 probabilities of `columns`: every value a finite non-negative number, every row summing to 1
    within PROB_TOLERANCE (nothing is silently clipped or renormalised)."""
    values = frame[list(columns)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    where = f"{path}: columns {list(columns)}"
    not_numbers = ~np.isfinite(values).all(axis=1)
    if not_numbers.any():
        raise DataError(f"{where}: not a finite number in {_examples(frame['id'], not_numbers)}")
    negative = (values < 0).any(axis=1)
    if negative.any():
        raise DataError(f"{where}: negative probability in {_examples(frame['id'], negative)}")
    unnormalised = np.abs(values.sum(axis=1) - 1.0) > PROB_TOLERANCE
    if unnormalised.any():
        raise DataError(f"{where}: rows must sum to 1 (within {PROB_TOLERANCE}); "
                        f"{_examples(frame['id'], unnormalised)} do not")
    return values


def _targets(frame: pd.DataFrame, path: str) -> np.ndarray:
    """Soft targets when the file carries them, else one-hot of the hard label; (N, 3)."""
    if all(column in frame for column in SOFT_TARGET_COLUMNS):
        return checked_probabilities(frame, SOFT_TARGET_COLUMNS, path)
    if "label" not in frame:
        raise DataError(f"{path}: needs a 'label' column or soft targets {SOFT_TARGET_COLUMNS}")
    labels = pd.to_numeric(frame["label"], errors="coerce").to_numpy(np.float64)
    bad = ~np.isin(labels, CLASSES)
    if bad.any():
        raise DataError(f"{path}: column 'label': expected one of {list(CLASSES)} (A, B, tie) in "
                        f"{_examples(frame['id'], bad)}, got {frame['label'][bad].head(5).tolist()}")
    return np.eye(3)[labels.astype(int)]


def _load_aligned(paths: list[str]) -> tuple[np.ndarray, list[pd.DataFrame]]:
    """Ids in the first file's order and every file's frame reordered to them, each file's probabilities checked."""
    frames = [_read_csv(path, ("id", *TARGET_COLUMNS)) for path in paths]
    for frame, path in zip(frames, paths, strict=True):
        checked_probabilities(frame, TARGET_COLUMNS, path)
    ids = frames[0]["id"].to_numpy()
    return ids, [_align(ids, frame, path) for frame, path in zip(frames, paths)]


def load_oof(paths: list[str]) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Ids (in the first file's order), each model's (N, 3) probabilities, and the first file's (N, 3) targets."""
    ids, frames = _load_aligned(paths)
    probs = [frame[list(TARGET_COLUMNS)].to_numpy(np.float64) for frame in frames]
    return ids, probs, _targets(frames[0], paths[0])


def load_submissions(paths: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Ids (in the first file's order) and each submission's (N, 3) probabilities aligned to them."""
    ids, frames = _load_aligned(paths)
    return ids, [frame[list(TARGET_COLUMNS)].to_numpy(np.float64) for frame in frames]


def score_table(
    names: list[str], prob_list: list[np.ndarray], targets: np.ndarray, weights: np.ndarray, temperature: float
) -> pd.DataFrame:
    """One row per model and one for the ensemble: OOF log loss, accuracy and weight."""
    rows = [
        {"model": name, "log_loss": log_loss(p, targets), "accuracy": accuracy(p, targets), "weight": w}
        for name, p, w in zip(names, prob_list, weights)
    ]
    ensemble = combine(prob_list, weights, temperature)
    rows.append({"model": f"ensemble (T={temperature:.4f})", "log_loss": log_loss(ensemble, targets),
                 "accuracy": accuracy(ensemble, targets), "weight": float(np.sum(weights))})
    return pd.DataFrame(rows)


def write_submission(ids: np.ndarray, probs: np.ndarray, path: Path) -> None:
    frame = pd.DataFrame(probs, columns=list(TARGET_COLUMNS))
    frame.insert(0, "id", ids)
    frame.to_csv(path, index=False)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lmsys.ensemble", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--oof", nargs="+", help="oof.csv of each run (id, winner_*, label or target_*)")
    parser.add_argument("--out", required=True, help="output directory for weights.json and submission.csv")
    parser.add_argument("--temperature", action="store_true", help="also fit a temperature T")
    parser.add_argument("--submissions", nargs="+", help="Kaggle submission of each run, in --oof order")
    parser.add_argument("--weights", help="weights.json to apply instead of fitting")
    args = parser.parse_args(argv)
    if args.oof is None and args.weights is None:
        parser.error("give --oof to fit weights, or --weights to apply existing ones")
    if args.weights is not None and args.submissions is None:
        parser.error("--weights needs --submissions to apply them to")
    return args


def save_weights(path: Path, models: list[str], weights: np.ndarray, temperature: float, table: pd.DataFrame) -> None:
    ensemble = table.iloc[-1]
    path.write_text(json.dumps({
        "models": list(models),
        "weights": weights.tolist(),
        "temperature": temperature,
        "oof_log_loss": float(ensemble["log_loss"]),
        "oof_accuracy": float(ensemble["accuracy"]),
    }, indent=2))


def load_weights(path: str) -> tuple[np.ndarray, float]:
    saved = json.loads(Path(path).read_text())
    weights, temperature = np.asarray(saved["weights"], dtype=np.float64), float(saved["temperature"])
    if not (np.isfinite(weights).all() and (weights >= 0).all() and abs(weights.sum() - 1.0) <= PROB_TOLERANCE):
        raise DataError(f"{path}: 'weights' must be non-negative and sum to 1, got {weights.tolist()}")
    if not (np.isfinite(temperature) and temperature > 0):
        raise DataError(f"{path}: 'temperature' must be positive, got {temperature}")
    return weights, temperature


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    oof = load_oof(args.oof) if args.oof is not None else None
    if args.weights is None:
        weights, temperature = fit_ensemble_weights(oof[1], oof[2], fit_temperature=args.temperature)
    else:
        weights, temperature = load_weights(args.weights)

    if oof is not None:
        if len(weights) != len(args.oof):
            raise ConfigError(f"{len(weights)} weights for {len(args.oof)} --oof files")
        table = score_table(args.oof, oof[1], oof[2], weights, temperature)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.5f}"))
        if args.weights is None:
            save_weights(out / "weights.json", args.oof, weights, temperature, table)
            print(f"wrote {out / 'weights.json'}")

    if args.submissions is not None:
        if len(args.submissions) != len(weights):
            raise ConfigError(f"{len(args.submissions)} --submissions for {len(weights)} weights")
        ids, sub_probs = load_submissions(args.submissions)
        write_submission(ids, combine(sub_probs, weights, temperature), out / "submission.csv")
        print(f"wrote {out / 'submission.csv'}")


if __name__ == "__main__":
    main()
