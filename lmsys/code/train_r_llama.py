"""Train a Llama-family preference model: `accelerate launch lmsys/code/train_r_llama.py --config-name NAME`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `import lmsys` without `pip install -e .`

import hydra
from omegaconf import DictConfig

from lmsys.config import Family, register_configs
from lmsys.entry import check_entry_family

register_configs()


@hydra.main(config_path="../../conf", config_name="conf_r_llama_smol", version_base="1.3")
def main(cfg: DictConfig) -> float:
    check_entry_family(cfg, Family.llama, Path(__file__).name)
    from lmsys.train import run_training

    return run_training(cfg)["best"]["log_loss"]


if __name__ == "__main__":
    main()
