"""The training recipe: one object holding the model, optimizer, scheduler, validation set and run outputs, with
the steps of a run as its methods: setup (from the config), update, evaluate, save best, save state, train.

`TrainingRecipe.setup` reads the config through the builders; everything after it takes plain values. The bench
and the DDP test worker build a recipe from their own parts and call `update`, the one optimizer step there is.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from lmsys import builders
from lmsys.cli import CommandError
from lmsys.config import ConfigError, TrainConfig
from lmsys.data.batching import collate
from lmsys.data.dataset import EncodedSplit, encode_split
from lmsys.evaluation.metrics import save_reliability_diagram
from lmsys.evaluation.validation import Evaluation, ValidationSet, evaluate, oof_frame, targets_of
from lmsys.logs import held_records, setup_logging, start_log_file
from lmsys.modeling.checkpoint import ModelSpec, save_checkpoint
from lmsys.modeling.compute_dtype import dtype_record
from lmsys.modeling.losses import preference_loss
from lmsys.modeling.warm_start import check_warm_start
from lmsys.output_paths import check_output_paths, enclosing_run
from lmsys.provenance import SWEEP_ID, run_info
from lmsys.runs import FINISHED_MARKER, FinishedRun, RunDir, RunDirError
from lmsys.tracking import Tracker, forget_after, new_wandb_run_id, start_wandb
from lmsys.training.distributed import full_trainable_state, lockstep_count
from lmsys.training.loss_scaling import no_loss_scaling
from lmsys.training.plan import Update, iterate_updates
from lmsys.training.settings import LoopSettings
from lmsys.training.signals import GracefulStop, StopRequested
from lmsys.training.state import (
    LoopState,
    check_resumable,
    model_plan,
    plan_changes,
    recorded_plan,
    restore_state,
    run_plan,
    save_training_state,
    saved_wandb_run_id,
    state_plan,
)

log = logging.getLogger("lmsys")


@dataclass(frozen=True)
class UpdateStats:
    loss: float  # mean over the update's examples on all processes
    lr: float  # the lr this update used
    grad_norm: float


@dataclass
class RunOutputs:
    """Where a run's files go and what a checkpoint needs besides the model."""

    run: RunDir
    tracker: Tracker
    spec: ModelSpec
    tokenizer: object
    plan: dict = field(default_factory=dict)  # recorded in the training state (lmsys.training.state.run_plan)


@dataclass
class TrainingRecipe:
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared by accelerate (DDP-wrapped with several processes)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    settings: LoopSettings
    train_split: EncodedSplit
    validation: ValidationSet | None = None  # only `update` works without it and `outputs`
    outputs: RunOutputs | None = None
    state: LoopState = field(default_factory=LoopState)
    grad_scaler: torch.amp.GradScaler = field(default_factory=no_loss_scaling)  # enabled for float16 compute only

    @classmethod
    def setup(cls, config: TrainConfig, run_path: Path, resolved_yaml: str) -> TrainingRecipe:
        """Data checked before the run dir is claimed, and the run dir claimed before any model loads."""
        with held_records() as early_records:  # logged again once the run's log exists (open_run_dir)
            train_pairs, valid_pairs = builders.build_splits(config)
            spec = builders.build_spec(config.model, config.data, config.trainer.packing, config.trainer.tta_mode)
            if config.model.init_from:
                check_warm_start(spec, config.lora, config.model.init_from, config.model.finetune)
            accelerator = builders.build_accelerator(config, run_path)
            grad_scaler = builders.build_grad_scaler(config.model, accelerator.device)
            builders.check_optimizer(config.optimizer)
            builders.check_lora(config.model, config.lora)
            builders.check_training_attention(spec, accelerator.device)
            tokenizer = builders.build_tokenizer(config.model.path, config.model.trust_remote_code)
            encoders = builders.build_encoders(spec, tokenizer)  # checks that max_length holds the layout
            set_seed(config.seed)
            train_split, valid_split = encode_split(train_pairs, encoders), encode_split(valid_pairs, encoders)
            settings = builders.build_loop_settings(config, spec, len(train_split), accelerator.num_processes,
                                                    tokenizer.pad_token_id)
            warn_idle_patience(settings)
            # the plan a resume must continue: known before the claim, which finds a finished run to compare with
            plan = run_plan(settings, asdict(config.optimizer), train_split, valid_split,
                            model_plan(config.model, config.lora))
        run = open_run_dir(run_path, config, accelerator, plan)
        early_records.replay()
        log.info("run dir %s; %d train pairs, %d valid pairs", run_path, len(train_pairs), len(valid_pairs))
        if config.resume:
            check_resumable(run_path, plan, accelerator.num_processes)
        record_run(run, config, accelerator, resolved_yaml, plan)
        try:
            wandb_run_id = start_tracking(config, accelerator, run_path)
        except CommandError:
            run.forget_unstarted()
            raise
        model = builders.build_model(spec, config.model, config.lora, accelerator.device)
        optimizer = builders.build_optimizer(config.optimizer, model)
        scheduler = builders.build_scheduler(config.optimizer, optimizer, settings.total_updates)
        model, optimizer = accelerator.prepare(model, optimizer)
        state = (restore_state(run_path, accelerator.unwrap_model(model), optimizer, scheduler, grad_scaler)
                 if config.resume else None) or LoopState()
        if config.resume and forget_after(run, state.step):
            log.info("metrics.jsonl: the lines after update %d, which this run trains again, dropped", state.step)
        state.wandb_run_id = wandb_run_id or state.wandb_run_id
        validation = builders.build_validation(config, spec, valid_split, tokenizer.pad_token_id)
        outputs = RunOutputs(run, Tracker(accelerator, run, config.use_wandb), spec, tokenizer, plan)
        return cls(accelerator, model, optimizer, scheduler, settings, train_split, validation, outputs, state,
                   grad_scaler)

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def update(self, update: Update) -> UpdateStats:
        """One optimizer update: forward/backward of every micro-batch, unscale (float16), clip, step, schedule,
        zero-grad."""
        scaler = self.grad_scaler
        scale = scaler.get_scale() if scaler.is_enabled() else None
        loss = self.accumulate_gradients(update)
        check_finite_loss(loss, self.state.step + 1)
        scaler.unscale_(self.optimizer)  # float16: the true gradients, before they are clipped and logged
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        scaler.step(self.optimizer)  # float16: skipped when a gradient overflowed
        scaler.update()
        if scale is not None and scaler.get_scale() < scale:  # the schedule counts the steps taken
            log.warning("update %d: float16 gradients overflowed at loss scale %g: step skipped, scale now %g",
                        self.state.step + 1, scale, scaler.get_scale())
        else:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return UpdateStats(loss, lr, float(grad_norm))

    def accumulate_gradients(self, update: Update) -> float:
        """Forward/backward every micro-batch of one update; gradients sync across processes on the last one only.

        Each example's loss is weighted 1 / (examples in the update over all processes), times the number of
        processes because DDP averages gradients: every pair counts equally whatever the micro-batch layout.
        Returns the update's mean loss over all processes.
        """
        accelerator, settings, n_real = self.accelerator, self.settings, len(update.micro_batches)
        scale = accelerator.num_processes / update.n_examples
        total = torch.zeros((), device=accelerator.device)
        # FSDP: ranks with fewer micro-batches repeat their last one at weight 0, so that every rank runs the same
        # all-gathers and reduce-scatters (a repeat adds nothing to the gradient or the loss).
        n_runs = lockstep_count(self.model, n_real, accelerator.device)
        for k in range(n_runs):
            batch = collate(update.micro_batches[min(k, n_real - 1)], settings.batching)
            with nullcontext() if k == n_runs - 1 else accelerator.no_sync(self.model):
                logits = self.model(**batch.model_inputs(accelerator.device))
                loss_sum = preference_loss(logits, batch.targets.to(accelerator.device),
                                           _on(batch.teacher_logits, accelerator.device), settings.loss, reduction="sum")
                accelerator.backward(self.grad_scaler.scale(loss_sum * (scale if k < n_real else 0.0)))
            if k < n_real:
                total += loss_sum.detach()
        return float(accelerator.reduce(total, reduction="sum")) / update.n_examples

    def evaluate(self) -> Evaluation:
        evaluation = evaluate(self.unwrapped, self.validation, self.accelerator)
        metrics, step = evaluation.metrics, self.state.step
        self.outputs.tracker.log({f"eval/{k}": v for k, v in metrics.items()}, step)
        self.outputs.tracker.log_table("eval/subsets", metrics.get("subsets", []), step)
        log.info("eval at update %d: log_loss %.4f accuracy %.4f (prior %.4f)", step, metrics["log_loss"],
                 metrics["accuracy"], metrics["prior_log_loss"])
        return evaluation

    def save_best(self, evaluation: Evaluation) -> None:
        """The best evaluation's oof.csv, reliability diagram and checkpoint, each written atomically."""
        run, split = self.outputs.run, self.validation.split
        run.write("oof.csv", lambda p: oof_frame(split, evaluation, self.outputs.spec.input_formats).to_csv(
            p, index=False))
        run.write("reliability.png", lambda p: save_reliability_diagram(evaluation.probs, targets_of(split), p))
        trainable = full_trainable_state(self.unwrapped)  # on every rank: under FSDP a collective
        run.write("checkpoint", lambda p: save_checkpoint(p, self.unwrapped, self.outputs.tokenizer, self.outputs.spec,
                                                          trainable))

    def save_state(self) -> None:
        save_training_state(self.outputs.run, self.unwrapped, self.optimizer, self.scheduler, self.state,
                            self.grad_scaler, self.outputs.plan)

    def train(self) -> LoopState:
        """Updates until the plan ends, patience runs out or a signal arrives; evaluations keep the best."""
        settings, state = self.settings, self.state
        if settings.total_updates == 0:
            self._evaluate_and_track()
            return state
        bar = tqdm(total=settings.total_updates, initial=state.step, desc="train",
                   disable=not self.accelerator.is_local_main_process)
        self.model.train()
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        with GracefulStop() as stop:
            if state.eval_pending and self._pending_evaluation():
                bar.close()
                return state
            for update in iterate_updates(self.train_split, settings, rank, world, state.step):
                stats = self.update(update)
                state.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{stats.lr:.2e}")
                self._log_update(stats)
                if self._after_update(stop):
                    break
        bar.close()
        return state

    def _after_update(self, stop: GracefulStop) -> bool:
        """Evaluate when due, save the state when due; True when the run must end here."""
        settings, state = self.settings, self.state
        if _eval_due(state.step, settings):
            try:
                state.stopped_early = self._evaluate_and_track()
            except StopRequested:  # the evaluation is abandoned; the update it was of is kept
                state.eval_pending = True
                return self._stop_here("during the evaluation at update")
            self.model.train()
            if state.stopped_early:
                log.info("early stopping at update %d: no improvement in %d evaluations", state.step, settings.patience)
                return True
        if settings.state_frequency and state.step % settings.state_frequency == 0:
            self.save_state()
        if stop.requested(self.accelerator):
            return self._stop_here("at update")
        return False

    def _pending_evaluation(self) -> bool:
        """The evaluation a stop abandoned, run first on resume; True when the run must end here."""
        try:
            self.state.stopped_early = self._evaluate_and_track()
        except StopRequested:
            return self._stop_here("during the evaluation at update")
        self.state.eval_pending = False
        self.model.train()
        return self.state.stopped_early

    def _stop_here(self, where: str) -> bool:
        """Save the state of the last finished update and mark the run interrupted (it exits 0, resumable)."""
        self.save_state()
        self.state.interrupted = True
        log.warning("stop requested %s %d: training state saved; continue with resume=true", where, self.state.step)
        return True

    def _evaluate_and_track(self) -> bool:
        """Evaluate, keep the best, and say whether patience has run out."""
        state, evaluation = self.state, self.evaluate()
        metrics = evaluation.metrics
        state.history.append({"step": state.step, **{k: v for k, v in metrics.items() if k != "subsets"}})
        if metrics["log_loss"] < state.best_score:
            state.best_score, state.best_step, state.best_metrics = metrics["log_loss"], state.step, metrics
            state.evals_without_improvement = 0
            self.save_best(evaluation)
        else:
            state.evals_without_improvement += 1
        return self.settings.patience is not None and state.evals_without_improvement >= self.settings.patience

    def _log_update(self, stats: UpdateStats) -> None:
        step = self.state.step
        self.outputs.tracker.log({"train/loss": stats.loss, "train/lr": stats.lr, "train/grad_norm": stats.grad_norm},
                                 step)
        if step % self.settings.log_frequency == 0 or step == 1:
            log.info("update %d loss %.4f lr %.3e grad_norm %.3f", step, stats.loss, stats.lr, stats.grad_norm)

    def finish(self) -> dict:
        """metrics.json (the mark of a finished run) and the closing line; the process freed for a sweep's next job."""
        self.accelerator.wait_for_everyone()
        # the trackers end here, the process group not: accelerate's end_training would destroy it, and a sweep's
        # next job under torchrun would fail at its first collective (creating it again races between the ranks);
        # the entry point closes it when the process's jobs are done
        for tracker in self.accelerator.trackers:
            tracker.finish()
        state = self.state
        summary = {
            "best": {"step": state.best_step, **state.best_metrics},
            "history": state.history,
            "n_train_pairs": len(self.train_split),
            "n_valid_pairs": len(self.validation.split),
            "updates": state.step,
            "stopped_early": state.stopped_early,
        }
        if not state.interrupted:
            self.outputs.run.write_json("metrics.json", summary)
            log.info("best validation log loss %.4f at update %d; class-prior log loss %.4f",
                     state.best_metrics["log_loss"], state.best_step, state.best_metrics["prior_log_loss"])
        release(self.accelerator)
        return summary


def check_finite_loss(loss: float, update: int) -> None:
    """A NaN/inf loss (diverged weights, an overflow) would make every later update NaN: stop before the step, so
    that the weights and the last saved state stay as they were. Every process holds the same reduced loss."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"update {update}: the training loss is {loss}; no step taken (the weights diverged "
                                 f"or overflowed): start again with a lower optimizer.lr or trainer.max_grad_norm "
                                 f"(overwrite=true), or compute in float32/bfloat16")


def skip_finished_run(run_path: Path, finished: FinishedRun, resolved_yaml: str) -> dict:
    """resume=true on a finished run: its metrics as they are; in a multirun it joins the sweep's summary (its
    run_info.json records the sweep, as a resumed run's does). Refused when it was trained under another plan (as a
    resume of it unfinished would be) or evaluated otherwise (EVALUATION_KEYS; a run that recorded no plan: any other
    setting): its results would pass for this config's."""
    saved = run_path / "config.yaml"
    changed = changed_settings(saved.read_text(), resolved_yaml) if saved.is_file() else []
    if finished.plan_changes is not None:  # what a resume of it unfinished would refuse, and how it was evaluated
        changed = finished.plan_changes + [line for line in changed if line.split(":")[0] in EVALUATION_KEYS]
    if changed:
        raise RunDirError(f"resume=true: {run_path} finished under other settings ({'; '.join(changed[:5])}), so its "
                          f"results are not this config's; restore them, or pass overwrite=true to train it again")
    log.warning("%s; skipped", finished)
    sweep_id, info_file = os.environ.get(SWEEP_ID), run_path / "run_info.json"
    if sweep_id and info_file.is_file():
        info = json.loads(info_file.read_text())
        RunDir(run_path, PartialState().is_main_process).write_json("run_info.json", {**info, "sweep_id": sweep_id})
    return json.loads((run_path / FINISHED_MARKER).read_text())


NOT_SETTINGS = ("resume", "overwrite", "use_wandb", "wandb")  # how a run is started and logged, not what it trains
# A finished run's results depend on them beyond its plan: which update was best, when it stopped, how it was scored.
EVALUATION_KEYS = ("trainer.eval_frequency", "trainer.patience", "trainer.eval_tta", "trainer.tta_mode")


def changed_settings(saved_yaml: str, current_yaml: str) -> list[str]:
    """`key: saved -> now` for every setting (dotted key) that differs between two resolved configs."""
    saved, current = (_flat(OmegaConf.to_container(OmegaConf.create(text))) for text in (saved_yaml, current_yaml))
    return [f"{key}: {saved.get(key)} -> {current.get(key)}" for key in sorted(saved.keys() | current.keys())
            if key.split(".")[0] not in NOT_SETTINGS and saved.get(key) != current.get(key)]


def _flat(tree: object, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    return {key: value for name, item in tree.items() for key, value in _flat(item, f"{prefix}{name}.").items()}


def start_tracking(config: TrainConfig, accelerator, run_path: Path) -> str:
    """wandb started before the model loads, continuing the saved state's wandb run on resume; its run id ('' with
    wandb off)."""
    if not config.use_wandb:
        return ""
    run_id = (saved_wandb_run_id(run_path) if config.resume else "") or new_wandb_run_id()
    start_wandb(accelerator, config.wandb, OmegaConf.to_container(OmegaConf.structured(config)), run_path, run_id)
    return run_id


def _on(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


def _eval_due(step: int, settings: LoopSettings) -> bool:
    periodic = settings.eval_frequency > 0 and step % settings.eval_frequency == 0
    return periodic or step == settings.total_updates


def warn_idle_patience(settings: LoopSettings) -> None:
    """Early stopping needs patience + 1 evaluations to ever stop a run: say so when the plan has fewer."""
    if settings.patience is None:
        return
    evaluations = max(1, sum(_eval_due(step, settings) for step in range(1, settings.total_updates + 1)))
    if evaluations <= settings.patience:
        log.warning("trainer.patience=%d cannot stop this run: it evaluates %d time(s) (trainer.eval_frequency=%d over "
                    "%d updates)", settings.patience, evaluations, settings.eval_frequency, settings.total_updates)


def open_run_dir(run_path: Path, config: TrainConfig, accelerator, plan: dict) -> RunDir:
    """Claim the run dir (refusing another run's, and one that holds or lies inside an input) and start the log.
    A finished run that resume=true finds is told apart by `plan`, as an unfinished one would be resumed or not."""
    inputs = {"model.path": config.model.path, "model.init_from": config.model.init_from,
              "data.train_path": config.data.train_path, "data.valid_path": config.data.valid_path}
    try:
        check_output_paths(inputs, {"the run dir": run_path}, directory_outputs=frozenset({"the run dir"}),
                           run_dir_outputs=frozenset({"the run dir"}))
    except ConfigError:
        remove_made_inside_a_run(run_path)
        raise
    run = RunDir(run_path, accelerator.is_main_process)
    try:
        run.claim(config.overwrite, config.resume)
    except FinishedRun as finished:  # its plan: of its last state, else the one it recorded at its start
        saved_state = state_plan(run_path)
        finished.plan_changes = plan_changes(saved_state or recorded_plan(run_path), plan, accelerator.num_processes,
                                             "in the state" if saved_state else "in the run")
        raise
    accelerator.wait_for_everyone()
    # a resume's log file waits for record_run: a resume refused under another plan leaves train.log as it was
    setup_logging(accelerator.is_main_process, run.path / "train.log", waits=config.resume)
    return run


def remove_made_inside_a_run(run_path: Path) -> None:
    """Hydra makes hydra.run.dir before any code of ours runs: refused for lying inside another run's directory,
    the empty directories it made there go again (that run holds only its own files)."""
    path = run_path.resolve()
    run = enclosing_run(path, itself=False)
    for directory in (path, *path.parents) if run is not None else ():
        if directory == run:
            return
        try:
            directory.rmdir()  # empty ones only
        except OSError:
            return


def record_run(run: RunDir, config: TrainConfig, accelerator, resolved_yaml: str, plan: dict) -> None:
    """The config and provenance, once the run is known to go ahead (a refused resume keeps the run's own); the
    plan, which a resume=true that finds the run finished compares with (its states may be none)."""
    start_log_file()
    run.write_text("config.yaml", resolved_yaml)
    dtype = dtype_record(config.model.compute_dtype.value, accelerator.device, config.model.path)  # every rank
    run.write_json("run_info.json", {**run_info(accelerator.num_processes, accelerator.distributed_type.value),
                                     "compute_dtype": dtype, "plan": plan})


def release(accelerator) -> None:
    """Free the process for the next job of a sweep: accelerator state, trackers, cached memory. The process state
    and its process group stay for the next job (see `finish`)."""
    del accelerator
    AcceleratorState._reset_state()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
