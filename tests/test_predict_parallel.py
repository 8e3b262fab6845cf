"""Two devices: data-parallel prediction (`python -m lmsys.predict` under torchrun, 2 CPU processes) gives every id
exactly once and the one-process predictions; one model split over devices (`device_map`) predicts like one device.

The split is planned for two (absent) GPUs by accelerate from max_memory, then run with each planned device
replaced by the CPU: the module placement, the hooks and our pooling/head across the boundary run for real; the
copies between two GPUs do not (that needs two GPUs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from accelerate import Accelerator
from entry_runs import run_side_by_side
from test_predict import make_checkpoint
from tiny import arena_frame, build_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

import lmsys.prediction
from lmsys.builders import build_prediction_spec
from lmsys.config import Quantization
from lmsys.data.io import read_pairs
from lmsys.modeling.precision import plan_device_map
from lmsys.prediction import predict_checkpoint
from lmsys.prediction_config import DeviceMap, PredictConfig

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}


def six_layer_llama(directory: Path) -> Path:
    """A tiny Llama with six decoder layers (~150 KB each in float32), so that a split has layers to share out."""
    tokenizer = build_tokenizer(False)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parallel")
    checkpoint = make_checkpoint(root / "checkpoint", six_layer_llama(root / "base"), seed=5)
    arena_frame(11, seed=9, labelled=False, start_id=700).sample(frac=1.0, random_state=2).to_csv(
        root / "test.csv", index=False)  # odd: the two ranks predict 6 and 5 pairs
    return {"root": root, "checkpoint": checkpoint, "test": root / "test.csv"}


def test_data_parallel_predict_equals_one_process(setup):
    root = setup["root"]
    args = [f"checkpoint={setup['checkpoint']}", f"data.test_path={setup['test']}", "quantization=none",
            "show_progress=false"]
    one = subprocess.run([sys.executable, "-m", "lmsys.predict", *args, f"output={root / 'one.csv'}"],
                         capture_output=True, text=True, env=ENV, cwd=root, check=False)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "lmsys.predict", *args, f"output={root / 'two.csv'}"],
                         capture_output=True, text=True, env=ENV, cwd=root, check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    single, parallel = pd.read_csv(root / "one.csv"), pd.read_csv(root / "two.csv")
    ids = list(pd.read_csv(setup["test"]).id)
    assert list(parallel.id) == ids and parallel.id.is_unique  # every id once, in input order
    np.testing.assert_allclose(parallel.iloc[:, 1:].to_numpy(), single.iloc[:, 1:].to_numpy(), atol=1e-5)


def test_cli_help_and_typo(setup):
    shown, typo = run_side_by_side([
        [sys.executable, "-m", "lmsys.predict", "--help"],
        [sys.executable, "-m", "lmsys.predict", f"checkpoint={setup['checkpoint']}", "data.test_path=t.csv",
         "output=o.csv", "quantisation=int8"],
    ], env=ENV)
    assert shown.returncode == 0 and "device_map=auto|balanced" in shown.stdout
    assert typo.returncode == 2 and typo.stderr.strip().splitlines()[-1] == (
        "error: Key 'quantisation' not in 'PredictConfig'")


@pytest.mark.parametrize(("mode", "max_memory"), [("auto", {0: "500KB", 1: "10MB"}), ("balanced", None)])
def test_device_map_plans_a_split_and_predicts_like_one_device(setup, monkeypatch, mode, max_memory):
    memory = max_memory or {0: "10MB", 1: "10MB"}
    plan = plan_device_map(setup["root"] / "base", mode, memory, torch.float32)
    layers = {name: device for name, device in plan.items() if name.startswith("layers.")}
    assert plan["embed_tokens"] == 0 and plan["norm"] == 1 and set(layers.values()) == {0, 1}
    if mode == "balanced":
        assert sorted(layers.values()).count(0) >= 2  # balanced: both devices hold layers, not just the first

    def on_cpu(*args, **kwargs):  # the same plan, every device replaced by the CPU
        return {name: "cpu" for name in plan_device_map(*args, **kwargs)}

    monkeypatch.setattr(lmsys.prediction, "plan_device_map", on_cpu)
    pairs = read_pairs(setup["test"], False)
    logits = {}
    for split in (False, True):
        settings = PredictConfig(checkpoint=str(setup["checkpoint"]), output="unused.csv", show_progress=False,
                                 quantization=Quantization.none, device_map=DeviceMap(mode) if split else None,
                                 max_memory=dict(memory) if split else None)
        spec = build_prediction_spec(settings.checkpoint, settings)
        preds = predict_checkpoint(settings.checkpoint, spec, pairs, settings, Accelerator(cpu=True))
        logits[split] = np.concatenate([preds.logits_ab, preds.logits_ba], axis=1)
    assert np.abs(logits[False]).max() > 0.1
    np.testing.assert_allclose(logits[True], logits[False], atol=1e-6)
