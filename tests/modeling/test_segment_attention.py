"""The C++ segment attention of prediction (lmsys.modeling.segment_attention): each segment of a packed row causal
on its own, a swap tree's continuing segment after its prefix's keys, equal to float64 attention within bf16
rounding on shapes that cross its blocks (32 query tokens, 64 keys, 16 lanes); and the compiled attention sends
calls without gradients to it, trees included, at any length. Where the CPU lacks AVX-512 BF16 the op is None."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lmsys.modeling import segment_attention as kernel_module
from lmsys.modeling.attention import (
    COMPILED_FORWARD_MAX_KEYS,
    CompiledCausalAttention,
    bf16_kernel,
    cpu_sdpa,
    process_compiled_attention,
)
from lmsys.modeling.segment_attention import segment_attention, segment_attention_op

needs_kernel = pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(),
                                  reason="the C++ segment attention needs a CPU with AVX-512 BF16")


def reference(query, key, value, segments, scaling):
    """float64 attention of each (first, length, prefix_first, prefix_length) segment alone: (T, H, D)."""
    output = torch.full(query.shape, float("nan"), dtype=torch.float64)
    for first, length, prefix_first, prefix_length in segments:
        keys = [*range(prefix_first, prefix_first + prefix_length), *range(first, first + length)]
        q = query[first : first + length].double().transpose(0, 1)[None]  # (1, H, L, D)
        k, v = (t[keys].double().transpose(0, 1)[None] for t in (key, value))
        visible = torch.ones(length, len(keys), dtype=torch.bool).tril(prefix_length)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scaling, enable_gqa=True)
        output[first : first + length] = attended[0].transpose(0, 1)
    return output


def random_qkv(seed: int, tokens: int, heads: int, kv_heads: int, dim: int):
    generator = torch.Generator().manual_seed(seed)
    query = (torch.randn(tokens, heads, dim, generator=generator) * 2).bfloat16()
    key = (torch.randn(tokens, kv_heads, dim, generator=generator) * 2).bfloat16()
    return query, key, torch.randn(tokens, kv_heads, dim, generator=generator).bfloat16()


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,dim,segments", [
    # SmolLM2's heads: blocks of 32 query tokens and 64 keys crossed, a one-token segment, a continuing one of 70
    # after a prefix of 90 (keys not a multiple of 16), a one-token continuing one
    (9, 3, 64, [(0, 100, 0, 0), (100, 37, 0, 0), (137, 1, 0, 0), (138, 70, 0, 90), (208, 1, 5, 60)]),
    (4, 4, 64, [(0, 300, 0, 0), (300, 130, 0, 200)]),  # no GQA; long rows
    (8, 2, 128, [(0, 65, 0, 0), (65, 64, 0, 0), (129, 3, 0, 33)]),  # two column chunks of 64
    (4, 2, 16, [(0, 17, 0, 0), (17, 9, 0, 0)]),  # the tiny test models' heads: one vector
    (6, 1, 48, [(0, 33, 0, 0)]),  # three vectors
])
def test_each_segment_attends_its_prefix_and_itself(heads, kv_heads, dim, segments):
    tokens = max(first + length for first, length, _, _ in segments)
    query, key, value = random_qkv(len(segments) + dim, tokens, heads, kv_heads, dim)
    output = segment_attention(query, key, value, segments, dim**-0.5)
    expected = reference(query, key, value, segments, dim**-0.5)
    assert output.dtype == torch.bfloat16 and output.shape == query.shape
    # within about a bf16 step of the output (2^-8 relative to the largest value) on top of its own rounding
    torch.testing.assert_close(output.double(), expected, atol=2.0**-7 * float(expected.abs().max()), rtol=2.0**-8)


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,dim,lengths", [
    (9, 3, 64, [100, 37, 1, 70]),  # query blocks of 32 tokens and key blocks of 64 crossed; a one-token segment
    (4, 4, 64, [300]),
    (8, 2, 128, [65, 64]),
    (4, 2, 16, [17, 9]),
])
def test_the_gradients_are_those_of_float64_attention(heads, kv_heads, dim, lengths):
    """Training's path (no prefixes): q, k and v gradients within bf16 rounding of float64 autograd's, under a
    random output gradient; the output too."""
    segments = [(first, length, 0, 0) for first, length in zip([0, *itertools.accumulate(lengths)], lengths)]
    query, key, value = random_qkv(sum(lengths) + dim, sum(lengths), heads, kv_heads, dim)
    grad_output = torch.randn(query.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    ours = [t.clone().requires_grad_(True) for t in (query, key, value)]
    output = segment_attention(*ours, segments, dim**-0.5)
    output.backward(grad_output)
    exact = [t.double().requires_grad_(True) for t in (query, key, value)]
    expected = reference(*exact, segments, dim**-0.5)
    expected.backward(grad_output.double())
    for mine, theirs in [(output, expected), *((a.grad, b.grad) for a, b in zip(ours, exact, strict=True))]:
        assert mine.dtype == torch.bfloat16
        # float64's gradients within 1% of their largest (bf16 weights and score gradients, as the compiled kernel)
        theirs = theirs.detach()
        torch.testing.assert_close(mine.double(), theirs, atol=0.01 * float(theirs.abs().max()), rtol=0)


@needs_kernel
def test_the_backward_refuses_prefixes():
    """With gradients, a segment continuing a prefix is refused at the forward (the backward has none), and the
    C++ backward refuses one too."""
    query, key, value = (t.requires_grad_(True) for t in random_qkv(0, 8, 4, 2, 16))
    segments = [(0, 4, 0, 0), (4, 4, 0, 4)]
    with pytest.raises(ValueError, match="no backward"):
        segment_attention(query, key, value, segments, 0.25)
    table = torch.tensor(segments)
    output, logsumexp = segment_attention_op().segment_attention(query, key, value, table, 0.25)
    with pytest.raises(RuntimeError, match="no prefixes"):
        segment_attention_op().segment_attention_backward(query, key, value, output, output, logsumexp, table, 0.25)


@needs_kernel
def test_strided_inputs_as_the_projections_leave_them():
    """q, k and v as column blocks of one (T, (H + 2 H_kv) D) tensor: read through their strides."""
    fused = torch.randn(50, (9 + 2 * 3) * 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    query, key, value = (block.view(50, -1, 64) for block in fused.split([9 * 64, 3 * 64, 3 * 64], dim=1))
    segments = [(0, 20, 0, 0), (20, 30, 0, 12)]
    expected = reference(query, key, value, segments, 0.125)
    torch.testing.assert_close(segment_attention(query, key, value, segments, 0.125).double(), expected,
                               atol=2.0**-7 * float(expected.abs().max()), rtol=2.0**-8)


@needs_kernel
def test_the_kernel_refuses_other_inputs():
    query, key, value = random_qkv(0, 8, 4, 2, 16)
    with pytest.raises(RuntimeError, match="bf16"):
        segment_attention(query.float(), key, value, [(0, 8, 0, 0)], 0.25)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        segment_attention(query[..., :8], key[..., :8], value[..., :8], [(0, 8, 0, 0)], 0.25)
    with pytest.raises(RuntimeError, match="outside the tokens"):
        segment_attention(query, key, value, [(4, 8, 0, 0)], 0.25)


@needs_kernel
def test_prediction_through_cpu_sdpa_takes_the_kernel_for_rows_and_trees(monkeypatch):
    """Without gradients, the process's compiled attention sends a packed row with swap trees (one call per layer)
    and plain rows to the kernel; each logical sequence gets what it gets alone."""
    from modeling.test_attention import several_trees

    attention = process_compiled_attention()
    assert attention.segment_attention is not None
    calls = []
    monkeypatch.setattr(attention, "segment_attention", lambda *args: calls.append(args) or segment_attention(*args))
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False, compiled_attention=attention)
    query, key, value, bounds, shared, sequences = several_trees(torch.bfloat16)
    with torch.no_grad():
        output, _ = cpu_sdpa(module, query, key, value, None, scaling=0.25, cu_seq_lens_q=bounds,
                             cu_seq_lens_k=bounds, shared_prefixes=shared)  # (1, T, H, D)
        rows, _ = cpu_sdpa(module, query.expand(2, -1, -1, -1), key.expand(2, -1, -1, -1),
                           value.expand(2, -1, -1, -1), None, scaling=0.25)  # two unpacked rows, causal
    assert len(calls) == 2 and len(calls[0][3]) == len(bounds) - 1  # one call each; every segment in the first
    for tokens, own in sequences:
        alone = [t[0, :, tokens].transpose(0, 1) for t in (query, key, value)]
        expected = reference(*alone, [(0, len(tokens), 0, 0)], 0.25)[-len(own):]
        tolerance = 2.0**-7 * float(expected.abs().max())
        torch.testing.assert_close(output[0, own].double(), expected, atol=tolerance, rtol=2.0**-8)
    whole = reference(*(t[0].transpose(0, 1) for t in (query, key, value)), [(0, query.shape[2], 0, 0)], 0.25)
    for row in rows:
        torch.testing.assert_close(row.double(), whole, atol=2.0**-7 * float(whole.abs().max()), rtol=2.0**-8)


def test_a_fusing_kernel_takes_calls_of_any_length():
    """Beyond FLOAT32_MAX_ROW (with gradients) and COMPILED_FORWARD_MAX_KEYS (without) the compiled attention gives
    way to torch's sdpa, the segment attention not (measured faster at every length); heads it cannot take (not
    whole vectors of 16) keep the limits."""
    fusing = CompiledCausalAttention(segment_attention=lambda *args: None)
    module = SimpleNamespace(compiled_attention=fusing)
    longest = COMPILED_FORWARD_MAX_KEYS * 4
    for recorded in (False, True):
        with torch.set_grad_enabled(recorded):
            assert bf16_kernel(module, torch.zeros(1, 1, 2, 64, dtype=torch.bfloat16), 0.0, longest) is fusing
            assert bf16_kernel(module, torch.zeros(1, 1, 2, 8, dtype=torch.bfloat16), 0.0, longest) is None


def test_no_kernel_without_avx512_bf16(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    kernel_module.segment_attention_op.cache_clear()
    try:
        assert segment_attention_op() is None
    finally:
        kernel_module.segment_attention_op.cache_clear()


@needs_kernel
def test_training_takes_the_kernel_for_a_row_of_sequences_and_not_for_trees(monkeypatch):
    """With gradients, a packed row of sequences goes to the kernel in one call (its backward reaching q, k and v);
    swap trees (none in training) keep the compiled kernel's calls, which continue prefixes."""
    attention = CompiledCausalAttention(segment_attention=segment_attention)
    calls = []
    monkeypatch.setattr(attention, "segment_attention", lambda *args: calls.append(args) or segment_attention(*args))
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, training=True, compiled_attention=attention)
    query, key, value = (t.transpose(0, 1)[None].requires_grad_(True) for t in random_qkv(5, 60, 4, 2, 16))
    bounds = torch.tensor([0, 25, 60], dtype=torch.int32)
    output, _ = cpu_sdpa(module, query, key, value, None, scaling=0.25, cu_seq_lens_q=bounds, cu_seq_lens_k=bounds)
    output.float().square().sum().backward()
    assert len(calls) == 1 and all(t.grad is not None and t.grad.abs().sum() > 0 for t in (query, key, value))
    shared = torch.tensor([[40, 0, 25]])  # the second segment continues the first's 25 tokens
    bounds = torch.tensor([0, 40, 60], dtype=torch.int32)
    cpu_sdpa(module, query, key, value, None, scaling=0.25, cu_seq_lens_q=bounds, shared_prefixes=shared)
    assert [call[3] for call in calls[1:]] == [[(0, 40, 0, 0)]]  # the first segment alone; the continuing one not


def test_a_failed_build_leaves_the_compiled_attention(monkeypatch, caplog):
    """No compiler or ninja (load_inline raises RuntimeError): one warning naming the cause, and the op is None."""
    import torch.utils.cpp_extension

    def fail(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions (pip install ninja to get it)")

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", fail)
    kernel_module.segment_attention_op.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="lmsys"):
            assert segment_attention_op() is None
    finally:
        kernel_module.segment_attention_op.cache_clear()
    assert "could not be built (Ninja is required" in caplog.text
