"""sdpa of a bfloat16 model on CPU trains in float32 on short rows: the same attention, with sdpa's packed mask;
evaluation and long rows keep torch's bf16 sdpa."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lmsys.modeling.attention import FLOAT32_MAX_ROW, SDPA_FLOAT32, attention_kernel, sdpa_in_float32

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("name,dtype,device,expected", [
    ("sdpa", torch.bfloat16, CPU, SDPA_FLOAT32),
    ("sdpa", torch.float32, CPU, "sdpa"),
    ("sdpa", torch.bfloat16, CUDA, "sdpa"),
    ("eager", torch.bfloat16, CPU, "eager"),
    ("flash_attention_2", torch.bfloat16, CUDA, "flash_attention_2"),
])
def test_only_bfloat16_sdpa_on_cpu_changes_kernel(name, dtype, device, expected):
    assert attention_kernel(name, dtype, device) == expected


def qkv(seed: int = 0, batch: int = 2, heads: int = 4, kv_heads: int = 2, length: int = 40, dim: int = 16):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, length, dim), (batch, kv_heads, length, dim), (batch, kv_heads, length, dim)]
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(torch.bfloat16) for shape in shapes]


def block_causal_mask(batch: int = 2, length: int = 40, split: int = 23) -> torch.Tensor:
    """(B, 1, T, T) bool: two packed sequences per row, each causal and apart."""
    segment = (torch.arange(length) >= split).long()
    same = segment[:, None] == segment[None, :]
    return (torch.ones(length, length, dtype=torch.bool).tril() & same)[None, None].expand(batch, 1, length, length)


GQA = SimpleNamespace(num_key_value_groups=2, is_causal=True, training=True)


def test_training_attention_is_float32_sdpa_and_no_less_precise():
    query, key, value = qkv()
    mask = block_causal_mask()
    output, _ = sdpa_in_float32(GQA, query, key, value, mask, scaling=0.25)
    assert output.dtype == torch.bfloat16 and output.shape == (2, 40, 4, 16)  # (B, T, H, D)
    upcast, _ = sdpa_attention_forward(GQA, query.float(), key.float(), value.float(), mask, scaling=0.25)
    torch.testing.assert_close(output, upcast.to(torch.bfloat16), atol=0, rtol=0)
    exact, _ = sdpa_attention_forward(GQA, query.double(), key.double(), value.double(), mask, scaling=0.25)
    in_bf16, _ = sdpa_attention_forward(GQA, query, key, value, mask, scaling=0.25)
    assert (output.double() - exact).abs().mean() <= (in_bf16.double() - exact).abs().mean()  # both end in bf16


def test_the_packed_mask_keeps_sequences_apart():
    query, key, value = qkv()
    mask = block_causal_mask()
    output, _ = sdpa_in_float32(GQA, query, key, value, mask, scaling=0.25)
    key, value = key.clone(), value.clone()
    key[:, :, :23], value[:, :, :23] = 0, 0  # the first sequence of each row changes
    moved, _ = sdpa_in_float32(GQA, query, key, value, mask, scaling=0.25)
    torch.testing.assert_close(moved[:, 23:], output[:, 23:], atol=0, rtol=0)
    assert (moved[:, :23] - output[:, :23]).abs().max() > 0.1


def test_without_a_mask_it_is_causal():
    query, key, value = qkv()
    causal = torch.ones(40, 40, dtype=torch.bool).tril()[None, None].expand(2, 1, 40, 40)
    torch.testing.assert_close(sdpa_in_float32(GQA, query, key, value, None, scaling=0.25)[0],
                               sdpa_in_float32(GQA, query, key, value, causal, scaling=0.25)[0], atol=1e-2, rtol=0)
    no_future = sdpa_in_float32(GQA, query, key, value, None, scaling=0.25)[0]
    key = key.clone()
    key[:, :, 30:] = 5.0
    torch.testing.assert_close(sdpa_in_float32(GQA, query, key, value, None, scaling=0.25)[0][:, :30],
                               no_future[:, :30], atol=0, rtol=0)


@pytest.mark.parametrize("case", ["no_grad", "long_row"])
def test_evaluation_and_long_rows_keep_bfloat16_sdpa(case):
    length = FLOAT32_MAX_ROW + 1 if case == "long_row" else 40
    query, key, value = qkv(length=length)
    mask = block_causal_mask(length=length, split=length // 2)
    with torch.set_grad_enabled(case == "long_row"):
        output, _ = sdpa_in_float32(GQA, query, key, value, mask, scaling=0.25)
    plain, _ = sdpa_attention_forward(GQA, query, key, value, mask, scaling=0.25)
    torch.testing.assert_close(output, plain, atol=0, rtol=0)


def test_the_float32_kernel_trains():
    """Gradients reach q, k and v through the casts (the backward is float32 sdpa's)."""
    query, key, value = (t.requires_grad_(True) for t in qkv())
    output, _ = sdpa_in_float32(GQA, query, key, value, block_causal_mask(), scaling=0.25)
    output.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 and t.grad.abs().sum() > 0
               for t in (query, key, value))
