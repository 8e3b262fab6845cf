"""DDP mechanics that a run's files cannot show, checked on real processes by tests/test_ddp.py:

    ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUT.json OVERRIDE...

Builds the model as a run does, picks an update of the real plan in which the ranks have different numbers of
token-budget micro-batches, runs it with the recipe's `update` (micro-batches, clip, optimizer step), and gathers
every rank's trainable weights. Then runs one more update with gradient sync switched off, to show that the comparison can tell.
Rank 0 writes OUT.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lmsys import builders
from lmsys.config import TrainConfig, register_configs
from lmsys.data.dataset import EncodedSplit, encode_split
from lmsys.training.plan import Update, epoch_plan
from lmsys.training.recipe import TrainingRecipe
from lmsys.training.settings import LoopSettings

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def load_config(overrides: list[str]) -> TrainConfig:
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_object(compose("conf_r_llama_smol", overrides=overrides))


def uneven_update(split: EncodedSplit, settings: LoopSettings, rank: int, world_size: int) -> tuple[Update, list[int]]:
    """This rank's part of the first update of the real plan whose micro-batch counts differ between ranks."""
    for epoch in range(8):
        plans = [epoch_plan(split, epoch, settings, r, world_size) for r in range(world_size)]
        for parts in zip(*plans, strict=True):
            counts = [len(part.micro_batches) for part in parts]
            if len(set(counts)) > 1:
                return parts[rank], counts
    raise RuntimeError("no update with unequal micro-batch counts: lower trainer.max_tokens")


def trainable_vector(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().double() for p in model.parameters() if p.requires_grad])


def weight_spread(accelerator: Accelerator, model: torch.nn.Module) -> float:
    """Largest difference of any trainable weight between ranks (0.0: identical)."""
    gathered = accelerator.gather(trainable_vector(accelerator.unwrap_model(model))).view(accelerator.num_processes, -1)
    return float((gathered - gathered[0]).abs().max())


def main(out: Path, overrides: list[str]) -> None:
    config = load_config(overrides)
    accelerator = Accelerator()
    set_seed(config.seed)
    train_pairs, _ = builders.build_splits(config)
    spec = builders.build_spec(config.model, config.data, config.trainer.packing)
    tokenizer = builders.build_tokenizer(config.model.path, config.model.trust_remote_code)
    split = encode_split(train_pairs, builders.build_encoders(spec, tokenizer))
    model = builders.build_model(spec, config.model, config.lora, accelerator.device)
    optimizer = builders.build_optimizer(config.optimizer, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    settings = builders.build_loop_settings(config, spec, len(split), accelerator.num_processes,
                                            tokenizer.pad_token_id)
    scheduler = builders.build_scheduler(config.optimizer, optimizer, settings.total_updates)
    recipe = TrainingRecipe(accelerator, model, optimizer, scheduler, settings, split)
    update, counts = uneven_update(split, settings, accelerator.process_index, accelerator.num_processes)
    model.train()
    before = weight_spread(accelerator, model)
    recipe.update(update)
    synced = weight_spread(accelerator, model)
    with accelerator.no_sync(model):  # the control: each rank keeps its own gradients
        recipe.update(update)
    unsynced = weight_spread(accelerator, model)
    if accelerator.is_main_process:
        out.write_text(json.dumps({"micro_batches": counts, "spread_before": before, "spread_synced": synced,
                                   "spread_unsynced": unsynced, "world_size": accelerator.num_processes}))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
