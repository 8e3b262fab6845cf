"""Predict-time precision: the base re-quantized under an adapter, a merged export quantized on load or saved
pre-quantized (nf4, int8), and the float16 overflow check that refuses to write a submission with NaNs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file, save_file
from test_predict import make_checkpoint, predict_cfg
from tiny import arena_frame, save_tiny_model

from lmsys.export import main as export_main
from lmsys.modeling.checkpoint import CheckpointError, read_spec
from lmsys.modeling.precision import PrecisionError
from lmsys.predict import main as predict_main
from lmsys.prediction import run_prediction


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("precision")
    checkpoint = make_checkpoint(root / "checkpoint", tiny_models["llama"], seed=2)
    arena_frame(10, seed=6, labelled=False, start_id=300).to_csv(root / "test.csv", index=False)
    exports = {q: export_main([f"checkpoint={checkpoint}", f"output_dir={root / q}", "dtype=float32",
                               f"quantization={q}"]) for q in ("none", "nf4", "int8")}
    return {"root": root, "checkpoint": checkpoint, "test": root / "test.csv", **exports}


def probs_of(setup, checkpoint: Path, tmp_path: Path, **overrides) -> np.ndarray:
    out = tmp_path / f"sub{len(list(tmp_path.iterdir()))}.csv"
    run_prediction(predict_cfg(checkpoint=checkpoint, **{"data.test_path": setup["test"]}, output=out, tta=False,
                               show_progress=False, **overrides))
    return pd.read_csv(out).iloc[:, 1:].to_numpy()


def test_prequantized_exports_are_smaller_and_load_as_saved(setup):
    size = {q: (setup[q] / "model.safetensors").stat().st_size for q in ("none", "nf4", "int8")}
    assert size["nf4"] < size["int8"] < size["none"]  # tiny model: embeddings and norms stay unquantized
    for q in ("nf4", "int8"):
        assert read_spec(setup[q]).quantization.value == q and read_spec(setup[q]).merged
        saved = json.loads((setup[q] / "config.json").read_text())["quantization_config"]
        assert saved["load_in_4bit" if q == "nf4" else "load_in_8bit"] is True


@pytest.mark.filterwarnings("error:You passed `quantization_config`")  # a pre-quantized export loads as saved
def test_merged_export_quantized_on_load_equals_prequantized(setup, tmp_path):
    for q in ("nf4", "int8"):
        on_load = probs_of(setup, setup["none"], tmp_path, quantization=q)
        saved = probs_of(setup, setup[q], tmp_path)
        np.testing.assert_allclose(on_load, saved, atol=1e-6)
    unquantized = probs_of(setup, setup["none"], tmp_path)
    assert np.abs(unquantized - probs_of(setup, setup["nf4"], tmp_path)).max() > 1e-4  # nf4 rounding shows


def test_adapter_checkpoint_requantized_at_predict_time(setup, tmp_path):
    nf4 = probs_of(setup, setup["checkpoint"], tmp_path)  # trained on (and saved as) an nf4 base
    unquantized = probs_of(setup, setup["checkpoint"], tmp_path, quantization="none")
    int8 = probs_of(setup, setup["checkpoint"], tmp_path, quantization="int8")
    assert np.abs(nf4 - unquantized).max() > 1e-4 and np.abs(int8 - unquantized).max() > 1e-5
    assert np.abs(int8 - unquantized).max() < np.abs(nf4 - unquantized).max()  # 8 bits round less than 4
    merged = probs_of(setup, setup["none"], tmp_path)  # the adapter merged into the float32 base
    np.testing.assert_allclose(unquantized, merged, atol=1e-4)


def test_prequantized_export_refuses_another_quantization(setup, tmp_path):
    with pytest.raises(CheckpointError, match="pre-quantized export.*quantization=int8 only"):
        probs_of(setup, setup["int8"], tmp_path, quantization="none")


def overflowing_checkpoint(root: Path) -> Path:
    """An adapter checkpoint on a tiny Llama whose first MLP has its three projections scaled by 300: the weights
    stay small (|w| < 25, exact in float16) but the MLP output is cubic in the scale, ~4e5 in the residual stream
    (measured), beyond float16's 65504: finite in float32, inf then NaN (after the next norm) in float16."""
    base = root / "base"
    save_tiny_model("llama", base)
    weights = load_file(str(base / "model.safetensors"))
    for projection in ("gate_proj", "up_proj", "down_proj"):
        weights[f"model.layers.0.mlp.{projection}.weight"] *= 300
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    return make_checkpoint(root / "checkpoint", base, seed=3)


def test_float16_overflow_fails_naming_ids_and_setting(setup, tmp_path, capsys):
    checkpoint = overflowing_checkpoint(tmp_path / "overflow")
    (tmp_path / "float32").mkdir()
    assert np.isfinite(probs_of(setup, checkpoint, tmp_path / "float32", quantization="none",
                                compute_dtype="float32")).all()
    out = tmp_path / "sub.csv"
    args = [f"checkpoint={checkpoint}", f"data.test_path={setup['test']}", f"output={out}", "quantization=none",
            "compute_dtype=float16", "show_progress=false"]
    with pytest.raises(PrecisionError, match=r"compute_dtype=float16, first ids \['30\d'.*compute_dtype=float32"):
        run_prediction(predict_cfg(**dict(arg.split("=", 1) for arg in args)))
    with pytest.raises(SystemExit) as exited:  # the command: one line, exit 2, no submission
        predict_main(args)
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading logs
    assert exited.value.code == 2 and last_line.startswith("error: non-finite logits (inf/NaN) for ")
    assert not out.exists()
