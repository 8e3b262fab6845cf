"""DDP mechanics that a run's files cannot show, checked on real processes by tests/test_ddp.py:

    ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUT.json OVERRIDE...

Builds the model as a run does, picks an update of the real plan in which the ranks have different numbers of
token-budget micro-batches, runs it with `run_update` and an optimizer step, and gathers every rank's trainable
weights. Then runs one more update with gradient sync switched off, to show that the comparison can tell.
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

from lmsys.builders import build_encoder, build_model, build_spec, build_splits, build_tokenizer
from lmsys.config import TrainConfig, register_configs
from lmsys.data.dataset import EncodedSplit, encode_split
from lmsys.train import loop_settings
from lmsys.training.loop import LoopSettings, run_update
from lmsys.training.optim import build_optimizer, parameter_groups
from lmsys.training.plan import Update, epoch_plan

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def load_config(overrides: list[str]) -> TrainConfig:
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_object(compose("conf_r_llama_smol", overrides=overrides))


def uneven_update(split: EncodedSplit, settings: LoopSettings, rank: int, world_size: int) -> tuple[Update, list[int]]:
    """This rank's part of the first update of the real plan whose micro-batch counts differ between ranks."""
    for epoch in range(8):
        plans = [epoch_plan(split, epoch, settings.seed, settings.pairs_per_update, settings.swap, settings.batching,
                            r, world_size) for r in range(world_size)]
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


def step(accelerator: Accelerator, model, optimizer, update: Update, settings: LoopSettings) -> None:
    run_update(accelerator, model, update, settings)
    accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main(out: Path, overrides: list[str]) -> None:
    config = load_config(overrides)
    accelerator = Accelerator()
    set_seed(config.seed)
    train_pairs, _ = build_splits(config.data)
    spec = build_spec(config.model, config.data, config.trainer.packing)
    tokenizer = build_tokenizer(config.model.path, config.model.trust_remote_code)
    split = encode_split(train_pairs, build_encoder(spec, tokenizer))
    model = build_model(spec, config.model, config.lora, accelerator.device)
    opt = config.optimizer
    optimizer = build_optimizer(parameter_groups(model, opt.lr, opt.head_lr, opt.lora_b_lr_multiplier, opt.weight_decay),
                                opt.name, tuple(opt.betas), opt.eps)
    model, optimizer = accelerator.prepare(model, optimizer)
    settings = loop_settings(config, len(split), accelerator.num_processes, tokenizer.pad_token_id)
    update, counts = uneven_update(split, settings, accelerator.process_index, accelerator.num_processes)
    model.train()
    before = weight_spread(accelerator, model)
    step(accelerator, model, optimizer, update, settings)
    synced = weight_spread(accelerator, model)
    with accelerator.no_sync(model):  # the control: each rank keeps its own gradients
        step(accelerator, model, optimizer, update, settings)
    unsynced = weight_spread(accelerator, model)
    if accelerator.is_main_process:
        out.write_text(json.dumps({"micro_batches": counts, "spread_before": before, "spread_synced": synced,
                                   "spread_unsynced": unsynced, "world_size": accelerator.num_processes}))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
