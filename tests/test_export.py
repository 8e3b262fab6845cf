"""Merged export: the merged model predicts like the adapter on the same unquantized base, loads without peft,
and its checkpoint is checked like any other.

Measured on the tiny Llama with a random adapter (logits up to ~3): merged float32 vs the adapter on the float32
base, max |logit difference| 3e-6 (probabilities 1e-6; bound 1e-4); merged bfloat16 vs the same, 0.06 (probabilities
0.013; bound 0.5: bf16 weights and activations); the 4-bit adapter model vs merged float32, 0.77 (probabilities 0.26
on this random model), which is why the merge is checked against the unquantized base: NF4 rounding of the base
weights is not undone by merging. Predict with the 4-bit checkpoint to reproduce training-time evaluation exactly.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from accelerate import Accelerator
from omegaconf.errors import ConfigKeyError, ValidationError
from peft import PeftModel
from test_predict import make_checkpoint
from tiny import arena_frame

from lmsys.builders import build_model, build_prediction_spec
from lmsys.cli import parse_config
from lmsys.config import ComputeDtype, ConfigError, Quantization
from lmsys.data.io import read_pairs
from lmsys.export import run_export
from lmsys.modeling.checkpoint import ADAPTER_FILES, SPEC_FILE, CheckpointError, read_spec
from lmsys.predict import predict_checkpoint
from lmsys.prediction_config import ExportConfig, PredictConfig
from lmsys.runs import RunDirError


def export_main(argv: list[str]):
    """`python -m lmsys.export` with its errors raised rather than printed."""
    return run_export(parse_config(ExportConfig, argv))

ROOT = Path(__file__).resolve().parents[1]
MERGE_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.5}  # max |logit difference| vs the adapter on a float32 base


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    checkpoint = make_checkpoint(root / "checkpoint", tiny_models["llama"], seed=1)
    arena_frame(16, seed=4, labelled=False).to_csv(root / "test.csv", index=False)
    merged = {dtype: export_main([f"checkpoint={checkpoint}", f"output_dir={root / dtype}", f"dtype={dtype}"])
              for dtype in MERGE_TOLERANCE}
    return {"root": root, "checkpoint": checkpoint, "test": root / "test.csv", **merged}


def logits_of(checkpoint: Path, test: Path, **spec_changes) -> np.ndarray:
    """(N, 6) logits of both orientations, with the checkpoint's spec changed as given."""
    cfg = PredictConfig(checkpoint=str(checkpoint), output="unused.csv", show_progress=False)
    spec = dataclasses.replace(build_prediction_spec(cfg.checkpoint, cfg), **spec_changes)
    preds = predict_checkpoint(cfg.checkpoint, spec, read_pairs(test, False), cfg, Accelerator())
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


def test_four_bit_adapter_differs_from_merged_by_more_than_the_merge_tolerance(setup):
    four_bit = logits_of(setup["checkpoint"], setup["test"])
    merged = logits_of(setup["float32"], setup["test"])
    gap = np.abs(four_bit - merged).max()
    assert MERGE_TOLERANCE["float32"] < gap < 2.0


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
