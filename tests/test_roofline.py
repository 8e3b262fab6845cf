"""The roofline's arithmetic: projection weights counted from config.json equal the real models' linear weights
(every family, and a layout where head_dim * heads != hidden), the FLOPs-per-token formula, and a rate measurement
that runs in both dtypes (no timing asserted)."""

import math

import pytest
import torch
from torch import nn
from transformers import AutoModel, LlamaConfig

from lmsys.roofline import ProjectionShapes, flops_per_token, matmul_rate, tokens_per_s_limit


def linear_weights_and_norms(model: nn.Module) -> tuple[int, int]:
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    return linear, sum(p.numel() for p in model.parameters()) - embedding - linear


@pytest.mark.parametrize("kind", ["llama", "gemma2", "gemma3"])
def test_projection_weights_match_the_real_model(tiny_models, kind):
    shapes = ProjectionShapes.from_model_dir(tiny_models[kind])
    linear, rest = linear_weights_and_norms(AutoModel.from_pretrained(tiny_models[kind]))
    assert shapes.layers == 2 and shapes.matmul_params() == linear
    assert 0 < rest < 0.1 * linear  # what is left of the non-embedding parameters: the norms' scales


def test_head_dim_and_kv_heads_are_read_from_the_config(tmp_path):
    config = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24)
    model = AutoModel.from_config(config)
    model.save_pretrained(tmp_path)
    shapes = ProjectionShapes.from_model_dir(tmp_path)
    assert (shapes.heads, shapes.kv_heads, shapes.head_dim) == (4, 2, 24)
    # per layer: q 64*96, k and v 64*48, o 96*64, gate and up 64*96, down 96*64
    assert shapes.matmul_params() == 3 * (64 * 96 + 2 * 64 * 48 + 96 * 64 + 2 * 64 * 96 + 96 * 64)
    assert shapes.matmul_params() == linear_weights_and_norms(model)[0]


def test_the_limit_is_the_rate_over_four_or_six_flops_a_weight():
    smollm2 = ProjectionShapes(hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64, layers=30)
    params = smollm2.matmul_params()
    assert params == 106_168_320
    assert flops_per_token(params, False) == 4 * params and flops_per_token(params, True) == 6 * params
    assert tokens_per_s_limit(150.0, params, False) == pytest.approx(353.21, abs=0.01)  # the fp32 ~350
    assert tokens_per_s_limit(370.0, params, False) == pytest.approx(871.26, abs=0.01)  # and bf16 ~870
    assert tokens_per_s_limit(150.0, params, True) == pytest.approx(235.48, abs=0.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rate_is_measured_in_each_dtype(dtype):
    shapes = ProjectionShapes(hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, layers=2)
    rate = matmul_rate(shapes, dtype, tokens=32, repeats=2)
    assert math.isfinite(rate) and rate > 0
