"""sdpa on CPU (CPU_SDPA): each packed sequence attended on its own (rows of one sequence in one call, a row's pad
tail joined to its sequence), the same attention as sdpa over the packed
row's block-diagonal mask (values and gradients), sequences kept apart, the masked path where a sliding window is
shorter than a sequence; and a bfloat16 model trains it with bf16 sdpa's forward and a float32 backward on short
rows (or, with model.attention_kernel=compiled, a compiled causal attention: the same within bf16 rounding, one
graph family whatever the rows), while evaluation and long rows keep torch's bf16 sdpa throughout."""

from __future__ import annotations

import statistics
from types import SimpleNamespace

import pytest
import tiny
import torch
from torch._dynamo.utils import counters
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lmsys.builders import build_encoders
from lmsys.config import PaddingSide
from lmsys.data.batching import collate
from lmsys.data.dataset import encode_split
from lmsys.data.io import pairs_from_frame
from lmsys.modeling.attention import (
    COMPILED_FORWARD_MAX_KEYS,
    CPU_SDPA,
    FLOAT32_MAX_ROW,
    QUERY_BLOCKS,
    CompiledCausalAttention,
    Float32Backward,
    _stacked,
    _unstacked,
    attention_kernel,
    bf16_kernel,
    causal_attention_backward,
    causal_attention_forward,
    cpu_sdpa,
    padded_groups,
    query_blocks,
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


# --- model.attention_kernel=compiled --------------------------------------------------------------------------------

COMPILED = SimpleNamespace(num_key_value_groups=2, is_causal=True, training=True)


@pytest.fixture
def compiled_module():
    """A module with a fresh compiled attention, dynamo reset: graphs of other tests count towards its limits."""
    torch._dynamo.reset()
    COMPILED.compiled_attention = CompiledCausalAttention()
    return COMPILED


def compiled_float32_and_exact(module, packed: bool):
    """Output and q, k, v gradients (float64) of cpu_sdpa with `module` in bf16, with the float32-backward kernel in
    bf16, and of sdpa in float64, on two rows: packed (each segment alone, the pad tail joined) or whole causal."""
    query, key, value, mask, bounds = packed_inputs(torch.bfloat16)
    causal = torch.ones(40, 40, dtype=torch.bool).tril()[None, None].expand(2, 1, 40, 40)
    results = []
    for kernel, attending, dtype in ((cpu_sdpa, module, torch.bfloat16), (cpu_sdpa, GQA, torch.bfloat16),
                                     (sdpa_attention_forward, GQA, torch.float64)):
        inputs = [t.detach().to(dtype).requires_grad_(True) for t in (query, key, value)]
        if dtype == torch.float64:
            output, _ = kernel(attending, *inputs, mask if packed else causal, scaling=0.25)
        elif packed:
            output, _ = kernel(attending, *inputs, mask, scaling=0.25, cu_seq_lens_q=bounds)
        else:
            output, _ = kernel(attending, *inputs, None, scaling=0.25)
        (output.double() * torch.linspace(-1.0, 1.0, output.numel()).view_as(output).double()).sum().backward()
        results.append([output.detach().double()] + [t.grad.double() for t in inputs])
    return results


@pytest.mark.parametrize("packed", [True, False])
def test_compiled_attention_equals_the_float32_kernel_within_bf16_rounding(compiled_module, packed):
    counters.clear()
    compiled, float32, exact = compiled_float32_and_exact(compiled_module, packed)
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled graph ran, not a fallback
    for ours, theirs, reference in zip(compiled, float32, exact, strict=True):
        scale = reference.abs().max()
        assert (ours - theirs).abs().max() <= 0.02 * scale
        assert (ours - reference).abs().max() <= 0.02 * scale
        assert (ours - theirs).abs().max() > 0  # a different kernel, not the float32 one again


def test_long_rows_attend_in_blocks_within_bf16_rounding(compiled_module):
    """Rows long enough for QUERY_BLOCKS blocks (query_blocks): the compiled kernel's output and q, k, v gradients as
    near float64 sdpa's as the float32-backward kernel's, in its blocked graph."""
    assert query_blocks(2, 224) == query_blocks(2, 224, 224) == QUERY_BLOCKS > query_blocks(2, 100) == 1
    assert query_blocks(2, 224, 300) == 1  # a continuing call (more keys than queries): one block
    query, key, value = qkv(seed=6, length=224)
    causal = torch.ones(224, 224, dtype=torch.bool).tril()[None, None].expand(2, 1, 224, 224)
    results = []
    for module, dtype in ((compiled_module, torch.bfloat16), (GQA, torch.bfloat16), (GQA, torch.float64)):
        inputs = [t.detach().to(dtype).requires_grad_(True) for t in (query, key, value)]
        if dtype == torch.float64:
            output, _ = sdpa_attention_forward(module, *inputs, causal, scaling=0.25)
        else:
            output, _ = cpu_sdpa(module, *inputs, None, scaling=0.25)
        (output.double() * torch.linspace(-1.0, 1.0, output.numel()).view_as(output).double()).sum().backward()
        results.append([output.detach().double()] + [t.grad.double() for t in inputs])
    for ours, theirs, reference in zip(*results, strict=True):
        scale = reference.abs().max()
        assert (ours - reference).abs().max() <= 0.02 * scale
        assert (ours - reference).abs().max() <= 2 * (theirs - reference).abs().max() + 1e-3 * scale
        assert (ours - theirs).abs().max() > 0  # a different kernel, not the float32 one again


@pytest.mark.parametrize("length", [40, 224])  # one block; QUERY_BLOCKS blocks
def test_inference_attends_through_the_compiled_graph_within_bf16_rounding(compiled_module, length):
    """Without gradients (evaluation, prediction) a bf16 module with the compiled attention runs its forward graph,
    not torch's sdpa: as near float64 sdpa as torch's bf16 flash forward is, and not the same numbers."""
    query, key, value = (t.to(torch.bfloat16) for t in qkv(seed=7, length=length))
    causal = torch.ones(length, length, dtype=torch.bool).tril()[None, None].expand(2, 1, length, length)
    reference, _ = sdpa_attention_forward(GQA, *(t.double() for t in (query, key, value)), causal, scaling=0.25)
    counters.clear()
    with torch.inference_mode():
        ours, _ = cpu_sdpa(compiled_module, query, key, value, None, scaling=0.25)
        flash, _ = cpu_sdpa(GQA, query, key, value, None, scaling=0.25)
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled graph ran
    assert ours.dtype == torch.bfloat16 and ours.shape == reference.shape
    error, flash_error = ((t.double() - reference).abs().max() for t in (ours, flash))
    assert error <= 2 * flash_error + 1e-3 * reference.abs().max()
    assert (ours.double() - flash.double()).abs().max() > 0


@pytest.mark.parametrize(("length", "blocks"), [(40, 1), (40, 4), (17, 4)])  # 4 blocks of 10; of 5, 5, 5 and 2
def test_the_hand_written_backward_is_the_gradient_of_the_forward(length, blocks):
    """causal_attention_forward / _backward (eager, float64 inputs; the softmax runs in float32) against float64
    sdpa's autograd, GQA included, on the documented layout: row t * g + j is token t of query head j of the group."""
    query, key, value = (t.double().requires_grad_(True) for t in qkv(seed=4, length=length))
    causal = torch.ones(length, length, dtype=torch.bool).tril()[None, None].expand(2, 1, length, length)
    expected, _ = sdpa_attention_forward(GQA, query, key, value, causal, scaling=0.25)  # (B, T, H, D)
    grad_output = torch.randn(expected.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected.backward(grad_output)

    def stacked(tensor):  # (B, h, T, D) -> (B * H_kv, T * h / H_kv, D), H_kv = 2
        batch, heads, _, dim = tensor.shape
        return tensor.transpose(1, 2).reshape(batch, length, 2, heads // 2, dim).transpose(1, 2).reshape(
            batch * 2, -1, dim)

    def unstacked(tensor, heads):  # the inverse, as (B, T, h, D)
        return tensor.view(2, 2, length, heads // 2, 16).transpose(1, 2).reshape(2, length, heads, 16)

    with torch.no_grad():
        inputs = [stacked(t) for t in (query, key, value)]
        output, weights = causal_attention_forward(*inputs, 0.25, 2, blocks, keep_weights=True)
        grads = causal_attention_backward(*inputs, output, weights, stacked(grad_output.transpose(1, 2)), 0.25, 2)
    assert len(weights) == blocks
    torch.testing.assert_close(unstacked(output, 4), expected.detach(), atol=1e-5, rtol=0)
    for grad, reference in zip(grads, (query.grad, key.grad, value.grad), strict=True):
        torch.testing.assert_close(unstacked(grad, reference.shape[1]), reference.transpose(1, 2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("blocks", [1, 4])
def test_fewer_queries_than_keys_continue_the_keys(blocks):
    """A swap tree's continuing sequence: the last 17 of 40 tokens as queries against all 40 keys give those tokens'
    outputs, and the gradients of q (theirs), k and v, of the whole sequence's attention (float64 sdpa's autograd
    with the other tokens' output gradients zero)."""
    query, key, value = (t.double().requires_grad_(True) for t in qkv(seed=8, length=40))
    causal = torch.ones(40, 40, dtype=torch.bool).tril()[None, None].expand(2, 1, 40, 40)
    expected, _ = sdpa_attention_forward(GQA, query, key, value, causal, scaling=0.25)  # (B, T, H, D)
    grad_output = torch.randn(expected.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    grad_output[:, :23] = 0
    expected.backward(grad_output)

    def stacked(tensor):  # (B, h, T, D) -> (B * H_kv, T * h / H_kv, D), H_kv = 2
        batch, heads, length, dim = tensor.shape
        return tensor.transpose(1, 2).reshape(batch, length, 2, heads // 2, dim).transpose(1, 2).reshape(
            batch * 2, -1, dim)

    def unstacked(tensor, heads, length):  # the inverse, as (B, T, h, D)
        return tensor.view(2, 2, length, heads // 2, 16).transpose(1, 2).reshape(2, length, heads, 16)

    with torch.no_grad():
        inputs = [stacked(query[:, :, 23:]), stacked(key), stacked(value)]
        output, weights = causal_attention_forward(*inputs, 0.25, 2, blocks, keep_weights=True)
        grads = causal_attention_backward(*inputs, output, weights, stacked(grad_output[:, 23:].transpose(1, 2)),
                                          0.25, 2)
    torch.testing.assert_close(unstacked(output, 4, 17), expected.detach()[:, 23:], atol=1e-5, rtol=0)
    torch.testing.assert_close(unstacked(grads[0], 4, 17), query.grad.transpose(1, 2)[:, 23:], atol=1e-5, rtol=0)
    for grad, reference in zip(grads[1:], (key.grad, value.grad), strict=True):
        torch.testing.assert_close(unstacked(grad, 2, 40), reference.transpose(1, 2), atol=1e-5, rtol=0)


TREE_ROW = (9, 6, 7, 4, 14)  # one row of 40: a tree (prefix 9, its rests 6 and 7), a sequence of 4, a tail of 14


def tree_inputs(dtype):
    """q, k, v of one packed row holding a swap tree, its bounds (the tree's second rest a segment of its own) and
    shared prefixes, and the row's two logical sequences that the tree stands for, as token indices."""
    query, key, value = (t[:1].to(dtype) for t in qkv(seed=10, length=40))
    prefix, first, second, _, _ = TREE_ROW
    bounds = torch.tensor([0, prefix + first, prefix + first + second, 26, 40], dtype=torch.int32)
    shared = torch.tensor([[prefix + first, 0, prefix]])
    sequences = {"first": list(range(prefix + first)),
                 "second": list(range(prefix)) + list(range(prefix + first, prefix + first + second)),
                 "other": list(range(22, 26))}
    return query, key, value, bounds, shared, sequences


@pytest.mark.parametrize("kernel", ["sdpa_float32", "compiled_bf16"])
def test_a_swap_trees_sequences_attend_as_if_each_were_alone(compiled_module, kernel):
    """Each logical sequence of a packed swap tree (the prefix with either rest) gets the attention it gets alone
    (float64 sdpa over just its tokens): float32 to float rounding, the compiled bf16 kernel, without gradients
    as prediction runs it, within bf16 rounding."""
    dtype = torch.float32 if kernel == "sdpa_float32" else torch.bfloat16
    module = GQA if kernel == "sdpa_float32" else compiled_module
    query, key, value, bounds, shared, sequences = tree_inputs(dtype)
    counters.clear()
    with torch.inference_mode():
        output, _ = cpu_sdpa(module, query, key, value, None, scaling=0.25, cu_seq_lens_q=bounds,
                             cu_seq_lens_k=bounds, shared_prefixes=shared)  # (1, T, H, D)
    if kernel == "compiled_bf16":
        assert counters["stats"]["unique_graphs"] >= 1  # the compiled graph ran
    for name, tokens in sequences.items():
        alone = [t[:, :, tokens].double() for t in (query, key, value)]
        expected, _ = sdpa_attention_forward(GQA, *alone, None, scaling=0.25, is_causal=True)  # (1, L, H, D)
        own = tokens[-TREE_ROW[2]:] if name == "second" else tokens  # the second rest's output is its tokens'
        ours, theirs = output[:, own].double(), expected[:, -len(own):]
        tolerance = 1e-5 if dtype == torch.float32 else 0.02 * float(theirs.abs().max())
        torch.testing.assert_close(ours, theirs, atol=tolerance, rtol=0)


TREES = [(9, 6, 7), (5, 8, 3), (4, 2, 1), (3, 5, 9)]  # (prefix, first rest, second rest): continuing 7, 3, 1, 9


def several_trees(dtype, plain: int = 4):
    """q, k, v of one packed row of TREES and a sequence of `plain` tokens, its bounds, the trees' shared prefixes
    and every logical sequence (a prefix with either rest, the plain one) as token indices, with its own tokens'."""
    length = sum(map(sum, TREES)) + plain
    query, key, value = (t[:1].to(dtype) for t in qkv(seed=11, length=length))
    starts, shared, sequences, at = [], [], [], 0
    for prefix, first, second in TREES:
        starts += [at, at + prefix + first]
        shared.append([at + prefix + first, at, prefix])
        whole = list(range(at, at + prefix + first))
        rest = list(range(at + prefix + first, at + prefix + first + second))
        sequences += [(whole, whole), (whole[:prefix] + rest, rest)]
        at += prefix + first + second
    starts.append(at)
    sequences.append((list(range(at, length)), list(range(at, length))))
    bounds = torch.tensor([*starts, length], dtype=torch.int32)
    return query, key, value, bounds, torch.tensor(shared), sequences


def test_several_trees_attend_straight_from_their_pieces():
    """Prediction's trees through the compiled kernel's graphs (attend_parts: stacked straight from each segment's
    pieces, written into the row's output, a one-token continuing segment by sdpa; where the C++ segment attention
    does not run): each logical sequence's output is what it gets alone (float64 sdpa over its tokens) within bf16
    rounding, and equal to the bit to the padded calls that a forward with gradients recorded makes."""
    torch._dynamo.reset()
    attention = CompiledCausalAttention()
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False, compiled_attention=attention)
    query, key, value, bounds, shared, sequences = several_trees(torch.bfloat16)
    outputs = []
    for recorded in (False, True):  # with gradients recorded (none required): the padded calls, one by one
        with torch.set_grad_enabled(recorded):
            outputs.append(cpu_sdpa(module, query, key, value, None, scaling=0.25, cu_seq_lens_q=bounds,
                                    cu_seq_lens_k=bounds, shared_prefixes=shared)[0])  # (1, T, H, D)
    assert torch.equal(outputs[0], outputs[1])
    for tokens, own in sequences:
        alone = [t[:, :, tokens].double() for t in (query, key, value)]
        expected, _ = sdpa_attention_forward(GQA, *alone, None, scaling=0.25, is_causal=True)  # (1, L, H, D)
        ours, theirs = outputs[0][:, own].double(), expected[:, -len(own):]
        torch.testing.assert_close(ours, theirs, atol=0.02 * float(theirs.abs().max()), rtol=0)


def test_swap_trees_refuse_the_masked_path():
    query, key, value, bounds, shared, _ = tree_inputs(torch.float32)
    with pytest.raises(ValueError, match="swap trees"):
        cpu_sdpa(GQA, query, key, value, None, scaling=0.25, cu_seq_lens_q=bounds, shared_prefixes=shared, softcap=30.0)


def test_compiled_attention_keeps_its_bf16_weights_once(compiled_module):
    """For the backward: q, k, v, the output and the softmax weights in bf16 (one block here: 2 rows of 120 tokens,
    2 key/value heads of 2 query heads each), nothing else of (T, T): not the float32 scores, not a second copy."""
    def kept_bytes(module):
        storages = {}

        def keep(tensor):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        query, key, value = (t.requires_grad_(True) for t in qkv(length=120))
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            cpu_sdpa(module, query, key, value, None, scaling=0.25)
        return sum(storages.values())

    counters.clear()
    compiled, weights = kept_bytes(compiled_module), (2 * 2) * (120 * 2) * 120 * 2  # (N, T * g, T) in bf16
    assert counters["stats"]["unique_graphs"] >= 1
    assert weights <= compiled - kept_bytes(GQA) + 4 * 120 * 2 * 4 <= weights * 1.05  # Float32Backward's logsumexp


def test_compiled_attention_leaves_masks_to_the_float32_kernel(compiled_module):
    """A masked call (a sliding window's rows, a padded batch) and a one-token row go to Float32Backward, bit for
    bit, and compile nothing."""
    query, key, value = (t.requires_grad_(True) for t in qkv())
    mask = block_causal_mask().float().log()  # additive: 0 or -inf
    counters.clear()
    torch.testing.assert_close(compiled_module.compiled_attention(query, key, value, mask, 0.25, False),
                               Float32Backward.apply(query, key, value, mask, 0.25, False), atol=0, rtol=0)
    one = [t[:, :, :1] for t in (query, key, value)]
    torch.testing.assert_close(compiled_module.compiled_attention(*one, None, 0.25, True),
                               Float32Backward.apply(*one, None, 0.25, True), atol=0, rtol=0)
    assert counters["stats"]["unique_graphs"] == 0


def test_compiled_attention_compiles_few_graphs_whatever_the_rows(compiled_module):
    """Rows of one segment batched (any count and length) and segments one by one (the views of a split row): a
    handful of graphs, far from dynamo's limit of 8 recompiles, past which every call would run eagerly."""
    counters.clear()
    for rows, length in [(2, 40), (5, 23), (3, 61), (1, 40), (1, 17), (4, 9), (2, 2)]:
        query, key, value = (t.requires_grad_(True) for t in qkv(batch=rows, length=length))
        output, _ = cpu_sdpa(compiled_module, query, key, value, None, scaling=0.25)
        output.float().sum().backward()
    query, key, value, mask, bounds = packed_inputs(torch.bfloat16)
    cpu_sdpa(compiled_module, query, key, value, mask, scaling=0.25, cu_seq_lens_q=bounds)[0].float().sum().backward()
    assert counters["stats"]["unique_graphs"] <= 4


def test_a_bf16_model_with_compiled_attention_agrees_with_the_float32_kernel(tiny_models):
    """The builders give every attention module the compiled attention (module tree and checkpoint unchanged); a
    packed bf16 batch's logits and LoRA gradients are as near a float32 model's as with the float32-backward kernel
    (bf16 rounding: both within a few % of the largest gradient)."""
    torch._dynamo.reset()
    pairs = pairs_from_frame(tiny.arena_frame(6, seed=5), "mem.csv", require_labels=True)
    results, names = {}, {}
    for dtype, kernel in (("float32", "eager"), ("bfloat16", "eager"), ("bfloat16", "compiled")):
        model, spec, tokenizer = tiny.build_preference_model(tiny_models["llama"], "llama", "nf4", compute_dtype=dtype,
                                                             attention_kernel=kernel)
        tiny.perturb(model, seed=2)
        attentions = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
        assert attentions and all(("compiled_attention" in m.__dict__) == (kernel == "compiled") for m in attentions)
        names[dtype, kernel] = list(model.state_dict())
        split = encode_split(pairs, build_encoders(spec, tokenizer))
        batch = collate(split.forward + split.swapped, tiny.batching(True, tokenizer.pad_token_id, PaddingSide.left,
                                                                    300))
        logits = model.train()(**batch.model_inputs(CPU))
        (logits.float() * torch.linspace(-1.0, 1.0, logits.numel()).view_as(logits)).sum().backward()
        results[kernel if dtype == "bfloat16" else dtype] = (
            logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    assert names["bfloat16", "eager"] == names["bfloat16", "compiled"]
    reference_logits, reference = results["float32"]
    errors = {}
    for kernel in ("eager", "compiled"):
        logits, grads = results[kernel]
        assert grads.keys() == reference.keys() and any("self_attn" in name for name in grads)
        errors[kernel] = {name: ((grad - reference[name]).abs().max() / reference[name].abs().max()).item()
                          for name, grad in grads.items()}
        errors[kernel]["logits"] = ((logits - reference_logits).abs().max() / reference_logits.abs().max()).item()
    # measured: largest 0.071 (float32 kernel) and 0.081 (compiled), medians 0.037 and 0.044; a wrong attention
    # (heads mis-grouped, the mask off by one) is off by the gradients' own size
    for summary in (max, statistics.median):
        eager, compiled = summary(errors["eager"].values()), summary(errors["compiled"].values())
        assert compiled <= max(1.5 * eager, 0.01) and compiled <= 0.15, (summary.__name__, eager, compiled)


# --- the rotary embedding compiled with the attention ----------------------------------------------------------------


def tiny_llama_attention():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         intermediate_size=128)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    module = LlamaAttention(config, 0).to(torch.bfloat16)
    hidden = torch.randn(2, 40, 64, dtype=torch.bfloat16)
    return module, hidden, LlamaRotaryEmbedding(config)(hidden, torch.arange(40)[None].expand(2, 40))


def test_the_rotary_embedding_is_compiled_with_and_without_gradients():
    """compile_rotary: the module's class becomes a subclass whose forward runs the family's code with its
    apply_rotary_pos_emb compiled (one graph made, or one more for the gradients' layout), the output with and
    without gradients and the input's gradient within bf16 rounding of eager's (~1e-2 of values ~1); the parameters'
    names unchanged; a second call changes nothing."""
    from lmsys.modeling.rotary import CompiledRotary, compile_rotary

    module, hidden, position_embeddings = tiny_llama_attention()
    names = [name for name, _ in module.named_parameters()]

    def outputs():
        with torch.no_grad():
            inference = module(hidden, position_embeddings, None)[0].float()
        inputs = hidden.clone().requires_grad_(True)
        output = module(inputs, position_embeddings, None)[0]
        output.float().square().sum().backward()
        return inference, output.detach().float(), inputs.grad.float()

    eager = outputs()
    counters.clear()
    assert compile_rotary(module) and compile_rotary(module)
    assert isinstance(module, CompiledRotary) and type(module).__mro__[2].__name__ == "LlamaAttention"
    compiled = outputs()
    assert 1 <= counters["stats"]["unique_graphs"] <= 2
    assert [name for name, _ in module.named_parameters()] == names
    for ours, theirs in zip(compiled, eager, strict=True):
        assert 0 < (ours - theirs).abs().max() <= 1e-2 * theirs.abs().max()  # rounded otherwise: compiled


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2", "gemma3_text"])
def test_the_rotations_backward_is_the_rotation_back(family):
    """Rotation (training's compiled rotary embedding): its q and k gradients are eager autograd's through the
    family's own apply_rotary_pos_emb, in float32 to rounding, with cos and sin from the family's rotary embedding
    (the backward rotates by -sin: cos and sin equal on both halves of a head)."""
    import importlib

    from transformers import AutoConfig

    from lmsys.modeling.rotary import Rotation

    module = importlib.import_module(f"transformers.models.{family.removesuffix('_text')}.modeling_"
                                     f"{family.removesuffix('_text')}")
    config = AutoConfig.for_model(family, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    embedding = next(getattr(module, name) for name in dir(module) if name.endswith("RotaryEmbedding"))
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 30, 64, generator=generator)
    layer = {"layer_type": "full_attention"} if family == "gemma3_text" else {}  # its local and global rotations
    cos, sin = embedding(config)(hidden, torch.arange(30)[None].expand(2, 30) + 7, **layer)
    function = module.apply_rotary_pos_emb
    grads = [torch.randn(2, h, 30, 16, generator=generator) for h in (4, 2)]  # the outputs' gradients
    results = []
    for rotate in (function, lambda *args: Rotation.apply(function, *args)):
        query, key = (torch.randn(2, h, 30, 16, generator=torch.Generator().manual_seed(h)).requires_grad_(True)
                      for h in (4, 2))
        outputs = rotate(query, key, cos, sin)
        torch.autograd.backward(outputs, grads)
        results.append([*outputs, query.grad, key.grad])
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_a_forward_without_the_rotary_function_keeps_its_class():
    from lmsys.modeling.rotary import compile_rotary

    class Plain(torch.nn.Module):
        def forward(self, x):
            return x

    module = Plain()
    assert not compile_rotary(module) and type(module) is Plain


def test_the_bf16_kernel_by_gradients_and_keys():
    """With gradients the compiled attention (or Float32Backward) up to FLOAT32_MAX_ROW keys; without, the compiled
    forward up to COMPILED_FORWARD_MAX_KEYS (beyond 512: a tree's continuing sequence and its pad tail); torch's sdpa
    (None) beyond, in float32, with dropout, or without gradients and the compiled attention."""
    compiled = CompiledCausalAttention()
    module, plain = SimpleNamespace(compiled_attention=compiled), SimpleNamespace()
    query = torch.zeros(1, 1, 2, 4, dtype=torch.bfloat16)
    assert FLOAT32_MAX_ROW < 600 <= COMPILED_FORWARD_MAX_KEYS < 700
    with torch.no_grad():
        assert bf16_kernel(module, query, 0.0, 600) is compiled and bf16_kernel(module, query, 0.0, 700) is None
        assert bf16_kernel(plain, query, 0.0, 100) is None and bf16_kernel(module, query.float(), 0.0, 100) is None
    assert bf16_kernel(module, query, 0.0, FLOAT32_MAX_ROW) is compiled and bf16_kernel(module, query, 0.0, 600) is None
    assert bf16_kernel(plain, query, 0.0, 100) == Float32Backward.apply and bf16_kernel(module, query, 0.1, 100) is None


# --- one row of real tokens (model.unpad_rows): its sequences padded only inside the attention -------------------


def test_padded_groups_bound_the_padding_of_a_call():
    # longest first; a group grows while members x longest^2 <= PADDING_WASTE (2) x the members' own squares
    assert padded_groups([7, 12, 3, 18]) == [[3, 1, 0], [2]]  # 4 x 18^2 = 1296 > 2 x 526: the 3 goes alone
    assert padded_groups([10, 12, 9, 9]) == [[1, 0, 2, 3]]
    assert padded_groups([5]) == [[0]] and padded_groups([]) == []


def test_stacking_a_row_of_sequences_pads_each_with_zeros_and_unstacks_back():
    tensor = torch.randn(1, 10, 4, 3).transpose(1, 2)  # (1, h=4, T=10, D=3), as the projections lay it out
    stacked = _stacked(tensor, 2, (4, 6))  # 2 sequences x 2 kv heads, up to 6 tokens x 2 heads of a group
    assert stacked.shape == (4, 12, 3) and stacked.is_contiguous()
    padded = stacked.view(2, 2, 6, 2, 3)  # (S, H_kv, L, g, D)
    assert torch.equal(padded[0, :, 4:], torch.zeros(2, 2, 2, 3))  # the first sequence's 2 padding tokens
    # token 5 (the second sequence's second), head 3 = kv head 1, head 1 of its group
    assert torch.equal(padded[1, 1, 1, 1], tensor[0, 3, 5])
    assert torch.equal(_unstacked(stacked, tensor.shape, (4, 6)), tensor)


ONE_ROW = {"one_call": [10, 12, 9, 9], "two_calls": [7, 12, 3, 18]}  # padded_groups: one group; two


@pytest.mark.parametrize("lengths", ONE_ROW.values(), ids=ONE_ROW.keys())
@pytest.mark.parametrize("kernel", ["sdpa_float32", "compiled_bf16"])
def test_one_row_of_sequences_attends_each_alone_with_gradients(compiled_module, monkeypatch, kernel, lengths):
    """A row of sequences with no pad tail (PreferenceModel's unpadded row): each sequence's output and q, k, v
    gradients as float64 sdpa over that sequence alone; float32 to float rounding, the compiled bf16 kernel within
    bf16 rounding, padding the sequences in its own copies (_stacked with lengths) where they make one call."""
    dtype = torch.float32 if kernel == "sdpa_float32" else torch.bfloat16
    module = GQA if kernel == "sdpa_float32" else compiled_module
    query, key, value = (t[:1].to(dtype).requires_grad_(True) for t in qkv(seed=12, length=40))
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    stacked_lengths = []
    original = _stacked
    monkeypatch.setattr("lmsys.modeling.attention._stacked",
                        lambda t, kv, lens=None: stacked_lengths.append(lens) or original(t, kv, lens))
    output, _ = cpu_sdpa(module, query, key, value, None, scaling=0.25, cu_seq_lens_q=bounds)  # (1, 40, H, D)
    weights = torch.linspace(-1.0, 1.0, output.numel()).view_as(output)
    (output.double() * weights.double()).sum().backward()
    if kernel == "compiled_bf16":
        one_call = len(padded_groups(lengths)) == 1
        assert (tuple(lengths) in stacked_lengths) == one_call  # one call padded inside the kernel; else not
    start = 0
    for length in lengths:
        tokens = slice(start, start + length)
        alone = [t.detach()[:, :, tokens].double().requires_grad_(True) for t in (query, key, value)]
        expected, _ = sdpa_attention_forward(GQA, *alone, None, scaling=0.25, is_causal=True)  # (1, L, H, D)
        (expected * weights[:, tokens].double()).sum().backward()
        for ours, theirs in zip([output[:, tokens], *(t.grad[:, :, tokens] for t in (query, key, value))],
                                [expected, *(t.grad for t in alone)], strict=True):
            tolerance = 1e-5 if dtype == torch.float32 else 0.02 * float(theirs.detach().abs().max())
            torch.testing.assert_close(ours.detach().double(), theirs.detach(), atol=tolerance, rtol=0)
        start += length
