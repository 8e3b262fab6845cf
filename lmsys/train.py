"""Train one preference model, any family: `python -m lmsys.train --config-name NAME [key=value ...]`
(or `accelerate launch -m lmsys.train ...`); the family entry points `lmsys/code/train_r_<family>.py` do the same
after checking the config's family.

A run, as steps: the config checked against the schema -> the recipe set up (data checked, run dir claimed,
model built) -> trained -> its summary written. See lmsys/training/recipe.py.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lmsys.cli import command_errors
from lmsys.config import validated_config
from lmsys.runs import FinishedRun


def run_training(cfg: DictConfig) -> dict:
    with command_errors():
        config = validated_config(cfg)  # every __post_init__ rule; fails on ??? left unset and on unknown keys
        from lmsys.training.recipe import TrainingRecipe, skip_finished_run  # torch, transformers, peft: after
        # the config is checked

        run_path = Path(HydraConfig.get().runtime.output_dir)
        resolved_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        try:
            recipe = TrainingRecipe.setup(config, run_path, resolved_yaml)
        except FinishedRun as finished:  # resume=true, e.g. a resumed sweep, and this job's run is done
            return skip_finished_run(run_path, finished, resolved_yaml)
        # the run's own expected errors (a diverged loss, non-finite validation logits, a full disk) are one line too
        state = recipe.train()
        summary = recipe.finish()
    if state.interrupted:
        raise SystemExit(0)
    return summary


if __name__ == "__main__":
    from lmsys.entry import train_entry

    train_entry(None, "python -m lmsys.train")
