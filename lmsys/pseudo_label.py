"""Pseudo-label unlabelled pairs with one or several checkpoints (a stage-1 ensemble) for stage-2 training.

    python -m lmsys.pseudo_label checkpoints=[RUN1/checkpoint,RUN2/checkpoint] data.test_path=unlabelled.csv \\
        output=pseudo.parquet [tta=true] [tta_mode=prob|logit]    (multi-GPU: accelerate launch -m lmsys.pseudo_label)

Each checkpoint's (TTA-combined) probabilities are averaged; the parquet holds id, prompt, response_a,
response_b (lists of turns), `label` (the three A/B/tie probabilities) and source=pseudo, and is training data as
it stands: `data.train_path=pseudo.parquet` (see conf/conf_r_llama_smol_stage2.yaml). `python -m lmsys.predict
pseudo_label_output=FILE.parquet` writes the same file from a single checkpoint.
"""

from __future__ import annotations

from lmsys.cli import run_command
from lmsys.prediction_config import PseudoLabelConfig


def main(argv: list[str] | None = None) -> None:
    run_command(PseudoLabelConfig, __doc__, "lmsys.prediction:run_pseudo_labels", argv)


if __name__ == "__main__":
    main()
