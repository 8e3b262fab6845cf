"""DDP on CPU: two real processes (torchrun, gloo) train and evaluate a tiny Llama, as one process does with the
same pairs per update."""

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
    start_entry,
    tiny_overrides,
    torchrun_command,
)
from omegaconf import OmegaConf
from safetensors.torch import load_file
from tiny import arena_frame

from lmsys.builders import build_encoders, build_eval_batching, build_model, build_tokenizer
from lmsys.config import TrainConfig
from lmsys.data.dataset import encode_split
from lmsys.data.io import read_pairs
from lmsys.evaluation.metrics import accuracy, log_loss
from lmsys.evaluation.predict_loop import predict_split
from lmsys.modeling.checkpoint import HEAD_FILE, read_spec
from lmsys.runs import LOCK_FILE

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
# One process, the same 16 pairs per update as 2 ranks x batch_size 4 x grad_accum 2 (trainer/cpu.yaml).
SINGLE_PROCESS_BATCH = ["trainer.batch_size=8"]
# 2 processes vs 1, float32 reduction order only (measured: loss and grad norm 1.2e-7, one ulp of ~1.1; weights
# 1.6e-7; validation probabilities 1.6e-8). The weight bound is 1% of the smallest Adam step of the run
# (lr 1.65e-4): a pair weighted wrongly or missing on one rank changes the steps by a large fraction of lr.
CURVE_ATOL, WEIGHT_ATOL, PROB_ATOL = 1e-5, 2e-6, 1e-6


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory, tiny_models) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("ddp_data")
    arena_frame(N_TRAIN, seed=3).to_csv(root / "train.csv", index=False)
    arena_frame(N_VALID, seed=4, start_id=500).to_csv(root / "valid.csv", index=False)
    overrides = tiny_overrides(tiny_models["llama"], root / "train.csv", root / "valid.csv", trainer__max_tokens=128)
    return SimpleNamespace(root=root, valid=root / "valid.csv", overrides=overrides)


@pytest.fixture(scope="module")
def ddp(ddp_data) -> SimpleNamespace:
    """Three independent launches at once: a full run (3 updates, then evaluation) by torchrun in a fresh working
    dir with the default run dir, each rank recording its run dir and file-system writes (tests/ddp_audit.py);
    the same run by one process with the same pairs per update; and tests/ddp_worker.py."""
    root = ddp_data.root
    cwd, reports, worker_out, single_dir = root / "cwd", root / "reports", root / "worker.json", root / "single"
    cwd.mkdir()
    reports.mkdir()
    env = entry_env(**CPU_DDP)
    audit_args = [str(reports), str(ENTRY), "--config-name", "conf_r_llama_smol", *ddp_data.overrides, f"seed={SEED}"]
    run = start(torchrun_command(REPO / "tests" / "ddp_audit.py", audit_args), root / "run.log", env, cwd)
    single = start_entry([*ddp_data.overrides, *SINGLE_PROCESS_BATCH, f"seed={SEED}", f"hydra.run.dir={single_dir}"],
                         root / "single.log", env, root)
    worker = start(torchrun_command(REPO / "tests" / "ddp_worker.py", [str(worker_out), *ddp_data.overrides]),
                   root / "worker.log", env, root)
    sweep_args = ["--config-name", "conf_r_llama_smol", "-m", *ddp_data.overrides, "trainer.max_steps=1",
                  f"hydra.sweep.dir={root / 'sweep'}", "seed=1,2"]
    sweep = start(torchrun_command(ENTRY, sweep_args), root / "sweep.log", env, root)
    for process, log in ((run, "run.log"), (single, "single.log"), (worker, "worker.log"), (sweep, "sweep.log")):
        finish(process, root / log)
    return SimpleNamespace(
        cwd=cwd, run_dir=(cwd / RUN_SUBDIR).resolve(), single_dir=single_dir, sweep_dir=root / "sweep",
        worker=json.loads(worker_out.read_text()),
        ranks=[json.loads((reports / f"rank{rank}.json").read_text()) for rank in (0, 1)],
    )


def test_run_is_distributed_over_two_processes(ddp):
    info = json.loads((ddp.run_dir / "run_info.json").read_text())
    assert info["num_processes"] == 2
    assert info["distributed_type"] == "MULTI_CPU"
    assert read_metrics(ddp.run_dir)["updates"] == 3


def test_a_seed_sweep_runs_every_job_over_two_processes(ddp):
    """`-m seed=1,2` under torchrun: the second job failed at its first collective (the first job's end had
    destroyed the process group that accelerate's kept state took for alive)."""
    for seed in (1, 2):
        info = json.loads((ddp.sweep_dir / f"seed{seed}" / "run_info.json").read_text())
        assert info["num_processes"] == 2 and read_metrics(ddp.sweep_dir / f"seed{seed}")["updates"] == 1
    assert json.loads((ddp.sweep_dir / "sweep_summary.json").read_text())["best_log_loss"]["n"] == 2


def test_evaluation_gathers_each_valid_pair_exactly_once(ddp):
    oof = read_oof(ddp.run_dir)
    valid_ids = sorted(arena_frame(N_VALID, seed=4, start_id=500)["id"])
    assert len(oof) == N_VALID
    assert oof["id"].tolist() == valid_ids
    assert read_metrics(ddp.run_dir)["best"]["n"] == N_VALID


def single_process_probs(run_dir: Path, valid_csv: Path) -> tuple[np.ndarray, np.ndarray, list]:
    """The run's checkpoint evaluated by one process (this one), with the run's own evaluation batching and TTA."""
    config: TrainConfig = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(run_dir / "config.yaml")))
    checkpoint = run_dir / "checkpoint"
    spec = read_spec(checkpoint)
    tokenizer = build_tokenizer(checkpoint, spec.trust_remote_code)
    split = encode_split(read_pairs(valid_csv, require_labels=True), build_encoders(spec, tokenizer))
    model = build_model(spec, None, None, SINGLE_PROCESS.device, adapter_dir=checkpoint)
    predictions = predict_split(model, split, config.trainer.eval_tta,
                                build_eval_batching(config, spec, tokenizer.pad_token_id), SINGLE_PROCESS,
                                show_progress=False)
    targets = np.array([pair.target for pair in split.pairs])
    return predictions.combined(config.trainer.tta_mode.value), targets, [pair.id for pair in split.pairs]


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
    assert not [p.name for p in ddp.run_dir.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE]


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


def training_curves(run_dir: Path) -> dict[str, list[float]]:
    """train/loss, train/grad_norm and train/lr of each update, in update order, from the run's metrics log."""
    logged = sorted((entry for entry in read_metrics_log(run_dir) if "train/loss" in entry), key=lambda e: e["step"])
    assert [entry["step"] for entry in logged] == list(range(1, len(logged) + 1))
    return {key: [entry[key] for entry in logged] for key in ("train/loss", "train/grad_norm", "train/lr")}


def trained_weights(run_dir: Path) -> dict[str, np.ndarray]:
    checkpoint = run_dir / "checkpoint"
    weights = {**load_file(str(checkpoint / "adapter_model.safetensors")), **load_file(str(checkpoint / HEAD_FILE))}
    return {name: tensor.double().numpy() for name, tensor in weights.items()}


def test_two_processes_train_like_one_with_the_same_pairs_per_update(ddp):
    """Same data, same pairs per update (16), no dropout: the loss, gradient-norm and lr curves, the final LoRA
    and head weights and the validation predictions of the 2-process run are the 1-process run's, up to float32
    reduction order (rows packed per rank instead of per update, the gradient all-reduce)."""
    info = json.loads((ddp.single_dir / "run_info.json").read_text())
    assert (info["num_processes"], read_metrics(ddp.single_dir)["updates"]) == (1, 3)
    one, two = training_curves(ddp.single_dir), training_curves(ddp.run_dir)
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=0, atol=CURVE_ATOL, err_msg=key)
    one_weights, two_weights = trained_weights(ddp.single_dir), trained_weights(ddp.run_dir)
    assert sorted(one_weights) == sorted(two_weights)
    for name, weight in one_weights.items():
        np.testing.assert_allclose(two_weights[name], weight, rtol=0, atol=WEIGHT_ATOL, err_msg=name)
    # the weights compared are trained ones: LoRA B starts at zero and moved by far more than the tolerance
    assert max(np.abs(w).max() for name, w in one_weights.items() if "lora_B" in name) > 100 * WEIGHT_ATOL
    np.testing.assert_allclose(oof_probs(ddp.run_dir), oof_probs(ddp.single_dir), rtol=0, atol=PROB_ATOL)


def oof_probs(run_dir: Path) -> np.ndarray:
    return read_oof(run_dir)[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy()


@pytest.mark.parametrize(("name", "distributed", "processes"), [("gpu8", "MULTI_GPU", 8), ("gpu1", "NO", 1)])
def test_accelerate_configs(name, distributed, processes):
    config = load_config_from_file(str(REPO / "conf" / "accelerate" / f"{name}.yaml"))
    # no autocast: bf16 comes from model.compute_dtype, and autocast would run the fp32 head in bf16
    assert (config.distributed_type.value, config.num_processes, config.mixed_precision) == (distributed, processes,
                                                                                              "no")
    assert not config.use_cpu
