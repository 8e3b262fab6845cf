"""Predict-time precision and placement: the float16 overflow check, pre-quantized exports, and one model split
over several devices (`device_map`).

Kaggle's T4s have no bfloat16, and Gemma-2's activations overflow float16: a float16 run then yields inf/NaN
logits for some pairs. `check_finite_logits` refuses such predictions, naming the first ids and the setting to
change, so that no submission with NaNs is ever written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmsys.config import Quantization
from lmsys.modeling.model_facts import read_config

QUANTIZATION_OF_CONFIG = {"nf4": Quantization.nf4, "fp4": Quantization.fp4}  # bnb_4bit_quant_type -> ours


class PrecisionError(FloatingPointError):
    """Non-finite predictions: the message names the first pair ids and the setting to change."""


def check_finite_logits(logits: list[np.ndarray | None], ids: list[str], dtype: torch.dtype,
                        outcome: str = "no submission written") -> None:
    """Fail when any pair has an inf/NaN logit in any orientation or format; `logits` are (N, C) arrays (None: not
    run); `outcome` says what the failure leaves."""
    bad = np.zeros(len(ids), dtype=bool)
    for array in logits:
        if array is not None:
            bad |= ~np.isfinite(array).all(axis=1)
    if not bad.any():
        return
    first = [ids[i] for i in np.flatnonzero(bad)[:5]]
    if dtype == torch.float16:
        advice = ("the activations overflow float16 (Gemma-2 does); predict with compute_dtype=float32, or "
                  "compute_dtype=bfloat16 on a GPU that has it")
    else:
        advice = f"the model itself produces them in {dtype_name(dtype)}; check the checkpoint's weights"
    raise PrecisionError(f"non-finite logits (inf/NaN) for {int(bad.sum())} of {len(ids)} pairs with "
                         f"compute_dtype={dtype_name(dtype)}, first ids {first}: {advice}; {outcome}")


def half_dtype_of(model: torch.nn.Module) -> torch.dtype:
    """The 16-bit float type a model computes in (its weights outside the fp32 head are in it), else float32."""
    return next((p.dtype for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)), torch.float32)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def saved_quantization(model_dir: str | Path) -> Quantization | None:
    """The bitsandbytes quantization a directory's weights are stored in (a pre-quantized export), else None."""
    saved = read_config(model_dir).get("quantization_config")
    if not saved:
        return None
    if saved.get("load_in_8bit"):
        return Quantization.int8
    return QUANTIZATION_OF_CONFIG.get(saved.get("bnb_4bit_quant_type", "nf4"), Quantization.nf4)


def plan_device_map(
    model_dir: str | Path, mode: str, max_memory: dict[int | str, str] | None, dtype: torch.dtype,
    trust_remote_code: bool = False,
) -> dict[str, int | str]:
    """Which device holds each module of the backbone, by accelerate's planner over the weights' sizes in `dtype`
    (an upper bound for a quantized model, whose weights are smaller): `auto` fills the first device then the next,
    `balanced` gives each device about the same share. No weights are read (the model is built on the meta device).
    Devices are GPU indices (or "cpu"); `max_memory` defaults to what each visible GPU has free."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    from lmsys.modeling.model_facts import model_skeleton

    model = model_skeleton(model_dir, trust_remote_code)
    no_split = list(model._no_split_modules or [])
    if mode == "balanced":
        max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    return infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)


def parse_max_memory(max_memory: dict | None) -> dict[int | str, str] | None:
    """`max_memory={0: 14GiB, 1: 15GiB, cpu: 30GiB}` from the command line: GPU indices arrive as strings."""
    if max_memory is None:
        return None
    return {int(key) if str(key).isdigit() else str(key): value for key, value in max_memory.items()}


def devices_of(device_map: dict[str, int | str]) -> list[int | str]:
    return sorted(set(device_map.values()), key=str)


def predict_quantization(checkpoint: str | Path, spec, settings) -> Quantization:
    """The quantization to predict with: `settings.quantization`, else the spec's. A pre-quantized export only loads
    with the quantization it was saved in (checked before anything is loaded)."""
    from lmsys.modeling.checkpoint import CheckpointError

    quantization = settings.quantization or spec.quantization
    saved = saved_quantization(checkpoint) if spec.merged else None
    if saved is not None and quantization != saved:
        raise CheckpointError(f"{checkpoint}: holds {saved.value} weights (a pre-quantized export) and loads with "
                              f"quantization={saved.value} only; export again for quantization={quantization.value}")
    return quantization

