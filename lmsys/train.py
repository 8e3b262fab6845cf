"""One training run, as steps: config -> data -> model -> loop -> run dir. Entry points call `run_training`."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lmsys.builders import (
    build_accelerator,
    build_encoder,
    build_eval_batching,
    build_model,
    build_spec,
    build_splits,
    build_tokenizer,
    build_train_batching,
)
from lmsys.config import TrainConfig
from lmsys.data.dataset import EncodedSplit, encode_split
from lmsys.data.schema import TARGET_COLUMNS
from lmsys.entry import validated_config
from lmsys.evaluation.metrics import evaluation_metrics, save_reliability_diagram
from lmsys.evaluation.predict_loop import predict_split
from lmsys.modeling.checkpoint import save_checkpoint
from lmsys.provenance import run_info
from lmsys.runs import RunDir
from lmsys.tracking import Tracker
from lmsys.training.distributed import full_trainable_state
from lmsys.training.loop import LoopSettings, LoopState, total_updates, train_loop
from lmsys.training.optim import build_optimizer, build_scheduler, parameter_groups
from lmsys.training.signals import GracefulStop
from lmsys.training.state import find_state, load_training_state, save_training_state

log = logging.getLogger("lmsys")


def run_training(cfg: DictConfig) -> dict:
    config = validated_config(cfg)  # runs every __post_init__ rule; fails on ??? left unset and on unknown keys
    run_path = Path(HydraConfig.get().runtime.output_dir)
    train_pairs, valid_pairs = build_splits(config.data)
    spec = build_spec(config.model, config.data, config.trainer.packing)

    accelerator = build_accelerator(config, run_path)
    run = RunDir(run_path, accelerator.is_main_process)
    run.claim(config.overwrite, config.resume)
    accelerator.wait_for_everyone()
    setup_logging(run, accelerator.is_main_process)
    run.write_text("config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    run.write_json("run_info.json", run_info(accelerator.num_processes, accelerator.distributed_type.value))
    log.info("run dir %s; %d train pairs, %d valid pairs", run_path, len(train_pairs), len(valid_pairs))
    set_seed(config.seed)

    tokenizer = build_tokenizer(config.model.path, config.model.trust_remote_code)
    encoder = build_encoder(spec, tokenizer)
    train_split, valid_split = encode_split(train_pairs, encoder), encode_split(valid_pairs, encoder)
    model = build_model(spec, config.model, config.lora, accelerator.device)
    optimizer_cfg = config.optimizer
    optimizer = build_optimizer(
        parameter_groups(model, optimizer_cfg.lr, optimizer_cfg.head_lr, optimizer_cfg.lora_b_lr_multiplier,
                         optimizer_cfg.weight_decay),
        optimizer_cfg.name, tuple(optimizer_cfg.betas), optimizer_cfg.eps,
    )
    settings = loop_settings(config, len(train_split), accelerator.num_processes, tokenizer.pad_token_id)
    scheduler = build_scheduler(optimizer, settings.total_updates, optimizer_cfg.warmup_ratio, optimizer_cfg.min_lr_ratio)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    state = restore_state(config.resume, run_path, unwrapped, optimizer, scheduler)
    if config.use_wandb:
        init_wandb(accelerator, config, run_path)
    tracker = Tracker(accelerator, run, config.use_wandb)

    eval_batching = build_eval_batching(config, tokenizer.pad_token_id)
    best_probs: dict = {}

    def evaluate(step: int) -> dict:
        predictions = predict_split(unwrapped, valid_split, config.trainer.eval_tta, eval_batching, accelerator)
        metrics = evaluation_metrics(predictions.probs_ab, targets_of(valid_split), subset_frame(valid_split),
                                     predictions.probs_ba_back, config.trainer.tta_mode.value)
        tracker.log({f"eval/{k}": v for k, v in metrics.items()}, step)
        tracker.log_table("eval/subsets", metrics.get("subsets", []), step)
        log.info("eval at update %d: log_loss %.4f accuracy %.4f (prior %.4f)", step, metrics["log_loss"],
                 metrics["accuracy"], metrics["prior_log_loss"])
        best_probs["latest"] = predictions.combined(config.trainer.tta_mode.value)
        return metrics

    def on_improvement(step: int, metrics: dict) -> None:
        probs = best_probs["latest"]
        run.write("oof.csv", lambda p: oof_frame(valid_split, probs).to_csv(p, index=False))
        run.write("reliability.png", lambda p: save_reliability_diagram(probs, targets_of(valid_split), p))
        trainable = full_trainable_state(unwrapped)  # every rank: under FSDP a collective
        run.write("checkpoint", lambda p: save_checkpoint(p, unwrapped, tokenizer, spec, trainable))

    def save_state(loop_state: LoopState) -> None:
        save_training_state(run, unwrapped, optimizer, scheduler, loop_state)

    with GracefulStop() as stop:
        state = train_loop(accelerator, model, optimizer, scheduler, train_split, settings, evaluate, on_improvement,
                           save_state, lambda: stop.requested(accelerator), tracker.log, state)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if state.interrupted:
        release(accelerator)
        raise SystemExit(0)
    summary = {
        "best": {"step": state.best_step, **state.best_metrics},
        "history": state.history,
        "n_train_pairs": len(train_split),
        "n_valid_pairs": len(valid_split),
        "updates": state.step,
        "stopped_early": state.stopped_early,
    }
    run.write_json("metrics.json", summary)
    log.info("best validation log loss %.4f at update %d; class-prior log loss %.4f",
             state.best_metrics["log_loss"], state.best_step, state.best_metrics["prior_log_loss"])
    release(accelerator)
    return summary


def restore_state(resume: bool, run_path: Path, model, optimizer, scheduler) -> LoopState | None:
    if not resume:
        return None
    directory = find_state(run_path)
    if directory is None:
        log.warning("resume=true but %s holds no training state: starting from the beginning", run_path)
        return None
    state = load_training_state(directory, model, optimizer, scheduler)
    log.info("resumed from %s at update %d (best log loss %.4f)", directory, state.step, state.best_score)
    return state


def release(accelerator) -> None:
    """Free the process for the next job of a sweep: accelerator state, trackers, cached memory."""
    del accelerator
    AcceleratorState._reset_state()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def loop_settings(config: TrainConfig, n_train: int, world_size: int, pad_id: int) -> LoopSettings:
    trainer = config.trainer
    pairs_per_update = trainer.batch_size * trainer.grad_accum * world_size
    return LoopSettings(
        total_updates=total_updates(n_train, pairs_per_update, trainer.epochs, trainer.max_steps),
        pairs_per_update=pairs_per_update,
        swap=trainer.swap_augmentation,
        batching=build_train_batching(config),
        pad_id=pad_id,
        padding_side=config.data.padding_side,
        max_grad_norm=trainer.max_grad_norm,
        eval_frequency=trainer.eval_frequency,
        patience=trainer.patience,
        log_frequency=trainer.log_frequency,
        state_frequency=trainer.state_frequency,
        label_smoothing=config.loss.label_smoothing,
        distill_temperature=config.loss.distill_temperature,
        seed=config.seed,
    )


def targets_of(split: EncodedSplit) -> np.ndarray:
    return np.array([pair.target for pair in split.pairs], dtype=float)


def subset_frame(split: EncodedSplit) -> pd.DataFrame:
    return pd.DataFrame({
        "n_turns": [pair.n_turns for pair in split.pairs],
        "language": [pair.meta.get("language") for pair in split.pairs],
        "source": [pair.meta.get("source") for pair in split.pairs],
        "prompt_tokens": split.prompt_tokens,
    })


def oof_frame(split: EncodedSplit, probs) -> pd.DataFrame:
    frame = pd.DataFrame(probs, columns=list(TARGET_COLUMNS))
    frame.insert(0, "id", [pair.id for pair in split.pairs])
    frame["label"] = [pair.label for pair in split.pairs]
    return frame


def setup_logging(run: RunDir, is_main: bool) -> None:
    logger = logging.getLogger("lmsys")
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.handlers.clear()
    logger.propagate = False
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if is_main:
        handlers.append(logging.FileHandler(run.path / "train.log"))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)


def init_wandb(accelerator, config: TrainConfig, run_path: Path) -> None:
    wandb = config.wandb
    accelerator.init_trackers(
        wandb.project, config=OmegaConf.to_container(OmegaConf.structured(config), resolve=True),
        init_kwargs={"wandb": {"mode": wandb.mode, "entity": wandb.entity, "name": wandb.name or run_path.name,
                               "tags": wandb.tags, "dir": str(run_path)}},
    )
