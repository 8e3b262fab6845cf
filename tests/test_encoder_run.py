"""A DeBERTa cross-encoder run through its entry point (the GPU experiment file with CPU overrides, full
fine-tuning), prediction from its checkpoint with exact swap-TTA symmetry, and its oof.csv ensembled with a
decoder run's by `python -m lmsys.ensemble`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file
from test_predict import predict_cfg, swapped_frame
from test_train_run import CPU_GROUPS, REPO, digest, run_entry
from tiny import arena_frame

from lmsys.modeling.checkpoint import read_spec
from lmsys.prediction import run_prediction

PROBS = ["winner_model_a", "winner_model_b", "winner_tie"]


@pytest.fixture(scope="module")
def deberta_run(tiny_models, arena_files, tmp_path_factory):
    model_dir = tiny_models["deberta_v2"]
    base = digest(model_dir)
    run_dir = tmp_path_factory.mktemp("runs") / "deberta"
    result = run_entry("deberta", "conf_r_deberta_v3_large", model_dir, arena_files, run_dir, *CPU_GROUPS,
                       "trainer.packing=false")
    assert result.returncode == 0, result.stderr[-4000:]
    assert digest(model_dir) == base  # the base model directory is untouched
    return run_dir


def test_the_deberta_run_trains_the_whole_encoder(deberta_run, tiny_models, arena_files):
    metrics = json.loads((deberta_run / "metrics.json").read_text())
    assert metrics["updates"] == 2 and np.isfinite(metrics["best"]["log_loss"]) and metrics["n_valid_pairs"] == 6
    oof = pd.read_csv(deberta_run / "oof.csv")
    assert list(oof.columns)[:5] == ["id", *PROBS, "label"] and len(oof) == 6  # then the logits
    np.testing.assert_allclose(oof[PROBS].sum(axis=1), 1.0, atol=1e-6)
    spec = read_spec(deberta_run / "checkpoint")
    assert (spec.family.value, spec.template.value, spec.model_type, spec.merged) == ("deberta", "sep", "deberta-v2", True)
    assert spec.first_token_pooling and spec.padding_side.value == "right"
    trained = load_file(str(deberta_run / "checkpoint" / "model.safetensors"))
    base = load_file(str(tiny_models["deberta_v2"] / "model.safetensors"))
    changed = [key for key in base if key in trained and not np.allclose(base[key].numpy(), trained[key].numpy())]
    assert any("attention.self.query_proj" in key for key in changed)  # full fine-tuning moved the encoder


def test_predict_from_the_deberta_checkpoint_is_exactly_swap_symmetric(deberta_run, tmp_path):
    test = arena_frame(10, seed=5, labelled=False, start_id=300)
    paths = {"test": tmp_path / "test.csv", "swapped": tmp_path / "swapped.csv"}
    test.to_csv(paths["test"], index=False)
    swapped_frame(test).to_csv(paths["swapped"], index=False)
    subs = {}
    for tta in (True, False):
        for name, path in paths.items():
            out = tmp_path / f"{name}_{tta}.csv"
            run_prediction(predict_cfg(checkpoint=deberta_run / "checkpoint", **{"data.test_path": path},
                                       output=out, tta=tta, show_progress=False))  # padded: the encoder's default
            subs[name, tta] = pd.read_csv(out)[PROBS].to_numpy()
    mirrored = subs["swapped", True][:, [1, 0, 2]]
    assert np.abs(subs["test", True] - mirrored).max() <= 1e-6
    # without TTA the model is not symmetric, so the check above is not vacuous
    assert np.abs(subs["test", False] - subs["swapped", False][:, [1, 0, 2]]).max() > 1e-4


def test_the_ensemble_takes_a_cross_encoder_beside_a_decoder(deberta_run, tiny_models, arena_files, tmp_path):
    llama_dir = tmp_path / "llama"
    result = run_entry("llama", "conf_r_llama_smol", tiny_models["llama"], arena_files, llama_dir)
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "ensemble"
    command = [sys.executable, "-m", "lmsys.ensemble", "--oof", str(deberta_run / "oof.csv"),
               str(llama_dir / "oof.csv"), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    saved = json.loads((out / "weights.json").read_text())
    assert saved["models"] == [str(deberta_run / "oof.csv"), str(llama_dir / "oof.csv")]
    assert len(saved["weights"]) == 2 and abs(sum(saved["weights"]) - 1.0) <= 1e-9
    # the fit is over the simplex, which holds each run alone: the blend is no worse than the better run
    single = [json.loads((run / "metrics.json").read_text()) for run in (deberta_run, llama_dir)]
    losses = [log_loss_of(run / "oof.csv") for run in (deberta_run, llama_dir)]
    assert saved["oof_log_loss"] <= min(losses) + 1e-9
    assert all(np.isfinite(m["best"]["log_loss"]) for m in single)


def log_loss_of(oof_path) -> float:
    oof = pd.read_csv(oof_path)
    probs = oof[PROBS].to_numpy()
    return float(-np.log(probs[np.arange(len(oof)), oof["label"].to_numpy()]).mean())


def test_a_lora_deberta_run_with_the_experiments_target_modules(tiny_models, arena_files, tmp_path):
    """model.finetune=lora reads the experiment file's DeBERTa-v2 target modules; gradient checkpointing stays on,
    as in the GPU file."""
    overrides = [o for o in CPU_GROUPS if not o.startswith("model.gradient_checkpointing")]
    run_dir = tmp_path / "deberta_lora"
    result = run_entry("deberta", "conf_r_deberta_v3_large", tiny_models["deberta_v2"], arena_files, run_dir,
                       *overrides, "trainer.packing=false", "model.finetune=lora")
    assert result.returncode == 0, result.stderr[-4000:]
    spec = read_spec(run_dir / "checkpoint")
    assert not spec.merged
    adapter = load_file(str(run_dir / "checkpoint" / "adapter_model.safetensors"))
    trained = {key.split(".lora_B.")[0].rsplit(".", 1)[-1] for key, t in adapter.items()
               if ".lora_B." in key and t.abs().max() > 0}
    assert trained == {"query_proj", "key_proj", "value_proj", "dense"}
