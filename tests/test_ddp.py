"""DDP on CPU: two real processes (torchrun, gloo) train and evaluate a tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from entry_runs import (
    ENTRY,
    REPO,
    entry_env,
    finish,
    read_metrics,
    read_metrics_log,
    read_oof,
    start,
    tiny_overrides,
    torchrun_command,
)
from omegaconf import OmegaConf
from tiny import arena_frame

from lmsys.builders import build_encoders, build_eval_batching, build_model, build_tokenizer
from lmsys.config import TrainConfig
from lmsys.data.dataset import encode_split
from lmsys.data.io import read_pairs
from lmsys.evaluation.metrics import accuracy, log_loss
from lmsys.evaluation.predict_loop import predict_split
from lmsys.modeling.checkpoint import read_spec

N_VALID = 7  # odd: the two ranks evaluate 4 and 3 pairs
# Updates of 4 * 2 pairs per rank: two full ones, then 3 pairs dealt 2 + 1. With a token budget of one pair per
# micro-batch (every encoded pair is longer than half of max_tokens) the last update has 2 micro-batches on rank 0
# and 1 on rank 1.
N_TRAIN = 35
SEED = 5
RUN_SUBDIR = Path("outputs") / "conf_r_llama_smol" / f"seed{SEED}"
# What predict_split reads of an accelerator, for one process (a real Accelerator would set global state).
SINGLE_PROCESS = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True, device=torch.device("cpu"))
CPU_DDP = {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory, tiny_models) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("ddp_data")
    arena_frame(N_TRAIN, seed=3).to_csv(root / "train.csv", index=False)
    arena_frame(N_VALID, seed=4, start_id=500).to_csv(root / "valid.csv", index=False)
    overrides = tiny_overrides(tiny_models["llama"], root / "train.csv", root / "valid.csv", trainer__max_tokens=128)
    return SimpleNamespace(root=root, valid=root / "valid.csv", overrides=overrides)


@pytest.fixture(scope="module")
def ddp(ddp_data) -> SimpleNamespace:
    """Two independent torchrun launches at once: a full run (3 updates, then evaluation) in a fresh working dir
    with the default run dir, each rank recording its run dir and file-system writes (tests/ddp_audit.py); and
    tests/ddp_worker.py."""
    root = ddp_data.root
    cwd, reports, worker_out = root / "cwd", root / "reports", root / "worker.json"
    cwd.mkdir()
    reports.mkdir()
    env = entry_env(**CPU_DDP)
    audit_args = [str(reports), str(ENTRY), "--config-name", "conf_r_llama_smol", *ddp_data.overrides, f"seed={SEED}"]
    run = start(torchrun_command(REPO / "tests" / "ddp_audit.py", audit_args), root / "run.log", env, cwd)
    worker = start(torchrun_command(REPO / "tests" / "ddp_worker.py", [str(worker_out), *ddp_data.overrides]),
                   root / "worker.log", env, root)
    finish(run, root / "run.log")
    finish(worker, root / "worker.log")
    return SimpleNamespace(
        cwd=cwd, run_dir=(cwd / RUN_SUBDIR).resolve(), worker=json.loads(worker_out.read_text()),
        ranks=[json.loads((reports / f"rank{rank}.json").read_text()) for rank in (0, 1)],
    )


def test_run_is_distributed_over_two_processes(ddp):
    info = json.loads((ddp.run_dir / "run_info.json").read_text())
    assert info["num_processes"] == 2
    assert info["distributed_type"] == "MULTI_CPU"
    assert read_metrics(ddp.run_dir)["updates"] == 3


def test_evaluation_gathers_each_valid_pair_exactly_once(ddp):
    oof = read_oof(ddp.run_dir)
    valid_ids = sorted(arena_frame(N_VALID, seed=4, start_id=500)["id"])
    assert len(oof) == N_VALID
    assert oof["id"].tolist() == valid_ids
    assert read_metrics(ddp.run_dir)["best"]["n"] == N_VALID


def single_process_probs(run_dir: Path, valid_csv: Path) -> tuple[np.ndarray, np.ndarray, list]:
    """The run's checkpoint evaluated by one process (this one), with the run's own evaluation batching."""
    config: TrainConfig = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(run_dir / "config.yaml")))
    checkpoint = run_dir / "checkpoint"
    spec = read_spec(checkpoint)
    tokenizer = build_tokenizer(checkpoint, spec.trust_remote_code)
    split = encode_split(read_pairs(valid_csv, require_labels=True), build_encoders(spec, tokenizer))
    model = build_model(spec, None, None, SINGLE_PROCESS.device, adapter_dir=checkpoint)
    predictions = predict_split(model, split, False, build_eval_batching(config, spec, tokenizer.pad_token_id),
                                SINGLE_PROCESS, show_progress=False)
    targets = np.array([pair.target for pair in split.pairs])
    return predictions.probs_ab, targets, [pair.id for pair in split.pairs]


def test_distributed_evaluation_equals_single_process_evaluation(ddp, ddp_data):
    probs, targets, ids = single_process_probs(ddp.run_dir, ddp_data.valid)
    order = np.argsort(np.array(ids, dtype=int))
    oof = read_oof(ddp.run_dir)
    ddp_probs = oof[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy()
    np.testing.assert_allclose(ddp_probs, probs[order], rtol=0, atol=1e-6)
    best = read_metrics(ddp.run_dir)["best"]
    assert best["log_loss"] == pytest.approx(log_loss(probs, targets), abs=1e-6)
    assert best["accuracy"] == pytest.approx(accuracy(probs, targets), abs=1e-12)


def test_all_ranks_use_the_same_run_dir(ddp):
    assert ddp.ranks[0]["run_dirs"] == [[str(ddp.run_dir), True]]
    assert ddp.ranks[1]["run_dirs"] == [[str(ddp.run_dir), False]]
    # The only dir made in the working dir is the deterministic one (a rank with a timestamped dir would add one).
    made = sorted(p.relative_to(ddp.cwd) for p in ddp.cwd.rglob("*") if p.is_dir())
    assert made == [RUN_SUBDIR.parents[1], RUN_SUBDIR.parent, RUN_SUBDIR, RUN_SUBDIR / "checkpoint"]


def writes_under(report: dict, root: Path) -> list[list[str]]:
    return [write for write in report["writes"] if Path(write[1]).is_relative_to(root)]


def test_only_rank_zero_writes_to_the_run_dir(ddp):
    rank0, rank1 = (writes_under(report, ddp.cwd) for report in ddp.ranks)
    written_by_0 = {Path(path).name for event, path in rank0 if event == "open"}
    assert {"train.log", "config.yaml", "run_info.json", "metrics.json", "oof.csv"} <= written_by_0  # the audit sees
    # Hydra creates the job dir (with its parents) on every rank before our code runs; beyond that, rank 1 writes
    # nothing.
    hydra_dirs = {str(ddp.run_dir), *(str(d) for d in ddp.run_dir.parents)}
    assert ["os.mkdir", str(ddp.run_dir)] in rank1  # the audit sees rank 1 too
    assert [write for write in rank1 if not (write[0] == "os.mkdir" and write[1] in hydra_dirs)] == []
    assert not [p.name for p in ddp.run_dir.iterdir() if p.name.startswith(".")]  # no temp or .old leftovers


def test_logs_are_written_once(ddp):
    log_lines = (ddp.run_dir / "train.log").read_text().splitlines()
    assert sum("run dir" in line for line in log_lines) == 1
    assert sum("best validation log loss" in line for line in log_lines) == 1
    train_steps = [entry["step"] for entry in read_metrics_log(ddp.run_dir) if "train/loss" in entry]
    assert train_steps == [1, 2, 3]


def test_gradients_are_synchronized_with_unequal_micro_batch_counts(ddp):
    assert ddp.worker["world_size"] == 2
    counts = ddp.worker["micro_batches"]
    assert counts[0] != counts[1]  # and the update finished: no rank waited for a sync the other never made
    assert ddp.worker["spread_before"] == 0.0
    assert ddp.worker["spread_synced"] == 0.0
    assert ddp.worker["spread_unsynced"] > 1e-6  # without the all-reduce the ranks drift apart: the check can fail


@pytest.mark.parametrize(("name", "distributed", "processes"), [("gpu8", "MULTI_GPU", 8), ("gpu1", "NO", 1)])
def test_accelerate_configs(name, distributed, processes):
    config = load_config_from_file(str(REPO / "conf" / "accelerate" / f"{name}.yaml"))
    # no autocast: bf16 comes from model.compute_dtype, and autocast would run the fp32 head in bf16
    assert (config.distributed_type.value, config.num_processes, config.mixed_precision) == (distributed, processes,
                                                                                              "no")
    assert not config.use_cpu
