"""Format augmentation (`data.formats=[pab,papb]`): one encoder per format, predictions averaged over the formats
with swap TTA still exactly symmetric, the checkpoint's formats, and a run of the entry point with both formats
and full swap."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from accelerate import Accelerator
from entry_runs import run_side_by_side
from tiny import arena_frame

from lmsys import builders
from lmsys.builders import (
    build_encoders,
    build_model,
    build_prediction_spec,
    build_spec,
    build_tokenizer,
    build_train_batching,
)
from lmsys.cli import parse_config
from lmsys.config import (
    DataConfig,
    Family,
    InputFormat,
    LoraConfig,
    ModelConfig,
    SwapMode,
    TrainConfig,
    TrainerConfig,
)
from lmsys.data.dataset import encode_split
from lmsys.data.io import pairs_from_frame, read_pairs
from lmsys.data.schema import swap_abt
from lmsys.modeling.checkpoint import read_spec, save_checkpoint
from lmsys.prediction import predict_checkpoint, run_prediction
from lmsys.prediction_config import PredictConfig

ROOT = Path(__file__).resolve().parents[1]
BOTH = [InputFormat.pab, InputFormat.papb]


def spec_of(base: Path, formats: list[InputFormat]):
    model_cfg = ModelConfig(path=str(base), family=Family.llama, max_length=128, head_init_std=0.5)
    return model_cfg, build_spec(model_cfg, DataConfig(train_path="unused", formats=formats), packing=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_models) -> Path:
    """A tiny Llama checkpoint trained (as far as its spec says) on both formats, with a random adapter and head."""
    model_cfg, spec = spec_of(tiny_models["llama"], BOTH)
    torch.manual_seed(0)
    model = build_model(spec, model_cfg, LoraConfig(r=8, alpha=16, dropout=0.0), torch.device("cpu"))
    with torch.no_grad():
        for name, param in model.backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    directory = tmp_path_factory.mktemp("formats") / "checkpoint"
    save_checkpoint(directory, model, build_tokenizer(tiny_models["llama"], False), spec)
    return directory


@pytest.fixture(scope="module")
def test_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("format_files")
    frame = arena_frame(16, seed=5, labelled=False, start_id=300)
    swapped = frame.copy()
    swapped["response_a"], swapped["response_b"] = frame["response_b"], frame["response_a"]
    paths = {"test": root / "test.csv", "swapped": root / "swapped.csv"}
    frame.to_csv(paths["test"], index=False)
    swapped.to_csv(paths["swapped"], index=False)
    return paths


def test_each_format_encodes_every_pair_with_its_format_index(tiny_models):
    _, spec = spec_of(tiny_models["llama"], BOTH)
    tokenizer = build_tokenizer(tiny_models["llama"], False)
    encoders = build_encoders(spec, tokenizer)
    assert [enc.input_format for enc in encoders] == BOTH
    pairs = pairs_from_frame(arena_frame(6, seed=1), "frame", require_labels=True)
    split = encode_split(pairs, encoders)
    assert split.n_formats == 2 and split.forward is split.forward_by_format[0]
    for k, encoder in enumerate(encoders):
        alone = encode_split(pairs, [encoder])  # the same examples as a single-format split of that format
        for swapped in (False, True):
            for index in range(len(pairs)):
                ex = split.example(index, swapped, k)
                assert (ex.pair_index, ex.swapped, ex.format_index) == (index, swapped, k)
                assert np.array_equal(ex.ids, alone.example(index, swapped).ids)
    for index in range(len(pairs)):
        pab, papb = split.example(index, False, 0), split.example(index, False, 1)
        assert not np.array_equal(pab.ids, papb.ids) and pab.target == papb.target
        assert "# Conversation with A" in tokenizer.decode(papb.ids)
        assert "# Conversation with A" not in tokenizer.decode(pab.ids)


def predictions(checkpoint: Path, path: Path, formats: list[str] | None = None):
    values = {"checkpoint": checkpoint, "data.test_path": path, "output": "unused.csv", "show_progress": "false"}
    if formats is not None:
        values["formats"] = "[" + ",".join(formats) + "]"
    cfg = parse_config(PredictConfig, [f"{key}={value}" for key, value in values.items()])
    spec = build_prediction_spec(cfg.checkpoint, cfg)
    return predict_checkpoint(cfg.checkpoint, spec, read_pairs(path, False), cfg, Accelerator(cpu=True)), spec


def test_predictions_average_the_formats_and_tta_stays_exactly_symmetric(checkpoint, test_files):
    both, spec = predictions(checkpoint, test_files["test"])
    assert spec.input_formats == tuple(BOTH)  # the checkpoint's formats by default
    pab, _ = predictions(checkpoint, test_files["test"], ["pab"])
    papb, _ = predictions(checkpoint, test_files["test"], ["papb"])
    np.testing.assert_array_equal(both.format_logits_ab[0], pab.logits_ab)  # each format its own pass
    np.testing.assert_array_equal(both.format_logits_ba[1], papb.logits_ba)
    assert np.abs(pab.logits_ab - papb.logits_ab).max() > 0.1  # the formats disagree: the average is not vacuous
    np.testing.assert_allclose(both.probs_ab, (pab.probs_ab + papb.probs_ab) / 2, rtol=0, atol=1e-12)
    np.testing.assert_allclose(both.probs_ba_back, (pab.probs_ba_back + papb.probs_ba_back) / 2, rtol=0, atol=1e-12)
    for mode in ("prob", "logit"):
        mirrored, _ = predictions(checkpoint, test_files["swapped"])
        assert np.array_equal(both.combined(mode), swap_abt(mirrored.combined(mode)))  # to the bit
    # without TTA the random model is far from symmetric (the check above is not vacuous)
    assert np.abs(both.logits_ab - swap_abt(mirrored.logits_ab)).max() > 0.1


def test_logits_output_has_the_first_format_and_each_formats_columns(checkpoint, test_files, tmp_path):
    cfg = parse_config(PredictConfig, [f"checkpoint={checkpoint}", f"data.test_path={test_files['test']}",
                                       f"output={tmp_path / 'sub.csv'}", f"logits_output={tmp_path / 'logits.csv'}",
                                       "show_progress=false"])
    run_prediction(cfg)
    logits = pd.read_csv(tmp_path / "logits.csv", dtype={"id": str})
    plain = ["logit_a", "logit_b", "logit_tie", "swapped_logit_a", "swapped_logit_b", "swapped_logit_tie"]
    assert list(logits.columns) == ["id", *plain, *[c + "_pab" for c in plain], *[c + "_papb" for c in plain]]
    np.testing.assert_array_equal(logits[plain].to_numpy(), logits[[c + "_pab" for c in plain]].to_numpy())
    single, _ = predictions(checkpoint, test_files["test"], ["papb"])
    np.testing.assert_allclose(logits[["logit_a_papb", "logit_b_papb", "logit_tie_papb"]].to_numpy(),
                               single.logits_ab, atol=1e-5)  # the CSV rounds


def test_a_format_the_checkpoint_was_not_trained_on_is_a_warning(tiny_models, test_files, tmp_path, monkeypatch):
    model_cfg, spec = spec_of(tiny_models["llama"], [InputFormat.pab])
    model = build_model(spec, model_cfg, LoraConfig(r=8, alpha=16, dropout=0.0), torch.device("cpu"))
    save_checkpoint(tmp_path / "ckpt", model, build_tokenizer(tiny_models["llama"], False), spec)
    assert read_spec(tmp_path / "ckpt").input_formats == (InputFormat.pab,)
    cfg = parse_config(PredictConfig, [f"checkpoint={tmp_path / 'ckpt'}", f"data.test_path={test_files['test']}", "output=o.csv", "formats=[papb,pab]"])
    warnings = []  # the "lmsys" logger may not propagate (setup_logging), so its warning method is recorded
    monkeypatch.setattr(builders.log, "warning", lambda message, *args: warnings.append(message % args))
    assert build_prediction_spec(cfg.checkpoint, cfg).input_formats == (InputFormat.papb, InputFormat.pab)
    assert len(warnings) == 1 and "trained on formats ['pab'], not on ['papb']" in warnings[0]


def test_bad_formats_fail_before_a_model_loads(tmp_path):
    arguments = ["formats=[]", "formats=[pab,pab]", "formats=[pabp]"]
    results = run_side_by_side([[sys.executable, "-m", "lmsys.predict", f"checkpoint={tmp_path}", "output=o.csv",
                                 f"data.test_path={tmp_path / 't.csv'}", argument] for argument in arguments], cwd=ROOT)
    for argument, result in zip(arguments, results, strict=True):
        assert result.returncode == 2 and "formats" in result.stderr, (argument, result.stderr[-2000:])


@pytest.mark.parametrize("formats,swap,examples_per_micro_batch", [([InputFormat.pab], "none", 3),
                                                                ([InputFormat.pab], "full", 6), (BOTH, "none", 6),
                                                                (BOTH, "full", 12)])
def test_padded_micro_batches_hold_batch_size_pairs_in_every_format(tiny_models, formats, swap, examples_per_micro_batch):
    model_cfg, spec = spec_of(tiny_models["llama"], formats)
    config = TrainConfig(model=model_cfg, data=DataConfig(train_path="unused", formats=formats),
                         trainer=TrainerConfig(packing=False, batch_size=3, swap_augmentation=SwapMode(swap)))
    assert build_train_batching(config, spec, pad_id=0).batch_size == examples_per_micro_batch


def test_entry_point_trains_both_formats_with_full_swap(tiny_models, arena_files, tmp_path):
    """The whole path from the command line: both formats and full swap train, validate with TTA and checkpoint
    their formats (the plan's 4 examples per pair in one update are tested in tests/training/test_swap.py)."""
    run_dir = tmp_path / "run"
    command = [
        sys.executable, str(ROOT / "lmsys" / "code" / "train_r_llama.py"), "--config-name", "conf_r_llama_smol",
        f"model.path={tiny_models['llama']}", f"data.train_path={arena_files['train']}",
        f"data.valid_path={arena_files['valid']}", f"hydra.run.dir={run_dir}", "trainer.max_steps=2",
        "model.max_length=128", "trainer.max_tokens=512", "trainer.batch_size=2", "trainer.grad_accum=1",
        "data.formats=[pab,papb]", "trainer.swap_augmentation=full", "trainer.eval_tta=true",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=400, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    assert read_spec(run_dir / "checkpoint").input_formats == tuple(BOTH)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["updates"] == 2 and np.isfinite(metrics["best"]["log_loss"])
    oof = pd.read_csv(run_dir / "oof.csv")
    assert np.allclose(oof[["winner_model_a", "winner_model_b", "winner_tie"]].sum(1), 1.0)
