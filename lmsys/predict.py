"""Prediction, as steps: validate inputs -> checkpoint -> encode -> predict (with swap TTA) -> atomic outputs.

    python -m lmsys.predict checkpoint=CKPT data.test_path=test.csv output=submission.csv [tta=true]
        [quantization=nf4|int8|none] [compute_dtype=float16|bfloat16|float32] [max_length=N]
        [base_model_path=DIR] [device_map=auto|balanced ['max_memory={0: 14GiB, 1: 15GiB}']] [logits_output=FILE]
    accelerate launch --num_processes 2 -m lmsys.predict ...      (data parallel: one model per GPU, rows dealt out)

Every key is in lmsys/prediction_config.py (PredictConfig). `lmsys/code/predict.py` (Hydra) and this module both
call `run_prediction`; `lmsys.pseudo_label` reuses `predict_checkpoint` and the writers. Everything that can be
wrong with the inputs (the test file, the checkpoint, the base model) is found before a model is loaded, and the
submission is written atomically, only when every pair has finite logits.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf

from lmsys.builders import build_encoder, build_model, build_tokenizer
from lmsys.config import Attention
from lmsys.data.dataset import EncodedSplit, encode_split
from lmsys.data.io import read_pairs
from lmsys.data.schema import TARGET_COLUMNS, Pair, swap_abt
from lmsys.evaluation.predict_loop import InferenceBatching, SplitPredictions, predict_split
from lmsys.modeling.backbone import fold_into_dense, resolve_dtype
from lmsys.modeling.checkpoint import ModelSpec, read_spec
from lmsys.modeling.families import attention_width, resolve_attention
from lmsys.modeling.precision import check_finite_logits, parse_max_memory, plan_device_map, predict_time_model
from lmsys.prediction_config import InferenceSettings, PredictConfig
from lmsys.runs import RunDir

log = logging.getLogger("lmsys")
LOGIT_COLUMNS = ("logit_a", "logit_b", "logit_tie")
# The (B, A) pass mapped back to (A, B, tie) order: swapped_logit_a is A's logit although A was shown second.
SWAPPED_LOGIT_COLUMNS = ("swapped_logit_a", "swapped_logit_b", "swapped_logit_tie")


def run_prediction(cfg: DictConfig) -> Path:
    config: PredictConfig = OmegaConf.to_object(cfg)  # runs the __post_init__ rules; fails on ??? left unset
    accelerator = Accelerator()
    setup_logging(accelerator.is_main_process)
    pairs = read_pairs(config.data.test_path, require_labels=False)
    spec = build_prediction_spec(config.checkpoint, config)
    log.info("%d pairs from %s; checkpoint %s (%s, %s)", len(pairs), config.data.test_path, config.checkpoint,
             spec.base_model_path, "merged" if spec.merged else f"adapter on {spec.quantization.value} base")

    predictions = predict_checkpoint(config.checkpoint, spec, pairs, config, accelerator)
    check_finite_logits([predictions.logits_ab, predictions.logits_ba], [pair.id for pair in pairs],
                        resolve_dtype(spec.compute_dtype, accelerator.device))
    probs = predictions.combined(config.tta_mode.value)
    write_table(submission_frame(pairs, probs), config.output, accelerator.is_main_process)
    if config.logits_output:
        write_table(logits_frame(pairs, predictions), config.logits_output, accelerator.is_main_process)
    if config.pseudo_label_output:
        write_table(pseudo_label_frame(pairs, probs), config.pseudo_label_output, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    log.info("wrote %s (%d rows)", config.output, len(pairs))
    return Path(config.output)


def build_prediction_spec(checkpoint: str, settings: InferenceSettings) -> ModelSpec:
    """The checkpoint's spec (checked complete) with the inference overrides; the attention kernel is re-checked
    because a checkpoint trained padded may hold one that would let packed pairs see each other."""
    spec = read_spec(checkpoint)
    attention = settings.attn_implementation or spec.attn_implementation
    base_model_path, quantization = predict_time_model(checkpoint, spec, settings)
    return dataclasses.replace(
        spec,
        base_model_path=base_model_path,
        quantization=quantization,
        max_length=settings.max_length or spec.max_length,
        compute_dtype=settings.compute_dtype or spec.compute_dtype,
        attn_implementation=Attention(resolve_attention(spec.family, spec.model_type, attention, settings.packing)),
    )


def build_inference_batching(
    settings: InferenceSettings, pad_id: int, spec: ModelSpec, checkpoint: str
) -> InferenceBatching:
    # Rows at most one sequence wide by default: sdpa/eager attention costs the square of the row width.
    model_dir = checkpoint if spec.merged else spec.base_model_path
    return InferenceBatching(settings.packing, settings.max_tokens, settings.row_tokens or spec.max_length,
                             settings.batch_size, pad_id, spec.padding_side,
                             attention_width(model_dir, spec.attn_implementation))


def predict_checkpoint(
    checkpoint: str, spec: ModelSpec, pairs: list[Pair], settings: InferenceSettings, accelerator: Accelerator
) -> SplitPredictions:
    """Logits of every pair (both orientations with TTA) from one checkpoint, on every process.

    Each orientation runs in its own pass. Then the (A, B) pass of a file with A and B exchanged row by row meets
    exactly the micro-batches of this file's (B, A) pass, and TTA predictions are swap-symmetric to the bit even
    where a kernel's rounding depends on the batch shape (bitsandbytes' CPU 4-bit GEMM rounds to bfloat16).
    """
    tokenizer = build_tokenizer(checkpoint, spec.trust_remote_code)
    split = encode_split(pairs, build_encoder(spec, tokenizer))
    model = load_prediction_model(checkpoint, spec, settings, accelerator)
    batching = build_inference_batching(settings, tokenizer.pad_token_id, spec, checkpoint)
    forward = predict_split(model, split, False, batching, accelerator, settings.show_progress)
    if not settings.tta:
        return forward
    backward = predict_split(model, swapped_as_forward(split), False, batching, accelerator,
                             settings.show_progress)
    return SplitPredictions(forward.logits_ab, backward.logits_ab)


def load_prediction_model(
    checkpoint: str, spec: ModelSpec, settings: InferenceSettings, accelerator: Accelerator
) -> torch.nn.Module:
    """The frozen model as prediction runs it: quantized per the spec, placed (or split), dense weights folded."""
    model = build_model(spec, None, None, accelerator.device, adapter_dir=checkpoint,
                        device_map=prediction_device_map(checkpoint, spec, settings, accelerator))
    if use_dense_weights(settings.dense_weights, accelerator.device):
        log.info("folded the adapter into %d dense projections", fold_into_dense(model))
    return model


def prediction_device_map(
    checkpoint: str, spec: ModelSpec, settings: InferenceSettings, accelerator: Accelerator
) -> dict[str, int | str] | None:
    """With `device_map`, the one model split over the visible GPUs (one process only: data parallel is the other
    way of using two GPUs)."""
    if settings.device_map is None:
        return None
    if accelerator.num_processes > 1:
        raise ValueError("device_map splits one model over the GPUs of one process; run without accelerate launch "
                         f"(got {accelerator.num_processes} processes)")
    model_dir = checkpoint if spec.merged else spec.base_model_path
    dtype = resolve_dtype(spec.compute_dtype, accelerator.device)
    device_map = plan_device_map(model_dir, settings.device_map.value, parse_max_memory(settings.max_memory), dtype,
                                 spec.trust_remote_code)
    log.info("backbone split over devices %s", sorted(set(map(str, device_map.values()))))
    return device_map


def use_dense_weights(requested: bool | None, device: torch.device) -> bool:
    return device.type == "cpu" if requested is None else requested


def swapped_as_forward(split: EncodedSplit) -> EncodedSplit:
    """The (B, A) orientation as the only one of a split: predict_split without TTA runs the forward orientation."""
    forward = [dataclasses.replace(example, swapped=False) for example in split.swapped]
    return EncodedSplit(split.pairs, forward, [], split.prompt_tokens)


def normalised(probs: np.ndarray, pairs: list[Pair]) -> np.ndarray:
    """(N, 3) float64 rows that sum to 1; refuses non-finite predictions rather than writing them."""
    probs = np.asarray(probs, dtype=np.float64)
    bad = ~np.isfinite(probs).all(axis=1)
    if bad.any():
        ids = [pair.id for pair, is_bad in zip(pairs, bad, strict=True) if is_bad]
        raise FloatingPointError(f"non-finite predictions for {len(ids)} pair(s), e.g. ids {ids[:5]}")
    return probs / probs.sum(axis=1, keepdims=True)


def submission_frame(pairs: list[Pair], probs: np.ndarray) -> pd.DataFrame:
    """The Kaggle submission: one row per input pair, in input order."""
    frame = pd.DataFrame(normalised(probs, pairs), columns=list(TARGET_COLUMNS))
    frame.insert(0, "id", [pair.id for pair in pairs])
    return frame


def logits_frame(pairs: list[Pair], predictions: SplitPredictions) -> pd.DataFrame:
    frame = pd.DataFrame(predictions.logits_ab, columns=list(LOGIT_COLUMNS))
    if predictions.logits_ba is not None:
        frame[list(SWAPPED_LOGIT_COLUMNS)] = swap_abt(predictions.logits_ba)
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
        "label": [list(row) for row in normalised(probs, pairs)],
        "source": "pseudo",
    })


def write_table(frame: pd.DataFrame, path: str | Path, is_main: bool) -> None:
    """Atomic write by the main process only; the suffix picks CSV or parquet."""
    path = Path(path)

    def produce(tmp: Path) -> None:
        if path.suffix == ".parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False)

    RunDir(path.parent, is_main).write(path.name, produce)


def setup_logging(is_main: bool) -> None:
    logger = logging.getLogger("lmsys")
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.handlers.clear()
    logger.propagate = False
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)


USAGE = __doc__.split("\n\n")[1]


def main(argv: list[str] | None = None) -> None:
    """`python -m lmsys.predict key=value ...`: the same schema and steps as lmsys/code/predict.py, without Hydra."""
    from lmsys.command_line import UsageError, parse
    from lmsys.data.io import DataError
    from lmsys.modeling.backbone import ModelLoadError
    from lmsys.modeling.checkpoint import CheckpointError

    config = parse(PredictConfig, sys.argv[1:] if argv is None else argv, USAGE)
    try:
        run_prediction(OmegaConf.structured(config))
    except (DataError, CheckpointError, ModelLoadError, FloatingPointError) as err:
        raise UsageError(str(err)) from err


if __name__ == "__main__":
    main()
