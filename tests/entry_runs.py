"""Running the training entry point in real processes, as a user does, for the end-to-end tests of runs
(DDP, sweeps, resume, tracking)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "lmsys" / "code" / "train_r_llama.py"
CONFIG_NAME = "conf_r_llama_smol"
TIMEOUT_S = 400


def tiny_overrides(model: Path, train: Path, valid: Path, **extra: object) -> list[str]:
    """Hydra overrides for a run of a tiny model on tiny data; `extra` adds or replaces (dots as `__`)."""
    values = {"model.path": model, "data.train_path": train, "data.valid_path": valid, "model.max_length": 128,
              "trainer.max_tokens": 512, "trainer.batch_size": 4, **{k.replace("__", "."): v for k, v in extra.items()}}
    return [f"{key}={value}" for key, value in values.items()]


def entry_env(**extra: str) -> dict[str, str]:
    """The test's environment, with `lmsys` importable from the checkout (for scripts outside lmsys/code)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def start(command: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """Output goes to `log`, not a pipe: a process polled from outside must never block on a full pipe."""
    with open(log, "w") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env or entry_env(), cwd=cwd)


def start_entry(args: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
    return start([sys.executable, str(ENTRY), "--config-name", CONFIG_NAME, *args], log, env, cwd)


def finish(process: subprocess.Popen, log: Path, timeout: float = TIMEOUT_S) -> None:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"{process.args} did not finish in {timeout} s:\n{log.read_text()[-4000:]}") from None
    assert process.returncode == 0, f"{process.args} exited {process.returncode}:\n{log.read_text()[-4000:]}"


def run_entry(args: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    finish(start_entry(args, log, env, cwd), log)


def run_side_by_side(commands: list[list[str]], **popen_kwargs) -> list[subprocess.CompletedProcess]:
    """Commands started together and awaited in order: most of a short one (a CLI error, --help, a run of a tiny
    model) is the ~10 s import of torch and transformers, which two cores do side by side."""
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs)
                 for command in commands]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


def torchrun_command(script: Path, args: list[str]) -> list[str]:
    """Two CPU processes (gloo); --standalone picks a free rendezvous port, so concurrent test runs do not clash."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args]


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def read_metrics_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_oof(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "oof.csv").sort_values("id").reset_index(drop=True)
