"""Schemas of the inference commands: predict (`predict_schema`), pseudo-labelling and export.

Like `TrainConfig`, each is a dataclass that every `key=value` argument is validated against (lmsys/cli.py), so a
typo fails at once, before any model is loaded. Nothing here repeats the model settings: those come from the checkpoint's spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import MISSING

from lmsys.config import Attention, ComputeDtype, ElementwiseKernel, InputFormat, Quantization, TtaMode, require
from lmsys.output_paths import base_model_inputs, check_output_paths

TABLE_SUFFIXES = (".csv", ".parquet")


class DeviceMap(str, Enum):
    """One model split over the visible GPUs (accelerate's placement), for a model that does not fit one GPU."""

    auto = "auto"  # fill the first GPU, then the next
    balanced = "balanced"  # the same share of layers on every GPU


class MergeDtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"


class BaseWeights(str, Enum):
    """The base weights export merges the adapter into."""

    original = "original"  # the base model's own weights (the adapter was trained on their 4-bit rounding)
    as_trained = "as_trained"  # their nf4/fp4 round trip, the weights the 4-bit checkpoint computes with


@dataclass
class PredictDataConfig:
    test_path: str = MISSING  # Kaggle test.csv (no model/winner columns needed), train-schema CSV or parquet


@dataclass
class InferenceConfig:
    """How to run a checkpoint over pairs; shared by predict and pseudo-labelling."""

    data: PredictDataConfig = field(default_factory=PredictDataConfig)
    tta: bool = True  # also predict every pair with A and B swapped, map back and combine
    tta_mode: TtaMode | None = None  # prob|logit; None: the checkpoint's (its run's trainer.tta_mode)
    # with TTA, a pair's two orientations in one packed example, their common token prefix (instructions, prompt)
    # computed once, where the model attends it exactly (packed, the CPU sdpa kernel); false: two passes
    share_prefixes: bool = True
    # the input formats to predict in, their probabilities averaged (each format with its own swap TTA); None: the
    # checkpoint's (its data.formats); a format it was not trained on is allowed, with a warning
    formats: list[InputFormat] | None = None
    packing: bool | None = None  # padding-free rows, length-sorted (None: packed, but padded for an encoder)
    max_tokens: int = 8192  # packed: tokens per micro-batch
    row_tokens: int | None = None  # packed: tokens per row; None: the checkpoint's max_length (raise it with flash)
    batch_size: int = 8  # padded: pairs per micro-batch
    compute_dtype: ComputeDtype | None = None  # None: the checkpoint's
    attn_implementation: Attention | None = None  # None: the checkpoint's (re-checked against packing)
    # fold the adapter into dequantized full-precision weights before predicting: the same predictions, one matmul
    # per projection instead of dequantize + matmul + two LoRA matmuls (1.3x faster on CPU), for 2 (bf16) or 4
    # (fp32) bytes per parameter instead of ~0.5; None: on when predicting on CPU, off on GPU (where memory binds)
    dense_weights: bool | None = None
    # the RMSNorms, gated MLPs and attention compiled (torch.compile), as in training; auto: compiled where a
    # training run's are (bf16 on CPU with a C++ compiler; see lmsys/modeling/compile.py), eager elsewhere
    kernels: ElementwiseKernel = ElementwiseKernel.auto
    show_progress: bool = True
    # The base model directory of an adapter checkpoint; None: the spec's (a relative one is read from the checkpoint
    # directory, as in a Kaggle bundle). Kaggle has no hub: the base travels in the bundle.
    base_model_path: str | None = None
    # None: the checkpoint's. From an adapter checkpoint the base is (re-)quantized on load and the adapter applied;
    # a merged export is quantized on load; a pre-quantized export only loads with its own quantization.
    quantization: Quantization | None = None
    max_length: int | None = None  # None: the checkpoint's (tokens per pair; see `python -m lmsys.kaggle estimate`)
    # Split one model over the visible GPUs (one process); None: the whole model on the process's device
    device_map: DeviceMap | None = None
    max_memory: dict[Any, str] | None = None  # with device_map: per device (GPU index or cpu), e.g. {0: 14GiB, 1: 15GiB}

    def __post_init__(self) -> None:
        require(self.max_tokens >= 32, "max_tokens must be at least 32")
        require(self.max_length is None or self.max_length >= 32, "max_length must be at least 32")
        require(self.max_memory is None or self.device_map is not None, "max_memory needs device_map=auto|balanced")
        require(self.row_tokens is None or self.row_tokens >= 1, "row_tokens must be >= 1")
        require(self.batch_size >= 1, "batch_size must be >= 1")
        require(self.formats is None or len(self.formats) > 0, "formats must list at least one format, or be null")
        require(self.formats is None or len(set(self.formats)) == len(self.formats),
                f"formats lists a format twice: {self.formats}")


@dataclass
class PredictConfig(InferenceConfig):
    checkpoint: str = MISSING  # a run's checkpoint/ directory (adapter + head + spec), or an exported merged one
    # the Kaggle submission CSV: id, winner_model_a, winner_model_b, winner_tie (WSDM: id, winner)
    output: str = MISSING
    # .csv or .parquet: id and the class probabilities the submission was made from (what the ensemble averages; a
    # two-class model's submission holds only its argmax)
    probs_output: str | None = None
    # .csv or .parquet: raw logits of both orientations, per id (the first format's; with several formats also each
    # format's, in columns suffixed _<format>)
    logits_output: str | None = None
    pseudo_label_output: str | None = None  # .parquet that read_pairs accepts as (soft-labelled) training data

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.output.endswith(".csv"), "output (the Kaggle submission) must end in .csv")
        for key in ("probs_output", "logits_output"):
            require(getattr(self, key) is None or getattr(self, key).endswith(TABLE_SUFFIXES),
                    f"{key} must end in .csv or .parquet")
        require(self.pseudo_label_output is None or self.pseudo_label_output.endswith(".parquet"),
                 "pseudo_label_output must end in .parquet")
        check_output_paths(
            {"data.test_path": self.data.test_path, "checkpoint": self.checkpoint,
             **base_model_inputs({"checkpoint": self.checkpoint}, self.base_model_path)},
            {"output": self.output, "probs_output": self.probs_output, "logits_output": self.logits_output,
             "pseudo_label_output": self.pseudo_label_output},
        )


@dataclass
class PseudoLabelConfig(InferenceConfig):
    checkpoints: list[str] = MISSING  # their (TTA) probabilities are averaged
    output: str = MISSING  # .parquet

    def __post_init__(self) -> None:
        super().__post_init__()
        require(len(self.checkpoints) > 0, "checkpoints must name at least one checkpoint")
        require(self.output.endswith(".parquet"), "output must end in .parquet")
        inputs = {f"checkpoints[{i}]": path for i, path in enumerate(self.checkpoints)}
        check_output_paths({"data.test_path": self.data.test_path, **inputs,
                            **base_model_inputs(inputs, self.base_model_path)}, {"output": self.output})


@dataclass
class ExportConfig:
    checkpoint: str = MISSING  # an adapter checkpoint
    output_dir: str = MISSING  # the merged checkpoint to create
    dtype: MergeDtype = MergeDtype.bfloat16  # of the unquantized base the adapter is merged into, and of the result
    # none: save the merged weights in `dtype`; nf4|int8: save them quantized by bitsandbytes (~0.5 / 1 byte per
    # parameter), loaded as they are at predict time
    quantization: Quantization = Quantization.none
    # as_trained: predictions as the 4-bit checkpoint's (what validation measured), not as the adapter's on the
    # unrounded base
    base_weights: BaseWeights = BaseWeights.original
    overwrite: bool = False  # replace output_dir when it holds a checkpoint (never another kind of directory)
    base_model_path: str | None = None  # as for predict: where the base model is now, if it moved

    def __post_init__(self) -> None:
        require(self.quantization != Quantization.fp4,
                f"quantization={self.quantization.value}: export saves none, nf4 or int8")
        check_output_paths({"checkpoint": self.checkpoint,
                            **base_model_inputs({"checkpoint": self.checkpoint}, self.base_model_path)},
                           {"output_dir": self.output_dir}, directory_outputs=frozenset({"output_dir"}))
