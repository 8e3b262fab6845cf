"""Sweep summary: per-run (fold, seed) best validation log loss, their mean and standard deviation.

Written to `<sweep dir>/sweep_summary.json` at the end of `-m seed=1,2,3` (or `-m data.valid_fold=0,1,2`) by `SweepSummaryCallback` (registered in
conf/run_layout.yaml), and built from finished run dirs by `python -m lmsys.sweep DIR... [--output FILE]`.
Both read only the run dirs (metrics.json, config.yaml), so they give the same summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lmsys.runs import write_json

SUMMARY_FILE = "sweep_summary.json"


class SweepError(ValueError):
    """A run dir that cannot be summarized (missing or unfinished run)."""


def run_record(run_dir: str | Path) -> dict:
    """One row of the summary, read from a finished run dir."""
    path = Path(run_dir).resolve()
    metrics_file = path / "metrics.json"
    if not metrics_file.is_file():
        raise SweepError(f"{path}: no metrics.json (not a run dir, or the run did not finish)")
    best = json.loads(metrics_file.read_text())["best"]
    config_file = path / "config.yaml"
    config = OmegaConf.load(config_file) if config_file.is_file() else OmegaConf.create({})
    return {"run_dir": str(path), "seed": config.get("seed"), "fold": OmegaConf.select(config, "data.valid_fold"),
            "best_log_loss": best["log_loss"], "best_step": best["step"]}


def summarize(run_dirs: list[str | Path]) -> dict:
    if not run_dirs:
        raise SweepError("no run dirs to summarize")
    runs = [run_record(d) for d in run_dirs]
    losses = [run["best_log_loss"] for run in runs]
    return {
        "runs": runs,
        "best_log_loss": {
            "n": len(losses),
            "mean": statistics.fmean(losses),
            "std": statistics.stdev(losses) if len(losses) > 1 else None,  # sample std (n - 1): seeds are a sample
        },
    }


def format_table(summary: dict) -> str:
    lines = [f"{'run':<24} {'fold':>5} {'seed':>6} {'best log loss':>14} {'best update':>12}"]
    for run in summary["runs"]:
        fold = "-" if run["fold"] is None else run["fold"]
        lines.append(f"{Path(run['run_dir']).name:<24} {fold!s:>5} {run['seed']!s:>6} {run['best_log_loss']:>14.6f} "
                     f"{run['best_step']:>12}")
    stats = summary["best_log_loss"]
    spread = "n/a" if stats["std"] is None else f"{stats['std']:.6f}"
    lines.append(f"mean {stats['mean']:.6f}  std {spread}  (n={stats['n']})")
    return "\n".join(lines)


def is_main_process() -> bool:
    """Under accelerate/torchrun every rank runs the sweep; only global rank 0 reports."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


class SweepSummaryCallback(Callback):
    """Collects the run dir of every completed job of a multirun and writes the summary in the sweep dir.

    Jobs are collected in `on_job_end`, which runs in this process with Hydra's basic launcher (the one we use:
    every DDP rank must run the same jobs in the same order).
    """

    def __init__(self) -> None:
        self.run_dirs: list[str] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.run_dirs = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status == JobStatus.COMPLETED:
            self.run_dirs.append(job_return.hydra_cfg.hydra.runtime.output_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.run_dirs:
            return
        summary = summarize(self.run_dirs)
        main = is_main_process()
        write_json(Path(config.hydra.sweep.dir).resolve() / SUMMARY_FILE, summary, main)
        if main:
            print(format_table(summary), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Summarize finished runs (e.g. the seeds of a sweep).")
    parser.add_argument("run_dirs", nargs="+", help="run dirs, each with metrics.json")
    parser.add_argument("--output", type=Path, help=f"also write the summary as JSON here (like {SUMMARY_FILE})")
    args = parser.parse_args(argv)
    try:
        summary = summarize(args.run_dirs)
    except SweepError as err:
        parser.error(str(err))
    if args.output is not None:
        write_json(args.output.resolve(), summary)
    print(format_table(summary))


if __name__ == "__main__":
    main()
