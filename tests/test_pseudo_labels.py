"""Pseudo-labels: the parquet written by predict (one checkpoint) or `lmsys.pseudo_label` (the mean of several) is
training data as it stands, and the two-stage example configs compose."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from accelerate import Accelerator
from omegaconf.errors import ConfigKeyError
from test_config import compose_config
from test_predict import make_checkpoint, predict_cfg
from tiny import arena_frame

from lmsys.builders import build_encoders, build_prediction_spec, build_tokenizer
from lmsys.cli import parse_config
from lmsys.config import ConfigError, InputFormat, validated_config
from lmsys.data.batching import collate
from lmsys.data.io import read_pairs
from lmsys.data.schema import TARGET_COLUMNS, swap_abt
from lmsys.modeling.checkpoint import SPEC_FILE, CheckpointError
from lmsys.modeling.losses import soft_cross_entropy
from lmsys.prediction import predict_checkpoint, run_prediction, run_pseudo_labels
from lmsys.prediction_config import InferenceConfig, PseudoLabelConfig
from lmsys.training.plan import iterate_updates
from lmsys.training.recipe import TrainingRecipe, release


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
    return preds.combined("prob")  # the checkpoints' own tta_mode (build_spec's default)


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


def test_a_layout_the_last_checkpoint_cannot_hold_fails_before_any_prediction(setup, tmp_path, monkeypatch):
    """max_length that holds the first checkpoint's pab layout but not the second's papb markers: the error names
    the second checkpoint before the first has predicted (not after hours of it)."""
    papb = tmp_path / "papb"
    shutil.copytree(setup["second"], papb)
    spec = json.loads((papb / SPEC_FILE).read_text())
    (papb / SPEC_FILE).write_text(json.dumps({**spec, "input_formats": ["papb"]}))
    needed = {}
    for fmt in ("pab", "papb"):  # the shortest max_length that holds each layout, from the error itself
        with pytest.raises(ConfigError, match=r"use max_length >= (\d+)") as error:
            build_encoders(replace(build_prediction_spec(str(papb), InferenceConfig()), max_length=1,
                                   input_formats=(InputFormat(fmt),)), build_tokenizer(papb, False))
        needed[fmt] = int(re.search(r">= (\d+)", str(error.value)).group(1))
    assert needed["papb"] > needed["pab"]
    predicted = []
    monkeypatch.setattr("lmsys.prediction.predict_checkpoint", lambda checkpoint, *_: predicted.append(checkpoint))
    with pytest.raises(ConfigError, match=rf"^{papb}: max_length {needed['pab']} cannot hold the papb layout"):
        pseudo_label_main([f"checkpoints=[{setup['first']},{papb}]", f"data.test_path={setup['unlabelled']}",
                           f"output={tmp_path / 'o.parquet'}", f"max_length={needed['pab']}", "show_progress=false"])
    assert predicted == [] and not (tmp_path / "o.parquet").exists()


def test_pseudo_labels_of_two_class_checkpoints(setup, tmp_path):
    """WSDM's pseudo-label stage: two-class heads average to (A, B, 0) labels; a mix of two- and three-class heads
    is refused before a model loads."""
    first = make_checkpoint(tmp_path / "two_first", setup["base"], seed=2, num_classes=2)
    second = make_checkpoint(tmp_path / "two_second", setup["base"], seed=3, num_classes=2)
    out = tmp_path / "two.parquet"
    pseudo_label_main([f"checkpoints=[{first},{second}]", f"data.test_path={setup['unlabelled']}",
                       f"output={out}", "show_progress=false"])
    labels = np.array([p.target for p in read_pairs(out, require_labels=True)])  # (N, 3)
    expected = (tta_probs(first, setup["unlabelled"]) + tta_probs(second, setup["unlabelled"])) / 2  # (N, 2)
    assert expected.shape == (12, 2) and np.abs(expected[:, 0] - 0.5).max() > 1e-3
    assert np.abs(labels[:, :2] - expected).max() <= 1e-9 and (labels[:, 2] == 0).all()
    with pytest.raises(CheckpointError, match=f"checkpoints={first} predicts 2 classes, {setup['first']} 3"):
        pseudo_label_main([f"checkpoints=[{setup['first']},{first}]", f"data.test_path={setup['unlabelled']}",
                           f"output={tmp_path / 'mixed.parquet'}", "show_progress=false"])
    assert not (tmp_path / "mixed.parquet").exists()


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
    """Both stages validate, stage 2 trains on the file the stage-1 recipe's pseudo_label step writes and is
    judged on the same real labels, and only stage 2's training file holds soft labels."""
    stage1, stage2 = (validated_config(compose_config(f"conf_r_llama_smol_stage{k}")) for k in (1, 2))
    documented = (ROOT / "conf" / "conf_r_llama_smol_stage1.yaml").read_text()
    assert f"output={stage2.data.train_path}" in documented  # step 3 of stage 1 writes what stage 2 reads
    assert stage2.data.train_path.endswith(".parquet") and stage1.data.train_path.endswith(".csv")
    assert stage2.data.valid_path == stage1.data.valid_path
    assert stage1.model.path == stage2.model.path and stage2.loss.distill_temperature == 1.0


def first_update_check(config, run_dir: Path, soft: dict) -> tuple[float, dict[str, float]]:
    """The stage-2 recipe's first update loss, and the loss of the same logits computed here on the pseudo file's
    soft targets: as they are at the config's temperature, hardened to their argmax, and at temperature 1."""
    recipe = TrainingRecipe.setup(config, run_dir, "stage2: {}\n")
    try:
        update = next(iterate_updates(recipe.train_split, recipe.settings, 0, 1))
        logits, targets = [], []
        with torch.no_grad():
            for group in update.micro_batches:
                batch = collate(group, recipe.settings.batching)
                logits.append(recipe.model(**batch.model_inputs(recipe.accelerator.device)).float())
                for index, swapped in zip(batch.pair_index, batch.swapped, strict=True):
                    row = soft[recipe.train_split.pairs[index].id]
                    targets.append(swap_abt(row) if swapped else row)  # the example's own class order
        logits, targets = torch.cat(logits), torch.tensor(np.array(targets), dtype=torch.float32)
        hard = torch.nn.functional.one_hot(targets.argmax(-1), 3).float()
        temperature = config.loss.distill_temperature
        expected = {"soft": soft_cross_entropy(logits, targets, temperature=temperature).item(),
                    "hard": soft_cross_entropy(logits, hard, temperature=temperature).item(),
                    "t1": soft_cross_entropy(logits, targets).item()}
        return recipe.update(update).loss, expected
    finally:
        release(recipe.accelerator)


def test_stage_two_trains_on_the_soft_labels_at_the_distill_temperature(setup, tmp_path):
    """The first update's loss is the soft-target CE of the pseudo file at T=2: it would differ (by far more than
    float rounding) if the labels had been hardened on the way or the temperature ignored."""
    pseudo = tmp_path / "pseudo.parquet"
    pseudo_label_main([f"checkpoints=[{setup['first']}]", f"data.test_path={setup['unlabelled']}", f"output={pseudo}",
                       "show_progress=false"])
    soft = {row.id: np.array(row.label, dtype=float) for row in pd.read_parquet(pseudo).itertuples()}
    assert max(p.max() for p in soft.values()) < 0.99  # soft: hardening them would change the targets
    config = validated_config(compose_config("conf_r_llama_smol_stage2", (
        f"model.path={setup['base']}", f"data.train_path={pseudo}", f"data.valid_path={setup['valid']}",
        "trainer.max_steps=1", "model.max_length=128", "trainer.max_tokens=512", "lora.dropout=0.0",
        "model.head_init_std=0.5",  # logits far from uniform, so the targets matter to the loss
        "loss.distill_temperature=2.0")))
    loss, expected = first_update_check(config, tmp_path / "stage2", soft)
    assert loss == pytest.approx(expected["soft"], abs=1e-5)
    # each alternative 10x the tolerance above away at least (soft vs hard measured 4.5e-4 apart)
    assert abs(expected["soft"] - expected["hard"]) > 1e-4 and abs(expected["soft"] - expected["t1"]) > 1e-4
