"""Predict with a checkpoint: a Kaggle submission, with swap TTA by default.

    python -m lmsys.predict checkpoint=RUN_DIR/checkpoint data.test_path=test.csv output=submission.csv \
        [tta=false] [formats=[pab,papb]] [logits_output=logits.csv] [pseudo_label_output=pseudo.parquet] \
        [dense_weights=true|false]
    accelerate launch -m lmsys.predict ...        (several processes: each predicts a share of the pairs)

As steps: validate inputs -> checkpoint -> encode -> predict (with swap TTA) -> atomic outputs. Everything that
can be wrong with the inputs (the test file, the checkpoint) is found before a model is loaded.
`lmsys.pseudo_label` reuses `predict_checkpoint` and the writers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator

from lmsys.builders import build_encoders, build_inference_batching, build_model, build_prediction_spec, build_tokenizer
from lmsys.cli import run_command
from lmsys.config import InputFormat
from lmsys.data.dataset import encode_split
from lmsys.data.io import read_pairs
from lmsys.data.schema import TARGET_COLUMNS, Pair, swap_abt
from lmsys.evaluation.predict_loop import SplitPredictions, predict_split
from lmsys.logs import setup_logging
from lmsys.modeling.backbone import fold_into_dense
from lmsys.modeling.checkpoint import ModelSpec
from lmsys.prediction_config import InferenceConfig, PredictConfig
from lmsys.runs import write_file

log = logging.getLogger("lmsys")
LOGIT_COLUMNS = ("logit_a", "logit_b", "logit_tie")
# The (B, A) pass mapped back to (A, B, tie) order: swapped_logit_a is A's logit although A was shown second.
SWAPPED_LOGIT_COLUMNS = ("swapped_logit_a", "swapped_logit_b", "swapped_logit_tie")


def main(argv: list[str] | None = None) -> None:
    run_command(PredictConfig, __doc__, run_prediction, argv)


def prediction_inputs(checkpoints: list[str], settings: InferenceConfig) -> tuple[Accelerator, list[Pair], list[ModelSpec]]:
    """The accelerator, the pairs to predict and each checkpoint's spec: every input checked before a model loads."""
    accelerator = Accelerator()
    setup_logging(accelerator.is_main_process)
    pairs = read_pairs(settings.data.test_path, require_labels=False)
    return accelerator, pairs, [build_prediction_spec(checkpoint, settings) for checkpoint in checkpoints]


def run_prediction(config: PredictConfig) -> Path:
    accelerator, pairs, (spec,) = prediction_inputs([config.checkpoint], config)
    log.info("%d pairs from %s; checkpoint %s (%s, %s)", len(pairs), config.data.test_path, config.checkpoint,
             spec.base_model_path, "merged" if spec.merged else f"adapter on {spec.quantization.value} base")

    predictions = predict_checkpoint(config.checkpoint, spec, pairs, config, accelerator)
    probs = predictions.combined(config.tta_mode.value)
    write_table(submission_frame(pairs, probs), config.output, accelerator.is_main_process)
    if config.logits_output:
        write_table(logits_frame(pairs, predictions, spec.input_formats), config.logits_output,
                    accelerator.is_main_process)
    if config.pseudo_label_output:
        write_table(pseudo_label_frame(pairs, probs), config.pseudo_label_output, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    log.info("wrote %s (%d rows)", config.output, len(pairs))
    return Path(config.output)


def predict_checkpoint(
    checkpoint: str, spec: ModelSpec, pairs: list[Pair], settings: InferenceConfig, accelerator: Accelerator
) -> SplitPredictions:
    """Logits of every pair (both orientations with TTA) from one checkpoint, on every process."""
    tokenizer = build_tokenizer(checkpoint, spec.trust_remote_code)
    split = encode_split(pairs, build_encoders(spec, tokenizer))
    model = build_model(spec, None, None, accelerator.device, adapter_dir=checkpoint)
    if use_dense_weights(settings.dense_weights, accelerator.device):
        log.info("folded the adapter into %d dense projections", fold_into_dense(model))
    batching = build_inference_batching(settings, spec, tokenizer.pad_token_id)
    return predict_split(model, split, settings.tta, batching, accelerator, settings.show_progress)


def use_dense_weights(requested: bool | None, device: torch.device) -> bool:
    return device.type == "cpu" if requested is None else requested


def normalised(probs: np.ndarray, pairs: list[Pair]) -> np.ndarray:
    """(N, 3) float64 rows that sum to 1; refuses non-finite predictions rather than writing them."""
    probs = np.asarray(probs, dtype=np.float64)
    bad = ~np.isfinite(probs).all(axis=1)
    if bad.any():
        ids = [pair.id for pair, is_bad in zip(pairs, bad, strict=True) if is_bad]
        raise FloatingPointError(f"non-finite predictions for {len(ids)} pair(s), e.g. ids {ids[:5]}")
    return probs / probs.sum(axis=1, keepdims=True)


def submission_frame(pairs: list[Pair], probs: np.ndarray) -> pd.DataFrame:
    """The Kaggle submission, one row per input pair in input order: LMSYS `id, winner_model_a, winner_model_b,
    winner_tie` probabilities, or for a two-class model WSDM's `id, winner` (model_a / model_b)."""
    probs = normalised(probs, pairs)
    ids = [pair.id for pair in pairs]
    if probs.shape[1] == 2:
        return pd.DataFrame({"id": ids, "winner": np.where(probs[:, 0] >= probs[:, 1], "model_a", "model_b")})
    frame = pd.DataFrame(probs, columns=list(TARGET_COLUMNS))
    frame.insert(0, "id", ids)
    return frame


def logits_frame(pairs: list[Pair], predictions: SplitPredictions, formats: tuple[InputFormat, ...]) -> pd.DataFrame:
    """id, the first format's logits (logit_a ... swapped_logit_tie, as teacher files read them) and, with several
    formats, every format's under the same names suffixed _<format> (logit_a_papb, swapped_logit_a_papb, ...)."""
    width = predictions.logits_ab.shape[1]
    frame = pd.DataFrame({"id": [pair.id for pair in pairs]})
    suffixes = [""] + ([f"_{fmt.value}" for fmt in formats] if len(formats) > 1 else [])
    indices = [0] + (list(range(len(formats))) if len(formats) > 1 else [])
    for suffix, k in zip(suffixes, indices, strict=True):
        frame[[c + suffix for c in LOGIT_COLUMNS[:width]]] = predictions.format_logits_ab[k]
        if predictions.format_logits_ba is not None:
            frame[[c + suffix for c in SWAPPED_LOGIT_COLUMNS[:width]]] = swap_abt(predictions.format_logits_ba[k])
    return frame


def pseudo_label_frame(pairs: list[Pair], probs: np.ndarray) -> pd.DataFrame:
    """Soft-labelled training rows that `read_pairs(path, require_labels=True)` accepts: texts as lists of turns,
    `label` as the three (A, B, tie) probabilities."""
    return pd.DataFrame({
        "id": [pair.id for pair in pairs],
        "prompt": [list(pair.prompts) for pair in pairs],
        "response_a": [list(pair.responses_a) for pair in pairs],
        "response_b": [list(pair.responses_b) for pair in pairs],
        "label": [list(row) for row in normalised(probs, pairs)],
        "source": "pseudo",
    })


def write_table(frame: pd.DataFrame, path: str | Path, is_main: bool) -> None:
    """Atomic write by the main process only; the suffix picks CSV or parquet."""
    path = Path(path)
    if path.suffix == ".parquet":
        write_file(path, lambda tmp: frame.to_parquet(tmp, index=False), is_main)
    else:
        write_file(path, lambda tmp: frame.to_csv(tmp, index=False), is_main)


if __name__ == "__main__":
    main()
