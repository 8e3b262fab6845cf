"""Metrics of a run: always appended to `metrics.jsonl` in the run dir, and sent to wandb (via accelerate's
trackers) when it is on."""

from __future__ import annotations

import json
import os
import secrets
import string
from pathlib import Path

from lmsys.cli import CommandError, one_line
from lmsys.config import WandbConfig
from lmsys.runs import RunDir, json_safe

METRICS_LOG = "metrics.jsonl"


class Tracker:
    def __init__(self, accelerator, run: RunDir, use_wandb: bool) -> None:
        self.accelerator = accelerator
        self.run = run
        self.use_wandb = use_wandb

    def log(self, values: dict, step: int) -> None:
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.accelerator.log(scalars, step=step)
        self.run.append_line(METRICS_LOG, json.dumps(json_safe({"step": step, **scalars})))

    def log_table(self, name: str, rows: list[dict], step: int) -> None:
        """A per-subset table: a wandb.Table when wandb is on, one JSON line always."""
        if self.use_wandb and rows and self.accelerator.is_main_process:
            import wandb

            columns = list(rows[0])
            table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
            self.accelerator.get_tracker("wandb").log({name: table}, step=step)
        self.run.append_line(METRICS_LOG, json.dumps(json_safe({"step": step, name: rows})))


def forget_after(run: RunDir, step: int) -> int:
    """A resumed run's metrics.jsonl without the lines of the updates after its state (`step`), which it trains
    again and logs anew: each update's lines once. Returns the number of lines dropped."""
    path = run.path / METRICS_LOG
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if _step(line) <= step]
    if len(kept) < len(lines):
        run.write_text(METRICS_LOG, "".join(f"{line}\n" for line in kept))
    return len(lines) - len(kept)


def _step(line: str) -> float:
    """A line's update; a line cut short by a kill counts as after every state (dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def start_wandb(accelerator, wandb: WandbConfig, config: dict, run_path: Path, run_id: str) -> None:
    """wandb through accelerate's trackers, with the resolved config, before the model loads (a wandb that cannot
    start is one error line, not a traceback after minutes of loading). `run_id` (kept in the training state)
    makes a resumed run continue the same wandb run instead of starting another."""
    from accelerate.utils import broadcast_object_list
    from wandb.errors import Error as WandbError

    env, error = os.environ.get, None
    try:
        accelerator.init_trackers(
            wandb.project or env("WANDB_PROJECT") or "lmsys", config=config,
            init_kwargs={"wandb": {"mode": wandb.mode, "entity": wandb.entity, "tags": wandb.tags or None,
                                   "name": wandb.name or env("WANDB_NAME") or run_path.name,
                                   "dir": env("WANDB_DIR") or str(run_path), "id": run_id, "resume": "allow"}},
        )
    except WandbError as err:
        error = (f"wandb could not start: {one_line(err)} (log in with `wandb login` or WANDB_API_KEY, or run with "
                 f"wandb.mode=offline)")
    except ValueError as err:  # settings wandb refuses (pydantic's, e.g. WANDB_MODE=bogus)
        error = f"wandb could not start: {one_line(err)} (check the wandb.* options and the WANDB_* variables)"
    if accelerator.num_processes > 1:  # wandb starts on the main process only: the others stop with it, rather
        error = broadcast_object_list([error])[0]  # than load the model and fail at their first collective
    if error is not None:
        raise CommandError(error)


def new_wandb_run_id() -> str:
    """wandb's id format (8 of a-z0-9), drawn without touching the seeded random streams of the run."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
