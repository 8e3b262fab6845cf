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
from lmsys.runs import FinishedRun, release_lock


def run_training(cfg: DictConfig) -> dict:
    run_path = Path(HydraConfig.get().runtime.output_dir)
    with command_errors():
        config = validated_config(cfg)  # every __post_init__ rule; fails on ??? left unset and on unknown keys
        try:
            summary, interrupted = _train(config, run_path, OmegaConf.to_yaml(cfg, resolve=True))
        finally:  # an in-process sweep's finished job frees its dir for a resume from another shell
            release_lock(run_path)
    if interrupted:
        raise SystemExit(0)
    return summary


def _train(config, run_path: Path, resolved_yaml: str) -> tuple[dict, bool]:
    """The run's summary and whether a signal stopped it; the run's own expected errors (a diverged loss,
    non-finite validation logits, a full disk) reach command_errors as a setup error does."""
    from lmsys.training.recipe import TrainingRecipe, skip_finished_run  # torch, transformers, peft: after the
    # config is checked

    try:
        recipe = TrainingRecipe.setup(config, run_path, resolved_yaml)
    except FinishedRun as finished:  # resume=true, e.g. a resumed sweep, and this job's run is done
        return skip_finished_run(run_path, finished, resolved_yaml), False
    state = recipe.train()
    return recipe.finish(), state.interrupted


if __name__ == "__main__":
    from lmsys.entry import train_entry

    train_entry(None, "python -m lmsys.train")
