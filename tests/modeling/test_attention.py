"""sdpa on CPU (CPU_SDPA): each packed sequence attended on its own (rows of one sequence in one call, a row's pad
tail joined to its sequence), the same attention as sdpa over the packed
row's block-diagonal mask (values and gradients), sequences kept apart, the masked path where a sliding window is
shorter than a sequence; and a bfloat16 model trains it with bf16 sdpa's forward and a float32 backward on short
rows, while evaluation and long rows keep torch's bf16 sdpa throughout."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lmsys.modeling.attention import (
    CPU_SDPA,
    FLOAT32_MAX_ROW,
    attention_kernel,
    cpu_sdpa,
    sequence_bounds,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("name,dtype,device,expected", [
    ("sdpa", torch.bfloat16, CPU, CPU_SDPA),
    ("sdpa", torch.float32, CPU, CPU_SDPA),
    ("sdpa", torch.bfloat16, CUDA, "sdpa"),
    ("eager", torch.bfloat16, CPU, "eager"),
    ("flash_attention_2", torch.bfloat16, CUDA, "flash_attention_2"),
])
def test_only_sdpa_on_cpu_changes_kernel(name, dtype, device, expected):
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


def attention_and_gradients(kernel, dtype, mask):
    """Output and q, k, v gradients (float64 copies) of `kernel` on qkv() in `dtype`, under a fixed output gradient."""
    query, key, value = (t.to(dtype).requires_grad_(True) for t in qkv())
    output, _ = kernel(GQA, query, key, value, mask, scaling=0.25)
    (output * torch.linspace(-1.0, 1.0, output.numel()).view_as(output).to(dtype)).sum().backward()
    return output.detach().double(), [t.grad.double() for t in (query, key, value)]


def test_training_attention_runs_evaluations_forward_and_a_more_precise_backward():
    """With gradients, a bf16 model's attention is bf16 sdpa's forward to the bit (what evaluation computes) and a
    float32 backward: gradients nearer the float64 ones than bf16 sdpa's own backward."""
    mask = block_causal_mask()
    output, grads = attention_and_gradients(cpu_sdpa, torch.bfloat16, mask)
    in_bf16, bf16_grads = attention_and_gradients(sdpa_attention_forward, torch.bfloat16, mask)
    _, exact_grads = attention_and_gradients(sdpa_attention_forward, torch.float64, mask)
    assert output.shape == (2, 40, 4, 16)  # (B, T, H, D)
    torch.testing.assert_close(output, in_bf16, atol=0, rtol=0)
    for grad, bf16_grad, exact in zip(grads, bf16_grads, exact_grads, strict=True):
        assert (grad - exact).abs().mean() < 0.9 * (bf16_grad - exact).abs().mean()
        torch.testing.assert_close(grad, exact, atol=2e-2, rtol=0)


def test_the_packed_mask_keeps_sequences_apart():
    query, key, value = qkv()
    mask = block_causal_mask()
    output, _ = cpu_sdpa(GQA, query, key, value, mask, scaling=0.25)
    key, value = key.clone(), value.clone()
    key[:, :, :23], value[:, :, :23] = 0, 0  # the first sequence of each row changes
    moved, _ = cpu_sdpa(GQA, query, key, value, mask, scaling=0.25)
    torch.testing.assert_close(moved[:, 23:], output[:, 23:], atol=0, rtol=0)
    assert (moved[:, :23] - output[:, :23]).abs().max() > 0.1


def test_without_a_mask_it_is_causal():
    query, key, value = qkv()
    causal = torch.ones(40, 40, dtype=torch.bool).tril()[None, None].expand(2, 1, 40, 40)
    torch.testing.assert_close(cpu_sdpa(GQA, query, key, value, None, scaling=0.25)[0],
                               cpu_sdpa(GQA, query, key, value, causal, scaling=0.25)[0], atol=1e-2, rtol=0)
    no_future = cpu_sdpa(GQA, query, key, value, None, scaling=0.25)[0]
    key = key.clone()
    key[:, :, 30:] = 5.0
    torch.testing.assert_close(cpu_sdpa(GQA, query, key, value, None, scaling=0.25)[0][:, :30],
                               no_future[:, :30], atol=0, rtol=0)


@pytest.mark.parametrize("case", ["no_grad", "long_row"])
def test_evaluation_and_long_rows_keep_bfloat16_sdpa(case):
    length = FLOAT32_MAX_ROW + 1 if case == "long_row" else 40
    query, key, value = qkv(length=length)
    mask = block_causal_mask(length=length, split=length // 2)
    with torch.set_grad_enabled(case == "long_row"):
        output, _ = cpu_sdpa(GQA, query, key, value, mask, scaling=0.25)
    plain, _ = sdpa_attention_forward(GQA, query, key, value, mask, scaling=0.25)
    torch.testing.assert_close(output, plain, atol=0, rtol=0)


def test_the_float32_kernel_trains():
    """Gradients reach q, k and v through the casts (the backward is float32 sdpa's)."""
    query, key, value = (t.requires_grad_(True) for t in qkv())
    output, _ = cpu_sdpa(GQA, query, key, value, block_causal_mask(), scaling=0.25)
    output.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 and t.grad.abs().sum() > 0
               for t in (query, key, value))


# --- each packed sequence on its own --------------------------------------------------------------------------------

ROW_LENGTHS = [[7, 12, 3, 18], [25, 9, 6]]  # two packed rows of 40: the last sequence of the second is a pad tail


def packed_inputs(dtype=torch.float32, row_lengths=ROW_LENGTHS):
    """q, k, v of two packed rows (float64 draws), their block-diagonal causal mask and the sequences' bounds."""
    query, key, value = (t.to(dtype).requires_grad_(True) for t in qkv(seed=3))
    positions = torch.tensor([[p for n in row for p in range(n)] for row in row_lengths])  # (2, 40)
    starts = (positions == 0).long().cumsum(1)  # sequence number within the row
    same = starts[:, :, None] == starts[:, None, :]
    mask = (torch.ones(40, 40, dtype=torch.bool).tril() & same)[:, None]  # (2, 1, 40, 40)
    return query, key, value, mask, sequence_bounds(positions)


def test_sequence_bounds_from_restarting_positions():
    positions = torch.tensor([[p for n in row for p in range(n)] for row in ROW_LENGTHS])
    assert sequence_bounds(positions).tolist() == [0, 7, 19, 22, 40, 65, 74, 80]
    assert sequence_bounds(torch.arange(5)[None]).tolist() == [0, 5]  # unpacked: one sequence


def test_a_pad_tail_joins_the_sequence_before_it():
    positions = torch.tensor([[p for n in row for p in range(n)] for row in ROW_LENGTHS])
    last_tokens = torch.tensor([6, 18, 21, 39, 64, 73])  # every sequence's last token, none in the 6-token tail
    assert sequence_bounds(positions, last_tokens).tolist() == [0, 7, 19, 22, 40, 65, 80]
    assert sequence_bounds(positions, last_tokens, max_length=15).tolist() == [0, 7, 19, 22, 40, 65, 80]
    # joined, the 9-token sequence and the tail would be a segment longer than a 14-token sliding window
    assert sequence_bounds(positions, last_tokens, max_length=14).tolist() == [0, 7, 19, 22, 40, 65, 74, 80]
    # the pool order does not matter; a row without a pooled token (nothing of it reaches a loss) is one segment
    assert sequence_bounds(positions, last_tokens.flip(0)).tolist() == [0, 7, 19, 22, 40, 65, 80]
    assert sequence_bounds(positions, last_tokens[:4]).tolist() == [0, 7, 19, 22, 40, 80]


@pytest.mark.parametrize("row_lengths", [
    ROW_LENGTHS,  # every segment attended alone
    [[40], [40]],  # one segment a row: one call
])
def test_each_sequence_on_its_own_equals_the_masked_row_with_gradients(row_lengths):
    query, key, value, mask, bounds = packed_inputs(row_lengths=row_lengths)
    grad = torch.randn(2, 40, 4, 16, generator=torch.Generator().manual_seed(4))
    results = []
    for kwargs in ({"cu_seq_lens_q": bounds}, {}):
        output, _ = cpu_sdpa(GQA, query, key, value, mask, scaling=0.25, **kwargs)
        output.backward(grad)
        results.append([output.detach(), *(t.grad.clone() for t in (query, key, value))])
        for t in (query, key, value):
            t.grad = None
    for split, masked in zip(*results, strict=True):
        torch.testing.assert_close(split, masked, atol=1e-5, rtol=1e-5)


def test_each_sequence_sees_only_itself():
    query, key, value, _, bounds = packed_inputs()
    output, _ = cpu_sdpa(GQA, query, key, value, None, scaling=0.25, cu_seq_lens_q=bounds)
    key, value = key.detach().clone(), value.detach().clone()
    key[0, :, 7:19], value[0, :, 7:19] = 3.0, -2.0  # the second sequence of the first row
    moved, _ = cpu_sdpa(GQA, query, key, value, None, scaling=0.25, cu_seq_lens_q=bounds)
    changed = (moved - output).abs().amax(dim=(2, 3)) > 1e-3  # (2, 40)
    assert changed[0, 7:19].all() and not changed[0, :7].any() and not changed[0, 19:].any()
    assert not changed[1].any()


def test_a_sliding_window_shorter_than_a_sequence_takes_the_masked_path():
    query, key, value, mask, bounds = packed_inputs()
    window = 10  # shorter than the 12-, 18- and 25-token sequences
    windowed = mask & (torch.arange(40)[:, None] - torch.arange(40)[None, :] < window)
    output, _ = cpu_sdpa(GQA, query, key, value, windowed, scaling=0.25, cu_seq_lens_q=bounds, sliding_window=window)
    expected, _ = sdpa_attention_forward(GQA, query, key, value, windowed, scaling=0.25)
    torch.testing.assert_close(output, expected, atol=0, rtol=0)
    unwindowed, _ = cpu_sdpa(GQA, query, key, value, mask, scaling=0.25, cu_seq_lens_q=bounds, sliding_window=30)
    torch.testing.assert_close(unwindowed, cpu_sdpa(GQA, query, key, value, mask, scaling=0.25)[0],
                               atol=1e-6, rtol=1e-5)  # a window longer than every sequence changes nothing


def test_bfloat16_training_splits_sequences_with_a_float32_backward():
    query, key, value, mask, bounds = packed_inputs(torch.bfloat16)
    inputs = [t.detach().requires_grad_(True) for t in (query, key, value)]
    upcasts = [t.detach().float().requires_grad_(True) for t in (query, key, value)]
    output, _ = cpu_sdpa(GQA, *inputs, mask, scaling=0.25, cu_seq_lens_q=bounds)
    upcast, _ = sdpa_attention_forward(GQA, *upcasts, mask, scaling=0.25)
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), upcast, atol=1e-2, rtol=0)  # bf16 flash forward, per sequence
    output.float().square().sum().backward()
    upcast.square().sum().backward()
    for grad, reference in zip((t.grad for t in inputs), (t.grad for t in upcasts), strict=True):
        assert grad.dtype == torch.bfloat16
        torch.testing.assert_close(grad.float(), reference, atol=5e-2, rtol=1e-2)  # bf16 rounding (gradients up to ~16)
