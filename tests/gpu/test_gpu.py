"""CUDA checks of what the CPU suite cannot cover: NF4 QLoRA training per family and compute dtype, packed ==
padded logits per attention kernel, 8-bit AdamW, Kahan-summed AdamW, swap-TTA symmetry of prediction. Tiny random
models."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest
import tiny
import torch
from accelerate import Accelerator
from test_predict import make_checkpoint, predict_cfg, swapped_frame
from tiny import arena_frame, model_settings

from lmsys.builders import build_encoders, build_loop_settings, build_model, build_tokenizer
from lmsys.config import (
    Attention,
    ComputeDtype,
    DataConfig,
    LoraConfig,
    OptimizerName,
    PaddingSide,
    TrainConfig,
    TrainerConfig,
)
from lmsys.data.batching import collate
from lmsys.data.dataset import encode_split
from lmsys.data.io import read_pairs
from lmsys.modeling.losses import soft_cross_entropy
from lmsys.prediction import run_prediction
from lmsys.training.loss_scaling import grad_scaler_for
from lmsys.training.optim import create_optimizer, parameter_groups, warmup_cosine_scheduler
from lmsys.training.plan import iterate_updates
from lmsys.training.recipe import TrainingRecipe

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
FAMILY = {"llama": "llama", "gemma2": "gemma", "gemma3": "gemma"}
UPDATES = 20


def cuda_model(model_dir, kind: str, quantization: str = "nf4", dtype: str = "bfloat16", attention: str = "auto"):
    model_cfg, _, spec = model_settings(model_dir, FAMILY[kind], quantization, compute_dtype=ComputeDtype(dtype),
                                        attn_implementation=Attention(attention))
    torch.manual_seed(0)
    model = build_model(spec, model_cfg, LoraConfig(dropout=0.0), CUDA)
    [encoder] = build_encoders(spec, build_tokenizer(model_dir, False))
    return model, encoder


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu_pairs") / "pairs.csv"
    arena_frame(8, seed=1).to_csv(path, index=False)
    return read_pairs(path, require_labels=True)


def batch_of(encoder, pairs, packed: bool):
    """All pairs in one micro-batch: packed rows of up to 512 tokens, or one left-padded row per pair."""
    return collate(encode_split(pairs, [encoder]).forward,
                   tiny.batching(packed, encoder.tokenizer.pad_token_id, PaddingSide.left, 512))


def train_losses(model, batch, optimizer_name: OptimizerName) -> list[float]:
    optimizer = create_optimizer(parameter_groups(model, 1e-3, 1e-3, 1.0, 0.0), optimizer_name, (0.9, 0.999), 1e-8)
    model.train()
    losses = []
    for _ in range(UPDATES):
        logits = model(**batch.model_inputs(CUDA))
        loss = soft_cross_entropy(logits, batch.targets.to(CUDA), 0.0, 1.0, reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("kind", ["llama", "gemma2", "gemma3"])
def test_nf4_qlora_training_loss_falls(tiny_models, pairs, kind, dtype):
    model, encoder = cuda_model(tiny_models[kind], kind, dtype=dtype)
    base = next(m for m in model.modules() if type(m).__name__ == "Linear4bit")
    assert base.weight.device.type == "cuda" and base.compute_dtype == getattr(torch, dtype)
    losses = train_losses(model, batch_of(encoder, pairs, True), OptimizerName.adamw)
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.7 * losses[0], losses


def test_adamw_8bit_trains_on_cuda(tiny_models, pairs):
    model, encoder = cuda_model(tiny_models["llama"], "llama")
    losses = train_losses(model, batch_of(encoder, pairs, True), OptimizerName.adamw_8bit)
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("sharded", [False, True])  # optimi's Triton kernels (its CUDA default), its foreach path
def test_kahan_summation_keeps_bf16_updates_on_cuda(sharded):
    """Small AdamW updates of bf16 weights: kept with the compensation (each path within 5% of the float32 run's
    movement), rounded away without it."""
    generator = torch.Generator().manual_seed(0)
    start = (torch.randn(96, 64, generator=generator) * 0.02).to(CUDA)
    inputs = torch.randn(256, 64, generator=generator).to(CUDA)
    targets = torch.randn(256, 96, generator=generator).to(CUDA)
    finals = {}
    for dtype, kahan in ((torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, False)):
        weight = torch.nn.Parameter(start.to(dtype, copy=True))
        optimizer = create_optimizer([{"params": [weight], "lr": 1e-5, "weight_decay": 0.0}], OptimizerName.adamw,
                                     (0.9, 0.999), 1e-8, kahan, sharded)
        for _ in range(150):
            optimizer.zero_grad()
            ((inputs.to(dtype) @ weight.T).float() - 0.1 * targets).pow(2).mean().backward()
            optimizer.step()
        finals[(dtype, kahan)] = weight.detach().float()
    moved = (finals[(torch.float32, None)] - start).abs().mean()
    assert (finals[(torch.bfloat16, None)] - finals[(torch.float32, None)]).abs().mean() < 0.05 * moved
    assert (finals[(torch.bfloat16, False)] - finals[(torch.float32, None)]).abs().mean() > 0.5 * moved


def test_float16_training_through_the_recipe_scales_the_loss_on_cuda(tiny_models, pairs):
    """`TrainingRecipe.update` in float16 on CUDA with the GradScaler the trainer builds: the loss falls over 20
    updates of all 8 pairs, and the weights stay finite whatever steps an overflow skipped."""
    model_cfg, _, spec = model_settings(tiny_models["llama"], "llama", "nf4", compute_dtype=ComputeDtype.float16)
    torch.manual_seed(0)
    model = build_model(spec, model_cfg, LoraConfig(dropout=0.0), CUDA)
    tokenizer = build_tokenizer(tiny_models["llama"], False)
    split = encode_split(pairs, build_encoders(spec, tokenizer))
    config = TrainConfig(model=model_cfg, data=DataConfig(train_path="unused.csv"),
                         trainer=TrainerConfig(epochs=UPDATES, batch_size=8, max_tokens=1024))
    settings = build_loop_settings(config, spec, len(split), 1, tokenizer.pad_token_id)
    optimizer = create_optimizer(parameter_groups(model, 1e-3, 1e-3, 1.0, 0.0), OptimizerName.adamw, (0.9, 0.999), 1e-8)
    scaler = grad_scaler_for(ComputeDtype.float16, CUDA.type, False)
    recipe = TrainingRecipe(Accelerator(), model, optimizer, warmup_cosine_scheduler(optimizer, UPDATES, 0.0, 1.0),
                            settings, split, grad_scaler=scaler)
    model.train()
    losses = [recipe.update(update).loss for update in iterate_updates(split, settings, 0, 1)]
    assert scaler.is_enabled() and len(losses) == UPDATES
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)
    assert losses[-1] < 0.8 * losses[0], losses


KERNELS = [("llama", "sdpa", "float32", 1e-4), ("gemma2", "eager", "float32", 1e-4),
           ("llama", "flash_attention_2", "bfloat16", 5e-2), ("llama", "flex_attention", "float32", 1e-3)]


@pytest.mark.parametrize(("kind", "attention", "dtype", "tolerance"), KERNELS)
def test_packed_equals_padded_logits(tiny_models, pairs, kind, attention, dtype, tolerance):
    if attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash_attn is not installed")
    model, encoder = cuda_model(tiny_models[kind], kind, quantization="none", dtype=dtype, attention=attention)
    model.eval()
    with torch.inference_mode():
        packed = model(**batch_of(encoder, pairs, True).model_inputs(CUDA)).float()
        padded = model(**batch_of(encoder, pairs, False).model_inputs(CUDA)).float()
    assert (packed - padded).abs().max() <= tolerance


def test_prediction_with_tta_is_exactly_swap_symmetric(tiny_models, tmp_path):
    checkpoint = make_checkpoint(tmp_path / "checkpoint", tiny_models["llama"])
    frame = arena_frame(24, seed=3, labelled=False, start_id=100)
    frame.to_csv(tmp_path / "test.csv", index=False)
    swapped_frame(frame).to_csv(tmp_path / "swapped.csv", index=False)
    subs = {}
    for name in ("test", "swapped"):
        run_prediction(predict_cfg(checkpoint=checkpoint, **{"data.test_path": tmp_path / f"{name}.csv"},
                                   output=tmp_path / f"{name}_sub.csv", show_progress=False))
        subs[name] = pd.read_csv(tmp_path / f"{name}_sub.csv")[["winner_model_a", "winner_model_b", "winner_tie"]]
    assert torch.cuda.max_memory_allocated() > 0  # it ran on the GPU
    np.testing.assert_array_equal(subs["test"].to_numpy(), subs["swapped"].to_numpy()[:, [1, 0, 2]])
