"""Pseudo-labels: the parquet written by predict (one checkpoint) or `lmsys.pseudo_label` (the mean of several) is
training data as it stands, and the two-stage example configs compose."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from accelerate import Accelerator
from hydra import compose, initialize_config_dir
from omegaconf.errors import ConfigKeyError
from test_predict import make_checkpoint, predict_cfg
from tiny import arena_frame

from lmsys.builders import build_prediction_spec
from lmsys.cli import parse_config
from lmsys.config import ConfigError
from lmsys.data.io import read_pairs
from lmsys.data.schema import TARGET_COLUMNS
from lmsys.modeling.checkpoint import CheckpointError
from lmsys.predict import predict_checkpoint, run_prediction
from lmsys.prediction_config import PseudoLabelConfig
from lmsys.pseudo_label import run_pseudo_labels


def pseudo_label_main(argv: list[str]):
    """`python -m lmsys.pseudo_label` with its errors raised rather than printed."""
    return run_pseudo_labels(parse_config(PseudoLabelConfig, argv))


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pseudo")
    base = tiny_models["llama"]
    arena_frame(12, seed=6, labelled=False, start_id=500).to_csv(root / "unlabelled.csv", index=False)
    arena_frame(9, seed=7, labelled=True).to_csv(root / "valid.csv", index=False)
    return {"root": root, "base": base, "unlabelled": root / "unlabelled.csv", "valid": root / "valid.csv",
            "first": make_checkpoint(root / "first", base, seed=0), "second": make_checkpoint(root / "second", base, seed=1)}


def tta_probs(checkpoint: Path, test: Path) -> np.ndarray:
    cfg = PseudoLabelConfig(checkpoints=[str(checkpoint)], output="unused.parquet", show_progress=False)
    preds = predict_checkpoint(cfg.checkpoints[0], build_prediction_spec(cfg.checkpoints[0], cfg),
                               read_pairs(test, False), cfg, Accelerator())
    return preds.combined(cfg.tta_mode.value)


def test_predict_writes_pseudo_labels_that_read_as_training_data(setup, tmp_path):
    pseudo = tmp_path / "pseudo.parquet"
    run_prediction(predict_cfg(checkpoint=setup["first"], **{"data.test_path": setup["unlabelled"]},
                               output=tmp_path / "sub.csv", pseudo_label_output=pseudo, show_progress=False))
    pairs = read_pairs(pseudo, require_labels=True)
    source = read_pairs(setup["unlabelled"], require_labels=False)
    assert [p.id for p in pairs] == [p.id for p in source]
    assert all((p.prompts, p.responses_a, p.responses_b) == (s.prompts, s.responses_a, s.responses_b)
               for p, s in zip(pairs, source, strict=True))  # null turns come back as empty text
    assert {p.meta["source"] for p in pairs} == {"pseudo"}
    submission = pd.read_csv(tmp_path / "sub.csv")[list(TARGET_COLUMNS)].to_numpy()
    assert np.abs(np.array([p.target for p in pairs]) - submission).max() <= 1e-9


def test_pseudo_label_cli_averages_checkpoints(setup, tmp_path):
    out = tmp_path / "ensemble.parquet"
    pseudo_label_main([f"checkpoints=[{setup['first']},{setup['second']}]", f"data.test_path={setup['unlabelled']}",
                       f"output={out}", "show_progress=false"])
    labels = np.array([p.target for p in read_pairs(out, require_labels=True)])
    expected = (tta_probs(setup["first"], setup["unlabelled"]) + tta_probs(setup["second"], setup["unlabelled"])) / 2
    assert np.abs(labels - expected).max() <= 1e-9
    frame = pd.read_parquet(out)
    assert list(frame.columns) == ["id", "prompt", "response_a", "response_b", "label", "source"]


def test_pseudo_label_cli_refusals(setup, tmp_path):
    with pytest.raises(ConfigKeyError, match="checkpoint"):
        pseudo_label_main([f"checkpoint={setup['first']}", f"data.test_path={setup['unlabelled']}", "output=o.parquet"])
    with pytest.raises(ConfigError, match=".parquet"):
        pseudo_label_main([f"checkpoints=[{setup['first']}]", f"data.test_path={setup['unlabelled']}", "output=o.csv"])
    with pytest.raises(CheckpointError, match="no such checkpoint"):  # every checkpoint is checked before any loads
        pseudo_label_main([f"checkpoints=[{setup['first']},{tmp_path / 'absent'}]",
                           f"data.test_path={setup['unlabelled']}", f"output={tmp_path / 'o.parquet'}"])
    assert not (tmp_path / "o.parquet").exists()


def test_pseudo_label_output_never_replaces_an_input(setup, tmp_path):
    unlabelled = tmp_path / "unlabelled.parquet"
    pd.read_csv(setup["unlabelled"]).to_parquet(unlabelled)
    before = unlabelled.read_bytes()
    with pytest.raises(ConfigError, match="output=.*is the input data.test_path"):
        pseudo_label_main([f"checkpoints=[{setup['first']}]", f"data.test_path={unlabelled}", f"output={unlabelled}"])
    with pytest.raises(ConfigError, match=r"lies inside the input checkpoints\[1\]"):
        pseudo_label_main([f"checkpoints=[{setup['first']},{setup['second']}]", f"data.test_path={unlabelled}",
                           f"output={setup['second'] / 'p.parquet'}"])
    assert unlabelled.read_bytes() == before and not (setup["second"] / "p.parquet").exists()


def test_stage_configs_compose():
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        stage1 = compose("conf_r_llama_smol_stage1")
        stage2 = compose("conf_r_llama_smol_stage2")
    assert stage1.data.train_path.endswith(".csv")
    assert stage2.data.train_path.endswith(".parquet") and stage2.data.valid_path.endswith(".csv")


def test_stage_two_trains_on_pseudo_labels(setup, tmp_path):
    pseudo = tmp_path / "pseudo.parquet"
    pseudo_label_main([f"checkpoints=[{setup['first']}]", f"data.test_path={setup['unlabelled']}", f"output={pseudo}",
                       "show_progress=false"])
    run = tmp_path / "stage2"
    result = subprocess.run(
        [sys.executable, "lmsys/code/train_r_llama.py", "--config-name", "conf_r_llama_smol_stage2",
         f"model.path={setup['base']}", f"data.train_path={pseudo}", f"data.valid_path={setup['valid']}",
         f"hydra.run.dir={run}", "trainer.max_steps=1", "model.max_length=128", "trainer.max_tokens=512",
         "loss.distill_temperature=2.0"],
        capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.isfinite(json.loads((run / "metrics.json").read_text())["best"]["log_loss"])
