"""Full training state for resuming after a crash or a kill: trainable weights (LoRA + head, never the frozen
base), optimizer, scheduler, RNG states and the loop's counters; written atomically into `<run>/state`."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmsys.config import FineTune, LoraConfig, ModelConfig
from lmsys.data.dataset import EncodedSplit
from lmsys.modeling.checkpoint import weights_fingerprint
from lmsys.runs import STATE_DIR, RunDir
from lmsys.training.distributed import full_trainable_state, load_full_state, load_optimizer_state, optimizer_state
from lmsys.training.settings import LoopSettings

log = logging.getLogger("lmsys")

WEIGHTS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
LOOP_FILE = "loop.json"


class ResumeError(RuntimeError):
    """No usable training state to resume from."""


@dataclass
class LoopState:
    """The counters of a run: what a resumed run continues from."""

    step: int = 0
    best_score: float = math.inf
    best_step: int = -1
    evals_without_improvement: int = 0
    stopped_early: bool = False
    interrupted: bool = False
    eval_pending: bool = False  # a stop abandoned the evaluation of `step`: a resumed run runs it first
    wandb_run_id: str = ""  # with use_wandb: the wandb run a resumed run continues
    best_metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


PAIRS_PER_UPDATE = "pairs per update (trainer.batch_size x trainer.grad_accum x processes)"


def run_plan(settings: LoopSettings, optimizer: dict, train: EncodedSplit, validation: EncodedSplit,
             model: dict) -> dict:
    """What fixes a run's sequence of updates and what they optimise, as stored in its training state. A resumed run
    must agree on all of it, or it would continue another run: pairs skipped or trained twice, an lr schedule of
    another length, the config's lrs silently replaced by the loaded optimizer's and scheduler's. The process count
    is not part of it: the plan of updates is global (lmsys.training.plan), so another number of GPUs continues the
    same run when the pairs per update stay the same (up to float reduction order and dropout draws)."""
    plan = {
        "seed": settings.seed,
        PAIRS_PER_UPDATE: settings.pairs_per_update,
        "updates (training pairs, trainer.epochs, trainer.max_steps)": settings.total_updates,
        "trainer.swap_augmentation": settings.swap.value,
        "trainer.group_by_length": settings.group_by_length,
        "trainer.max_grad_norm": settings.max_grad_norm,
        "loss": asdict(settings.loss),
        "optimizer": optimizer,
        "training pairs": split_digest(train),
        "validation pairs": split_digest(validation),
        **model,
    }
    return json.loads(json.dumps(plan, default=_jsonable))  # as it reads back from loop.json


def model_plan(model: ModelConfig, lora: LoraConfig) -> dict:
    """What the trained weights are applied to and how: the base model's (and a warm start's) weight files by their
    content, not their path (a run moved to another machine resumes), the quantization of the base, the LoRA shape
    and scale, the head. Kernels and the compute dtype are left out: they compute the same function."""
    return {
        "model.path weights": weights_fingerprint(model.path),
        "model.init_from weights": weights_fingerprint(model.init_from) if model.init_from else None,
        **{f"model.{key}": getattr(model, key) for key in RESUMED_MODEL_KEYS},
        "lora": asdict(lora) if model.finetune == FineTune.lora else None,
    }


RESUMED_MODEL_KEYS = ("quantization", "double_quant", "head", "head_dropout", "num_classes", "finetune", "architecture")


def split_digest(split: EncodedSplit) -> str:
    """The pairs in their order with their targets, teacher logits and every format's token ids: another data file,
    max_length, truncation or data.formats changes it."""
    digest = hashlib.blake2b(digest_size=12)
    for pair in split.pairs:
        digest.update(f"{pair.id}\x00{pair.target}\x00{pair.teacher_logits}\x00".encode())
    for examples in split.forward_by_format:
        for example in examples:
            digest.update(example.ids.tobytes())
    return f"{len(split)} pairs, digest {digest.hexdigest()}"


def check_resumable(run_path: Path, plan: dict, processes: int) -> None:
    """Before any model loads: the state that `resume=true` would continue was saved under this plan."""
    changed = plan_changes(state_plan(run_path), plan, processes)
    if changed is None and find_state(run_path) is not None:
        log.warning("%s records no plan (saved by an older lmsys): resuming without checking the config", run_path)
    if changed:
        raise ResumeError(f"resume=true: {run_path} was trained with another plan, so it cannot continue as the same "
                          f"run: {'; '.join(changed)}. Restore those settings, or pass overwrite=true to start again")


def state_plan(run_path: Path) -> dict | None:
    """The plan the run dir's latest state was saved under; None without a state or with one that records none."""
    directory = find_state(run_path)
    if directory is None:
        return None
    return json.loads((directory / LOOP_FILE).read_text()).get("plan") or None


def recorded_plan(run_path: Path) -> dict | None:
    """The plan a run recorded in its run_info.json at its start; None without one (an older run's, unreadable)."""
    try:
        info = json.loads((run_path / "run_info.json").read_text())
    except (OSError, ValueError):
        return None
    return (info.get("plan") or None) if isinstance(info, dict) else None


def plan_changes(saved: dict | None, plan: dict, processes: int, where: str = "in the state") -> list[str] | None:
    """How `plan` differs from a `saved` one (with a hint on the pairs per update); None when there is none."""
    if not saved:
        return None
    changed = [f"{key}: {saved[key]} {where}, {value} now" for key, value in plan.items()
               if key in saved and saved[key] != value]  # a state saved before a key was planned: unchecked
    saved_pairs = saved.get(PAIRS_PER_UPDATE)
    other_layout = isinstance(saved_pairs, int) and saved_pairs != plan[PAIRS_PER_UPDATE]
    if changed and other_layout and saved_pairs % processes == 0:
        changed.append(f"with {processes} process{'es' if processes > 1 else ''}, trainer.batch_size x "
                       f"trainer.grad_accum = {saved_pairs // processes} keeps {saved_pairs} pairs per update")
    return changed


def save_training_state(run: RunDir, model: torch.nn.Module, optimizer, scheduler, loop: LoopState,
                        grad_scaler: torch.amp.GradScaler | None = None, plan: dict | None = None) -> None:
    """Write the state next to the previous one and swap it in only once complete (with float16 compute, the loss
    scale too; `plan`: what check_resumable compares)."""
    weights = full_trainable_state(model)  # gathered on every rank (FSDP: a collective); only the main process writes
    optimizer_blob = optimizer_state(model, optimizer)
    payload = {"loop": asdict(loop), "scheduler": scheduler.state_dict(), "python_rng": random.getstate(),
               "plan": plan or {}}

    def produce(directory: Path) -> None:
        directory.mkdir(parents=True)
        save_file(weights, str(directory / WEIGHTS_FILE))
        torch.save({"optimizer": optimizer_blob, "grad_scaler": grad_scaler.state_dict() if grad_scaler else {},
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   directory / OPTIMIZER_FILE)
        (directory / LOOP_FILE).write_text(json.dumps(payload, default=_jsonable))

    run.write(STATE_DIR, produce)


def find_state(run_path: Path) -> Path | None:
    """The latest complete state; the previous one if a kill came between the two renames of a save."""
    for candidate in (run_path / STATE_DIR, run_path / f".{STATE_DIR}.old"):
        if (candidate / LOOP_FILE).is_file() and (candidate / WEIGHTS_FILE).is_file():
            return candidate
    return None


def saved_wandb_run_id(run_path: Path) -> str:
    """The wandb run id the run dir's latest state records ('' when none), read before any model loads."""
    directory = find_state(run_path)
    if directory is None:
        return ""
    return json.loads((directory / LOOP_FILE).read_text())["loop"].get("wandb_run_id", "")


def restore_state(run_path: Path, model: torch.nn.Module, optimizer, scheduler,
                  grad_scaler: torch.amp.GradScaler | None = None) -> LoopState | None:
    """The run dir's latest state loaded into the model, optimizer, scheduler (and loss scale); None when it holds
    none."""
    directory = find_state(run_path)
    if directory is None:
        log.warning("resume=true but %s holds no training state: starting from the beginning", run_path)
        return None
    state = load_training_state(directory, model, optimizer, scheduler, grad_scaler)
    log.info("resumed from %s at update %d (best log loss %.4f)", directory, state.step, state.best_score)
    return state


def load_training_state(directory: Path, model: torch.nn.Module, optimizer, scheduler,
                        grad_scaler: torch.amp.GradScaler | None = None) -> LoopState:
    weights = load_file(str(directory / WEIGHTS_FILE))
    params = dict(model.named_parameters())
    missing = [name for name in weights if name not in params]
    if missing or len(weights) != sum(p.requires_grad for p in params.values()):
        raise ResumeError(f"{directory}: trainable parameters do not match this model (e.g. {missing[:3]})")
    load_full_state(model, weights)
    # onto the CPU: rank 0 saved its GPU tensors as cuda:0's, where every rank would otherwise load its copy; the
    # optimizer (or torch.distributed.checkpoint, under FSDP) moves each state tensor to its parameter's device
    blobs = torch.load(directory / OPTIMIZER_FILE, weights_only=True, map_location="cpu")
    load_optimizer_state(model, optimizer, blobs["optimizer"])
    if grad_scaler is not None and grad_scaler.is_enabled() and blobs.get("grad_scaler"):
        grad_scaler.load_state_dict(blobs["grad_scaler"])
    torch.set_rng_state(blobs["torch_rng"])
    if blobs["cuda_rng"]:
        torch.cuda.set_rng_state_all(blobs["cuda_rng"])
    payload = json.loads((directory / LOOP_FILE).read_text())
    scheduler.load_state_dict(payload["scheduler"])
    random.setstate(_python_rng(payload["python_rng"]))
    return LoopState(**payload["loop"])


def _jsonable(value: object) -> object:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"cannot store {type(value).__name__} in the training state")


def _python_rng(stored: list) -> tuple:
    version, internal, gauss = stored
    return version, tuple(internal), gauss
