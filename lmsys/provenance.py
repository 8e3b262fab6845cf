"""What a run was made from: code version, packages, command line and process layout (for run_info.json)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ("lmsys", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "torch-optimi", "hydra-core", "wandb")
REPO = Path(__file__).resolve().parents[1]


def git_state() -> dict:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def package_versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


SWEEP_ID = "LMSYS_SWEEP_ID"  # set by lmsys.sweep.SweepSummaryCallback for the jobs of one multirun


def run_info(num_processes: int, distributed_type: str) -> dict:
    return {
        "git": git_state(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "command": [sys.executable, *sys.argv],  # a multirun's whole command; a submitit job's is submitit's
        "overrides": job_overrides(),
        "sweep_id": os.environ.get(SWEEP_ID),
        "num_processes": num_processes,
        "distributed_type": distributed_type,
    }


def job_overrides() -> list[str] | None:
    """This job's own command-line overrides (`seed=2` for the second job of `-m seed=1,2`), as Hydra gives them to
    the job; None outside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None
