"""SIGTERM / Ctrl-C during an evaluation or a prediction: the work in progress stops at the next micro-batch (not
at the end of the evaluation), a training run keeps the state of its last finished update and exits 0, prediction
exits non-zero without writing a submission, and a second signal ends the process at once."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from entry_runs import entry_env, start, start_entry, tiny_overrides
from test_predict import make_checkpoint
from test_resume import saved_step
from tiny import arena_frame

from lmsys.training.signals import GracefulStop, StopRequested, raise_if_stop_requested

# A full evaluation of SLOW_PAIRS pairs one per micro-batch, both orientations, takes minutes on this machine; a
# stopped one must be over in seconds (model load and encoding come before the signal, so they do not count).
SLOW_PAIRS = 3000
STOP_WITHIN_S = 20


def wait_for(log: Path, text: str, process, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while text not in (log.read_text() if log.exists() else ""):
        assert process.poll() is None, f"ended before {text!r}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} after {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def seconds_to_end(process, timeout: float = 120) -> float:
    start_time = time.monotonic()
    process.wait(timeout=timeout)
    return time.monotonic() - start_time


@pytest.fixture(scope="module")
def slow_eval_overrides(tmp_path_factory, tiny_models) -> list[str]:
    root = tmp_path_factory.mktemp("slow_eval")
    arena_frame(16, seed=5).to_csv(root / "train.csv", index=False)
    arena_frame(SLOW_PAIRS, seed=6, start_id=10_000).to_csv(root / "valid.csv", index=False)
    return tiny_overrides(tiny_models["llama"], root / "train.csv", root / "valid.csv", trainer__max_steps=2,
                          trainer__eval_frequency=1, trainer__state_frequency=0, trainer__eval_max_tokens=128,
                          trainer__eval_tta=True, seed=3)


def start_and_signal_in_eval(root: Path, overrides: list[str], signals: list[signal.Signals]):
    """A run signalled (once per entry of `signals`, 0.05 s apart) while its first evaluation is under way."""
    run_dir, log = root / "run", root / "run.log"
    process = start_entry([*overrides, f"hydra.run.dir={run_dir}"], log)
    wait_for(log, "update 1 loss", process)  # logged just before the evaluation of update 1 starts
    time.sleep(1.0)
    for k, sig in enumerate(signals):
        if k:
            time.sleep(0.05)
        os.kill(process.pid, sig)
    return run_dir, log, process


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])  # USR2: submitit's warning before a time limit
def test_sigterm_during_evaluation_stops_it_and_keeps_the_update(tmp_path, slow_eval_overrides, sig):
    run_dir, log, process = start_and_signal_in_eval(tmp_path, slow_eval_overrides, [sig])
    took = seconds_to_end(process)
    text = log.read_text()
    assert process.returncode == 0, text[-3000:]
    assert took < STOP_WITHIN_S, f"took {took:.1f} s to stop"
    assert "stop requested during the evaluation at update 1" in text
    assert "eval at update 1" not in text  # the evaluation was abandoned, not finished
    assert saved_step(run_dir) == 1  # the state of the last finished update
    assert not (run_dir / "metrics.json").exists()  # not a finished run: resume=true continues it


def test_second_signal_during_evaluation_ends_the_process_at_once(tmp_path, slow_eval_overrides):
    _, log, process = start_and_signal_in_eval(tmp_path, slow_eval_overrides, [signal.SIGTERM])
    # the second SIGTERM every 10 ms until the process ends: one sent before the first one's handler ran merges with
    # it, and a single second one 50 ms later could come after a fast host's graceful stop had already exited 0
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
        os.kill(process.pid, signal.SIGTERM)
    seconds_to_end(process)
    # the first signal reset the handler, so the second one killed the process (no graceful exit 0)
    assert process.returncode == -signal.SIGTERM, log.read_text()[-3000:]


def test_second_ctrl_c_raises_keyboard_interrupt_in_process():
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN where the suite runs in the background
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs at the next bytecode of the main thread
        assert stop.received == signal.SIGINT
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # a second SIGTERM is not caught either
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is before  # the handler from before is back


def test_sigusr2_is_a_stop_request_and_submitits_handler_comes_back():
    """submitit has SLURM send USR2 ahead of the time limit and handles it by requeueing the same command (which
    stops at the run's state without resume=true): while training, the run saves its state instead."""
    def submitit_handler(signum, frame):
        raise AssertionError("submitit's handler ran during training")

    before = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with GracefulStop() as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.05)
            assert stop.received == signal.SIGUSR2 and signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_prediction_loop_raises_only_inside_a_requested_stop():
    class OneProcess:
        num_processes, device = 1, "cpu"

    raise_if_stop_requested(OneProcess())  # no GracefulStop: nothing to check
    with GracefulStop() as stop:
        raise_if_stop_requested(OneProcess())
        stop.received = signal.SIGTERM
        with pytest.raises(StopRequested):
            raise_if_stop_requested(OneProcess())


def test_predict_signalled_exits_non_zero_and_writes_nothing(tmp_path, tiny_models):
    checkpoint = make_checkpoint(tmp_path / "checkpoint", tiny_models["llama"])
    test_file, output = tmp_path / "test.csv", tmp_path / "submission.csv"
    arena_frame(SLOW_PAIRS, seed=4, labelled=False).to_csv(test_file, index=False)
    log = tmp_path / "predict.log"
    command = [sys.executable, "-m", "lmsys.predict", f"checkpoint={checkpoint}", f"data.test_path={test_file}",
               f"output={output}", "max_tokens=128", "show_progress=false"]
    process = start(command, log, entry_env())
    # pseudo_label, at the same time: it had no stop of its own (a signal killed it without a word)
    pseudo_log, pseudo = tmp_path / "pseudo.log", tmp_path / "pseudo.parquet"
    labelling = start([sys.executable, "-m", "lmsys.pseudo_label", f"checkpoints=[{checkpoint}]",
                       f"data.test_path={test_file}", f"output={pseudo}", "max_tokens=128", "show_progress=false"],
                      pseudo_log, entry_env())
    wait_for(log, "pairs from", process)  # logged just before the stop handlers are installed and the model loads
    wait_for(pseudo_log, "pseudo-labelling", labelling)
    time.sleep(1.0)
    os.kill(process.pid, signal.SIGTERM)
    os.kill(labelling.pid, signal.SIGTERM)
    took = seconds_to_end(process)
    text = log.read_text()
    assert process.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert took < STOP_WITHIN_S, f"took {took:.1f} s to stop"
    assert "nothing written" in text
    assert not output.exists() and not list(tmp_path.glob("*submission*"))
    assert seconds_to_end(labelling) < STOP_WITHIN_S and labelling.returncode == 128 + signal.SIGTERM
    assert "before the pseudo-labels were complete: nothing written" in pseudo_log.read_text()
    assert "Traceback" not in pseudo_log.read_text() and not list(tmp_path.glob("*pseudo*.parquet*"))
