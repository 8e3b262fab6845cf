"""The C++ causal softmax of the compiled CPU attention (lmsys.modeling.causal_softmax): the float32 softmax of
attention._causal_weights within a bf16 rounding, exact zeros after each row's token, and the compiled attention
with it equal to the attention with the compiled graph's softmax (outputs, gradients, swap trees' continuing
rows) within bf16 rounding. Where the CPU lacks AVX-512 BF16 the op is None and the attention keeps the graph."""

from __future__ import annotations

import pytest
import torch

from lmsys.modeling import causal_softmax as kernel_module
from lmsys.modeling.attention import CompiledCausalAttention, _causal_weights, cpu_sdpa, process_compiled_attention
from lmsys.modeling.causal_softmax import causal_softmax, causal_softmax_op

needs_kernel = pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(),
                                  reason="the C++ causal softmax needs a CPU with AVX-512 BF16")


@needs_kernel
@pytest.mark.parametrize("n,rows,keys,groups,first", [
    (3, 90, 30, 3, 0),  # a block of 30 tokens, 3 query heads each: the square, no vector tail (16 lanes)
    (2, 40, 77, 2, 57),  # a later block: 57 keys before its first token, rows longer than the vectors
    (1, 6, 5, 3, 3),  # shorter than a vector: scalar tails only
    (4, 300, 100, 3, 0),
    (2, 33, 1, 1, 0),  # one key
])
def test_kernel_is_the_float32_causal_softmax_rounded_to_bf16(n, rows, keys, groups, first):
    generator = torch.Generator().manual_seed(n * rows + keys)
    query = (torch.randn(n, rows, 64, generator=generator) * 2).bfloat16()
    key = (torch.randn(n, keys, 64, generator=generator) * 2).bfloat16()
    expected = _causal_weights(query, key, 0.125, groups, first)  # float32 (n, rows, keys)
    weights = causal_softmax(torch.matmul(query, key.transpose(-1, -2)), 0.125, groups, first)
    assert weights.dtype == torch.bfloat16 and weights.shape == expected.shape
    masked = expected == 0
    token = first + torch.arange(rows) // groups
    assert torch.equal(masked, (torch.arange(keys) > token[:, None]).expand_as(masked))  # the reference's mask
    assert torch.equal(weights[masked], torch.zeros_like(weights[masked]))
    # within half a bf16 step of the float32 weight (2^-9 relative) plus the exponentials' float32 difference
    torch.testing.assert_close(weights.float(), expected, atol=1e-6, rtol=2.0**-8)
    assert (weights.float() - expected).abs().max() > 0 or keys == 1  # rounded, not a copy of the reference


@needs_kernel
def test_kernel_refuses_other_inputs():
    with pytest.raises(RuntimeError, match="contiguous"):
        causal_softmax_op()(torch.zeros(2, 3, 4), 1.0, 1, 0)  # float32


@pytest.fixture
def kernel_and_graph():
    """The compiled attention with the C++ softmax and with the graph's own."""
    torch._dynamo.reset()
    return CompiledCausalAttention(causal_softmax), CompiledCausalAttention()


def attention_and_gradients(attention, query, key, value):
    """Output and q, k, v gradients (float64) of the attention of bf16 q, k, v under a fixed output gradient."""
    inputs = [t.detach().clone().requires_grad_(True) for t in (query, key, value)]
    output = attention(*inputs, None, 0.25, True)
    (output.double() * torch.linspace(-1.0, 1.0, output.numel()).view_as(output).double()).sum().backward()
    return [output.detach().double()] + [t.grad.double() for t in inputs]


def bf16_qkv(seed: int, batch: int, length: int, keys: int | None = None):
    generator = torch.Generator().manual_seed(seed)
    keys = keys or length
    shapes = [(batch, 4, length, 16), (batch, 2, keys, 16), (batch, 2, keys, 16)]
    return [torch.randn(shape, generator=generator).bfloat16() for shape in shapes]


@needs_kernel
@pytest.mark.parametrize("batch,length", [(2, 40), (3, 150), (1, 300)])  # one query block, and QUERY_BLOCKS
def test_attention_with_the_kernel_equals_the_graph_within_bf16_rounding(kernel_and_graph, batch, length):
    with_kernel, with_graph = kernel_and_graph
    query, key, value = bf16_qkv(batch, batch, length)
    ours = attention_and_gradients(with_kernel, query, key, value)
    theirs = attention_and_gradients(with_graph, query, key, value)
    for name, a, b in zip(("output", "dq", "dk", "dv"), ours, theirs, strict=True):
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= 0.02 * scale, name  # bf16 weights rounded apart: a few bf16 steps
    with torch.no_grad():  # the forward alone (evaluation, prediction)
        torch.testing.assert_close(with_kernel(query, key, value, None, 0.25, True).double(), ours[0], atol=0, rtol=0)


@needs_kernel
def test_continuing_rows_see_their_prefix(kernel_and_graph):
    """Fewer queries than keys (a swap tree's continuing sequence): the queries are the keys' last ones."""
    query, key, value = bf16_qkv(7, 1, 30, keys=70)
    with torch.no_grad():
        ours, theirs = (attention(query, key, value, None, 0.25, True).double() for attention in kernel_and_graph)
    assert (ours - theirs).abs().max().item() <= 0.02 * theirs.abs().max().item()


@needs_kernel
def test_the_process_attention_uses_the_kernel_and_attends_causally():
    assert process_compiled_attention().softmax is causal_softmax
    query, key, value = bf16_qkv(3, 2, 40)
    module = type("Module", (), {"num_key_value_groups": 2, "is_causal": True, "training": False,
                                 "compiled_attention": process_compiled_attention()})()
    with torch.no_grad():
        output, _ = cpu_sdpa(module, query, key, value, None, scaling=0.25)
        reference = torch.nn.functional.scaled_dot_product_attention(
            query.double(), key.double(), value.double(), is_causal=True, scale=0.25, enable_gqa=True).transpose(1, 2)
    assert (output.double() - reference).abs().max().item() <= 0.02


def test_no_kernel_without_avx512_bf16(monkeypatch):
    """Another CPU: no build is tried, the op is None, and the attention keeps the graph's softmax."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    kernel_module.causal_softmax_op.cache_clear()
    try:
        assert causal_softmax_op() is None
    finally:
        kernel_module.causal_softmax_op.cache_clear()


def test_a_failed_build_leaves_the_graph_softmax(monkeypatch, caplog):
    """No compiler or ninja (load_inline raises RuntimeError): one warning naming the cause, and the op is None."""
    import torch.utils.cpp_extension

    def fail(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions (pip install ninja to get it)")

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", fail)
    kernel_module.causal_softmax_op.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="lmsys"):
            assert causal_softmax_op() is None
    finally:
        kernel_module.causal_softmax_op.cache_clear()
    assert "could not be built (Ninja is required" in caplog.text
