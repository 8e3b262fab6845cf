"""What `python -m lmsys.predict` and `python -m lmsys.pseudo_label` run once their arguments are checked (the
commands' modules import this only then: torch, transformers and peft take ~10 s to import).

`run_prediction` writes a Kaggle submission from one checkpoint, with swap TTA by default; `run_pseudo_labels` the
mean of several checkpoints' probabilities as training data. Everything that can be wrong with the inputs (the
test file, the checkpoints, the base model) is found before a model is loaded, and every file is written atomically,
only when every pair has finite logits. `predict_checkpoint`, `load_prediction_model` and the writers serve
lmsys.kaggle.estimate and the tests.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator

from lmsys.builders import (
    build_encoders,
    build_inference_batching,
    build_model,
    build_prediction_spec,
    build_tokenizer,
    use_elementwise_kernels,
)
from lmsys.config import ConfigError, InputFormat
from lmsys.data.dataset import encode_split
from lmsys.data.io import read_pairs
from lmsys.data.schema import Pair
from lmsys.evaluation.predict_loop import SplitPredictions, predict_split
from lmsys.logs import setup_logging
from lmsys.modeling.backbone import fold_into_dense, resolve_dtype
from lmsys.modeling.checkpoint import CheckpointError, ModelSpec
from lmsys.modeling.compile import resolve_elementwise_kernel
from lmsys.modeling.precision import check_finite_logits, parse_max_memory, plan_device_map
from lmsys.prediction_config import InferenceConfig, PredictConfig, PseudoLabelConfig
from lmsys.submission import kaggle_submission, probability_table, write_table
from lmsys.training.signals import GracefulStop, StopRequested

log = logging.getLogger("lmsys")


def prediction_inputs(checkpoints: list[str], settings: InferenceConfig) -> tuple[Accelerator, list[Pair], list[ModelSpec]]:
    """The accelerator, the pairs to predict and each checkpoint's spec: every input checked before a model loads."""
    accelerator = Accelerator()
    setup_logging(accelerator.is_main_process)
    pairs = read_pairs(settings.data.test_path, require_labels=False)
    specs = [build_prediction_spec(checkpoint, settings) for checkpoint in checkpoints]
    for checkpoint, spec in zip(checkpoints, specs, strict=True):  # each layout fits its max_length: a last
        try:  # checkpoint's must not fail after the first ones have predicted for hours
            build_encoders(spec, build_tokenizer(checkpoint, spec.trust_remote_code))
        except ConfigError as err:
            raise ConfigError(f"{checkpoint}: {err}") from err
    return accelerator, pairs, specs


def run_prediction(config: PredictConfig) -> Path:
    accelerator, pairs, (spec,) = prediction_inputs([config.checkpoint], config)
    log.info("%d pairs from %s; checkpoint %s (%s, %s)", len(pairs), config.data.test_path, config.checkpoint,
             spec.base_model_path, "merged" if spec.merged else f"adapter on {spec.quantization.value} base")
    warn_submission_schema(pairs, spec.num_classes, config.data.test_path)

    with GracefulStop() as stop:
        try:
            predictions = predict_checkpoint(config.checkpoint, spec, pairs, config, accelerator)
        except StopRequested:
            log.error("stopped by signal %s before the prediction finished: nothing written", stop.received)
            raise SystemExit(128 + (stop.received or 15)) from None  # the shell's code for death by that signal
    check_finite_logits(predictions.all_logits, [pair.id for pair in pairs],
                        resolve_dtype(spec.compute_dtype, accelerator.device,
                                      spec.model_dir(config.checkpoint)))
    probs = predictions.combined((config.tta_mode or spec.tta_mode).value)
    write_table(submission_frame(pairs, probs), config.output, accelerator.is_main_process)
    if config.probs_output:
        write_table(probability_table([pair.id for pair in pairs], normalised(probs, pairs)), config.probs_output,
                    accelerator.is_main_process)
    if config.logits_output:
        write_table(logits_frame(pairs, predictions, spec.input_formats), config.logits_output,
                    accelerator.is_main_process)
    if config.pseudo_label_output:
        write_table(pseudo_label_frame(pairs, probs), config.pseudo_label_output, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    log.info("wrote %s (%d rows)", config.output, len(pairs))
    return Path(config.output)


def warn_submission_schema(pairs: list[Pair], num_classes: int, test_path: str) -> None:
    """WSDM test pairs (a `language` column) scored by a three-class model: its submission is LMSYS's three
    probability columns, which WSDM's `id, winner` scoring does not read."""
    if num_classes == 3 and pairs and all("language" in pair.meta for pair in pairs):
        log.warning("%s looks like WSDM pairs (a language column), but the checkpoint has three classes, so the "
                    "submission is LMSYS's id, winner_model_a, winner_model_b, winner_tie; WSDM scores id, winner: "
                    "predict with a two-class checkpoint (model.num_classes=2), or take probs_output's larger "
                    "of A and B", test_path)


def run_pseudo_labels(config: PseudoLabelConfig) -> None:
    accelerator, pairs, specs = prediction_inputs(config.checkpoints, config)  # every checkpoint checked first
    probs = np.zeros((len(pairs), shared_num_classes(config.checkpoints, specs)))  # (N, C) sum over checkpoints
    with GracefulStop() as stop:
        for checkpoint, spec in zip(config.checkpoints, specs, strict=True):
            log.info("pseudo-labelling %d pairs with %s", len(pairs), checkpoint)
            try:
                predictions = predict_checkpoint(checkpoint, spec, pairs, config, accelerator)
            except StopRequested:
                log.error("stopped by signal %s before the pseudo-labels were complete: nothing written",
                          stop.received)
                raise SystemExit(128 + (stop.received or 15)) from None
            probs += predictions.combined((config.tta_mode or spec.tta_mode).value)
    write_table(pseudo_label_frame(pairs, probs / len(specs)), config.output, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    log.info("wrote %s (%d pairs, mean of %d checkpoint(s))", config.output, len(pairs), len(specs))


def shared_num_classes(checkpoints: list[str], specs: list[ModelSpec]) -> int:
    """The class count every checkpoint's head predicts; a mix of 3-class (A, B, tie) and 2-class (A, B) heads is
    refused before a model loads (their probabilities cannot be averaged)."""
    for checkpoint, spec in zip(checkpoints, specs, strict=True):
        if spec.num_classes != specs[0].num_classes:
            raise CheckpointError(f"checkpoints={checkpoint} predicts {spec.num_classes} classes, {checkpoints[0]} "
                                  f"{specs[0].num_classes}: pseudo-label with checkpoints of one kind")
    return specs[0].num_classes


def predict_checkpoint(
    checkpoint: str, spec: ModelSpec, pairs: list[Pair], settings: InferenceConfig, accelerator: Accelerator
) -> SplitPredictions:
    """Logits of every pair (both orientations with TTA) from one checkpoint, on every process."""
    tokenizer = build_tokenizer(checkpoint, spec.trust_remote_code)
    split = encode_split(pairs, build_encoders(spec, tokenizer))
    model = load_prediction_model(checkpoint, spec, settings, accelerator)
    batching = build_inference_batching(settings, spec, tokenizer.pad_token_id)
    return predict_split(model, split, settings.tta, batching, accelerator, settings.show_progress,
                         settings.share_prefixes)


def load_prediction_model(
    checkpoint: str, spec: ModelSpec, settings: InferenceConfig, accelerator: Accelerator
) -> torch.nn.Module:
    """The frozen model as prediction runs it: quantized per the spec, placed (or split), dense weights folded."""
    model = build_model(spec, None, None, accelerator.device, adapter_dir=checkpoint,
                        device_map=prediction_device_map(checkpoint, spec, settings, accelerator))
    folded = fold_into_dense(model) if use_dense_weights(settings.dense_weights, accelerator.device) else 0
    if folded:  # none in a merged, unquantized export: nothing to fold
        log.info("folded the adapter into %d dense projections", folded)
    dtype = resolve_dtype(spec.compute_dtype, accelerator.device, spec.model_dir(checkpoint))
    kernel = resolve_elementwise_kernel("kernels", settings.kernels, accelerator.device, dtype, False, False)
    use_elementwise_kernels(model, kernel, kernel, kernel)
    return model


def prediction_device_map(
    checkpoint: str, spec: ModelSpec, settings: InferenceConfig, accelerator: Accelerator
) -> dict[str, int | str] | None:
    """With `device_map`, the one model split over the visible GPUs (one process only: data parallel is the other
    way of using two GPUs)."""
    if settings.device_map is None:
        return None
    if accelerator.num_processes > 1:
        raise ValueError("device_map splits one model over the GPUs of one process; run without accelerate launch "
                         f"(got {accelerator.num_processes} processes)")
    model_dir = spec.model_dir(checkpoint)
    dtype = resolve_dtype(spec.compute_dtype, accelerator.device, model_dir)
    device_map = plan_device_map(model_dir, settings.device_map.value, parse_max_memory(settings.max_memory), dtype,
                                 spec.trust_remote_code)
    log.info("backbone split over devices %s", sorted(set(map(str, device_map.values()))))
    return device_map


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
    """The Kaggle submission, one row per input pair in input order (`lmsys.submission.kaggle_submission`)."""
    return kaggle_submission([pair.id for pair in pairs], normalised(probs, pairs))


def logits_frame(pairs: list[Pair], predictions: SplitPredictions, formats: tuple[InputFormat, ...]) -> pd.DataFrame:
    """id, the first format's logits (logit_a ... swapped_logit_tie, as teacher files read them) and, with several
    formats, every format's under the same names suffixed _<format> (logit_a_papb, swapped_logit_a_papb, ...)."""
    frame = predictions.logits_columns(formats)
    frame.insert(0, "id", [pair.id for pair in pairs])
    return frame


def pseudo_label_frame(pairs: list[Pair], probs: np.ndarray) -> pd.DataFrame:
    """Soft-labelled training rows that `read_pairs(path, require_labels=True)` accepts: texts as lists of turns,
    `label` as the three (A, B, tie) probabilities."""
    return pd.DataFrame({
        "id": [pair.id for pair in pairs],
        "prompt": [list(pair.prompts) for pair in pairs],
        "response_a": [list(pair.responses_a) for pair in pairs],
        "response_b": [list(pair.responses_b) for pair in pairs],
        # (A, B, tie); a two-class model's rows get a tie of 0, so that every label reads the same way
        "label": [[*row, 0.0][:3] for row in normalised(probs, pairs)],
        "source": "pseudo",
    })
