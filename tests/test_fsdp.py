"""FSDP on CPU: two gloo processes train a tiny Llama under torch FSDP2 with the settings of
conf/accelerate/fsdp_qlora.yaml (4-bit NF4 weights sharded, gradient checkpointing on, as its command runs it) and
fsdp_full.yaml (full fine-tuning, also in bf16 with Kahan-summed AdamW), and must follow the loss curve of one
unsharded process, save checkpoints that one process reads back, and resume exactly."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from ddp_worker import load_config
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
from safetensors.torch import load_file
from test_ddp import single_process_probs
from tiny import arena_frame

from lmsys.builders import build_encoders, build_loop_settings, build_spec, build_splits, build_tokenizer
from lmsys.cluster import accelerate_env
from lmsys.data.dataset import encode_split
from lmsys.modeling.checkpoint import read_spec
from lmsys.runs import LOCK_FILE, STATE_DIR
from lmsys.training.plan import epoch_plan

UPDATES = 4  # 27 pairs, 8 per update (2 ranks x 4, or 1 process x 8); the last 3 are dealt 2 + 1
STATE_AT = 3  # the state left in the run dir, which the resumed run starts from
N_VALID = 7
LAUNCHER = REPO / "tests" / "fsdp_cpu_launch.py"
FULL = ("model.finetune=full", "model.quantization=none")
CHECKPOINTING = ("model.gradient_checkpointing=true",)  # as fsdp_qlora.yaml's command runs it; recomputation is exact
FULL_BF16 = (*FULL, "model.compute_dtype=bfloat16")  # bf16 weights: optimizer.kahan_summation's default turns it on


def fsdp_env(config_name: str) -> dict[str, str]:
    """The FSDP variables `accelerate launch --config_file conf/accelerate/<config_name>.yaml` sets."""
    fsdp = accelerate_env(REPO / "conf" / "accelerate" / f"{config_name}.yaml")
    assert fsdp["ACCELERATE_USE_FSDP"] == "true" and fsdp["FSDP_VERSION"] == "2"
    return entry_env(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", **fsdp)


def start_fsdp(config_name: str, args: list[str], log: Path):
    return start(torchrun_command(LAUNCHER, [str(ENTRY), "--config-name", "conf_r_llama_smol", *args]), log,
                 fsdp_env(config_name))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models) -> SimpleNamespace:
    """QLoRA and full fine-tuning, each as one plain process and as two FSDP processes, and full fine-tuning of bf16
    weights under FSDP (all five at once); then the FSDP QLoRA and bf16 runs resumed from their states at update
    STATE_AT in fresh dirs."""
    root = tmp_path_factory.mktemp("fsdp")
    arena_frame(27, seed=13).to_csv(root / "train.csv", index=False)
    arena_frame(N_VALID, seed=14, start_id=300).to_csv(root / "valid.csv", index=False)
    base = tiny_overrides(tiny_models["llama"], root / "train.csv", root / "valid.csv", trainer__max_tokens=128,
                          trainer__max_steps=UPDATES, trainer__state_frequency=STATE_AT, trainer__grad_accum=1,
                          trainer__eval_max_tokens=128, seed=3)
    dirs = {name: root / name for name in ("single_lora", "fsdp_lora", "single_full", "fsdp_full", "resumed",
                                           "fsdp_bf16", "resumed_bf16", "resumed_single")}
    single = ["trainer.batch_size=8"]  # the same 8 pairs per update as 2 ranks x 4
    started = [
        (start_entry([*base, *single, f"hydra.run.dir={dirs['single_lora']}"], root / "single_lora.log"), "single_lora"),
        (start_fsdp("fsdp_qlora", [*base, *CHECKPOINTING, f"hydra.run.dir={dirs['fsdp_lora']}"],
                    root / "fsdp_lora.log"), "fsdp_lora"),
        (start_entry([*base, *single, *FULL, f"hydra.run.dir={dirs['single_full']}"], root / "single_full.log"),
         "single_full"),
        (start_fsdp("fsdp_full", [*base, *FULL, f"hydra.run.dir={dirs['fsdp_full']}"], root / "fsdp_full.log"),
         "fsdp_full"),
        (start_fsdp("fsdp_full", [*base, *FULL_BF16, f"hydra.run.dir={dirs['fsdp_bf16']}"], root / "fsdp_bf16.log"),
         "fsdp_bf16"),
    ]
    for process, name in started:
        finish(process, root / f"{name}.log")
    resumes = []
    for name, source, config_name, extra in (("resumed", "fsdp_lora", "fsdp_qlora", CHECKPOINTING),
                                             ("resumed_bf16", "fsdp_bf16", "fsdp_full", FULL_BF16),
                                             ("resumed_single", "fsdp_lora", None, (*single, *CHECKPOINTING))):
        dirs[name].mkdir()
        shutil.copytree(dirs[source] / STATE_DIR, dirs[name] / STATE_DIR)
        args, log = [*base, *extra, "resume=true", f"hydra.run.dir={dirs[name]}"], root / f"{name}.log"
        resumes.append((start_entry(args, log) if config_name is None else start_fsdp(config_name, args, log), name))
    for process, name in resumes:
        finish(process, root / f"{name}.log")
    return SimpleNamespace(valid=root / "valid.csv", overrides=[*base, "trainer.batch_size=4"], **dirs)


def train_losses(run_dir: Path) -> dict[int, float]:
    return {entry["step"]: entry["train/loss"] for entry in read_metrics_log(run_dir) if "train/loss" in entry}


def probs(run_dir: Path) -> np.ndarray:
    return read_oof(run_dir)[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy()


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_fsdp_follows_the_single_process_loss_curve(runs, kind):
    single, fsdp = getattr(runs, f"single_{kind}"), getattr(runs, f"fsdp_{kind}")
    info = read_metrics(fsdp)
    assert info["updates"] == UPDATES
    assert (fsdp / "run_info.json").read_text().count('"distributed_type": "FSDP"') == 1
    want, got = train_losses(single), train_losses(fsdp)
    assert sorted(got) == list(range(1, UPDATES + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_fsdp_evaluation_gives_one_prediction_per_id_equal_to_one_process(runs, kind):
    single, fsdp = getattr(runs, f"single_{kind}"), getattr(runs, f"fsdp_{kind}")
    oof = read_oof(fsdp)
    assert oof["id"].tolist() == sorted(arena_frame(N_VALID, seed=14, start_id=300)["id"])
    np.testing.assert_allclose(probs(fsdp), probs(single), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_fsdp_checkpoint_is_unsharded_and_predicts_the_runs_evaluation(runs, kind):
    """The checkpoint written under FSDP, read by one process, gives the run's own validation predictions: the
    adapter (or, for full fine-tuning, the whole backbone) and the head were saved in full, not as one shard."""
    run_dir = getattr(runs, f"fsdp_{kind}")
    spec = read_spec(run_dir / "checkpoint")
    assert spec.merged == (kind == "full")
    assert trained_change(run_dir / "checkpoint", Path(spec.base_model_path), kind) > 1e-4  # training moved them
    single_probs, _, ids = single_process_probs(run_dir, runs.valid)
    order = np.argsort(np.array(ids, dtype=int))
    np.testing.assert_allclose(probs(run_dir), single_probs[order], rtol=0, atol=1e-5)


def trained_change(checkpoint: Path, base_model: Path, kind: str) -> float:
    """LoRA: the largest LoRA-B weight (they start at zero); full: the largest change of a backbone weight."""
    if kind == "lora":
        weights = load_file(str(checkpoint / "adapter_model.safetensors"))
        return max(float(v.abs().max()) for k, v in weights.items() if "lora_B" in k)
    trained, base = load_file(str(checkpoint / "model.safetensors")), load_file(str(base_model / "model.safetensors"))
    return max(float((trained[k] - base[f"model.{k}"]).abs().max()) for k in trained)


def test_the_ranks_run_unequal_micro_batch_counts(runs):
    """The FSDP runs above include updates where one rank has more micro-batches than the other (which it must
    match with zero-weight repeats, or the all-gathers deadlock)."""
    config = load_config(runs.overrides)
    train_pairs, _ = build_splits(config)
    tokenizer = build_tokenizer(config.model.path, False)
    spec = build_spec(config.model, config.data, True)
    split = encode_split(train_pairs, build_encoders(spec, tokenizer))
    settings = build_loop_settings(config, spec, len(split), 2, tokenizer.pad_token_id)
    plans = [epoch_plan(split, 0, settings, rank, 2) for rank in (0, 1)]
    counts = [(len(a.micro_batches), len(b.micro_batches)) for a, b in zip(*plans, strict=True)][:UPDATES]
    assert any(a != b for a, b in counts), counts


@pytest.mark.parametrize("resumed_name,run_name", [("resumed", "fsdp_lora"), ("resumed_bf16", "fsdp_bf16")])
def test_fsdp_resume_continues_like_the_uninterrupted_run(runs, resumed_name, run_name):
    """The state saved under FSDP (full trainable weights, optimizer state gathered to rank 0: for bf16 weights with
    their Kahan compensation) restores into the shards of a new FSDP run, which then computes update 4 as the
    uninterrupted run did."""
    resumed_dir, run_dir = getattr(runs, resumed_name), getattr(runs, run_name)
    resumed, uninterrupted = train_losses(resumed_dir), train_losses(run_dir)
    assert sorted(resumed) == list(range(STATE_AT + 1, UPDATES + 1))
    np.testing.assert_allclose(resumed[UPDATES], uninterrupted[UPDATES], rtol=0, atol=1e-6)
    assert read_metrics(resumed_dir)["best"]["log_loss"] == pytest.approx(
        read_metrics(run_dir)["best"]["log_loss"], abs=1e-6)
    np.testing.assert_allclose(probs(resumed_dir), probs(run_dir), rtol=0, atol=1e-6)


def test_a_state_saved_by_fsdp_ranks_resumes_in_one_process(runs):
    """The training state is one format whatever the launch (optimizer state keyed by parameter names): the FSDP
    QLoRA run's state at update 3, resumed by one process with the same 8 pairs per update (batch_size 8 instead of
    2 ranks x 4), computes update 4 and the evaluation as the FSDP run did, within FSDP's distance to one process."""
    resumed, uninterrupted = train_losses(runs.resumed_single), train_losses(runs.fsdp_lora)
    assert sorted(resumed) == list(range(STATE_AT + 1, UPDATES + 1))
    np.testing.assert_allclose(resumed[UPDATES], uninterrupted[UPDATES], rtol=0, atol=1e-4)
    assert (runs.resumed_single / "run_info.json").read_text().count('"num_processes": 1') == 1
    np.testing.assert_allclose(probs(runs.resumed_single), probs(runs.fsdp_lora), rtol=0, atol=1e-4)


def test_bf16_weights_train_with_kahan_summation_under_fsdp(runs):
    """Full fine-tuning of bf16 weights picks the Kahan-summed AdamW by default, under FSDP as in one process, and
    its updates reach the saved backbone."""
    log_text = (runs.fsdp_bf16 / "train.log").read_text()
    assert log_text.count("optimizer: optimi.AdamW, Kahan summation on (trainable weights in bfloat16, float32") == 1
    spec = read_spec(runs.fsdp_bf16 / "checkpoint")
    assert trained_change(runs.fsdp_bf16 / "checkpoint", Path(spec.base_model_path), "full") > 1e-4


def test_only_rank_zero_wrote_the_fsdp_run(runs):
    for run_dir in (runs.fsdp_lora, runs.fsdp_full):
        log_lines = (run_dir / "train.log").read_text().splitlines()
        assert sum("best validation log loss" in line for line in log_lines) == 1
        assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE]
