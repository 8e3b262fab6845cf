"""Merge a checkpoint's LoRA adapter into an unquantized copy of its base model, for inference without peft.

    python -m lmsys.export checkpoint=RUN_DIR/checkpoint output_dir=DIR [dtype=bfloat16|float32]
        [quantization=none|nf4|int8] [base_weights=original|as_trained] [overwrite=true] [base_model_path=DIR]
    python -m lmsys.predict checkpoint=DIR data.test_path=test.csv output=submission.csv

The result is a checkpoint like any other (spec, head, tokenizer) whose backbone weights are the merged
safetensors themselves; its spec says `merged: true` and `quantization: none`. Merging into a 4-bit base would
round the LoRA update away, so the base is loaded in `dtype`; predictions then match the adapter on that same
unquantized base (tests/test_export.py states the tolerance), not the 4-bit model the adapter was trained on.
`base_weights=as_trained` merges into the base's nf4/fp4 round trip instead: the export then predicts as the
4-bit checkpoint did in validation (to float rounding in float32).
`quantization=nf4|int8` then quantizes the merged weights with bitsandbytes and saves them so (a 9B model: ~5 GB
nf4, ~9 GB int8, instead of 18 GB bf16); prediction loads them as they are (bitsandbytes 0.50 serialises both
on CPU; its int8 CPU matmul casts the inputs to float16).

Every key is in lmsys/prediction_config.py (ExportConfig); the work is lmsys/merging.py's `run_export`, imported once
the arguments are checked (--help and a typo answer at once).
"""

from __future__ import annotations

from pathlib import Path

from lmsys.cli import run_command
from lmsys.prediction_config import ExportConfig


def main(argv: list[str] | None = None) -> Path:
    return run_command(ExportConfig, __doc__, "lmsys.merging:run_export", argv)


if __name__ == "__main__":
    main()
