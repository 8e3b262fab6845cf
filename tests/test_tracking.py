"""Tracking: wandb (the real library, offline, no network) through accelerate's trackers, the local metrics.jsonl
log that every run writes, and no secret from the environment in any file of a run."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from entry_runs import (
    ENTRY,
    entry_env,
    finish,
    read_metrics,
    read_metrics_log,
    start,
    start_entry,
    tiny_overrides,
    torchrun_command,
)
from tiny import arena_frame
from wandb.proto.wandb_internal_pb2 import Record

from lmsys.training.state import LOOP_FILE, STATE_DIR

WANDB_ON = ("use_wandb=true",)  # offline by WANDB_MODE in the environment, as wandb documents it
SECRETS = {"WANDB_API_KEY": "sk-secret-123456", "KAGGLE_KEY": "kg-secret-654321"}
UPDATES = 2
# The .wandb transaction log: a 7-byte file header, then LevelDB-log records in 32 KiB blocks, each with a 7-byte
# header (crc32, length, type); a record split over blocks is FIRST, MIDDLE..., LAST.
BLOCK, HEADER = 32 * 1024, 7
FULL, LAST = 1, 4


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_models) -> SimpleNamespace:
    """The same run with wandb on (offline) and off, at the same time, both with secrets in the environment."""
    root = tmp_path_factory.mktemp("tracking")
    arena_frame(16, seed=9).to_csv(root / "train.csv", index=False)
    arena_frame(7, seed=10, start_id=300).to_csv(root / "valid.csv", index=False)
    wandb_dir = root / "wandb_home"
    wandb_dir.mkdir()
    env = entry_env(WANDB_CONFIG_DIR=str(wandb_dir), WANDB_MODE="offline", WANDB_SILENT="true", **SECRETS)
    overrides = tiny_overrides(tiny_models["llama"], root / "train.csv", root / "valid.csv", trainer__max_steps=UPDATES)
    on, off = root / "wandb_on", root / "wandb_off"
    processes = [
        (start_entry([*overrides, *WANDB_ON, "trainer.state_frequency=1", f"hydra.run.dir={on}"], root / "on.log",
                     env), root / "on.log"),
        (start_entry([*overrides, f"hydra.run.dir={off}"], root / "off.log", env), root / "off.log"),
    ]
    for process, log in processes:
        finish(process, log)
    return SimpleNamespace(on=on, off=off, wandb_dir=wandb_dir, overrides=overrides, env=env)


@pytest.fixture(scope="module")
def resumed_on(tracked, tmp_path_factory) -> Path:
    """The wandb run resumed from its state at update 2 (a copy of its dir, as if stopped before its end)."""
    root = tmp_path_factory.mktemp("tracking_resumed")
    run_dir, log = root / "run", root / "resumed.log"
    shutil.copytree(tracked.on, run_dir)
    (run_dir / "metrics.json").unlink()
    finish(start_entry([*tracked.overrides, *WANDB_ON, "resume=true", f"hydra.run.dir={run_dir}"], log, tracked.env),
           log)
    return run_dir


def wandb_records(path: Path) -> Iterator[Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = HEADER, b""
    while position + HEADER <= len(data):
        room = BLOCK - position % BLOCK
        _, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        if room < HEADER or kind == 0:  # the zero-filled tail of a block
            position += room
            continue
        pending += data[position + HEADER : position + HEADER + length]
        position += HEADER + length
        if kind in (FULL, LAST):
            yield Record.FromString(pending)
            pending = b""


def wandb_history(path: Path) -> dict[int, dict]:
    """step -> {metric: value} of the run's logged history."""
    history: dict[int, dict] = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(row["_step"], {}).update(row)
    return history


def wandb_config(path: Path) -> dict:
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "config":
            return {item.key: json.loads(item.value_json) for item in record.config.update}
    raise AssertionError(f"{path}: no config record")


@pytest.fixture(scope="module")
def wandb_file(tracked) -> Path:
    found = [*tracked.on.rglob("offline-run-*/run-*.wandb"), *tracked.wandb_dir.rglob("offline-run-*/run-*.wandb")]
    assert len(found) == 1, found
    return found[0]


def logged(run_dir: Path, name: str) -> dict[int, float]:
    return {entry["step"]: entry[name] for entry in read_metrics_log(run_dir) if name in entry}


def test_wandb_offline_run_has_train_and_eval_metrics(tracked, wandb_file):
    history = wandb_history(wandb_file)
    assert sorted(history) == list(range(1, UPDATES + 1))
    for name in ("train/loss", "train/lr", "train/grad_norm"):
        assert {step: row[name] for step, row in history.items()} == pytest.approx(logged(tracked.on, name), abs=1e-7)
    best = read_metrics(tracked.on)["best"]
    assert history[UPDATES]["eval/log_loss"] == pytest.approx(best["log_loss"], abs=1e-12)
    assert history[UPDATES]["eval/accuracy"] == pytest.approx(best["accuracy"], abs=1e-12)
    assert history[UPDATES]["eval/subsets/_type"] == "table-file"  # the per-subset table


def test_wandb_gets_the_run_config(tracked, wandb_file):
    config = wandb_config(wandb_file)
    assert config["seed"] == 0
    assert config["trainer"]["max_steps"] == UPDATES
    assert config["use_wandb"] is True


@pytest.mark.parametrize("wandb", ["on", "off"])
def test_metrics_log_is_written_whether_or_not_wandb_is_on(tracked, wandb):
    run_dir = getattr(tracked, wandb)
    assert sorted(logged(run_dir, "train/loss")) == list(range(1, UPDATES + 1))
    assert sorted(logged(run_dir, "train/lr")) == list(range(1, UPDATES + 1))
    assert logged(run_dir, "eval/log_loss") == {UPDATES: read_metrics(run_dir)["best"]["log_loss"]}
    assert logged(run_dir, "eval/subsets")[UPDATES]  # the per-subset table, as rows
    assert (run_dir / "wandb").exists() == (wandb == "on")


def test_a_resumed_run_continues_its_wandb_run(tracked, resumed_on):
    """The wandb run id is part of the training state: the resumed process logs into the same wandb run (its
    offline directory carries the same id) instead of starting a second one."""
    run_id = json.loads((tracked.on / STATE_DIR / LOOP_FILE).read_text())["loop"]["wandb_run_id"]
    assert len(run_id) >= 8
    offline_runs = sorted(path.name for path in (resumed_on / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(name.endswith(f"-{run_id}") for name in offline_runs), offline_runs
    assert read_metrics(resumed_on)["best"] == read_metrics(tracked.on)["best"]


def test_tracking_does_not_change_training(tracked):
    assert logged(tracked.on, "train/loss") == logged(tracked.off, "train/loss")
    assert read_metrics(tracked.on)["best"]["log_loss"] == read_metrics(tracked.off)["best"]["log_loss"]


def test_no_secret_in_any_file_of_a_run(tracked, wandb_file):
    files = [p for root in (tracked.on, tracked.off, tracked.wandb_dir) for p in root.rglob("*") if p.is_file()]
    assert wandb_file in files and len(files) > 20
    leaks = [(str(p), name) for p in files for name, secret in SECRETS.items() if secret.encode() in p.read_bytes()]
    assert leaks == []


def test_a_wandb_that_cannot_start_is_one_error_line_before_the_model_loads(tiny_models, tmp_path):
    """wandb.init ran after the model had loaded and its error was a traceback (WANDB_MODE was ignored, too)."""
    arena_frame(8, seed=9).to_csv(tmp_path / "train.csv", index=False)
    (tmp_path / "home").mkdir()  # no ~/.netrc: no API key anywhere
    env = {key: value for key, value in entry_env(HOME=str(tmp_path / "home"), WANDB_MODE="online").items()
           if key != "WANDB_API_KEY"}
    overrides = tiny_overrides(tiny_models["llama"], tmp_path / "train.csv", tmp_path / "train.csv")
    log, ddp_log = tmp_path / "run.log", tmp_path / "ddp.log"
    process = start_entry([*overrides, "use_wandb=true", f"hydra.run.dir={tmp_path / 'run'}"], log, env)
    # two processes: wandb starts on rank 0 alone, and rank 1 stops with it (it loaded the model and died in gloo)
    ddp = start(torchrun_command(ENTRY, ["--config-name", "conf_r_llama_smol", *overrides, "use_wandb=true",
                                         f"hydra.run.dir={tmp_path / 'ddp'}"]),
                ddp_log, {**env, "WANDB_MODE": "bogus", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    assert process.wait(timeout=120) == 2 and ddp.wait(timeout=180) != 0
    lines = [line for line in log.read_text().splitlines() if line.startswith("error:")]
    assert lines == [next(line for line in lines if line.startswith("error: wandb could not start: No API key"))]
    assert not (tmp_path / "run" / "checkpoint").exists() and "Traceback" not in log.read_text()
    assert not (tmp_path / "run" / "lmsys_run.txt").exists()  # no killed run left: the corrected command goes ahead
    ddp_lines = [line for line in ddp_log.read_text().splitlines() if line.startswith("error:")]
    assert len(ddp_lines) == 2 and all("check the wandb.* options and the WANDB_* variables" in line
                                       for line in ddp_lines), ddp_log.read_text()[-3000:]
    assert "Loading weights" not in ddp_log.read_text() and "gloo" not in ddp_log.read_text()
