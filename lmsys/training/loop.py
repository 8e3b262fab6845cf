"""The training loop: updates of accumulated micro-batches, evaluation every N updates, early stopping."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from lmsys.config import PaddingSide, SwapMode
from lmsys.data.batching import collate
from lmsys.data.dataset import EncodedSplit
from lmsys.modeling.losses import soft_cross_entropy
from lmsys.training.distributed import lockstep_count
from lmsys.training.plan import Batching, Update, epoch_plan, updates_per_epoch

log = logging.getLogger("lmsys")


@dataclass(frozen=True)
class LoopSettings:
    total_updates: int
    pairs_per_update: int  # over all processes
    swap: SwapMode
    batching: Batching
    pad_id: int
    padding_side: PaddingSide
    max_grad_norm: float
    eval_frequency: int  # 0: evaluate only at the end
    patience: int | None
    log_frequency: int
    state_frequency: int  # updates between saves of the full training state; 0: never
    label_smoothing: float
    distill_temperature: float
    seed: int


@dataclass
class LoopState:
    step: int = 0
    best_score: float = math.inf
    best_step: int = -1
    evals_without_improvement: int = 0
    stopped_early: bool = False
    interrupted: bool = False
    best_metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


def total_updates(n_pairs: int, pairs_per_update: int, epochs: float, max_steps: int | None) -> int:
    planned = math.ceil(epochs * updates_per_epoch(n_pairs, pairs_per_update))
    return planned if max_steps is None else min(planned, max_steps)


def iterate_updates(
    split: EncodedSplit, settings: LoopSettings, rank: int, world_size: int, start: int = 0
) -> Iterator[Update]:
    """Updates `start`..`total_updates` across epochs, each epoch with its own shuffle (so a resumed run sees the
    same data in the same order as an uninterrupted one)."""
    produced, epoch = 0, 0
    while produced < settings.total_updates:
        plan = epoch_plan(split, epoch, settings.seed, settings.pairs_per_update, settings.swap, settings.batching,
                          rank, world_size)
        for update in plan[: settings.total_updates - produced]:
            if produced >= start:
                yield update
            produced += 1
        epoch += 1


def train_loop(
    accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    split: EncodedSplit,
    settings: LoopSettings,
    evaluate: Callable[[int], dict],  # step -> metrics with "log_loss"
    on_improvement: Callable[[int, dict], None],
    save_state: Callable[[LoopState], None],
    stop_requested: Callable[[], bool],
    log_metrics: Callable[[dict, int], None],
    state: LoopState | None = None,  # restored state when resuming
) -> LoopState:
    state = state or LoopState()
    if settings.total_updates == 0:
        _evaluate_and_track(state, evaluate, on_improvement, settings)
        return state
    bar = tqdm(total=settings.total_updates, initial=state.step, desc="train",
               disable=not accelerator.is_local_main_process)
    model.train()
    updates = iterate_updates(split, settings, accelerator.process_index, accelerator.num_processes, state.step)
    for update in updates:
        loss = run_update(accelerator, model, update, settings)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        lr = scheduler.get_last_lr()[0]  # the lr this update used
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        _log_step(log_metrics, state.step, loss, lr, float(grad_norm), settings.log_frequency)
        if _eval_due(state.step, settings):
            state.stopped_early = _evaluate_and_track(state, evaluate, on_improvement, settings)
            model.train()
            if state.stopped_early:
                log.info("early stopping at update %d: no improvement in %d evaluations", state.step, settings.patience)
                break
        if settings.state_frequency and state.step % settings.state_frequency == 0:
            save_state(state)
        if stop_requested():
            save_state(state)
            state.interrupted = True
            log.warning("stop requested: training state saved at update %d; continue with resume=true", state.step)
            break
    bar.close()
    return state


def run_update(accelerator, model: torch.nn.Module, update: Update, settings: LoopSettings) -> float:
    """Forward/backward every micro-batch of one update; gradients sync across processes on the last one only.

    Each example's loss is weighted 1 / (examples in the update over all processes), times the number of
    processes because DDP averages gradients: every pair counts equally whatever the micro-batch layout.
    Returns the update's mean loss over all processes.
    """
    scale = accelerator.num_processes / update.n_examples
    total = torch.zeros((), device=accelerator.device)
    n_real = len(update.micro_batches)
    # FSDP: ranks with fewer micro-batches repeat their last one at weight 0, so every rank runs the same
    # all-gathers and reduce-scatters (a repeat adds nothing to the gradient or the loss).
    n_runs = lockstep_count(model, n_real, accelerator.device)
    for k in range(n_runs):
        examples = update.micro_batches[min(k, n_real - 1)]
        weight = scale if k < n_real else 0.0
        batching = settings.batching
        batch = collate(examples, batching.packed, settings.pad_id, settings.padding_side, batching.row_tokens,
                        batching.attention_width)
        with nullcontext() if k == n_runs - 1 else accelerator.no_sync(model):
            logits = model(**batch.model_inputs(accelerator.device))
            loss_sum = soft_cross_entropy(
                logits, batch.targets.to(accelerator.device), settings.label_smoothing, settings.distill_temperature,
                reduction="sum",
            )
            accelerator.backward(loss_sum * weight)
        if k < n_real:
            total += loss_sum.detach()
    return float(accelerator.reduce(total, reduction="sum")) / update.n_examples


def _eval_due(step: int, settings: LoopSettings) -> bool:
    periodic = settings.eval_frequency > 0 and step % settings.eval_frequency == 0
    return periodic or step == settings.total_updates


def _evaluate_and_track(state: LoopState, evaluate, on_improvement, settings: LoopSettings) -> bool:
    """Evaluate, keep the best, and say whether patience has run out."""
    metrics = evaluate(state.step)
    state.history.append({"step": state.step, **{k: v for k, v in metrics.items() if k != "subsets"}})
    if metrics["log_loss"] < state.best_score:
        state.best_score, state.best_step, state.best_metrics = metrics["log_loss"], state.step, metrics
        state.evals_without_improvement = 0
        on_improvement(state.step, metrics)
    else:
        state.evals_without_improvement += 1
    return settings.patience is not None and state.evals_without_improvement >= settings.patience


def _log_step(log_metrics, step: int, loss: float, lr: float, grad_norm: float, every: int) -> None:
    log_metrics({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm}, step)
    if step % every == 0 or step == 1:
        log.info("update %d loss %.4f lr %.3e grad_norm %.3f", step, loss, lr, grad_norm)
