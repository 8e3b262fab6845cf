"""Prediction from a checkpoint: submission format, exact swap symmetry with TTA, independence from the
micro-batch a pair lands in, and clear errors (before any model loads) for bad test files and checkpoints."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from accelerate import Accelerator
from entry_runs import run_side_by_side
from tiny import arena_frame

from lmsys.builders import (
    build_encoders,
    build_inference_batching,
    build_model,
    build_prediction_spec,
    build_spec,
    build_tokenizer,
)
from lmsys.cli import parse_config
from lmsys.config import ConfigError, DataConfig, Family, LoraConfig, ModelConfig, Quantization
from lmsys.data.dataset import encode_split
from lmsys.data.io import DataError, read_pairs
from lmsys.data.schema import TARGET_COLUMNS
from lmsys.evaluation.predict_loop import predict_split
from lmsys.modeling.checkpoint import SPEC_FILE, CheckpointError, read_spec, save_checkpoint
from lmsys.modeling.compile import cpp_compiler_found
from lmsys.modeling.gated_mlp import CompiledGatedMLP
from lmsys.modeling.model_facts import ModelLoadError
from lmsys.prediction import load_prediction_model, predict_checkpoint, run_prediction
from lmsys.prediction_config import ExportConfig, PredictConfig, PseudoLabelConfig

ROOT = Path(__file__).resolve().parents[1]
SYMMETRY_TOLERANCE = 1e-5  # the bound on |P_A(file) - P_B(swapped file)|; we get exactly 0


def make_checkpoint(directory: Path, base: Path, seed: int = 0, r: int = 8, num_classes: int = 3) -> Path:
    """A checkpoint of a tiny Llama whose LoRA and head are random (not near zero), so the adapter matters."""
    model_cfg = ModelConfig(path=str(base), family=Family.llama, max_length=128, head_init_std=0.5,
                            num_classes=num_classes)
    spec = build_spec(model_cfg, DataConfig(train_path="unused"), packing=True)
    torch.manual_seed(seed)
    model = build_model(spec, model_cfg, LoraConfig(r=r, alpha=16, dropout=0.0), torch.device("cpu"))
    with torch.no_grad():
        for name, param in model.backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    save_checkpoint(directory, model, build_tokenizer(base, False), spec)
    return directory


def swapped_frame(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    out["response_a"], out["response_b"] = frame["response_b"], frame["response_a"]
    return out


def predict_cfg(**values: object) -> PredictConfig:
    """The checked command-line config for `key=value` arguments, as `python -m lmsys.predict` parses them."""
    return parse_config(PredictConfig, [f"{key}={value}" for key, value in values.items()])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_models) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("predict") / "checkpoint", tiny_models["llama"])


@pytest.fixture(scope="module")
def test_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("test_files")
    frame = arena_frame(24, seed=3, labelled=False, start_id=100).sample(frac=1.0, random_state=0)  # ids unordered
    paths = {"test": root / "test.csv", "swapped": root / "swapped.csv"}
    frame.to_csv(paths["test"], index=False)
    swapped_frame(frame).to_csv(paths["swapped"], index=False)
    return paths


def test_submission_format_and_outputs(checkpoint, test_files, tmp_path):
    out = tmp_path / "sub" / "submission.csv"
    run_prediction(predict_cfg(checkpoint=checkpoint, **{"data.test_path": test_files["test"]}, output=out,
                               logits_output=tmp_path / "logits.csv", show_progress=False))
    sub = pd.read_csv(out, dtype={"id": str})
    src = pd.read_csv(test_files["test"], dtype={"id": str})
    assert list(sub.columns) == ["id", *TARGET_COLUMNS]
    assert list(sub.id) == list(src.id)  # one row per input id, in input order
    probs = sub[list(TARGET_COLUMNS)].to_numpy()
    assert np.isfinite(probs).all() and (probs > 0).all()
    assert np.abs(probs.sum(1) - 1).max() <= 1e-6
    logits = pd.read_csv(tmp_path / "logits.csv", dtype={"id": str})
    assert list(logits.id) == list(src.id) and logits.shape[1] == 7  # id + both orientations
    assert not list(tmp_path.glob("**/.*"))  # no temporary leftovers from the atomic writes


def test_tta_predictions_are_swap_symmetric(checkpoint, test_files, tmp_path):
    subs = {}
    for name, path in test_files.items():
        run_prediction(predict_cfg(checkpoint=checkpoint, **{"data.test_path": path}, output=tmp_path / f"{name}.csv",
                                   show_progress=False))
        subs[name] = pd.read_csv(tmp_path / f"{name}.csv")
    a, b = subs["test"], subs["swapped"]
    gap = max(np.abs(a.winner_model_a - b.winner_model_b).max(), np.abs(a.winner_model_b - b.winner_model_a).max(),
              np.abs(a.winner_tie - b.winner_tie).max())
    assert gap <= SYMMETRY_TOLERANCE
    # Without TTA the tiny random model is far from symmetric, so the check above is not vacuous.
    run_prediction(predict_cfg(checkpoint=checkpoint, **{"data.test_path": test_files["test"]},
                               output=tmp_path / "no_tta.csv", tta=False, show_progress=False))
    run_prediction(predict_cfg(checkpoint=checkpoint, **{"data.test_path": test_files["swapped"]},
                               output=tmp_path / "no_tta_swapped.csv", tta=False, show_progress=False))
    c, d = pd.read_csv(tmp_path / "no_tta.csv"), pd.read_csv(tmp_path / "no_tta_swapped.csv")
    assert np.abs(c.winner_model_a - d.winner_model_b).max() > 100 * SYMMETRY_TOLERANCE


def test_predict_combines_the_orientations_as_the_run_validated_unless_told(checkpoint, test_files, tmp_path):
    """trainer.tta_mode=logit was not in the checkpoint: predict combined in prob and so did not reproduce the
    run's oof.csv."""
    logit = tmp_path / "logit_checkpoint"
    shutil.copytree(checkpoint, logit)
    spec = json.loads((logit / SPEC_FILE).read_text())
    assert spec["tta_mode"] == "prob"
    (logit / SPEC_FILE).write_text(json.dumps({**spec, "tta_mode": "logit"}))
    probs = {}
    for name, ckpt, mode in (("default", logit, None), ("logit", checkpoint, "logit"), ("prob", logit, "prob"),
                             ("prob_default", checkpoint, None)):
        run_prediction(predict_cfg(checkpoint=ckpt, **{"data.test_path": test_files["test"]}, show_progress=False,
                                   output=tmp_path / f"{name}.csv", **({"tta_mode": mode} if mode else {})))
        probs[name] = pd.read_csv(tmp_path / f"{name}.csv")[list(TARGET_COLUMNS)].to_numpy()
    np.testing.assert_allclose(probs["default"], probs["logit"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(probs["prob"], probs["prob_default"], rtol=0, atol=1e-12)
    assert np.abs(probs["default"] - probs["prob"]).max() > 1e-6


@pytest.mark.parametrize("tta_mode", ["prob", "logit"])
def test_tta_modes_symmetric_in_process(checkpoint, test_files, tta_mode):
    cfg = PredictConfig(checkpoint=str(checkpoint), output="unused.csv", tta_mode=tta_mode, show_progress=False)
    spec = build_prediction_spec(cfg.checkpoint, cfg)
    probs = {}
    for name, path in test_files.items():
        preds = predict_checkpoint(cfg.checkpoint, spec, read_pairs(path, False), cfg, Accelerator())
        probs[name] = preds.combined(tta_mode)
    assert np.abs(probs["test"] - probs["swapped"][:, [1, 0, 2]]).max() <= SYMMETRY_TOLERANCE


def test_dense_weights_give_the_same_predictions(checkpoint, test_files):
    pairs = read_pairs(test_files["test"], False)
    logits = {}
    for dense in (False, True):
        cfg = PredictConfig(checkpoint=str(checkpoint), output="unused.csv", show_progress=False, dense_weights=dense)
        spec = dataclasses.replace(build_prediction_spec(cfg.checkpoint, cfg), quantization=Quantization.nf4)
        preds = predict_checkpoint(cfg.checkpoint, spec, pairs, cfg, Accelerator())
        logits[dense] = np.concatenate([preds.logits_ab, preds.logits_ba], axis=1)
    assert np.abs(logits[True]).max() > 0.5  # the random head gives O(1) logits: the comparison means something
    np.testing.assert_allclose(logits[True], logits[False], atol=1e-4, rtol=0)


@pytest.mark.skipif(not cpp_compiler_found(), reason="inductor needs a C++ compiler on CPU")
def test_bf16_prediction_compiles_the_kernels_and_keeps_the_logits(checkpoint, test_files):
    """kernels=auto in a bf16 prediction on CPU: the norms, gated MLPs and attention compiled as in training; the
    logits within bf16 rounding of the eager kernels', and TTA still swap-symmetric to the bit."""
    logits, compiled = {}, {}
    for kernels in ("eager", "auto"):
        cfg = PredictConfig(checkpoint=str(checkpoint), output="unused.csv", show_progress=False,
                            compute_dtype="bfloat16", kernels=kernels)
        spec = build_prediction_spec(cfg.checkpoint, cfg)
        model = load_prediction_model(cfg.checkpoint, spec, cfg, Accelerator())
        compiled[kernels] = (sum("compiled_attention" in module.__dict__ for module in model.modules()),
                             sum(isinstance(module, CompiledGatedMLP) for module in model.modules()))
        tokenizer = build_tokenizer(cfg.checkpoint, False)
        batching = build_inference_batching(cfg, spec, tokenizer.pad_token_id)
        for name, path in test_files.items():
            split = encode_split(read_pairs(path, False), build_encoders(spec, tokenizer))
            logits[kernels, name] = predict_split(model, split, True, batching, Accelerator(), False)
    assert compiled["eager"] == (0, 0) and min(compiled["auto"]) == 2  # the tiny Llama's two layers
    ours, eager = (np.concatenate([logits[k, "test"].logits_ab, logits[k, "test"].logits_ba]) for k in ("auto", "eager"))
    assert np.abs(eager).max() > 0.5  # O(1) logits from the random head: the comparison means something
    np.testing.assert_allclose(ours, eager, atol=0.05 * np.abs(eager).max(), rtol=0)
    assert np.abs(ours - eager).max() > 0  # other kernels, not the eager ones again
    test, swapped = logits["auto", "test"], logits["auto", "swapped"]
    np.testing.assert_array_equal(test.logits_ab, swapped.logits_ba)


@pytest.mark.parametrize(("compute_dtype", "tolerance"), [("float32", 1e-5), ("bfloat16", 0.05)])
def test_shared_prefixes_give_the_two_pass_logits_from_fewer_tokens(checkpoint, test_files, compute_dtype,
                                                                     tolerance):
    """TTA through swap trees (share_prefixes, the default) against the two passes: the same logits (float32 to
    float rounding; bf16, the compiled kernels, within its rounding) from fewer tokens, each pair's common prefix
    (the instructions, the prompt) computed once."""
    pairs = read_pairs(test_files["test"], False)
    logits, tokens = {}, {}
    for share in (False, True):
        cfg = PredictConfig(checkpoint=str(checkpoint), output="unused.csv", show_progress=False,
                            compute_dtype=compute_dtype, share_prefixes=share)
        spec = dataclasses.replace(build_prediction_spec(cfg.checkpoint, cfg), quantization=Quantization.none)
        model = load_prediction_model(cfg.checkpoint, spec, cfg, Accelerator())
        seen: list[int] = []

        def count(_module, _args, kwargs, seen=seen):
            seen.append(kwargs["input_ids"].numel())

        model.register_forward_pre_hook(count, with_kwargs=True)
        tokenizer = build_tokenizer(cfg.checkpoint, False)
        split = encode_split(pairs, build_encoders(spec, tokenizer))
        preds = predict_split(model, split, True, build_inference_batching(cfg, spec, tokenizer.pad_token_id),
                              Accelerator(), False, share)
        logits[share], tokens[share] = np.concatenate([preds.logits_ab, preds.logits_ba], axis=1), sum(seen)
    assert np.abs(logits[False]).max() > 0.5  # O(1) logits from the random head: the comparison means something
    np.testing.assert_allclose(logits[True], logits[False], atol=tolerance * np.abs(logits[False]).max(), rtol=0)
    assert tokens[True] < 0.85 * tokens[False]  # the arena frames' prompts and instructions, once per pair


# Unquantized, a pair's logits are the same alone, packed with others or padded, up to float32 noise: packing keeps
# pairs apart. bitsandbytes' CPU 4-bit GEMM casts to bfloat16, so there the batch shape moves logits by bf16
# rounding (observed up to 6e-3 on logits of magnitude ~10); a leak between packed pairs would move them by O(1).
@pytest.mark.parametrize(("quantization", "tolerance"), [(Quantization.none, 1e-5), (Quantization.nf4, 3e-2)])
def test_logits_do_not_depend_on_micro_batch_neighbours(checkpoint, test_files, quantization, tolerance):
    pairs = read_pairs(test_files["test"], False)
    logits = {}
    for name, settings in {
        "alone": {"packing": True, "max_tokens": 32},  # every pair in its own micro-batch (budget < any pair)
        "packed": {"packing": True, "max_tokens": 8192},  # all pairs in one packed row
        "padded": {"packing": False, "batch_size": 5},
    }.items():
        cfg = PredictConfig(checkpoint=str(checkpoint), output="unused.csv", show_progress=False, **settings)
        spec = dataclasses.replace(build_prediction_spec(cfg.checkpoint, cfg), quantization=quantization)
        preds = predict_checkpoint(cfg.checkpoint, spec, pairs, cfg, Accelerator())
        logits[name] = np.concatenate([preds.logits_ab, preds.logits_ba], axis=1)
    assert np.abs(logits["packed"] - logits["alone"]).max() <= tolerance
    assert np.abs(logits["padded"] - logits["alone"]).max() <= tolerance


def test_bad_test_file_fails_before_loading_with_row_id(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr("lmsys.prediction.predict_checkpoint", _must_not_load)
    frame = arena_frame(6, seed=1, labelled=False)
    duplicated = pd.concat([frame, frame.iloc[[2]]])
    duplicated.to_csv(tmp_path / "dup.csv", index=False)
    malformed = frame.copy()
    malformed.loc[4, "response_b"] = '["unterminated'
    malformed.to_csv(tmp_path / "bad.csv", index=False)
    for name, row_id in (("dup.csv", "id=2"), ("bad.csv", "id=4")):
        with pytest.raises(DataError, match=row_id):
            run_prediction(predict_cfg(checkpoint=checkpoint, **{"data.test_path": tmp_path / name},
                                       output=tmp_path / "out.csv"))
    assert not (tmp_path / "out.csv").exists()


def test_incomplete_or_incompatible_checkpoint_named(checkpoint, test_files, tmp_path, monkeypatch):
    monkeypatch.setattr("lmsys.prediction.predict_checkpoint", _must_not_load)
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in checkpoint.iterdir():
        if item.name != "adapter_model.safetensors":
            (broken / item.name).write_bytes(item.read_bytes())
    with pytest.raises(CheckpointError, match="missing.*adapter_model.safetensors"):
        run_prediction(predict_cfg(checkpoint=broken, **{"data.test_path": test_files["test"]}, output=tmp_path / "o.csv"))
    (broken / "adapter_model.safetensors").write_bytes((checkpoint / "adapter_model.safetensors").read_bytes())
    spec = json.loads((broken / SPEC_FILE).read_text())
    (broken / SPEC_FILE).write_text(json.dumps({**spec, "format_version": 99}))
    with pytest.raises(CheckpointError, match="version 99"):
        run_prediction(predict_cfg(checkpoint=broken, **{"data.test_path": test_files["test"]}, output=tmp_path / "o.csv"))
    assert not (tmp_path / "o.csv").exists()


def test_old_checkpoint_spec_without_merged_field_still_reads(checkpoint, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for item in checkpoint.iterdir():
        (old / item.name).write_bytes(item.read_bytes())
    spec = json.loads((old / SPEC_FILE).read_text())
    del spec["merged"]
    (old / SPEC_FILE).write_text(json.dumps(spec))
    cfg = PredictConfig(checkpoint=str(old), output="unused.csv")
    assert build_prediction_spec(cfg.checkpoint, cfg).merged is False


def test_cli_rejects_typos_and_missing_values_at_compose():
    script = str(ROOT / "lmsys" / "code" / "predict.py")
    typo, missing = run_side_by_side([
        [sys.executable, script, "checkpoint=c", "data.test_path=t.csv", "output=o.csv", "tta_mod=logit"],
        [sys.executable, script, "checkpoint=c", "data.test_path=t.csv"],
    ], cwd=ROOT)
    assert typo.returncode != 0 and "tta_mod" in typo.stderr
    assert missing.returncode != 0 and "output" in missing.stderr


def _must_not_load(*args, **kwargs):
    raise AssertionError("a model was loaded although the inputs are invalid")


# --- outputs never replace inputs, directories or each other (issue 14, items 1-3) --------------------------------


def test_output_equal_to_the_test_file_is_refused_and_the_input_kept(checkpoint, test_files, tmp_path, monkeypatch):
    monkeypatch.setattr("lmsys.prediction.predict_checkpoint", _must_not_load)
    test = tmp_path / "test.csv"
    test.write_bytes(test_files["test"].read_bytes())
    before = test.read_bytes()
    for output in (test, tmp_path / "." / "test.csv"):
        with pytest.raises(ConfigError, match=r"output=.*test\.csv is the input data\.test_path"):
            run_prediction(predict_cfg(checkpoint=checkpoint, **{"data.test_path": test}, output=output))
    assert test.read_bytes() == before


def test_output_naming_an_existing_directory_is_refused_and_the_directory_kept(checkpoint, test_files, tmp_path,
                                                                               monkeypatch):
    monkeypatch.setattr("lmsys.prediction.predict_checkpoint", _must_not_load)
    directory = tmp_path / "results.csv"
    directory.mkdir()
    (directory / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is an existing directory"):
        run_prediction(predict_cfg(checkpoint=checkpoint, **{"data.test_path": test_files["test"]}, output=directory))
    assert (directory / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(("extra", "message"), [
    ({"logits_output": "same.csv"}, "output and logits_output name the same path"),
    ({"logits_output": "p.parquet", "pseudo_label_output": "p.parquet"}, "logits_output and pseudo_label_output"),
])
def test_two_outputs_naming_the_same_file_are_refused(checkpoint, test_files, tmp_path, monkeypatch, extra, message):
    monkeypatch.setattr("lmsys.prediction.predict_checkpoint", _must_not_load)
    outputs = {key: tmp_path / name for key, name in extra.items()}
    with pytest.raises(ConfigError, match=message):
        run_prediction(predict_cfg(checkpoint=checkpoint, **{"data.test_path": test_files["test"]},
                                   output=tmp_path / "same.csv", **outputs))


def test_output_inside_the_checkpoint_is_refused(checkpoint, test_files, monkeypatch):
    monkeypatch.setattr("lmsys.prediction.predict_checkpoint", _must_not_load)
    with pytest.raises(ConfigError, match="lies inside the input checkpoint"):
        run_prediction(predict_cfg(checkpoint=checkpoint, **{"data.test_path": test_files["test"]},
                                   output=checkpoint / "submission.csv"))
    assert not (checkpoint / "submission.csv").exists()


def test_outputs_inside_the_base_model_the_checkpoint_names_are_refused(checkpoint, test_files, tiny_models,
                                                                         monkeypatch):
    """The base model is an input whether it is named on the command line or only in the checkpoint's spec."""
    monkeypatch.setattr("lmsys.prediction.predict_checkpoint", _must_not_load)
    base = tiny_models["llama"]
    with pytest.raises(ConfigError, match=rf"output={base / 'sub.csv'} lies inside the input the base model of "
                                          rf"checkpoint={base}"):
        run_prediction(predict_cfg(checkpoint=checkpoint, **{"data.test_path": test_files["test"]},
                                   output=base / "sub.csv"))
    with pytest.raises(ConfigError, match=r"output_dir=.*merged lies inside the input the base model of checkpoint"):
        parse_config(ExportConfig, [f"checkpoint={checkpoint}", f"output_dir={base / 'merged'}"])
    with pytest.raises(ConfigError, match=r"output=.*p.parquet lies inside the input the base model of checkpoints"):
        parse_config(PseudoLabelConfig, [f"checkpoints=[{checkpoint}]", f"data.test_path={test_files['test']}",
                                         f"output={base / 'p.parquet'}"])
    assert not (base / "sub.csv").exists() and not (base / "merged").exists()


# --- a checkpoint whose base model moved (item 10) -----------------------------------------------------------------


def moved_base_checkpoint(checkpoint: Path, directory: Path) -> Path:
    directory.mkdir()
    for item in checkpoint.iterdir():
        (directory / item.name).write_bytes(item.read_bytes())
    spec = json.loads((directory / SPEC_FILE).read_text())
    (directory / SPEC_FILE).write_text(json.dumps({**spec, "base_model_path": "/kaggle/gone/llama"}))
    return directory


def test_moved_base_model_is_named_and_base_model_path_overrides_it(checkpoint, test_files, tiny_models, tmp_path,
                                                                    monkeypatch):
    moved = moved_base_checkpoint(checkpoint, tmp_path / "moved")
    with monkeypatch.context() as patched:
        patched.setattr("lmsys.prediction.predict_checkpoint", _must_not_load)
        with pytest.raises(CheckpointError, match="/kaggle/gone/llama is not a model directory.*base_model_path="):
            run_prediction(predict_cfg(checkpoint=moved, **{"data.test_path": test_files["test"]},
                                       output=tmp_path / "o.csv"))
        weightless = shutil.copytree(tiny_models["llama"], tmp_path / "weightless")
        (weightless / "model.safetensors").unlink()
        with pytest.raises(ModelLoadError, match=rf"^{moved}: base_model_path= {weightless}: no model.safetensors"):
            run_prediction(predict_cfg(checkpoint=moved, **{"data.test_path": test_files["test"]},
                                       output=tmp_path / "o.csv", base_model_path=weightless))
        with pytest.raises(CheckpointError, match="is a gemma3_text model.*trained on a llama"):
            run_prediction(predict_cfg(checkpoint=moved, **{"data.test_path": test_files["test"]},
                                       output=tmp_path / "o.csv", base_model_path=tiny_models["gemma3"]))
    for name, source in (("moved", moved), ("original", checkpoint)):
        extra = {"base_model_path": tiny_models["llama"]} if name == "moved" else {}
        run_prediction(predict_cfg(checkpoint=source, **{"data.test_path": test_files["test"]},
                                   output=tmp_path / f"{name}.csv", tta=False, show_progress=False, **extra))
    moved_sub, original_sub = (pd.read_csv(tmp_path / f"{name}.csv") for name in ("moved", "original"))
    pd.testing.assert_frame_equal(moved_sub, original_sub)


# --- damaged checkpoint files are named before a model loads (item 14) ---------------------------------------------


@pytest.mark.parametrize(("name", "damage"), [
    ("adapter_model.safetensors", lambda data: data[: len(data) // 2]),
    ("head.safetensors", lambda data: b""),
])
def test_truncated_weights_are_named_at_read_spec(checkpoint, tmp_path, name, damage):
    broken = moved_base_checkpoint(checkpoint, tmp_path / "broken")
    (broken / name).write_bytes(damage((checkpoint / name).read_bytes()))
    with pytest.raises(CheckpointError, match=f"{name}: unreadable weights"):
        read_spec(broken)


def test_missing_tokenizer_json_is_an_incomplete_checkpoint(checkpoint, tmp_path):
    assert (checkpoint / "tokenizer.json").is_file()  # what save_pretrained writes for a fast tokenizer
    broken = moved_base_checkpoint(checkpoint, tmp_path / "broken")
    (broken / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete checkpoint, missing \['tokenizer.json'\]"):
        read_spec(broken)
