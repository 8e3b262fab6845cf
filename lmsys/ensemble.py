"""Weighted ensemble of several runs' out-of-fold predictions, with an optional temperature.

    python -m lmsys.ensemble --oof runs/a/oof.csv runs/b/oof.csv --out ens [--temperature] \\
        [--submissions runs/a/submission.csv runs/b/submission.csv]
    python -m lmsys.ensemble --weights ens/weights.json --submissions a.csv b.csv --out ens2 [--oof a.csv b.csv]

Weights are non-negative, sum to 1 and minimise the OOF log loss of the weighted mean of probabilities; the
temperature T maps the ensemble p to softmax(log(p) / T). Files are CSV or parquet (`python -m lmsys.oof join`'s
output included), rows matched by id. Three-class files hold (A, B, tie) probabilities; two-class (WSDM) runs'
oof.csv and `predict probs_output=` files hold (A, B), and their ensemble's submission is WSDM's `id, winner`.

Every file is validated before anything is fitted or written (one `error:` line naming the file, the column and the
ids, exit status 2): ids present; probabilities finite, non-negative and summing to 1 within 1e-4 per row; `label`
one of the classes 0 (A), 1 (B), 2 (tie); soft targets valid probabilities too; every OOF file's targets the same.
--out is a directory that must not be, hold or lie inside an input, nor hold an earlier ensemble's weights.json or
submission.csv (--overwrite replaces them, and removes the one this call does not write); weights.json and
submission.csv are written into it atomically. A weight fit that does not converge fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import softmax

from lmsys.cli import command_errors
from lmsys.config import ConfigError
from lmsys.data.io import PROB_TOLERANCE, DataError, check_present_ids, read_table
from lmsys.data.schema import SOFT_TARGET_COLUMNS, TARGET_COLUMNS, class_columns
from lmsys.evaluation.metrics import accuracy, clip_probs, log_loss
from lmsys.output_paths import check_output_paths
from lmsys.runs import write_json
from lmsys.submission import kaggle_submission, write_table

OUTPUT_FILES = ("weights.json", "submission.csv")
# Bounds on log T: beyond them the ensemble is either uniform or one-hot, so nothing is lost.
LOWEST_T, HIGHEST_T = 0.05, 20.0
LOG_TEMPERATURE_BOUNDS = (np.log(LOWEST_T), np.log(HIGHEST_T))
CLASSES = (0, 1, 2)  # label values: A wins, B wins, tie (a two-class model's: A wins, B wins)
CLASS_NAMES = {2: "A, B", 3: "A, B, tie"}


def combine(prob_list: list[np.ndarray], weights: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Weighted mean of the models' (N, C) probabilities, then temperature scaling; rows sum to 1."""
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in prob_list])  # (M, N, C)
    mixed = np.tensordot(np.asarray(weights, dtype=np.float64), stacked, axes=1)  # (N, C)
    return softmax(np.log(clip_probs(mixed)) / temperature, axis=1)


def fit_ensemble_weights(
    prob_list: list[np.ndarray], targets: np.ndarray, fit_temperature: bool = False
) -> tuple[np.ndarray, float]:
    """Simplex weights (M,) and temperature minimising the log loss of `combine` against (N, C) `targets`.

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


def _read(path: str) -> pd.DataFrame:
    """A CSV or parquet table (`read_table`: ids stay strings, so "007", 7 and "NA" are ids as written)."""
    frame = read_table(path)
    if "id" not in frame:
        raise DataError(f"{path}: missing column 'id'")
    check_present_ids(frame["id"], path)  # a null id in a parquet file, an empty one in a CSV file
    frame["id"] = frame["id"].astype(str)
    return frame


def _probability_columns(frame: pd.DataFrame, path: str, expected: tuple[str, ...] | None) -> tuple[str, ...]:
    """The file's (A, B, tie) or two-class (A, B) probability columns, which must be `expected` when given."""
    if "winner" in frame and TARGET_COLUMNS[0] not in frame:
        raise DataError(f"{path}: holds a two-class model's submission (id, winner): hard labels cannot be averaged; "
                        f"ensemble its probabilities (python -m lmsys.predict ... probs_output=FILE)")
    columns = class_columns(frame.columns)
    absent = [column for column in columns if column not in frame]
    if absent:
        raise DataError(f"{path}: missing columns {absent}")
    if expected is not None and columns != expected:
        raise DataError(f"{path}: probability columns {list(columns)}, the first file's {list(expected)} (a two-class "
                        f"and a three-class model cannot be ensembled)")
    return columns


def _examples(ids: pd.Series, bad: np.ndarray) -> str:
    return f"{int(bad.sum())} row(s), e.g. ids {ids[bad].head(5).tolist()}"


def checked_probabilities(frame: pd.DataFrame, columns: tuple[str, ...], path: str) -> np.ndarray:
    """(N, C) float64 probabilities of `columns`: every value a finite non-negative number, every row summing to 1
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


def _targets(frame: pd.DataFrame, path: str, n_classes: int) -> np.ndarray:
    """Soft targets when the file carries them, else one-hot of the hard label; (N, C)."""
    soft = SOFT_TARGET_COLUMNS[:n_classes]
    if all(column in frame for column in soft):
        return checked_probabilities(frame, soft, path)
    if "label" not in frame:
        raise DataError(f"{path}: needs a 'label' column or soft targets {soft}")
    labels = pd.to_numeric(frame["label"], errors="coerce").to_numpy(np.float64)
    bad = ~np.isin(labels, CLASSES[:n_classes])
    if bad.any():
        raise DataError(f"{path}: column 'label': expected one of {list(CLASSES[:n_classes])} "
                        f"({CLASS_NAMES[n_classes]}) in {_examples(frame['id'], bad)}, "
                        f"got {frame['label'][bad].head(5).tolist()}")
    return np.eye(n_classes)[labels.astype(int)]


def _load_aligned(paths: list[str], columns: tuple[str, ...] | None = None
                  ) -> tuple[np.ndarray, list[np.ndarray], list[pd.DataFrame]]:
    """Ids in the first file's order, every file's (N, C) probabilities and frame reordered to them; each file's
    columns are `columns` (default: the first file's) and its probabilities checked."""
    frames = [_read(path) for path in paths]
    columns = columns or _probability_columns(frames[0], paths[0], None)
    for frame, path in zip(frames, paths, strict=True):
        checked_probabilities(frame, _probability_columns(frame, path, columns), path)
    ids = frames[0]["id"].to_numpy()
    frames = [_align(ids, frame, path) for frame, path in zip(frames, paths, strict=True)]
    return ids, [frame[list(columns)].to_numpy(np.float64) for frame in frames], frames


def load_oof(paths: list[str]) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Ids (in the first file's order), each model's (N, C) probabilities, and the (N, C) targets, which every file
    that carries targets must agree on (they were fitted against the same labels)."""
    ids, probs, frames = _load_aligned(paths)
    n_classes = probs[0].shape[1]
    targets = _targets(frames[0], paths[0], n_classes)
    for frame, path in zip(frames[1:], paths[1:]):
        if "label" in frame or SOFT_TARGET_COLUMNS[0] in frame:
            differs = np.abs(_targets(frame, path, n_classes) - targets).max(axis=1) > PROB_TOLERANCE
            if differs.any():
                raise DataError(f"{path}: targets differ from {paths[0]}'s in {_examples(frames[0]['id'], differs)} "
                                f"(out-of-fold files of other training data?)")
    return ids, probs, targets


def load_submissions(paths: list[str], columns: tuple[str, ...] | None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Ids (in the first file's order) and each submission's (N, C) probabilities aligned to them."""
    ids, probs, _frames = _load_aligned(paths, columns)
    return ids, probs


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lmsys.ensemble", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--oof", nargs="+", help="oof.csv of each run (id, winner_*, label or target_*)")
    parser.add_argument("--out", required=True, help="output directory for weights.json and submission.csv")
    parser.add_argument("--temperature", action="store_true", help="also fit a temperature T")
    parser.add_argument("--submissions", nargs="+", help="Kaggle submission of each run, in --oof order")
    parser.add_argument("--weights", help="weights.json to apply instead of fitting")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the weights.json / submission.csv of an earlier ensemble in --out")
    args = parser.parse_args(argv)
    if args.oof is None and args.weights is None:
        parser.error("give --oof to fit weights, or --weights to apply existing ones")
    if args.weights is not None and args.submissions is None:
        parser.error("--weights needs --submissions to apply them to")
    if args.weights is not None and args.temperature:
        parser.error("--temperature fits a temperature with the weights; --weights applies the weights.json's own")
    return args


def weights_record(models: list[str], weights: np.ndarray, temperature: float, table: pd.DataFrame) -> dict:
    ensemble = table.iloc[-1]
    return {
        "models": list(models),
        "weights": weights.tolist(),
        "temperature": temperature,
        "oof_log_loss": float(ensemble["log_loss"]),
        "oof_accuracy": float(ensemble["accuracy"]),
    }


def load_weights(path: str) -> tuple[np.ndarray, float]:
    try:
        saved = json.loads(Path(path).read_text())
        weights, temperature = np.asarray(saved["weights"], dtype=np.float64), float(saved["temperature"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a weights.json of python -m lmsys.ensemble "
                        f"({type(err).__name__}: {err})") from err
    if not (weights.ndim == 1 and np.isfinite(weights).all() and (weights >= 0).all()
            and abs(weights.sum() - 1.0) <= PROB_TOLERANCE):
        raise DataError(f"{path}: 'weights' must be non-negative and sum to 1, got {weights.tolist()}")
    if not (np.isfinite(temperature) and temperature > 0):
        raise DataError(f"{path}: 'temperature' must be positive, got {temperature}")
    return weights, temperature


def check_paths(args: argparse.Namespace) -> list[Path]:
    """--out is a directory that neither is nor holds nor lies inside an input, nor holds an earlier ensemble's
    outputs unless --overwrite (returned: they go, so that the directory holds one ensemble's files); counts agree
    with the weights."""
    inputs = {f"--oof[{k}]": path for k, path in enumerate(args.oof or [])}
    inputs |= {f"--submissions[{k}]": path for k, path in enumerate(args.submissions or [])}
    inputs["--weights"] = args.weights
    check_output_paths(inputs, {"--out": args.out}, directory_outputs=frozenset({"--out"}))
    if args.oof and args.submissions and len(args.oof) != len(args.submissions):
        raise ConfigError(f"{len(args.submissions)} --submissions for {len(args.oof)} --oof files (one per model)")
    for flag, files in (("--oof", args.oof or []), ("--submissions", args.submissions or [])):
        resolved = [Path(path).resolve() for path in files]
        twice = next((path for k, path in enumerate(files) if resolved[k] in resolved[:k]), None)
        if twice is not None:  # one model counted as two: the fit splits its weight, a summary weighs it twice
            raise ConfigError(f"{flag}: {twice} is given twice; name each model's file once")
    earlier = [Path(args.out) / name for name in OUTPUT_FILES if (Path(args.out) / name).exists()]
    if earlier and not args.overwrite:
        raise ConfigError(f"--out {args.out} already holds an ensemble's {' and '.join(p.name for p in earlier)}; "
                          f"choose another --out, or pass --overwrite to replace them")
    return earlier


def run_ensemble(args: argparse.Namespace) -> None:
    """Every input read and checked, the weights fitted or loaded, then the outputs written (atomically)."""
    earlier = check_paths(args)
    oof = load_oof(args.oof) if args.oof is not None else None
    if args.weights is None:
        weights, temperature = fit_ensemble_weights(oof[1], oof[2], fit_temperature=args.temperature)
    else:
        weights, temperature = load_weights(args.weights)
    for flag, files in (("--oof", args.oof), ("--submissions", args.submissions)):
        if files is not None and len(files) != len(weights):
            raise ConfigError(f"{len(weights)} weights for {len(files)} {flag} files")
    columns = TARGET_COLUMNS[: oof[1][0].shape[1]] if oof is not None else None
    submissions = load_submissions(args.submissions, columns) if args.submissions is not None else None
    out = Path(args.out)
    if oof is not None:
        if args.weights is None and args.temperature and not (LOWEST_T * 1.001 < temperature < HIGHEST_T / 1.001):
            print(f"warning: the fitted temperature {temperature:.4g} sits at its bound ({LOWEST_T:g} to "
                  f"{HIGHEST_T:g}): the OOF predictions are nearly uninformative or already one-hot", file=sys.stderr)
        table = score_table(args.oof, oof[1], oof[2], weights, temperature)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.5f}"))
        if args.weights is None:
            write_json(out / "weights.json", weights_record(args.oof, weights, temperature, table))
            print(f"wrote {out / 'weights.json'}")
    if submissions is not None:
        ids, sub_probs = submissions
        write_table(kaggle_submission(list(ids), combine(sub_probs, weights, temperature)), out / "submission.csv")
        print(f"wrote {out / 'submission.csv'}")
    written = {"weights.json"} if oof is not None and args.weights is None else set()
    written |= {"submission.csv"} if submissions is not None else set()
    for path in earlier:  # --overwrite: an earlier ensemble's file that this one does not write
        if path.name not in written:
            path.unlink()
            print(f"removed {path} (an earlier ensemble's)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with command_errors():
        run_ensemble(args)


if __name__ == "__main__":
    main()
