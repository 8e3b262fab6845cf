"""Pseudo-label unlabelled pairs with one or several checkpoints (a stage-1 ensemble) for stage-2 training.

    python -m lmsys.pseudo_label checkpoints=[RUN1/checkpoint,RUN2/checkpoint] data.test_path=unlabelled.csv \
        output=pseudo.parquet [tta=true] [tta_mode=prob]          (multi-GPU: accelerate launch -m lmsys.pseudo_label ...)

Each checkpoint's (TTA-combined) probabilities are averaged; the parquet holds id, prompt, response_a,
response_b (lists of turns), `label` (the three A/B/tie probabilities) and source=pseudo, and is training data as
it stands: `data.train_path=pseudo.parquet` (see conf/conf_r_llama_smol_stage2.yaml). `python -m lmsys.predict
pseudo_label_output=FILE.parquet` writes the same file from a single checkpoint.
"""

from __future__ import annotations

import logging

import numpy as np

from lmsys.cli import run_command
from lmsys.predict import prediction_inputs, predict_checkpoint, pseudo_label_frame, write_table
from lmsys.prediction_config import PseudoLabelConfig

log = logging.getLogger("lmsys")


def main(argv: list[str] | None = None) -> None:
    run_command(PseudoLabelConfig, __doc__, run_pseudo_labels, argv)


def run_pseudo_labels(config: PseudoLabelConfig) -> None:
    accelerator, pairs, specs = prediction_inputs(config.checkpoints, config)  # every checkpoint checked first
    probs = np.zeros((len(pairs), 3))  # (N, 3) running sum over checkpoints
    for checkpoint, spec in zip(config.checkpoints, specs, strict=True):
        log.info("pseudo-labelling %d pairs with %s", len(pairs), checkpoint)
        probs += predict_checkpoint(checkpoint, spec, pairs, config, accelerator).combined(config.tta_mode.value)
    write_table(pseudo_label_frame(pairs, probs / len(specs)), config.output, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    log.info("wrote %s (%d pairs, mean of %d checkpoint(s))", config.output, len(pairs), len(specs))


if __name__ == "__main__":
    main()
