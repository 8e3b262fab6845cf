"""Evaluation of (A wins, B wins, tie) probabilities: log loss, calibration, position bias, per-subset tables.

Every function takes `probs` (N, 3) rows summing to 1 and `targets` (N, 3) target probabilities (one-hot for hard
labels), both in (A, B, tie) column order. Returned numbers are plain Python floats/ints so they serialise to JSON.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import softmax, xlogy

EPS = 1e-15
TTA_MODES = ("prob", "logit")
PROMPT_TOKEN_EDGES = (64, 256, 1024)


def _checked(probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] not in (2, 3) or probs.shape != targets.shape:
        raise ValueError(f"expected probs and targets of equal shape (N, 3), got {probs.shape} and {targets.shape}")
    return probs, targets


def clip_probs(probs: np.ndarray) -> np.ndarray:
    """Clip to [EPS, 1 - EPS] and renormalise rows, as the Kaggle metric does, so a confident miss costs ~34.5 not inf."""
    clipped = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    return clipped / clipped.sum(axis=-1, keepdims=True)


def log_loss(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean cross-entropy -sum(targets * log p); equals sklearn's multiclass log loss for one-hot targets."""
    probs, targets = _checked(probs, targets)
    return float(-xlogy(targets, clip_probs(probs)).sum(axis=1).mean())


def accuracy(probs: np.ndarray, targets: np.ndarray) -> float:
    """Share of rows whose most probable class is the target's top class, over the rows whose target has one (a
    two-class tie, (0.5, 0.5), has none: no answer is right); NaN when no row has."""
    probs, targets = _checked(probs, targets)
    ranked = np.sort(targets, axis=1)  # (N, C)
    decided = ranked[:, -1] > ranked[:, -2]  # (N,)
    if not decided.any():
        return float("nan")
    return float((probs[decided].argmax(axis=1) == targets[decided].argmax(axis=1)).mean())


def class_prior_log_loss(targets: np.ndarray) -> float:
    """Log loss of predicting the mean target for every row: the score a model must beat to have learnt anything."""
    targets = np.asarray(targets, dtype=np.float64)
    prior = np.broadcast_to(targets.mean(axis=0), targets.shape)  # (N, 3)
    return log_loss(prior, targets)


def position_bias(p_ab: np.ndarray, p_ba_back: np.ndarray) -> float:
    """Mean |P(A wins)| gap between the (A, B) pass and the (B, A) pass mapped back; 0 for an order-blind model."""
    p_ab, p_ba_back = _checked(p_ab, p_ba_back)
    return float(np.abs(p_ab[:, 0] - p_ba_back[:, 0]).mean())


def tta_combine(probs_ab: np.ndarray, probs_ba_back: np.ndarray, mode: str = "prob") -> np.ndarray:
    """Combine both orientations: "prob" averages probabilities, "logit" is the softmax of the mean log-probability."""
    probs_ab, probs_ba_back = _checked(probs_ab, probs_ba_back)
    if mode == "prob":
        return (probs_ab + probs_ba_back) / 2
    if mode == "logit":
        return softmax((np.log(clip_probs(probs_ab)) + np.log(clip_probs(probs_ba_back))) / 2, axis=1)
    raise ValueError(f"unknown TTA mode {mode!r}, expected one of {TTA_MODES}")


def calibration_bins(probs: np.ndarray, targets: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Top-label reliability statistics per equal-width confidence bin: count, mean confidence, accuracy (each (n_bins,))."""
    probs, targets = _checked(probs, targets)
    confidence = probs.max(axis=1)  # (N,)
    correct = (probs.argmax(axis=1) == targets.argmax(axis=1)).astype(np.float64)  # (N,)
    # Confidence 1.0 belongs to the last bin, not to an extra one.
    bin_index = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    count = np.bincount(bin_index, minlength=n_bins)
    safe_count = np.maximum(count, 1)
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1),
        "count": count,
        "confidence": np.bincount(bin_index, weights=confidence, minlength=n_bins) / safe_count,
        "accuracy": np.bincount(bin_index, weights=correct, minlength=n_bins) / safe_count,
    }


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: count-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    bins = calibration_bins(probs, targets, n_bins)
    weight = bins["count"] / bins["count"].sum()
    return float((weight * np.abs(bins["accuracy"] - bins["confidence"])).sum())


def save_reliability_diagram(
    probs: np.ndarray,
    targets: np.ndarray,
    path: str | Path,
    n_bins: int = 15,
    title: str = "Reliability diagram",
) -> Path:
    """Write a PNG of per-bin accuracy against confidence (diagonal = perfect calibration) above the bin counts."""
    bins = calibration_bins(probs, targets, n_bins)
    ece = expected_calibration_error(probs, targets, n_bins)
    centers = (bins["edges"][:-1] + bins["edges"][1:]) / 2
    width = 1.0 / n_bins
    filled = bins["count"] > 0

    # imported here: matplotlib takes ~0.8 s to import, which every run and predict would pay at start-up. A bare
    # Figure renders through Agg without touching pyplot's global backend state.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 6))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    top.bar(centers[filled], bins["accuracy"][filled], width=width, edgecolor="black", alpha=0.7, label="accuracy")
    top.plot(bins["confidence"][filled], bins["accuracy"][filled], marker="o", color="C3", label="accuracy at mean confidence")
    top.set(ylabel="accuracy", ylim=(0, 1), title=f"{title} (ECE={ece:.4f})")
    top.legend(loc="upper left")
    bottom.bar(centers, bins["count"], width=width, edgecolor="black")
    bottom.set(xlabel="confidence (max probability)", ylabel="count", xlim=(0, 1))
    fig.tight_layout()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def _prompt_token_bucket(tokens: pd.Series) -> pd.Series:
    low, mid, high = PROMPT_TOKEN_EDGES
    labels = [f"prompt_tokens<={low}", f"prompt_tokens={low + 1}-{mid}", f"prompt_tokens={mid + 1}-{high}",
              f"prompt_tokens>{high}"]
    return pd.cut(tokens, bins=[-np.inf, low, mid, high, np.inf], labels=labels).astype(object)


def _subset_labels(frame: pd.DataFrame) -> dict[str, pd.Series]:
    """Per subset column, the label of each row (null where the row has no value); absent/all-null columns skipped."""
    labels = {}
    for column in ("n_turns", "language", "source", "prompt_tokens"):
        if column not in frame or frame[column].isna().all():
            continue
        values = frame[column]
        if column == "n_turns":
            labels[column] = values.map(lambda n: None if pd.isna(n) else ("single_turn" if n <= 1 else "multi_turn"))
        elif column == "prompt_tokens":
            labels[column] = _prompt_token_bucket(values.astype(np.float64))
        else:
            labels[column] = values.map(lambda v: None if pd.isna(v) else str(v))
    return labels


def subset_table(probs: np.ndarray, targets: np.ndarray, frame: pd.DataFrame) -> list[dict]:
    """Rows {subset, value, n, log_loss, accuracy}; `frame` holds one row per pair, aligned with `probs`."""
    probs, targets = _checked(probs, targets)
    if len(frame) != len(probs):
        raise ValueError(f"frame has {len(frame)} rows but probs has {len(probs)}")
    rows = []
    for column, labels in _subset_labels(frame.reset_index(drop=True)).items():
        # Largest subsets first; value_counts drops the nulls, so rows without a value join no subset.
        for value, n in labels.value_counts().items():
            mask = (labels == value).to_numpy()
            rows.append({
                "subset": column,
                "value": str(value),
                "n": int(n),
                "log_loss": log_loss(probs[mask], targets[mask]),
                "accuracy": accuracy(probs[mask], targets[mask]),
            })
    return rows


def _headline(probs: np.ndarray, targets: np.ndarray, frame: pd.DataFrame | None) -> dict:
    metrics = {
        "log_loss": log_loss(probs, targets),
        "accuracy": accuracy(probs, targets),
        "prior_log_loss": class_prior_log_loss(targets),
        "ece": expected_calibration_error(probs, targets),
        "n": len(probs),
    }
    if frame is not None:
        metrics["subsets"] = subset_table(probs, targets, frame)
    return metrics


def evaluation_metrics(
    probs_ab: np.ndarray,
    targets: np.ndarray,
    frame: pd.DataFrame | None = None,
    probs_ba_back: np.ndarray | None = None,
    tta_mode: str = "prob",
) -> dict:
    """Headline metrics of the prediction that would be submitted: the TTA combination when the swapped pass is given.

    `probs_ab` is the (A, B) orientation's prediction; `probs_ba_back` the (B, A) orientation's mapped back to
    (A, B, tie) order. With both, the single-pass scores and the position bias are reported alongside.
    """
    probs_ab, targets = _checked(probs_ab, targets)
    if probs_ba_back is None:
        return _headline(probs_ab, targets, frame)
    probs_ba_back, _ = _checked(probs_ba_back, targets)
    metrics = _headline(tta_combine(probs_ab, probs_ba_back, tta_mode), targets, frame)
    metrics.update({
        "tta_mode": tta_mode,
        "log_loss_no_tta": log_loss(probs_ab, targets),
        "accuracy_no_tta": accuracy(probs_ab, targets),
        "log_loss_swapped_only": log_loss(probs_ba_back, targets),
        "position_bias": position_bias(probs_ab, probs_ba_back),
    })
    return metrics
