"""Predict with a checkpoint: `accelerate launch lmsys/code/predict.py checkpoint=RUN_DIR/checkpoint
data.test_path=test.csv output=submission.csv [tta=true] [logits_output=logits.parquet]
[pseudo_label_output=pseudo.parquet]`; see `lmsys/prediction_config.py` for every option."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `import lmsys` without `pip install -e .`

import hydra
from omegaconf import DictConfig

from lmsys.prediction_config import register_predict_configs

register_predict_configs()


@hydra.main(config_path="../../conf", config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from lmsys.predict import run_prediction

    run_prediction(cfg)


if __name__ == "__main__":
    main()
