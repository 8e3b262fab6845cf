"""Merged export: the merged model predicts like the adapter on the same unquantized base, loads without peft,
and its checkpoint is checked like any other.

Measured on the tiny Llama with a random adapter (logits up to ~3.1), max |logit difference|: merged float32 vs the
adapter on the float32 base, 2.6e-6 (probabilities 9e-7; bound 1e-4); merged bfloat16 vs the same, 0.063
(probabilities 0.016; bound 0.5: bf16 weights and activations); the 4-bit adapter model vs merged float32, 0.78
(probabilities 0.26 on this random model). That gap is the NF4 rounding of the base weights and nothing else: the
same adapter and head on a float32 base whose projections are NF4-rounded (bitsandbytes' quantize_4bit, then
dequantize_4bit) give the 4-bit model's logits exactly (0.0 with float32 compute; bound 1e-5), and the adapter
folded into the NF4 weights (prediction's CPU default) is 3.3e-6 from them. Merging onto the unquantized base does
not undo the rounding: predict with the 4-bit checkpoint to reproduce training-time evaluation exactly.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import numpy as np
import pandas as pd
import pytest
import torch
from accelerate import Accelerator
from omegaconf.errors import ConfigKeyError, ValidationError
from peft import PeftModel
from test_predict import make_checkpoint
from tiny import arena_frame

from lmsys.builders import build_encoders, build_inference_batching, build_model, build_prediction_spec, build_tokenizer
from lmsys.cli import parse_config
from lmsys.config import ComputeDtype, ConfigError, Quantization
from lmsys.data.dataset import encode_split
from lmsys.data.io import read_pairs
from lmsys.evaluation.predict_loop import predict_split
from lmsys.merging import round_base_weights, run_export
from lmsys.modeling.checkpoint import ADAPTER_FILES, SPEC_FILE, CheckpointError, ModelSpec, read_spec
from lmsys.prediction import load_prediction_model
from lmsys.prediction_config import ExportConfig, PredictConfig
from lmsys.runs import RunDirError


def export_main(argv: list[str]):
    """`python -m lmsys.export` with its errors raised rather than printed."""
    return run_export(parse_config(ExportConfig, argv))

ROOT = Path(__file__).resolve().parents[1]
MERGE_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.5}  # max |logit difference| vs the adapter on a float32 base
# max |logit difference| of the 4-bit model vs float32 on its NF4-rounded base: bitsandbytes' CPU forward
# dequantizes to the float32 compute dtype and runs the same matmul (measured 0.0); 1e-5, some 30 float32 roundings
# of a logit of 3, leaves room for a fused dequantize-matmul kernel's summation order, far below the 0.78 NF4 gap.
NF4_KERNEL_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    checkpoint = make_checkpoint(root / "checkpoint", tiny_models["llama"], seed=1)
    arena_frame(16, seed=4, labelled=False).to_csv(root / "test.csv", index=False)
    merged = {dtype: export_main([f"checkpoint={checkpoint}", f"output_dir={root / dtype}", f"dtype={dtype}"])
              for dtype in MERGE_TOLERANCE}
    return {"root": root, "checkpoint": checkpoint, "test": root / "test.csv", **merged}


def logits_of(checkpoint: Path, test: Path, dense_weights: bool | None = None, **spec_changes) -> np.ndarray:
    """(N, 6) logits of both orientations, the model loaded as prediction loads it (`dense_weights=None`: folded on
    CPU) with the checkpoint's spec changed as given."""
    cfg, spec = prediction_setup(checkpoint, dense_weights, **spec_changes)
    return model_logits(load_prediction_model(cfg.checkpoint, spec, cfg, Accelerator()), cfg, spec, test)


def prediction_setup(checkpoint: Path, dense_weights: bool | None = None, **spec_changes) -> tuple[PredictConfig,
                                                                                                    ModelSpec]:
    cfg = PredictConfig(checkpoint=str(checkpoint), output="unused.csv", show_progress=False,
                        dense_weights=dense_weights)
    return cfg, dataclasses.replace(build_prediction_spec(cfg.checkpoint, cfg), **spec_changes)


def model_logits(model: torch.nn.Module, cfg: PredictConfig, spec: ModelSpec, test: Path) -> np.ndarray:
    """(N, 6) logits of both orientations of `model`, with prediction's encoding and batching."""
    tokenizer = build_tokenizer(cfg.checkpoint, spec.trust_remote_code)
    split = encode_split(read_pairs(test, False), build_encoders(spec, tokenizer))
    batching = build_inference_batching(cfg, spec, tokenizer.pad_token_id)
    preds = predict_split(model, split, cfg.tta, batching, Accelerator(), show_progress=False)
    return np.concatenate([preds.logits_ab, preds.logits_ba], axis=1)


def test_merged_checkpoint_spec_and_files(setup):
    for dtype in MERGE_TOLERANCE:
        spec = read_spec(setup[dtype])
        assert spec.merged and spec.quantization == Quantization.none and spec.compute_dtype == ComputeDtype(dtype)
        assert not any((setup[dtype] / name).exists() for name in ADAPTER_FILES)
        model = build_model(spec, None, None, torch.device("cpu"), adapter_dir=setup[dtype])
        assert not isinstance(model.backbone, PeftModel)
        assert next(model.backbone.parameters()).dtype == getattr(torch, dtype)


@pytest.mark.parametrize("dtype", list(MERGE_TOLERANCE))
def test_merged_predictions_match_adapter_on_unquantized_base(setup, dtype):
    adapter = logits_of(setup["checkpoint"], setup["test"], quantization=Quantization.none,
                        compute_dtype=ComputeDtype.float32)
    merged = logits_of(setup[dtype], setup["test"])
    assert np.abs(merged - adapter).max() <= MERGE_TOLERANCE[dtype]


def test_merge_gap_is_exactly_the_nf4_rounding_of_the_base(setup):
    """The 4-bit checkpoint's logits are those of the same adapter and head on a float32 base whose projections
    are NF4-rounded; the merged export equals them on the unrounded base. So the whole gap between the merged
    export and the 4-bit model is the rounding of the base weights (and prediction from the 4-bit checkpoint, not
    the merge, reproduces training-time evaluation)."""
    cfg, spec = prediction_setup(setup["checkpoint"], dense_weights=False)
    assert spec.quantization == Quantization.nf4
    four_bit_model = load_prediction_model(cfg.checkpoint, spec, cfg, Accelerator())
    four_bit = model_logits(four_bit_model, cfg, spec, setup["test"])
    float_spec = dataclasses.replace(spec, quantization=Quantization.none)
    float_model = load_prediction_model(cfg.checkpoint, float_spec, cfg, Accelerator())
    unrounded = model_logits(float_model, cfg, float_spec, setup["test"])
    rounded_layers = round_base_weights(float_model.backbone, spec.quantization, spec.double_quant)
    rounded = model_logits(float_model, cfg, float_spec, setup["test"])
    four_bit_layers = [name.removesuffix(".base_layer") for name, module in four_bit_model.backbone.named_modules()
                       if isinstance(module, bnb.nn.Linear4bit)]
    assert sorted(rounded_layers) == sorted(four_bit_layers) and four_bit_layers  # every projection, only those
    assert {module.compute_dtype for module in four_bit_model.backbone.modules()
            if isinstance(module, bnb.nn.Linear4bit)} == {torch.float32}  # the suite pins float32 compute
    merged = logits_of(setup["float32"], setup["test"])
    folded = logits_of(setup["checkpoint"], setup["test"])  # prediction's default on CPU: adapter folded into NF4
    assert np.abs(four_bit - rounded).max() <= NF4_KERNEL_TOLERANCE
    assert np.abs(merged - unrounded).max() <= MERGE_TOLERANCE["float32"]
    assert np.abs(folded - rounded).max() <= MERGE_TOLERANCE["float32"]
    assert np.abs(four_bit - merged).max() > MERGE_TOLERANCE["float32"]  # the rounding is what separates them
    as_trained = logits_of(export_main([f"checkpoint={setup['checkpoint']}", "dtype=float32",
                                        f"output_dir={setup['root'] / 'as_trained'}", "base_weights=as_trained"]),
                           setup["test"])
    assert np.abs(as_trained - four_bit).max() <= MERGE_TOLERANCE["float32"]  # predicts as validation measured


def test_predict_cli_on_merged_checkpoint(setup, tmp_path):
    out = tmp_path / "submission.csv"
    result = subprocess.run([sys.executable, "lmsys/code/predict.py", f"checkpoint={setup['float32']}",
                             f"data.test_path={setup['test']}", f"output={out}", "show_progress=false"],
                            capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    sub = pd.read_csv(out)
    assert len(sub) == 16 and np.allclose(sub.iloc[:, 1:].sum(1), 1, atol=1e-6)


def test_export_refusals(setup, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="already a merged checkpoint"):
        export_main([f"checkpoint={setup['float32']}", f"output_dir={tmp_path / 'again'}"])
    with pytest.raises(RunDirError, match="overwrite=true"):
        export_main([f"checkpoint={setup['checkpoint']}", f"output_dir={setup['float32']}"])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.md").write_text("mine")
    with pytest.raises(RunDirError, match="is not a checkpoint"):
        export_main([f"checkpoint={setup['checkpoint']}", f"output_dir={foreign}", "overwrite=true"])
    assert (foreign / "notes.md").read_text() == "mine"
    for inside in (setup["checkpoint"], setup["checkpoint"] / "merged", setup["checkpoint"].parent):
        with pytest.raises(ConfigError, match="output_dir="):
            export_main([f"checkpoint={setup['checkpoint']}", f"output_dir={inside}", "overwrite=true"])
    with pytest.raises(ConfigKeyError, match="dtyp"):
        export_main([f"checkpoint={setup['checkpoint']}", f"output_dir={tmp_path / 'x'}", "dtyp=float32"])
    with pytest.raises(ValidationError, match="float64"):
        export_main([f"checkpoint={setup['checkpoint']}", f"output_dir={tmp_path / 'x'}", "dtype=float64"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "again").exists()


def test_incomplete_merged_checkpoint_names_the_weights(setup, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in setup["float32"].iterdir():
        if item.name != "model.safetensors":
            (broken / item.name).write_bytes(item.read_bytes())
    with pytest.raises(CheckpointError, match="incomplete merged checkpoint, missing.*model.safetensors"):
        read_spec(broken)
    assert json.loads((broken / SPEC_FILE).read_text())["merged"] is True


def test_as_trained_base_weights_need_a_four_bit_checkpoint(setup, tmp_path):
    int8 = tmp_path / "int8"
    shutil.copytree(setup["checkpoint"], int8)
    spec = json.loads((int8 / SPEC_FILE).read_text())
    (int8 / SPEC_FILE).write_text(json.dumps({**spec, "quantization": "int8"}))
    with pytest.raises(CheckpointError, match="as_trained rounds a 4-bit .* this checkpoint's base is int8"):
        export_main([f"checkpoint={int8}", f"output_dir={tmp_path / 'out'}", "base_weights=as_trained"])
    assert not (tmp_path / "out").exists()
