"""The HF Trainer peer of the benchmark on a tiny NF4 model: the same token ids and LoRA as our modes, gradient
checkpointing in the typical variant only, and every real token of one pass counted (warm-up excluded)."""

import bitsandbytes as bnb
import numpy as np
import pytest
import tiny
import torch
from peft.tuners.lora import LoraLayer

from lmsys.bench import load_config
from lmsys.bench_peer import PEER_VARIANTS, build_peer_model, measure_peer, rows
from lmsys.builders import build_encoders, build_spec, build_tokenizer
from lmsys.config import PEER_MODES
from lmsys.data.dataset import encode_split
from lmsys.data.io import read_pairs

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bench_config(tiny_models, tmp_path_factory):
    train = tmp_path_factory.mktemp("peer") / "train.csv"
    tiny.arena_frame(16, seed=5).to_csv(train, index=False)

    def config(*overrides: str):
        return load_config("conf_r_llama_smol", [
            f"model.path={tiny_models['llama']}", "model.max_length=128", f"data.train_path={train}",
            "bench.n_pairs=16", "trainer.batch_size=4", "trainer.grad_accum=2", *overrides])
    return config


def encoded(config):
    spec = build_spec(config.model, config.data, packing=False)
    tokenizer = build_tokenizer(config.model.path, False)
    return encode_split(read_pairs(config.data.train_path, require_labels=True), build_encoders(spec, tokenizer)), spec


def test_the_peer_sees_our_token_ids_and_argmax_labels(bench_config):
    assert set(PEER_VARIANTS) == set(PEER_MODES)
    split, _ = encoded(bench_config())
    dataset = rows(split.forward, with_labels=True)
    assert [row["input_ids"] for row in dataset] == [ex.ids.tolist() for ex in split.forward]
    assert [row["labels"] for row in dataset] == [int(np.argmax(pair.target)) for pair in split.pairs]
    assert {row["labels"] for row in dataset} == {0, 1, 2}
    assert rows(split.swapped, with_labels=False)[0] == {"input_ids": split.swapped[0].ids.tolist()}


@pytest.mark.parametrize("mode,checkpointing", [("hf_trainer_typical", True), ("hf_trainer_strong", False)])
def test_the_peer_model_is_the_same_qlora(bench_config, mode, checkpointing):
    config = bench_config()
    _, spec = encoded(config)
    model = build_peer_model(config, spec.attn_implementation.value, 0, torch.float32, PEER_VARIANTS[mode], CPU)
    assert model.get_base_model().is_activation_checkpointing == checkpointing
    lora = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(lora) == 2 * len(config.lora.target_modules)  # every target of both layers
    assert all(m.r["default"] == config.lora.r and m.scaling["default"] == config.lora.alpha / config.lora.r
               for m in lora)
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) and m.base_layer.weight.quant_state.quant_type == "nf4"
               for m in lora)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name or ".score." in name for name in trainable)
    assert any(".score." in name for name in trainable)


@pytest.mark.parametrize("mode", PEER_MODES)
@pytest.mark.filterwarnings("error:torch.utils.checkpoint")  # the typical peer says use_reentrant, as torch asks
def test_one_pass_counts_every_real_token(bench_config, mode):
    """16 pairs at 8 pairs an update: after the warm-up (3 updates asked, an epoch's 2 run), the two timed updates
    are exactly one pass over the pairs (a window running on into a second epoch counted some pairs twice)."""
    config = bench_config("bench.warmup_updates=3")
    split, _ = encoded(config)
    result = measure_peer(config, mode)
    assert result["train_updates"] == 2
    assert result["train_real_tokens"] == sum(len(ex.ids) for ex in split.forward)
    assert 0.0 < result["train_padding_share"] < 0.5
    assert result["gradient_checkpointing"] == (mode == "hf_trainer_typical")
    assert result["compute_dtype"] == "float32"  # auto, pinned to fp32 in the test suite
    assert result["predict_single_pairs_per_s"] > result["predict_pairs_per_s"] > 0  # TTA: twice the forwards
    assert result["train_seconds"] > 0 and result["peak_rss_mb"] > 100
