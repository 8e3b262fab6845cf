"""Predict with a checkpoint: a Kaggle submission, with swap TTA by default.

    python -m lmsys.predict checkpoint=CKPT data.test_path=test.csv output=submission.csv [tta=true] [formats=[pab,papb]]
        [quantization=nf4|int8|none] [compute_dtype=float16|bfloat16|float32] [max_length=N]
        [base_model_path=DIR] [device_map=auto|balanced ['max_memory={0: 14GiB, 1: 15GiB}']] [logits_output=FILE]
    accelerate launch --num_processes 2 -m lmsys.predict ...      (data parallel: one model per GPU, rows dealt out)

Every key is in lmsys/prediction_config.py (PredictConfig). `lmsys/code/predict.py` calls `main`; the work is
lmsys/prediction.py's `run_prediction`, imported once the arguments are checked (--help and a typo answer in about a
second). Everything that can be wrong with the inputs (the test file, the checkpoint, the base model) is found
before a model is loaded, and the submission is written atomically, only when every pair has finite logits.
"""

from __future__ import annotations

from lmsys.cli import run_command
from lmsys.prediction_config import PredictConfig


def main(argv: list[str] | None = None) -> None:
    run_command(PredictConfig, __doc__, "lmsys.prediction:run_prediction", argv)


if __name__ == "__main__":
    main()
