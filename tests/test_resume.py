"""Resuming from the training state: after SIGKILL, after SIGTERM, and after a crash between the two renames of a
state save; each resumed run must end exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tiny
import torch
from entry_runs import finish, read_metrics, read_metrics_log, read_oof, start_entry, tiny_overrides
from tiny import arena_frame

from lmsys import runs
from lmsys.config import Quantization
from lmsys.modeling.backbone import load_backbone
from lmsys.modeling.checkpoint import weights_fingerprint
from lmsys.runs import RunDir
from lmsys.training.state import LOOP_FILE, STATE_DIR, check_resumable, find_state

UPDATES = 6  # 48 pairs, 8 per update: one epoch
OLD_STATE = f".{STATE_DIR}.old"


@pytest.fixture(scope="module")
def overrides(tmp_path_factory, tiny_models) -> list[str]:
    root = tmp_path_factory.mktemp("resume_data")
    arena_frame(48, seed=5).to_csv(root / "train.csv", index=False)
    arena_frame(7, seed=6, start_id=700).to_csv(root / "valid.csv", index=False)
    return tiny_overrides(tiny_models["llama"], root / "train.csv", root / "valid.csv", trainer__max_steps=UPDATES,
                          trainer__eval_frequency=3, trainer__state_frequency=1, seed=11)


def launch(root: Path, name: str, overrides: list[str], *extra: str) -> SimpleNamespace:
    run_dir = root / name
    log = root / f"{name}-{len(list(root.glob(f'{name}-*.log')))}.log"
    process = start_entry([*overrides, f"hydra.run.dir={run_dir}", *extra], log)
    return SimpleNamespace(run_dir=run_dir, process=process, log=log)


def saved_step(run_dir: Path) -> int | None:
    """The step of the latest complete training state, None while there is none (or a rename is under way)."""
    try:
        return json.loads((run_dir / STATE_DIR / LOOP_FILE).read_text())["loop"]["step"]
    except (OSError, ValueError):
        return None


def interrupt_after(runs: list[tuple[SimpleNamespace, signal.Signals]], min_step: int, timeout: float = 300) -> None:
    """Send each run its signal as soon as it has saved the state of update `min_step` (watching all of them at
    once, so a fast run is not left going while another is waited for), then wait for them to end."""
    deadline = time.monotonic() + timeout
    pending = list(runs)
    while pending:
        for run, sig in list(pending):
            if (saved_step(run.run_dir) or 0) >= min_step:
                os.kill(run.process.pid, sig)
                pending.remove((run, sig))
            else:
                assert run.process.poll() is None, f"the run ended before it could be interrupted:\n{run.log.read_text()}"
        assert time.monotonic() < deadline, f"no state at update {min_step} after {timeout} s"
        time.sleep(0.01)
    for run, _ in runs:
        run.process.wait(timeout=timeout)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, overrides) -> SimpleNamespace:
    """An uninterrupted run, a run killed with SIGKILL and one stopped with SIGTERM (started together), then both
    resumed with resume=true; the killed one after simulating a crash between the renames of a state save."""
    root = tmp_path_factory.mktemp("resume_runs")
    baseline, killed, stopped = (launch(root, name, overrides) for name in ("baseline", "killed", "stopped"))
    interrupt_after([(killed, signal.SIGKILL), (stopped, signal.SIGTERM)], 2)
    after_kill = SimpleNamespace(returncode=killed.process.returncode, finished=(killed.run_dir / "metrics.json").exists(),
                                 step=loop_step(find_state(killed.run_dir)))
    after_stop = SimpleNamespace(returncode=stopped.process.returncode, log=stopped.log.read_text(),
                                 finished=(stopped.run_dir / "metrics.json").exists(),
                                 step=saved_step(stopped.run_dir))
    crash_between_renames(killed.run_dir)
    continued = [launch(root, run.run_dir.name, overrides, "resume=true") for run in (killed, stopped)]
    for run in (baseline, *continued):
        finish(run.process, run.log)
    return SimpleNamespace(baseline=baseline.run_dir, killed=killed.run_dir, stopped=stopped.run_dir,
                           after_kill=after_kill, after_stop=after_stop)


def loop_step(state_dir: Path | None) -> int | None:
    return None if state_dir is None else json.loads((state_dir / LOOP_FILE).read_text())["loop"]["step"]


def crash_between_renames(run_dir: Path) -> None:
    """Leave the run as a kill after `state` -> `.state.old` and before the new state is renamed in would."""
    if (run_dir / STATE_DIR).is_dir():
        shutil.rmtree(run_dir / OLD_STATE, ignore_errors=True)
        (run_dir / STATE_DIR).rename(run_dir / OLD_STATE)


def assert_same_results(run_dir: Path, baseline: Path) -> None:
    got, want = read_metrics(run_dir), read_metrics(baseline)
    assert got["updates"] == want["updates"] == UPDATES
    assert got["best"]["step"] == want["best"]["step"]
    assert got["best"]["log_loss"] == pytest.approx(want["best"]["log_loss"], abs=1e-6)
    assert [h["step"] for h in got["history"]] == [h["step"] for h in want["history"]] == [3, 6]
    np.testing.assert_allclose([h["log_loss"] for h in got["history"]], [h["log_loss"] for h in want["history"]],
                               rtol=0, atol=1e-6)
    oof, oof_want = read_oof(run_dir), read_oof(baseline)
    assert oof["id"].tolist() == oof_want["id"].tolist()
    np.testing.assert_allclose(oof.drop(columns="id").to_numpy(), oof_want.drop(columns="id").to_numpy(), rtol=0,
                               atol=1e-6)


def logged_train_steps(run_dir: Path) -> list[int]:
    return sorted(entry["step"] for entry in read_metrics_log(run_dir) if "train/loss" in entry)


def test_sigkill_then_resume_matches_uninterrupted_run(resumed):
    assert resumed.after_kill.returncode == -signal.SIGKILL
    assert not resumed.after_kill.finished  # killed mid-way
    assert 2 <= resumed.after_kill.step < UPDATES
    assert_same_results(resumed.killed, resumed.baseline)
    # Resumed from the saved update, not from scratch; the lines of the updates after it, trained again, are logged
    # once (the killed run's own were dropped at the resume)
    assert logged_train_steps(resumed.killed) == list(range(1, UPDATES + 1))


def test_sigterm_saves_state_and_exits_zero(resumed):
    assert resumed.after_stop.returncode == 0, resumed.after_stop.log[-3000:]
    assert not resumed.after_stop.finished
    assert 2 <= resumed.after_stop.step < UPDATES


def test_resume_after_sigterm_finishes_the_run(resumed):
    metrics = read_metrics(resumed.stopped)
    assert metrics["updates"] == UPDATES
    assert [h["step"] for h in metrics["history"]] == [3, 6]  # the evaluation before the stop came from the state
    assert logged_train_steps(resumed.stopped) == list(range(1, UPDATES + 1))  # stopped at a boundary: none repeated
    log = (resumed.stopped / "train.log").read_text()
    assert log.count(" INFO run dir ") == 2 and "best validation log loss" in log  # the resumed session's log kept


def test_resume_after_sigterm_matches_uninterrupted_run(resumed):
    """The stop comes after the evaluation at update 3 (the signal is sent once update 2 is saved)."""
    assert_same_results(resumed.stopped, resumed.baseline)


def test_a_resume_under_another_plan_is_refused(resumed, overrides, tmp_path):
    """Another seed and half the pairs per update would continue another run (pairs skipped or trained twice):
    one `error:` line naming both, with the batch that keeps the saved pairs per update, exit 2, and the run's own
    files as they were."""
    run_dir = tmp_path / "baseline_copy"
    shutil.copytree(resumed.baseline, run_dir)
    (run_dir / runs.FINISHED_MARKER).unlink()  # as if stopped after its last state
    before = {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()}
    log = tmp_path / "refused.log"
    other_base = tiny.save_tiny_model("llama", tmp_path / "other_base", seed=5)  # the same shapes, other weights
    changed = [f"model.path={other_base}" if arg.startswith("model.path=") else arg for arg in overrides]
    process = start_entry([*changed, f"hydra.run.dir={run_dir}", "resume=true", "seed=12", "trainer.grad_accum=1",
                           "lora.alpha=8", "trainer.max_grad_norm=0.5"], log)
    process.wait(timeout=300)
    output = log.read_text()
    assert process.returncode == 2, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in output
    assert f"resume=true: {run_dir} was trained with another plan" in errors[0]
    assert "seed: 11 in the state, 12 now" in errors[0]
    assert "pairs per update (trainer.batch_size x trainer.grad_accum x processes): 8 in the state, 4 now" in errors[0]
    assert "with 1 process, trainer.batch_size x trainer.grad_accum = 8 keeps 8 pairs per update" in errors[0]
    assert "model.path weights: 1 weight file(s), digest" in errors[0]  # the adapter would continue on another base
    assert "'alpha': 32" in errors[0] and "'alpha': 8" in errors[0]  # and at another scale
    assert "trainer.max_grad_norm: 1.0 in the state, 0.5 now" in errors[0]  # and other clipped steps
    after = {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()}
    assert after == before  # train.log too: a refused resume's records reach stderr, not the run's log
    assert loop_step(run_dir / STATE_DIR) == UPDATES


def test_evaluation_leaves_the_4bit_base_weights_unchanged(tiny_models):
    """Training after an evaluation must compute what it computes without one (else no resume is exact)."""
    backbone = load_backbone(tiny_models["llama"], Quantization.nf4, True, torch.float32, "sdpa", torch.device("cpu"),
                             False)
    ids = torch.arange(3, 43).unsqueeze(0)

    def train_forward() -> torch.Tensor:
        backbone.train()
        embeddings = backbone.get_input_embeddings()(ids).detach().requires_grad_(True)
        return backbone(inputs_embeds=embeddings).last_hidden_state.detach()

    before = train_forward()
    backbone.eval()
    with torch.inference_mode():
        backbone(input_ids=ids)
    assert torch.equal(train_forward(), before)


def test_finished_runs_leave_no_temporary_state(resumed):
    for run_dir in (resumed.baseline, resumed.killed, resumed.stopped):
        assert (run_dir / STATE_DIR / LOOP_FILE).is_file()
        assert loop_step(run_dir / STATE_DIR) == UPDATES
        assert not (run_dir / OLD_STATE).exists()


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs."""


def save_state(run: RunDir, step: int) -> None:
    def produce(directory: Path) -> None:
        directory.mkdir()
        (directory / LOOP_FILE).write_text(json.dumps({"loop": {"step": step}}))
        (directory / "trainable.safetensors").write_bytes(b"weights")

    run.write(STATE_DIR, produce)


def test_crash_between_renames_keeps_the_previous_state(tmp_path, monkeypatch):
    run = RunDir(tmp_path, is_main=True)
    save_state(run, 1)

    def crash(*args):
        raise Killed("killed between the renames")

    monkeypatch.setattr(runs.os, "replace", crash)
    with pytest.raises(Killed):
        save_state(run, 2)
    assert not (tmp_path / STATE_DIR).exists()
    assert loop_step(find_state(tmp_path)) == 1


def test_save_after_a_kill_before_the_old_state_was_removed(tmp_path):
    run = RunDir(tmp_path, is_main=True)
    save_state(run, 1)
    shutil.copytree(tmp_path / STATE_DIR, tmp_path / OLD_STATE)  # both present: killed just before the rmtree
    save_state(run, 2)
    assert loop_step(find_state(tmp_path)) == 2
    assert not (tmp_path / OLD_STATE).exists()



def test_a_state_saved_without_a_plan_resumes_with_a_warning(tmp_path, caplog):
    """States written before plans were recorded (their loop.json has none) still resume, unchecked, and say so."""
    save_state(RunDir(tmp_path, is_main=True), 2)
    with caplog.at_level(logging.WARNING, logger="lmsys"):
        check_resumable(tmp_path, {"seed": 11}, 1)
    assert "records no plan (saved by an older lmsys): resuming without checking the config" in caplog.text


def test_the_weights_fingerprint_follows_content_not_path(tiny_models, tmp_path):
    same = tmp_path / "copy"
    shutil.copytree(tiny_models["llama"], same)
    other = tiny.save_tiny_model("llama", tmp_path / "other", seed=5)
    assert weights_fingerprint(str(same)) == weights_fingerprint(str(tiny_models["llama"]))
    assert weights_fingerprint(str(other)) != weights_fingerprint(str(tiny_models["llama"]))
