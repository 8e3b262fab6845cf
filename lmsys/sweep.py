"""Sweep summary: per-run (fold, seed) best validation log loss, their mean and standard deviation.

Written to `<sweep dir>/sweep_summary.json` at the end of `-m seed=1,2,3` (or `-m data.valid_fold=0,1,2`) by `SweepSummaryCallback` (registered in
conf/run_layout.yaml), and built from finished run dirs by `python -m lmsys.sweep DIR... [--output FILE]`.
Both read only the run dirs (metrics.json, config.yaml), so they give the same summary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmsys.cli import CommandError, command_errors, one_line
from lmsys.output_paths import check_output_paths, enclosing_run
from lmsys.provenance import SWEEP_ID
from lmsys.runs import FINISHED_MARKER, write_json

SUMMARY_FILE = "sweep_summary.json"
DEFAULT_SUBDIR = "${run_name:${data.valid_fold},${seed}}"  # conf/run_layout.yaml's hydra.sweep.subdir


class SweepError(CommandError):
    """A run dir that cannot be summarized (missing, unfinished or malformed run; a run given twice)."""


class MixedClassCounts(SweepError):
    """Two-class and three-class runs: each is summarized, but not together."""


def run_record(run_dir: str | Path) -> dict:
    """One row of the summary, read from a finished run dir."""
    path = Path(run_dir).resolve()
    metrics_file = path / "metrics.json"
    if not metrics_file.is_file():
        raise SweepError(f"{path}: no metrics.json (not a run dir, or the run did not finish)")
    best_log_loss, best_step = _best(metrics_file)
    seed, fold, num_classes = _run_settings(path / "config.yaml")
    return {"run_dir": str(path), "seed": seed, "fold": fold, "num_classes": num_classes,
            "best_log_loss": best_log_loss, "best_step": best_step}


def _best(metrics_file: Path) -> tuple[float, int]:
    """The best evaluation's log loss (a finite number) and update (an integer) of a run's metrics.json."""
    try:
        best = json.loads(metrics_file.read_text())["best"]
        log_loss, step = best["log_loss"], best["step"]
    except (ValueError, KeyError, TypeError) as err:
        raise SweepError(f"{metrics_file}: not a run's metrics.json (no best log_loss and step: {err!r})") from err
    is_number = isinstance(log_loss, int | float) and not isinstance(log_loss, bool)
    if not (is_number and math.isfinite(log_loss)) or not isinstance(step, int) or isinstance(step, bool):
        raise SweepError(f"{metrics_file}: best log_loss {log_loss!r} and step {step!r} are not a finite number "
                         f"and an integer")
    return float(log_loss), step


def _run_settings(config_file: Path) -> tuple[object, object, object]:
    """The run's seed, data.valid_fold and model.num_classes from its config.yaml (None where a run has none)."""
    if not config_file.is_file():
        return None, None, None
    try:
        config = OmegaConf.load(config_file)
        return (config.get("seed"), OmegaConf.select(config, "data.valid_fold"),
                OmegaConf.select(config, "model.num_classes"))
    except (yaml.YAMLError, OmegaConfBaseException, AttributeError) as err:
        raise SweepError(f"{config_file}: not a run's config.yaml ({one_line(err)})") from err


def summarize(run_dirs: list[str | Path]) -> dict:
    if not run_dirs:
        raise SweepError("no run dirs to summarize")
    runs = [run_record(d) for d in run_dirs]
    seen = set()
    for run in runs:  # counted twice, a run would weigh twice in the mean and shrink the spread
        if run["run_dir"] in seen:
            raise SweepError(f"{run['run_dir']} is given twice; name each run once")
        seen.add(run["run_dir"])
    classes = {run["num_classes"] for run in runs if run["num_classes"] is not None}
    if len(classes) > 1:  # a two-class log loss (at most ln 2 for a prior) and a three-class one do not average
        two = next(run["run_dir"] for run in runs if run["num_classes"] == 2)
        three = next(run["run_dir"] for run in runs if run["num_classes"] == 3)
        raise MixedClassCounts(f"{two} is a two-class run and {three} a three-class one: their log losses do not "
                         f"average; summarize the runs of one kind")
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
    """Under accelerate/torchrun every rank runs the sweep; only global rank 0 reports. RANK is the global rank
    (torchrun and accelerate launch set it for every node), LOCAL_RANK the fallback on one node."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


class SweepSummaryCallback(Callback):
    """Writes the summary of a multirun's finished runs in the sweep dir when the multirun ends.

    The runs are found in the sweep dir (each finished run dir whose run_info.json records this multirun's id),
    not collected from `on_job_end`: with the submitit launcher every job runs in its own process (or on another
    node), and only `on_multirun_start`/`on_multirun_end` run in the launching one. Runs of an earlier sweep in the
    same dir are left out, but not the finished runs that a resumed sweep (`resume=true`) finds done and skips:
    they join it. On a cluster the sweep dir is on the shared filesystem.
    """

    def __init__(self) -> None:
        self.sweep_id = ""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # every job's run_info.json records it (submitit's jobs inherit the variable), so runs that finish in the
        # sweep dir meanwhile but belong to another sweep or to no sweep are left out
        self.sweep_id = os.environ[SWEEP_ID] = uuid.uuid4().hex

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ.pop(SWEEP_ID, None)
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        run_dirs = [run_dir for run_dir in finished_runs(sweep_dir) if recorded_sweep_id(run_dir) == self.sweep_id]
        if not run_dirs:
            return
        try:
            summary = summarize(run_dirs)
        except MixedClassCounts as err:  # e.g. -m model.num_classes=2,3: the runs are fine, a mean of them is not
            if is_main_process():
                print(f"warning: no {SUMMARY_FILE}: {err}", file=sys.stderr, flush=True)
            return
        main = is_main_process()
        if main:
            keep_earlier_summary(sweep_dir / SUMMARY_FILE)
        write_json(sweep_dir / SUMMARY_FILE, summary, main)
        if main:
            print(format_table(summary), flush=True)


def recorded_sweep_id(run_dir: Path) -> str | None:
    """The multirun a run belongs to, from its run_info.json (None: a run of no multirun, or unreadable)."""
    try:
        info = json.loads((run_dir / "run_info.json").read_text())
    except (OSError, ValueError):
        return None
    return info.get("sweep_id") if isinstance(info, dict) else None


def keep_earlier_summary(path: Path) -> Path | None:
    """An earlier multirun's summary in the same sweep dir (e.g. `-m seed=3` after `-m seed=1,2`) moved aside to
    sweep_summary.<its time>.json rather than replaced; returns where it went."""
    if not path.is_file():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    for attempt in range(1000):
        kept = path.with_name(f"{path.stem}.{stamp}{f'-{attempt}' if attempt else ''}{path.suffix}")
        if not kept.exists():
            path.rename(kept)
            return kept
    raise SweepError(f"{path}: too many earlier summaries named {path.stem}.{stamp}*")


class DistinctRunDirs(Callback):
    """Fails a multirun before its first job when the jobs would share run dirs: the default layout names a run
    dir by `data.valid_fold` and `seed` only (`run_name`), so a sweep over anything else (`-m optimizer.lr=1e-4,3e-4`)
    needs its own `hydra.sweep.subdir`, which must name every swept key (or each job, as `${hydra:job.num}` does).
    Otherwise the second job finds the first one's finished run and stops (or, with overwrite=true, replaces it)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_sweep_dir(Path(config.hydra.sweep.dir).resolve())
        subdir = str(OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir"))
        unnamed = unnamed_keys(subdir, swept_keys(config))
        if not unnamed:
            return
        named_by = ("data.valid_fold and seed only" if subdir == DEFAULT_SUBDIR
                    else f"hydra.sweep.subdir={subdir}, which does not name {', '.join(unnamed)}")
        suggestion = subdir_naming(config, unnamed, subdir)
        print(f"error: -m varies {', '.join(unnamed)}, but each job's dir is named by {named_by}, so the jobs would "
              f"write the same dir; name them apart with hydra.sweep.subdir, e.g. "
              f"'hydra.sweep.subdir=\"{suggestion}\"'", file=sys.stderr)
        raise SystemExit(2)


def check_sweep_dir(sweep_dir: Path) -> None:
    """A sweep dir is no run's dir, nor inside one: its jobs' dirs, multirun.yaml and the summary would go in."""
    run = enclosing_run(sweep_dir)
    if run is not None:
        print(f"error: hydra.sweep.dir={sweep_dir} {'is' if run == sweep_dir else 'lies inside'} the run dir {run}, "
              f"which holds only its run's files; choose another sweep dir", file=sys.stderr)
        raise SystemExit(2)


JOB_UNIQUE = ("job.num", "job.id", "job.override_dirname")  # Hydra's ${hydra:job.num} and the like: one per job


def unnamed_keys(subdir: str, swept: list[str]) -> list[str]:
    """The swept keys that the sweep subdir does not name (a config group by its choice); none when it names each
    job apart by itself."""
    if any(token in subdir for token in JOB_UNIQUE):
        return []
    return [key for key in swept if not re.search(rf"[{{:,]\s*{re.escape(key)}\s*[}},]", subdir)
            and f"choices.{key}}}" not in subdir]  # ${key}, ${oc.select:key,default}, a resolver's argument


def subdir_naming(config: DictConfig, keys: list[str], base: str) -> str:
    """A sweep subdir that names each job by `keys` as well (a config group by its chosen option's name); quoted
    on the command line, since Hydra reads the comma in run_name's arguments as a sweep."""
    parts = []
    for key in keys:
        is_group = OmegaConf.is_config(OmegaConf.select(config, key, throw_on_missing=False))
        parts.append(f"{key.rsplit('.', 1)[-1]}=${{hydra:runtime.choices.{key}}}" if is_group
                     else f"{key.rsplit('.', 1)[-1]}=${{{key}}}")
    return "_".join([*parts, base])


def swept_keys(config: DictConfig) -> list[str]:
    """The keys (or config groups) a multirun gives several values: sweeps on the command line
    (`optimizer.lr=1e-4,3e-4`, `range(...)`, `choice(...)`) and in `hydra.sweeper.params`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    overrides = [*config.hydra.overrides.task, *(f"{key}={value}" for key, value in params.items())]
    parsed = OverridesParser.create().parse_overrides(overrides)
    return sorted({override.key_or_group for override in parsed if override.is_sweep_override()})


def finished_runs(sweep_dir: Path) -> list[Path]:
    """Run dirs under `sweep_dir` that hold a metrics.json (written last, when a run finishes), by seed."""
    found = [marker.parent for marker in sweep_dir.rglob(FINISHED_MARKER)]
    return sorted(found, key=lambda d: (_seed(d), str(d)))


def _seed(run_dir: Path) -> int:
    config_file = run_dir / "config.yaml"
    seed = OmegaConf.load(config_file).get("seed") if config_file.is_file() else None
    return seed if isinstance(seed, int) else 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Summarize finished runs (e.g. the seeds of a sweep).")
    parser.add_argument("run_dirs", nargs="+", help="run dirs, each with metrics.json")
    parser.add_argument("--output", type=Path, help=f"also write the summary as JSON here (like {SUMMARY_FILE})")
    args = parser.parse_args(argv)
    with command_errors():
        summary = summarize(args.run_dirs)
        if args.output is not None:  # a run's own files (metrics.json, oof.csv) are never replaced
            check_output_paths({f"run dir {d}": d for d in args.run_dirs}, {"--output": args.output})
            kept = keep_earlier_summary(args.output.resolve())
            write_json(args.output.resolve(), summary)
            if kept is not None:
                print(f"kept the earlier {args.output.name} as {kept.name}")
    print(format_table(summary))


if __name__ == "__main__":
    main()
