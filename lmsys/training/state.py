"""Full training state for resuming after a crash or a kill: trainable weights (LoRA + head, never the frozen
base), optimizer, scheduler, RNG states and the loop's counters; written atomically into `<run>/state`."""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmsys.runs import STATE_DIR, RunDir
from lmsys.training.distributed import full_trainable_state, load_full_state, load_optimizer_state, optimizer_state

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
    best_metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


def save_training_state(run: RunDir, model: torch.nn.Module, optimizer, scheduler, loop: LoopState,
                        grad_scaler: torch.amp.GradScaler | None = None) -> None:
    """Write the state next to the previous one and swap it in only once complete (with float16 compute, the loss
    scale too)."""
    weights = full_trainable_state(model)  # gathered on every rank (FSDP: a collective); only the main process writes
    optimizer_blob = optimizer_state(model, optimizer)
    payload = {"loop": asdict(loop), "scheduler": scheduler.state_dict(), "python_rng": random.getstate()}

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
    blobs = torch.load(directory / OPTIMIZER_FILE, weights_only=True)
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
    raise TypeError(f"cannot store {type(value).__name__} in the training state")


def _python_rng(stored: list) -> tuple:
    version, internal, gauss = stored
    return version, tuple(internal), gauss
