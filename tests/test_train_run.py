"""Training end to end: in-process updates on an NF4 model (only LoRA and head change; every pair weighs the same
whatever the micro-batch layout), and the real entry points in subprocesses for every family (a complete run dir,
the base model untouched, max_steps=0, overwrite protection, the family check)."""

import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import bitsandbytes as bnb
import numpy as np
import pandas as pd
import pytest
import tiny
import torch
from accelerate import Accelerator
from entry_runs import run_side_by_side
from omegaconf import OmegaConf
from safetensors.torch import load_file

from lmsys.builders import build_encoders, build_loop_settings, build_model, build_tokenizer
from lmsys.config import (
    DataConfig,
    Family,
    LoraConfig,
    ModelConfig,
    OptimizerName,
    PaddingSide,
    Quantization,
    TrainConfig,
    TrainerConfig,
)
from lmsys.data.batching import collate
from lmsys.data.dataset import encode_split
from lmsys.data.io import read_pairs
from lmsys.data.schema import swap_abt
from lmsys.evaluation.metrics import tta_combine
from lmsys.evaluation.predict_loop import softmax
from lmsys.modeling.checkpoint import read_spec
from lmsys.training.optim import create_optimizer, parameter_groups, warmup_cosine_scheduler
from lmsys.training.plan import epoch_plan, iterate_updates
from lmsys.training.recipe import TrainingRecipe

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
TIMEOUT_S = 400
# adapter + head + tokenizer + what is needed to rebuild the model without the training config
CHECKPOINT_FILES = ("lmsys_checkpoint.json", "head.safetensors", "adapter_config.json", "adapter_model.safetensors",
                    "tokenizer_config.json")


# --- in process ----------------------------------------------------------------------------------------------------


def train_config(model_dir: Path, family: str, quantization: str, train: Path, **trainer) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(path=str(model_dir), family=Family(family), quantization=Quantization(quantization),
                          max_length=128),
        data=DataConfig(train_path=str(train)),
        lora=LoraConfig(dropout=0.0),
        trainer=TrainerConfig(**{"max_steps": 2, "batch_size": 3, "grad_accum": 1, "max_tokens": 512, **trainer}),
    )


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, the 4-bit weights as their raw packed bytes plus their quantization state."""
    state = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        state[name] = tensor.detach().clone()
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            for key, value in module.weight.quant_state.as_dict(packed=True).items():
                state[f"{name}.weight.{key}"] = value.detach().clone()
    return state


def test_two_updates_change_only_lora_and_head(tiny_models, arena_files):
    config = train_config(tiny_models["llama"], "llama", "nf4", arena_files["train"])
    model, spec, tokenizer = tiny.build_preference_model(tiny_models["llama"], "llama", "nf4")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    split = encode_split(read_pairs(arena_files["train"], require_labels=True), build_encoders(spec, tokenizer))
    settings = build_loop_settings(config, spec, len(split), 1, tokenizer.pad_token_id)
    assert settings.total_updates == 2
    optimizer = create_optimizer(parameter_groups(model, 1e-3, 1e-3, 1.0, 0.01), config.optimizer.name, (0.9, 0.999),
                                 1e-8)
    scheduler = warmup_cosine_scheduler(optimizer, settings.total_updates, 0.0, 1.0)
    recipe = TrainingRecipe(Accelerator(cpu=True), model, optimizer, scheduler, settings, split)
    before = snapshot(model)
    model.train()
    losses = [recipe.update(update).loss for update in iterate_updates(split, settings, 0, 1)]
    after = snapshot(model)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)

    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert changed <= trainable, sorted(changed - trainable)[:5]
    assert all(".lora_" in name or name.startswith("head.") for name in trainable)
    lora_b = {name for name in trainable if ".lora_B." in name}
    head = {name for name in trainable if name.startswith("head.")}
    assert lora_b and lora_b <= changed and head <= changed
    assert all(torch.count_nonzero(before[name]) == 0 for name in lora_b)  # peft starts LoRA-B at zero
    # LoRA-A gets a gradient from the second update on (B is zero in the first)
    assert {name for name in trainable if ".lora_A." in name} <= changed
    base_4bit = [name for name in before if name.endswith(".base_layer.weight")]
    assert base_4bit and before[base_4bit[0]].dtype == torch.uint8 and not changed & set(base_4bit)


def test_every_pair_weighs_the_same_whatever_the_micro_batches(tiny_models, arena_files):
    """Gradient of one update = gradient of the mean loss over its pairs, for packed and padded micro-batches."""
    pairs = read_pairs(arena_files["train"], require_labels=True)[:6]
    config = train_config(tiny_models["llama"], "llama", "none", arena_files["train"], batch_size=6)
    grads = {}
    for layout, batching in {
        "one packed row": {"packed": True, "max_tokens": 4096, "row_tokens": 4096},
        "one micro-batch, a pair a row": {"packed": True, "max_tokens": 4096},
        "packed, one pair each": {"packed": True, "max_tokens": 128},
        "padded, 4 + 2": {"packed": False, "batch_size": 4},
        "padded, 1 each": {"packed": False, "batch_size": 1},
    }.items():
        model, spec, tokenizer = tiny.build_preference_model(tiny_models["llama"], "llama", "none")
        split = encode_split(pairs, build_encoders(spec, tokenizer))
        settings = build_loop_settings(config, spec, len(split), 1, tokenizer.pad_token_id)
        settings = replace(settings, seed=0, batching=replace(settings.batching, **batching))
        update = epoch_plan(split, 0, settings, 0, 1)[0]
        assert update.n_examples == 6
        model.train()
        loss = TrainingRecipe(Accelerator(cpu=True), model, None, None, settings, split).accumulate_gradients(update)
        grads[layout] = (loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                         len(update.micro_batches))
    assert grads["packed, one pair each"][2] == 6 and grads["padded, 4 + 2"][2] == 2
    reference_loss, reference, _ = grads["one packed row"]
    # the reference itself: the plain mean loss over the six pairs in one forward pass
    model, spec, tokenizer = tiny.build_preference_model(tiny_models["llama"], "llama", "none")
    split = encode_split(pairs, build_encoders(spec, tokenizer))
    batch = collate(split.forward, replace(settings.batching, packed=False, padding_side=PaddingSide.right))
    model.train()
    mean_loss = torch.nn.functional.cross_entropy(model(**batch.model_inputs(CPU)), batch.targets)
    mean_loss.backward()
    assert reference_loss == pytest.approx(mean_loss.item(), abs=1e-5)
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(reference[name], param.grad, atol=1e-6, rtol=1e-4)
    for layout, (loss, gradients, _) in grads.items():
        assert loss == pytest.approx(reference_loss, abs=1e-5), layout
        for name, grad in gradients.items():
            torch.testing.assert_close(grad, reference[name], atol=1e-6, rtol=1e-4, msg=f"{layout}: {name}")


def test_packed_and_padded_training_follow_the_same_loss_curve(tiny_models, tmp_path):
    """20 optimizer updates (5 epochs of 16 pairs) on an NF4 model with LoRA: packed rows and padded batches give
    the same loss at every update, while the loss itself falls (long enough for differences to compound)."""
    train = tmp_path / "train.csv"
    tiny.arena_frame(16, seed=3).to_csv(train, index=False)
    pairs = read_pairs(train, require_labels=True)
    curves = {}
    for packed in (False, True):
        config = train_config(tiny_models["llama"], "llama", "nf4", train, epochs=5, max_steps=None, batch_size=4,
                              packing=packed, max_tokens=160)
        model, spec, tokenizer = tiny.build_preference_model(tiny_models["llama"], "llama", "nf4")
        split = encode_split(pairs, build_encoders(spec, tokenizer))
        settings = build_loop_settings(config, spec, len(split), 1, tokenizer.pad_token_id)
        optimizer = create_optimizer(parameter_groups(model, 1e-3, 1e-2, 1.0, 0.0), OptimizerName.adamw,
                                     (0.9, 0.999), 1e-8)
        scheduler = warmup_cosine_scheduler(optimizer, settings.total_updates, 0.1, 0.1)
        recipe = TrainingRecipe(Accelerator(cpu=True), model, optimizer, scheduler, settings, split)
        losses, layouts = [], []
        model.train()
        for update in iterate_updates(split, settings, 0, 1):
            losses.append(recipe.update(update).loss)
            layouts.append(len(update.micro_batches))
        curves[packed] = (np.array(losses), layouts)
    (padded, padded_layout), (packed, packed_layout) = curves[False], curves[True]
    assert len(padded) == len(packed) == 20
    assert padded_layout != packed_layout  # the two runs really cut their updates differently
    assert padded[-4:].mean() < padded[:4].mean() - 0.1 and padded[-1] < padded[0]  # the updates change the model
    np.testing.assert_allclose(packed, padded, atol=1e-4, rtol=0)


# --- the entry points ----------------------------------------------------------------------------------------------


def entry(family: str) -> str:
    return str(REPO / "lmsys" / "code" / f"train_r_{family}.py")


def entry_command(family: str, config_name: str, model_dir: Path, files: dict, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, entry(family), "--config-name", config_name, f"model.path={model_dir}",
        f"data.train_path={files['train']}", f"data.valid_path={files['valid']}", f"hydra.run.dir={run_dir}",
        "trainer.max_steps=2", "model.max_length=128", "trainer.max_tokens=512", "trainer.batch_size=2",
        "trainer.grad_accum=1", *extra,
    ]


def run_entry(family: str, config_name: str, model_dir: Path, files: dict, run_dir: Path, *extra: str,
              timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    command = entry_command(family, config_name, model_dir, files, run_dir, *extra)
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def check_run_dir(run_dir: Path, model_dir: Path, valid: Path, updates: int) -> dict:
    for name in ("config.yaml", "train.log", "metrics.json", "oof.csv", "checkpoint"):
        assert (run_dir / name).exists(), name
    for name in CHECKPOINT_FILES:
        assert (run_dir / "checkpoint" / name).is_file(), name
    assert not list(run_dir.glob(".*.old")) and not list(run_dir.glob(".checkpoint.*"))  # no half-written leftovers

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["updates"] == updates and metrics["best"]["step"] == updates
    assert [h["step"] for h in metrics["history"]] == [updates]
    assert math.isfinite(metrics["best"]["log_loss"]) and metrics["n_valid_pairs"] == 6
    config = OmegaConf.load(run_dir / "config.yaml")  # resolved
    assert config.model.path == str(model_dir) and config.trainer.max_steps == updates
    assert "eval at update" in (run_dir / "train.log").read_text()

    oof = pd.read_csv(run_dir / "oof.csv", dtype={"id": str})
    swapped = ["swapped_logit_a", "swapped_logit_b", "swapped_logit_tie"] if config.trainer.eval_tta else []
    assert list(oof.columns) == ["id", "winner_model_a", "winner_model_b", "winner_tie", "label",
                                 "logit_a", "logit_b", "logit_tie", *swapped]  # without eval TTA: the (A, B) pass only
    valid_pairs = read_pairs(valid, require_labels=True)
    assert oof["id"].tolist() == [p.id for p in valid_pairs]
    assert oof["label"].tolist() == [p.label for p in valid_pairs]
    probs = oof[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    expected = softmax(oof[["logit_a", "logit_b", "logit_tie"]].to_numpy())
    if swapped:  # eval TTA (prob mode): the mean of both orientations' probabilities
        expected = (expected + softmax(oof[swapped].to_numpy())) / 2
    np.testing.assert_allclose(probs, expected, atol=1e-6)

    spec = read_spec(run_dir / "checkpoint")
    assert Path(spec.base_model_path) == model_dir.resolve() and spec.max_length == 128
    adapter = load_file(str(run_dir / "checkpoint" / "adapter_model.safetensors"))
    assert adapter and all(".lora_" in key for key in adapter)  # nothing of the frozen base is saved
    return {"metrics": metrics, "oof": oof, "adapter": adapter,
            "head": load_file(str(run_dir / "checkpoint" / "head.safetensors"))}


def reload_and_predict(checkpoint: Path, valid: Path) -> np.ndarray:
    """Probabilities for the validation pairs from a reloaded checkpoint, without the training config: with swap
    TTA (the CPU trainer's default), the mean of the (A, B) pass and the (B, A) pass mapped back."""
    spec = read_spec(checkpoint)
    tokenizer = build_tokenizer(checkpoint, False)
    split = encode_split(read_pairs(valid, require_labels=True), build_encoders(spec, tokenizer))
    model = build_model(spec, None, None, CPU, adapter_dir=checkpoint).eval()

    def probs(examples) -> np.ndarray:
        batch = collate(examples, tiny.batching(False, tokenizer.pad_token_id, spec.padding_side, spec.max_length))
        with torch.no_grad():
            return torch.softmax(model(**batch.model_inputs(CPU)), -1).numpy()

    return tta_combine(probs(split.forward), swap_abt(probs(split.swapped)), "prob")


@pytest.fixture(scope="module")
def llama_run(tiny_models, arena_files, tmp_path_factory):
    model_dir = tiny_models["llama"]
    base = digest(model_dir)
    run_dir = tmp_path_factory.mktemp("runs") / "llama"
    result = run_entry("llama", "conf_r_llama_smol", model_dir, arena_files, run_dir)
    assert result.returncode == 0, result.stderr[-4000:]
    assert digest(model_dir) == base  # the base model directory is untouched
    return run_dir


def test_llama_run_dir_is_complete(llama_run, tiny_models, arena_files):
    run = check_run_dir(llama_run, tiny_models["llama"], arena_files["valid"], updates=2)
    assert any(torch.count_nonzero(t) for key, t in run["adapter"].items() if ".lora_B." in key)
    spec = read_spec(llama_run / "checkpoint")
    assert spec.template.value == "chatml" and spec.quantization.value == "nf4"
    # the checkpoint alone reproduces the run's validation predictions
    probs = reload_and_predict(llama_run / "checkpoint", arena_files["valid"])
    np.testing.assert_allclose(probs, run["oof"][["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy(),
                               atol=2e-3)


@pytest.fixture(scope="module")
def rerun(llama_run, tiny_models, arena_files, tmp_path_factory):
    """A copy of the finished llama run; a second run into it without overwrite=true, then one with it and
    trainer.max_steps=0 (the same seed: the same initial weights)."""
    root = tmp_path_factory.mktemp("rerun")
    run_dir, resumed, same_plan, other_plan = (root / name for name in ("again", "resumed", "same_plan", "other_plan"))
    for directory in (run_dir, resumed, same_plan, other_plan):  # one each: they run at once, and each takes its lock
        shutil.copytree(llama_run, directory)
    finished = tree_digest(run_dir)
    refused, skipped, same, other = run_side_by_side([entry_command(
        "llama", "conf_r_llama_smol", tiny_models["llama"], arena_files, directory, *extra) for directory, extra in (
            (run_dir, ()), (resumed, ("resume=true",)),
            # the same pairs per update, another log frequency: a resume of the unfinished run would go on
            (same_plan, ("resume=true", "trainer.batch_size=1", "trainer.grad_accum=2", "trainer.log_frequency=7")),
            (other_plan, ("resume=true", "optimizer.lr=0.1")))], cwd=REPO)
    untouched = all(tree_digest(directory) == finished for directory in (run_dir, resumed, same_plan, other_plan))
    result = run_entry("llama", "conf_r_llama_smol", tiny_models["llama"], arena_files, run_dir, "overwrite=true",
                       "trainer.max_steps=0")
    assert result.returncode == 0, result.stderr[-4000:]
    return {"dir": run_dir, "refused": refused, "skipped": skipped, "untouched": untouched, "same": same,
            "other": other}


def tree_digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_refuses_to_overwrite_a_finished_run(rerun):
    refused = rerun["refused"]
    assert refused.returncode != 0
    assert "overwrite=true" in refused.stderr and str(rerun["dir"]) in refused.stderr
    assert "Loading weights" not in refused.stderr  # refused before any model is loaded
    assert rerun["untouched"]
    # resume=true (e.g. a resumed sweep's finished job) is no error: nothing to resume, the run as it was
    skipped = rerun["skipped"]
    assert skipped.returncode == 0 and "holds a finished run: nothing to resume" in skipped.stderr, skipped.stderr
    # judged by the run's plan (recorded in run_info.json), as a resume of it unfinished would be
    assert rerun["same"].returncode == 0 and "nothing to resume" in rerun["same"].stderr, rerun["same"].stderr
    other = rerun["other"]
    assert other.returncode == 2 and other.stderr.strip().splitlines()[-1].startswith(
        f"error: resume=true: {rerun['dir'].parent / 'other_plan'} finished under other settings (optimizer: "), \
        other.stderr[-3000:]


def test_max_steps_0_only_evaluates_the_initial_model(rerun, llama_run, tiny_models, arena_files):
    initial = check_run_dir(rerun["dir"], tiny_models["llama"], arena_files["valid"], updates=0)
    log = (rerun["dir"] / "train.log").read_text()
    assert "eval at update 0" in log.split("run dir ")[-1]
    assert "update 1 loss" not in log.split("run dir ")[-1]
    trained = check_run_dir(llama_run, tiny_models["llama"], arena_files["valid"], updates=2)
    assert initial["adapter"].keys() == trained["adapter"].keys()
    for key, value in initial["adapter"].items():
        if ".lora_B." in key:
            assert torch.count_nonzero(value) == 0, key  # untrained
            assert torch.count_nonzero(trained["adapter"][key]) > 0, key
        else:
            assert not torch.equal(value, trained["adapter"][key]), key  # LoRA-A moved in the second update
    assert initial["head"].keys() == trained["head"].keys()
    assert all(not torch.equal(initial["head"][k], trained["head"][k]) for k in initial["head"])


def test_overwrite_starts_a_fresh_train_log(rerun):
    assert "update 1 loss" not in (rerun["dir"] / "train.log").read_text()


# kind -> (entry point's family, experiment file, overrides that make a GPU-scale file run on the CPU, template,
# attention kernel); the Qwen and Mistral runs use their real experiment files (full swap, swap TTA)
CPU_GROUPS = ("data=default", "data.valid_fold=null", "optimizer=adamw_cpu", "trainer=cpu",
              "model.gradient_checkpointing=false")
FAMILY_RUNS = {
    "gemma2": ("gemma", "conf_r_gemma_270m", (), "gemma", "eager"),
    "gemma3": ("gemma", "conf_r_gemma_270m", (), "gemma", "sdpa"),
    "qwen2": ("qwen", "conf_r_qwen25_14b", CPU_GROUPS, "chatml", "sdpa"),
    "qwen3": ("qwen", "conf_r_qwen25_14b", CPU_GROUPS, "chatml", "sdpa"),
    "mistral": ("mistral", "conf_r_mistral_7b", CPU_GROUPS, "mistral", "sdpa"),
}


@pytest.fixture(scope="module")
def family_runs(tiny_models, arena_files, tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess,
                                                                               dict]]:
    """Every family's run, all started at once (most of each is the interpreter's imports, which two cores do side
    by side): kind -> (run dir, finished process, the model dir's digest before the run)."""
    work = tmp_path_factory.mktemp("families")
    before = {kind: digest(tiny_models[kind]) for kind in FAMILY_RUNS}
    commands = {kind: entry_command(family, config_name, tiny_models[kind], arena_files, work / kind, *overrides)
                for kind, (family, config_name, overrides, _, _) in FAMILY_RUNS.items()}
    results = run_side_by_side(list(commands.values()), cwd=REPO)
    return {kind: (work / kind, result, before[kind]) for kind, result in zip(commands, results, strict=True)}


@pytest.mark.parametrize("kind", FAMILY_RUNS)
def test_every_family_runs(kind, tiny_models, arena_files, family_runs):
    family, _, _, template, attention = FAMILY_RUNS[kind]
    model_dir = tiny_models[kind]
    run_dir, result, before = family_runs[kind]
    assert result.returncode == 0, result.stderr[-4000:]
    assert digest(model_dir) == before
    run = check_run_dir(run_dir, model_dir, arena_files["valid"], updates=2)
    assert any(torch.count_nonzero(t) for key, t in run["adapter"].items() if ".lora_B." in key)
    spec = read_spec(run_dir / "checkpoint")
    assert spec.family.value == family and spec.template.value == template
    assert spec.model_type == {"gemma3": "gemma3_text"}.get(kind, kind)
    assert spec.attn_implementation.value == attention
    config = OmegaConf.load(run_dir / "config.yaml")
    if family in ("qwen", "mistral"):  # the experiment file's own values survived the CPU overrides
        assert config.trainer.swap_augmentation == "full" and config.trainer.eval_tta


def test_a_gemma_config_on_the_llama_entry_point_fails_fast(tiny_models, arena_files, tmp_path):
    start = time.monotonic()
    result = run_entry("llama", "conf_r_gemma_270m", tiny_models["gemma3"], arena_files, tmp_path / "run", timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 2
    assert elapsed < 10, elapsed
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # nothing written


@pytest.mark.parametrize("entry_family,config_name,kind,named", [
    ("gemma", "conf_r_llama_smol", "llama", "train_r_llama.py"),
    ("mistral", "conf_r_qwen25_14b", "qwen2", "train_r_qwen.py"),
])
def test_the_family_check_says_why(entry_family, config_name, kind, named, tiny_models, arena_files, tmp_path):
    result = run_entry(entry_family, config_name, tiny_models[kind], arena_files, tmp_path / "run", timeout=60)
    assert result.returncode == 2
    assert named in result.stderr and entry_family in result.stderr
    assert (REPO / "lmsys" / "code" / named).is_file()  # the script it names exists


def test_a_diverged_run_and_a_model_without_weights_are_one_error_line(tiny_models, arena_files, tmp_path):
    """A loss gone NaN mid-run (here lr 1e30) stops the run with one line, exit 2, as a setup error does (it was a
    traceback, exit 1); a model.path without weights is refused before the run dir is claimed."""
    weightless = shutil.copytree(tiny_models["llama"], tmp_path / "weightless")
    (weightless / "model.safetensors").unlink()
    diverging = ("trainer.max_steps=4", "optimizer.lr=1e30", "optimizer.head_lr=1e30", "trainer.max_grad_norm=null",
                 "model.quantization=none")
    diverged, refused = run_side_by_side([
        entry_command("llama", "conf_r_llama_smol", tiny_models["llama"], arena_files, tmp_path / "nan", *diverging),
        entry_command("llama", "conf_r_llama_smol", weightless, arena_files, tmp_path / "none")], cwd=REPO)
    assert diverged.returncode == 2 and "Traceback" not in diverged.stderr, diverged.stderr[-3000:]
    error = [line for line in diverged.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and re.match(r"error: update \d: the training loss is (nan|inf); no step taken", error[0])
    assert not (tmp_path / "nan" / "metrics.json").exists()  # no finished run to pass for a result
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        f"error: model.path={weightless}: no model.safetensors (nor model.safetensors.index.json): the weights are "
        f"missing")
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())


def test_a_run_dir_that_is_not_a_run_is_refused_and_kept(tiny_models, arena_files, tmp_path):
    """Without and with overwrite=true (both started at once)."""
    works, commands = [], []
    for extra in [(), ("overwrite=true",)]:
        work = tmp_path / f"work{len(works)}"  # e.g. hydra.run.dir=. in a project directory
        (work / "src").mkdir(parents=True)
        (work / "src" / "model.py").write_text("mine")
        (work / "config.yaml").write_text("the user's own config\n")
        works.append((work, tree_digest(work)))
        commands.append(entry_command("llama", "conf_r_llama_smol", tiny_models["llama"], arena_files, work, *extra))
    for (work, before), result in zip(works, run_side_by_side(commands, cwd=REPO), strict=True):
        assert result.returncode != 0
        assert f"{work} is not a run directory and is not empty" in result.stderr
        assert "Loading weights" not in result.stderr
        assert tree_digest(work) == before and sorted(p.name for p in work.iterdir()) == ["config.yaml", "src"]
