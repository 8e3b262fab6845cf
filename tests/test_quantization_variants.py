"""model.quantization=int8|fp4 and lora.use_dora=true on the tiny model: a training step changes the adapter,
prediction from the saved checkpoint matches the model in memory, and dense_weights folding folds fp4 and leaves
int8 and DoRA layers unfolded, naming them and why."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny import arena_frame, batching, model_settings

from lmsys.builders import build_encoders, build_model, build_tokenizer
from lmsys.config import LoraConfig
from lmsys.data.batching import collate
from lmsys.data.dataset import encode_split
from lmsys.data.io import read_pairs
from lmsys.modeling.backbone import fold_into_dense
from lmsys.modeling.checkpoint import read_spec, save_checkpoint
from lmsys.modeling.losses import soft_cross_entropy

CPU = torch.device("cpu")
CASES = {  # (quantization, use_dora) -> the reason fold_into_dense gives for leaving the layers, None: it folds
    ("fp4", False): None,
    ("none", False): None,
    ("int8", False): "int8 base",
    ("nf4", True): "DoRA",
}


def inputs(tmp_path, spec, tokenizer):
    arena_frame(6, seed=12).to_csv(tmp_path / "pairs.csv", index=False)
    split = encode_split(read_pairs(tmp_path / "pairs.csv", require_labels=True), build_encoders(spec, tokenizer))
    return collate(split.forward, batching(True, tokenizer.pad_token_id, spec.padding_side, 128))


@pytest.mark.parametrize(("quantization", "use_dora"), list(CASES))
def test_train_step_reload_and_fold(tiny_models, tmp_path, caplog, monkeypatch, quantization, use_dora):
    model_cfg, _, spec = model_settings(tiny_models["llama"], "llama", quantization, head_init_std=0.5)
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, use_dora=use_dora)
    torch.manual_seed(0)
    model = build_model(spec, model_cfg, lora, CPU)
    tokenizer = build_tokenizer(tiny_models["llama"], False)
    batch = inputs(tmp_path, spec, tokenizer)
    adapter = {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    assert adapter and (not use_dora or any("magnitude" in n for n in adapter))
    before = {n: p.detach().clone() for n, p in adapter.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    soft_cross_entropy(model(**batch.model_inputs(CPU)), batch.targets).backward()
    optimizer.step()
    assert any((adapter[n].detach() - before[n]).abs().max() > 1e-4 for n in adapter if "lora_B" in n)

    model.eval()
    with torch.no_grad():
        in_memory = model(**batch.model_inputs(CPU)).float()
    save_checkpoint(tmp_path / "checkpoint", model, tokenizer, spec)
    saved = read_spec(tmp_path / "checkpoint")
    assert saved.quantization.value == quantization
    reloaded = build_model(saved, None, None, CPU, adapter_dir=tmp_path / "checkpoint")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch.model_inputs(CPU)).float(), in_memory, rtol=0, atol=1e-5)

        with caplog.at_level(logging.WARNING, logger="lmsys"):
            folded = fold_into_dense(reloaded)
        reason = CASES[quantization, use_dora]
        if reason is None:
            assert folded > 0 and "left unfolded" not in caplog.text
            # the 4-bit CPU GEMM rounds to bfloat16, the dense fold computes in float32; an unquantized base folds
            # in its own float32
            tolerance = 1e-5 if quantization == "none" else 5e-2
            torch.testing.assert_close(reloaded(**batch.model_inputs(CPU)).float(), in_memory, rtol=0, atol=tolerance)
        else:
            assert folded == 0 and f"left unfolded, {reason}" in caplog.text and "q_proj" in caplog.text
