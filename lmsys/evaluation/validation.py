"""Evaluation of a model on the validation split during training: predictions, metrics, the oof table."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from lmsys.config import InputFormat, TtaMode
from lmsys.data.batching import Batching
from lmsys.data.dataset import EncodedSplit
from lmsys.data.schema import SOFT_TARGET_COLUMNS, TARGET_COLUMNS
from lmsys.evaluation.metrics import evaluation_metrics
from lmsys.evaluation.predict_loop import SplitPredictions, predict_split
from lmsys.modeling.precision import check_finite_logits, half_dtype_of


@dataclass(frozen=True)
class ValidationSet:
    split: EncodedSplit
    batching: Batching
    tta: bool
    tta_mode: TtaMode


@dataclass(frozen=True)
class Evaluation:
    metrics: dict  # log_loss, accuracy, prior_log_loss, ... (see evaluation_metrics)
    probs: np.ndarray  # (N, C) the submitted prediction (TTA-combined with tta), in pair order
    predictions: SplitPredictions  # the logits behind `probs` (both orientations with tta), for oof.csv


def evaluate(model, validation: ValidationSet, accelerator) -> Evaluation:
    split = validation.split
    predictions = predict_split(model, split, validation.tta, validation.batching, accelerator)
    # a diverged or overflowing model: named here, not as a numpy error deep in the calibration metrics
    check_finite_logits(predictions.all_logits, [pair.id for pair in split.pairs], half_dtype_of(model),
                        "the run stops here (its best checkpoint so far is kept)")
    mode = validation.tta_mode.value
    metrics = evaluation_metrics(predictions.probs_ab, targets_of(split), subset_frame(split),
                                 predictions.probs_ba_back, mode)
    return Evaluation(metrics, predictions.combined(mode), predictions)


def targets_of(split: EncodedSplit) -> np.ndarray:
    return np.array([pair.target for pair in split.pairs], dtype=float)


def subset_frame(split: EncodedSplit) -> pd.DataFrame:
    return pd.DataFrame({
        "n_turns": [pair.n_turns for pair in split.pairs],
        "language": [pair.meta.get("language") for pair in split.pairs],
        "source": [pair.meta.get("source") for pair in split.pairs],
        "prompt_tokens": split.prompt_tokens,
    })


def oof_frame(split: EncodedSplit, evaluation: Evaluation, formats: tuple[InputFormat, ...] = ()) -> pd.DataFrame:
    """id, the submitted probabilities, label, the targets when they are soft (target_a ...: what the evaluation
    scored, and what the ensemble fits to), then the logits as predict's logits_output has them (with several
    `formats`, each format's too: `SplitPredictions.logits_columns`): one row a pair."""
    frame = pd.DataFrame(evaluation.probs, columns=list(TARGET_COLUMNS[: evaluation.probs.shape[1]]))
    frame.insert(0, "id", [pair.id for pair in split.pairs])
    frame["label"] = [pair.label for pair in split.pairs]
    targets = targets_of(split)  # (N, C)
    if not np.isin(targets, (0.0, 1.0)).all():  # soft targets (ties=split, pseudo-labels): label is only their argmax
        frame[list(SOFT_TARGET_COLUMNS[: targets.shape[1]])] = targets
    return pd.concat([frame, evaluation.predictions.logits_columns(formats)], axis=1)
