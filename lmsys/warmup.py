"""SFT / DPO warm-up of a backbone on our labelled battles, before the preference head is trained on it.

    python -m lmsys.warmup stage=sft|dpo model_path=DIR data.train_path=FILE output_dir=DIR [max_steps=N]
        [lr=...] [max_length=1024] [batch_size=4] [grad_accum=1] [beta=0.1] [data.label_margin=0.1]
        [data.max_pairs=N] [lora.r=16 lora.alpha=32 ...] [quantization=none|nf4|fp4|int8] [merge_dtype=bfloat16]
    python lmsys/code/train_r_llama.py --config-name conf_r_llama_smol model.path=DIR

TRL's SFTTrainer / DPOTrainer train a LoRA adapter (peft; on a 4-bit base with quantization=nf4); the adapter is
then merged into an unquantized copy of the base, saved as a full model directory (config.json, safetensors,
tokenizer, warmup.json) that `model.path=` takes like any base. The work is lmsys/warmup_training.py's
`logged_warmup`, imported once the arguments are checked (--help and a typo answer at once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from lmsys.cli import run_command
from lmsys.config import ComputeDtype, LoraConfig, Quantization, choices, require
from lmsys.prediction_config import MergeDtype

MARKER = "warmup.json"  # written into every output_dir: overwrite=true replaces only directories that hold it
# LoRA learning rates by stage (TRL's defaults, 2e-5 and 1e-6, are meant for full fine-tuning)
DEFAULT_LR = {"sft": 1e-4, "dpo": 5e-6}

USAGE = __doc__ + """
Keys:
  stage            sft: prompt -> the winning response (loss on the response only);
                   dpo: winner = chosen, loser = rejected (TRL's sigmoid DPO loss, `beta`, the frozen base as the
                   reference: the adapter switched off)
  data.train_path  labelled rows in any schema read_pairs accepts (Kaggle CSV, WSDM parquet, soft `label`)
  data.label_margin  which side won: the larger of P(A), P(B) when it is the argmax and beats the other by at
                   least this margin; ties (argmax = tie) and closer soft labels are skipped and counted
  max_steps        optimizer updates (default: one epoch)
  lr               default 1e-4 (sft) / 5e-6 (dpo), linear decay
  quantization     of the base during training (QLoRA); the adapter is always merged into an unquantized base
  merge_dtype      bfloat16 | float32: the dtype of the merged weights
"""


Stage = choices("Stage", "sft dpo")


@dataclass
class WarmupDataConfig:
    train_path: str = MISSING
    label_margin: float = 0.1
    max_pairs: int | None = None

    def __post_init__(self) -> None:
        require(0.0 <= self.label_margin <= 1.0, "data.label_margin must be in [0, 1]")
        require(self.max_pairs is None or self.max_pairs >= 1, "data.max_pairs must be >= 1")


@dataclass
class WarmupConfig:
    stage: Stage = MISSING
    model_path: str = MISSING  # a local causal LM directory with a chat template
    output_dir: str = MISSING  # the merged model directory to create
    data: WarmupDataConfig = field(default_factory=WarmupDataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: Quantization = Quantization.none
    double_quant: bool = True
    compute_dtype: ComputeDtype = ComputeDtype.auto  # auto: bfloat16 on GPU, float32 on CPU
    merge_dtype: MergeDtype = MergeDtype.bfloat16
    max_steps: int | None = None
    lr: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 1024  # tokens of prompt + response; a longer example keeps each text's head and tail
    beta: float = 0.1  # dpo: strength of the pull towards the reference
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    seed: int = 0
    overwrite: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        require(self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1")
        require(self.lr is None or self.lr > 0, "lr must be positive")
        require(self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1")
        require(self.max_length >= 16, "max_length must be at least 16")
        require(self.beta > 0, "beta must be positive")
        require(self.logging_steps >= 1, "logging_steps must be >= 1")


def main(argv: list[str] | None = None) -> Path:
    return run_command(WarmupConfig, USAGE, "lmsys.warmup_training:logged_warmup", argv)


if __name__ == "__main__":
    main()
