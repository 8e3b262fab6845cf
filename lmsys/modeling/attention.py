"""The attention kernel a backbone is loaded with on CPU for sdpa: CPU_SDPA, which computes a packed row's
attention sequence by sequence, and trains a bfloat16 model's attention with a float32 backward on rows of up to
FLOAT32_MAX_ROW tokens. Elsewhere (GPU, eager, flash attention) the spec's own kernel.

**Sequence by sequence.** With a packed row's block-diagonal causal mask, torch's CPU flash attention computes the
whole square of the row: a row of four 256-token pairs costs 16 blocks of 256 x 256 where four half-blocks are
needed. Given the packed sequences' bounds (`cu_seq_lens_q`, which PreferenceModel passes for packed micro-batches
on this kernel: the cumulative lengths over the flattened rows, the layout of flash attention's varlen kernels),
each sequence is attended on its own, causal, without a mask. `python scripts/attention_bench.py` prints the
comparison for the machine it runs on; on an AMD EPYC (AVX2, 2 threads, fp32, SmolLM2-135M's 9 query and 3
key/value heads of 64, forward + backward, median of 3):

| one row of | 4 x 256 | 6 x 170 | 512 + 300 + 212 | 1 x 1024 | 10 x 100 | 1 x 180 |
|---|---|---|---|---|---|---|
| sdpa, packed mask, ms | 102.4 | 101.4 | 103.1 | 102.3 | 95.2 | 5.3 |
| per sequence, ms | 33.2 | 30.0 | 44.7 | 80.3 | 20.8 | 5.4 |

The same attention (to float rounding: 1e-6 in fp32); a sliding window shorter than a sequence, a soft cap,
a position bias or non-causal attention take the masked path.

**Rows of one sequence in one call.** A row's pad tail joins the sequence before it (PreferenceModel passes the
bounds so, from its pooled tokens: sequence_bounds), which causal attention keeps exact for the real tokens; most
packed micro-batches are then rows of one segment each (packing sorts by length: 4 rows of 238 tokens, 2 of 512),
and they attend in one batched call on the tensors as they are, without splitting and concatenating.
`python scripts/attention_bench.py --micro-batches` on the Intel Xeon with AMX (2 threads, float32, forward +
backward, median of 9, the bench's micro-batch shapes):

| micro-batch (rows: sequences (+ pad tail)) | one call per sequence, ms | here, ms |
|---|---|---|
| 238, 236 (+2), 208 (+30), 203 (+35) | 26.7 | 19.5 |
| 170, 169 (+1), 160 (+10), 160 (+10), 158 (+12), 155 (+15) | 26.6 | 18.8 |
| 512, 481 (+31) | 46.9 | 33.3 |
| 246+196 (+2), 244+200 (rows of several sequences: each alone) | 24.1 | 24.4 |

**No pad tails** (models without a sliding window). PreferenceModel now drops the rows' pad tails before the
backbone (model.unpad_rows): one row of the real tokens, whose projections, norms and MLPs compute no padding
(5% of the bench's packed training tokens, 3.6% of its TTA pass's). The attention pads instead, where it batches
the row's sequences (attend_segments): inside the compiled kernel's own copies of q, k and v (_stacked with
`lengths`), so a micro-batch's sequences still attend in one call with no extra copy. Measured in one process
on the bench's packed updates and TTA pass (AMD EPYC, AVX-512 BF16, 2 threads, the two taking turns, two runs
each): 0.970-0.985 and 0.947-0.986 of the time of the rows with their tails, the TTA probabilities equal to the bit. The rows above (tails joined) remain for models with a sliding
window, where a sequence longer than the window takes the masked path, whose mask keeps to its row.

**A float32 backward in bf16 training.** torch's CPU flash-attention backward is slow in bfloat16 on short rows.
Measured on an Intel Xeon with AMX (2 threads, packed causal masks, forward + backward, median of 5; `python
scripts/attention_bench.py` prints the table for the machine it runs on):

| rows x tokens | 6 x 170 | 3 x 328 | 1 x 180 | 2 x 512 | 1 x 1024 |
|---|---|---|---|---|---|
| bf16 sdpa, ms | 39.0 | 31.5 | 8.9 | 35.6 | 46.1 |
| float32 sdpa, ms | 17.9 | 24.6 | 4.2 | 31.4 | 60.8 |

Its forward is the fast one in bf16 (the bench's micro-batch shapes, 4 x 444 to 8 x 223, 9 heads of 64: 0.45-0.72
of float32's time). So with gradients, on rows up to 512 tokens, `Float32Backward` runs torch's bf16 flash forward (the
output and its log-sum-exp exactly as evaluation computes them) and the float32 flash backward on q, k, v, the
output and its gradient cast up, the gradients cast back down: 0.78-0.92 of an all-float32 forward + backward on
those shapes, gradients within bf16 rounding of it. Evaluation, prediction and longer rows run bf16 sdpa throughout.

**Compiled, in bf16 training** (`model.attention_kernel=compiled`; `auto` where the norms and MLPs compile: bf16 on
CPU with a C++ compiler). The same causal attention of those rows as batched bf16 products around a float32
causal softmax, compiled (CompiledCausalAttention; where the C++ segment attention runs, that instead: below).
(Until Dec 6 a C++ causal softmax ran between the products on CPUs with AVX-512 BF16: the segment attention, on the
same CPUs, replaced it.) GQA by stacking
a key/value head's query heads into one operand, token by token (k and v are not repeated); on long rows the query tokens go in QUERY_BLOCKS blocks, each against the keys up to its last
token only (5/8 of the square's products and softmax, and a block's float32 scores stay in cache), short or few rows
in one block (query_blocks); the causal mask is generated inside the loop. The forward and a hand-written backward
are compiled, one graph each per block count. The forward keeps each block's softmax weights in bf16 (the operand
of its product with v) for the backward, which so recomputes nothing (KeptWeightsAttention): forward + backward of
one layer 0.83-0.91 of the time of recomputing them from a log-sum-exp as flash attention's backward does (AMD EPYC,
AVX-512 BF16, 2 threads, median of 7: 4 x 512 33.1 against 38.9 ms, 8 x 223 13.3 against 15.7, 12 x 170 13.4
against 15.7, 6 x 339 as 12 sequences 20.9 against 22.9), for ~12 MB a layer of a 4 x 512 micro-batch held until
its backward (SmolLM2's 9 heads; autograd through the compiled forward had kept float32 (T, T) tensors as well:
+1.2 GB peak RSS in the bench). Masked calls (a sliding window shorter than a
row) and one-token rows stay on Float32Backward. `python scripts/attention_bench.py --compiled` on an AMD EPYC
with AVX-512 BF16 (2 threads, the bench's micro-batch shapes, forward + backward, median of 9, the kernels taking
turns; the first compiled kernel, the whole square in one block always, in the last row, from an earlier session
when the machine ran ~15% slower: eager 275.5 ms in total then):

| rows x tokens | 4 x 444 | 8 x 223 | 4 x 512 | 4 x 364 | 6 x 340 | 4 x 265 | 1 x 180 | 1 x 130 | total |
|---|---|---|---|---|---|---|---|---|---|
| eager (float32 backward), ms | 46.5 | 26.6 | 60.1 | 31.6 | 41.4 | 17.5 | 2.9 | 1.7 | 228.2 |
| compiled, ms | 25.0 | 14.3 | 30.2 | 18.0 | 23.8 | 10.8 | 2.5 | 1.6 | 126.1 |
| compiled, always one block (earlier), ms | 58.8 | 25.2 | 65.0 | 25.6 | 40.7 | 17.4 | 3.0 | 2.1 | 237.8 |

Four blocks on every row of 16 tokens or more measured slower than one on short or few rows (1 x 130: 3.8 against
2.1 ms; 25 x 80: 11.9 against 10.0), hence query_blocks. In training, the bench's packed updates in one process, the
blocked and the one-block kernels taking turns update by update (12 updates each, after a warm-up pass that
compiles every graph): 463.4 against 427.6 real tokens/s (1.084x). Gradients: as near a float32 model's as
Float32Backward's (tests/modeling/test_attention.py). Compiling costs ~5 s at start-up for the one-block graphs and
~10 s with the blocked ones as well (~50 s the first time on a machine, before inductor's on-disk cache holds
them; the one-block pair alone ~15 s).

**Without gradients** (evaluation, prediction) a module with the compiled attention runs its forward graph alone
(bf16_kernel): torch's CPU flash forward in bf16 reached ~36 GFLOP/s on the bench's prediction micro-batches, and
the compiled forward halved the prediction's attention time (8.7 against 4.4 s of a profiled TTA pass).

**The C++ segment attention** (lmsys.modeling.segment_attention; CPUs with AVX-512 BF16): where it runs, the
compiled attention sends it every call it can take, with or without gradients, at any length: a call's segments
(and, without gradients, its swap trees) in one call, read from and written to the projections' layout, no stacked
copies, no scores tensor, no kept weights. The graphs above then serve swap trees with gradients (none in training)
and heads that are not whole vectors of 16. In one process on the bench (AMD EPYC with AVX-512 BF16, 2 threads,
taking turns): TTA passes 0.925 and training epochs 0.970 of the time.

**Swap trees** (lmsys.data.batching.swap_tree: a pair's two orientations sharing their common prefix, computed
once): the tree's second rest is a segment of its own that continues the prefix; PreferenceModel passes
`shared_prefixes` (its first token, the prefix's first token and length), and attend_segments puts the prefix's
keys and values before the segment's own, the queries being the keys' last ones (causal_attention_forward and
_backward take fewer queries than keys; torch's sdpa gets the offset causal mask). Calls that would take the masked
path (a soft cap, a position bias, a sliding window shorter than a sequence) refuse trees rather than mis-attend.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lmsys.modeling.rotary import compile_rotary
from lmsys.modeling.segment_attention import fits, segment_attention, segment_attention_op

CPU_SDPA = "lmsys_sdpa_cpu"
FLOAT32_MAX_ROW = 512  # the bf16 crossover measured above


def cpu_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
             is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention of query (B, H, T, D) over key, value (B, H_kv, T, D) -> (B, T, H, D) in the query's dtype."""
    length = query.shape[2]
    special = kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None or length != key.shape[2]
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    lengths = packed_sequences(kwargs.get("cu_seq_lens_q"), kwargs.get("sliding_window"))
    shared_prefixes = kwargs.get("shared_prefixes")
    if shared_prefixes is not None and (special or not causal or lengths is None):
        raise ValueError("swap trees (shared_prefixes) need causal per-sequence attention: no soft cap, position "
                         "bias or sliding window shorter than a sequence")
    longest = length if lengths is None else max(lengths)  # the most keys of one call
    if shared_prefixes is not None:  # a continuing segment's keys: its prefix's and its own
        bounds = kwargs["cu_seq_lens_q"].long()
        continuing = torch.searchsorted(bounds, shared_prefixes[:, 0].contiguous())  # (K,) each one's index among the segments
        longest = max(longest, int((bounds.diff()[continuing] + shared_prefixes[:, 2]).max()))
    kernel = bf16_kernel(module, query, dropout, longest)
    if special or not causal or (lengths is None and kernel is None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if lengths is None:
        output = kernel(query, key, value, additive_mask(attention_mask, query.dtype), scaling,
                        attention_mask is None and length > 1).transpose(1, 2)  # (B, T, H, D)
    else:
        output = attend_segments(query, key, value, lengths, dropout, scaling, kernel, shared_prefixes)
    return output.contiguous(), None


COMPILED_FORWARD_MAX_KEYS = 640  # without gradients, where the compiled forward stops being the faster


def bf16_kernel(module: torch.nn.Module, query: torch.Tensor, dropout: float, keys: int):
    """How a bf16 model attends calls of `keys` keys without dropout: by the module's compiled attention
    (`model.attention_kernel=compiled`: compile_attention) at any length where its C++ segment attention runs
    (lmsys.modeling.segment_attention; AMD EPYC with AVX-512 BF16, 2 threads, one row of SmolLM2's heads: without
    gradients 0.28-0.46 of torch's flash forward's time from 512 to 2,048 tokens, forward + backward 0.39-0.54 of
    torch's bf16 sdpa's at 512, 1,024 and 2,048). Else with gradients, calls of up to FLOAT32_MAX_ROW keys by the
    compiled attention or Float32Backward; without, calls of up to COMPILED_FORWARD_MAX_KEYS by the compiled
    attention's forward alone (a swap tree's continuing sequence with its row's pad tail has more keys than the
    sequence's max_length). None (torch's sdpa) in float32, on longer calls, with dropout, or without gradients and
    the compiled attention.

    COMPILED_FORWARD_MAX_KEYS: one row, bf16, without gradients, AMD EPYC with AVX-512 BF16, 2 threads, median of 9
    (twice): the compiled forward against torch's flash 3.9 against 4.2 ms at 512 tokens, 5.1-5.6 against 5.6-9.6 at
    640, 7.8-8.1 against 7.4-8.7 at 768, 10.7-11.1 against 9.6-10.1 at 900, 14.5-15.1 against 12.6-12.8 at 1,024."""
    if query.dtype != torch.bfloat16 or dropout:
        return None
    compiled = getattr(module, "compiled_attention", None)
    if compiled is not None and compiled.fuses(query):
        return compiled
    if torch.is_grad_enabled():
        return (compiled or Float32Backward.apply) if keys <= FLOAT32_MAX_ROW else None
    return compiled if keys <= COMPILED_FORWARD_MAX_KEYS else None


class Float32Backward(torch.autograd.Function):
    """Causal or masked attention, q (B, H, T, D), k and v (B, H_kv, T, D) in bf16 -> (B, H, T, D) in bf16: torch's
    CPU flash forward in bf16, its backward in float32 (see the module's docstring); no dropout. GQA as the kernel
    does it (H a multiple of H_kv)."""

    @staticmethod
    def forward(ctx, query, key, value, mask, scaling, causal):  # mask: additive, in the query's dtype, or None
        output, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, causal, attn_mask=mask, scale=scaling)  # logsumexp (B, T, H) float32
        ctx.save_for_backward(query, key, value, output, logsumexp)
        ctx.mask, ctx.scaling, ctx.causal = mask, scaling, causal
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, output, logsumexp = ctx.saved_tensors
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_output.float(), query.float(), key.float(), value.float(), output.float(), logsumexp, 0.0,
            ctx.causal, attn_mask=None if ctx.mask is None else ctx.mask.float(), scale=ctx.scaling)
        return *(grad.to(query.dtype) for grad in grads), None, None, None


QUERY_BLOCKS = 4  # query blocks of a long row: causal attention skips the keys after each block's last token


def query_blocks(rows: int, length: int, keys: int | None = None) -> int:
    """How many query blocks causal_attention_forward takes `rows` rows of `length` tokens in: QUERY_BLOCKS from 128
    tokens and ~90k rows x tokens^2, else 1 (the whole square): on shorter or fewer rows the blocks' smaller products
    and extra kernels cost more than the skipped triangle saves (measured on an AMD EPYC with AVX-512 BF16, 2
    threads, SmolLM2-135M's heads: 4 blocks 0.53x the time at 8 x 250 tokens, 0.77x at 1 x 400, 0.92x at 6 x 128;
    1.16-1.42x at 4 x 128, 3 x 150, 1 x 246 and 25 x 80). A swap tree's continuing call (more `keys` than query
    tokens: every block reads the whole prefix) in one block: 4 blocks measured 1.43x its time at 300 queries over
    500 keys and 2.0x at 150 over 270 (forward, without gradients)."""
    if keys is not None and keys > length:
        return 1
    return QUERY_BLOCKS if length >= 128 and rows * length * length >= 90_000 else 1


def causal_attention_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                             groups: int, blocks: int, keep_weights: bool = False
                             ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Causal attention as batched products around a float32 softmax, GQA without repeating k and v: the `groups`
    query heads of a key/value head stack into one operand, token by token (row t * g + j: token t, head j of the
    group), so that a block of tokens is a block of rows. The rows go in `blocks` blocks (query_blocks), each against
    the keys up to its last token only: with 4, 5/8 of the square's products and softmax, and a block's float32
    scores stay in cache.
    q (N, T * g, D), k and v (N, T, D), N = batch x key/value heads -> the output (N, T * g, D) in q's dtype and, with
    `keep_weights`, each block's softmax weights (N, C * g, L) as the product with v took them (q's dtype), which
    the backward takes instead of recomputing them; else (). Fewer query tokens than keys (a swap tree's continuing
    sequence: lmsys.data.batching.swap_tree) are the keys' last ones."""
    outputs, kept = [], []
    offset = key.shape[1] - query.shape[1] // groups  # the keys before the first query token
    for start, end in _query_block_bounds(query.shape[1] // groups, blocks):
        rows, keys = slice(start * groups, end * groups), offset + end
        weights = _causal_weights(query[:, rows], key[:, :keys], scaling, groups, offset + start).to(query.dtype)
        outputs.append(torch.matmul(weights, value[:, :keys]))  # (N, C * g, D)
        if keep_weights:
            kept.append(weights)
    return torch.cat(outputs, 1), tuple(kept)


def causal_attention_backward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor,
                              weights: tuple[torch.Tensor, ...], grad_output: torch.Tensor, scaling: float,
                              groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v (their shapes, q's dtype) from causal_attention_forward's output, its kept weights (one
    per block, in its blocks) and the output's gradient (N, T * g, D), block by block as the forward: the weights'
    gradient through the softmax in float32, the blocks' k and v gradients summed in float32."""
    grad_queries = []
    grad_key = torch.zeros(key.shape, dtype=torch.float32, device=key.device)  # (N, T, D)
    grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
    offset = key.shape[1] - query.shape[1] // groups
    bounds = _query_block_bounds(query.shape[1] // groups, len(weights))
    for (start, end), block_weights in zip(bounds, weights, strict=True):
        rows, keys = slice(start * groups, end * groups), offset + end
        query_rows, grad_rows = query[:, rows], grad_output[:, rows]  # (N, C * g, D)
        grad_value[:, :keys] += torch.matmul(block_weights.transpose(-1, -2), grad_rows)  # (N, keys, D)
        grad_weights = torch.matmul(grad_rows, value[:, :keys].transpose(-1, -2)).float()  # (N, C * g, keys)
        row_dot = (grad_rows.float() * output[:, rows].float()).sum(-1, keepdim=True)  # (N, C * g, 1)
        grad_scores = (block_weights.float() * (grad_weights - row_dot) * scaling).to(query.dtype)
        grad_queries.append(torch.matmul(grad_scores, key[:, :keys]))
        grad_key[:, :keys] += torch.matmul(grad_scores.transpose(-1, -2), query_rows)
    return torch.cat(grad_queries, 1), grad_key.to(query.dtype), grad_value.to(query.dtype)


def _query_block_bounds(length: int, blocks: int) -> list[tuple[int, int]]:
    """`blocks` (start, end) token blocks of a row of `length` tokens, in order (query_blocks: length >= 128 for
    more than one, so none is empty)."""
    size = (length + blocks - 1) // blocks
    ends = [size * (k + 1) for k in range(blocks - 1)] + [length]
    return list(zip([0, *ends[:-1]], ends, strict=True))


def _causal_weights(query: torch.Tensor, key: torch.Tensor, scaling: float, groups: int, start: int) -> torch.Tensor:
    """The causal softmax weights (N, C * g, L) in float32 of the query rows of tokens start.. (token-major, C
    tokens) over the first L keys."""
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scaling  # (N, C * g, L)
    token = start + torch.arange(query.shape[1], device=query.device) // groups  # (C * g,) each row's token
    future = torch.arange(key.shape[1], device=query.device) > token[:, None]  # (C * g, L)
    scores = scores.masked_fill(future, float("-inf"))
    return (scores - scores.logsumexp(-1, keepdim=True)).exp()


class CompiledCausalAttention:
    """`model.attention_kernel=compiled` (bf16 on CPU; see the module's docstring): the forward and the backward
    above, each by torch.compile into shape-generic graphs (dynamic=True) shared by every layer and model of the
    process (one per block count, one block or QUERY_BLOCKS, and for the forward per keep_weights: with gradients it
    keeps the weights, without it does not); a masked or non-causal call, or a row of one token (which dynamo would
    specialize into a graph of its own), goes to Float32Backward. The same arguments as Float32Backward.apply. With
    `segment_attention` (the C++ kernel), every call it takes goes to it first (fuses)."""

    def __init__(self, segment_attention=None) -> None:
        self.forward_graph = torch.compile(causal_attention_forward, dynamic=True)
        self.backward_graph = torch.compile(causal_attention_backward, dynamic=True)
        # the C++ segment attention (lmsys.modeling.segment_attention): a call's sequences in one, with or without
        # gradients; the graphs then serve only what it does not take (swap trees with gradients, heads that are
        # not whole vectors of 16)
        self.segment_attention = segment_attention

    def __call__(self, query, key, value, mask, scaling, causal, lengths: tuple[int, ...] | None = None
                 ) -> torch.Tensor:
        """Fewer query tokens than keys: the keys' last ones, causal, at least two (continues). `lengths`: one row
        (B = 1) of sequences of these lengths, each attended on its own, causal (attend_segments)."""
        if mask is not None or not causal or query.shape[2] <= 1:
            if query.shape[2] != key.shape[2] or lengths is not None:
                raise ValueError("the compiled attention continues a prefix with 2 or more causal query tokens only, "
                                 "and attends the sequences of a row causally only")
            return Float32Backward.apply(query, key, value, mask, scaling, causal)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        if self.fuses(query) and query.shape[2] == key.shape[2]:  # with or without gradients
            rows, heads, length, dim = query.shape
            sequences = [length] * rows if lengths is None else list(lengths)
            output = self.attend_flat(_flat(query), _flat(key), _flat(value), sequences, {}, scaling)  # (R * T, H, D)
            return output.view(rows, length, heads, dim).transpose(1, 2)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
            return KeptWeightsAttention.apply(query, key, value, scaling, self, lengths)
        return self.attend(query, key, value, scaling, lengths=lengths)[0]

    def attend_flat(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: list[int],
                    prefixes: dict[int, tuple[int, int]], scaling: float | None) -> torch.Tensor:
        """The C++ segment attention of q (T, H, D), k and v (T, h, D), with or without gradients: the segments of
        `lengths` tile the tokens; one starting at a token listed in `prefixes` (first: (prefix's first token,
        length)) continues that prefix (without gradients only). -> (T, H, D)"""
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        return self.segment_attention(query, key, value, _segment_table(lengths, prefixes), scaling)

    def fuses(self, query: torch.Tensor) -> bool:
        """Whether a call on `query` goes to the C++ segment attention."""
        return self.segment_attention is not None and fits(query.shape[-1])

    def attend(self, query, key, value, scaling: float, keep_weights: bool = False,
               lengths: tuple[int, ...] | None = None):
        """(the output (B, H, T, D), what the backward needs: the stacked q, k, v, the stacked output and the kept
        weights) of q (B, H, T, D), k and v (B, H_kv, T, D); with `lengths`, B = 1 and the row's sequences go
        side by side, each padded to the longest (_stacked)."""
        kv_heads = key.shape[1]
        stacked = [_stacked(tensor, kv_heads, lengths) for tensor in (query, key, value)]
        rows, length = (query.shape[0], query.shape[2]) if lengths is None else (len(lengths), max(lengths))
        blocks = query_blocks(rows, length, key.shape[2] if lengths is None else length)
        output, weights = self.forward_graph(*stacked, scaling, query.shape[1] // kv_heads, blocks, keep_weights)
        return _unstacked(output, query.shape, lengths), (*stacked, output, *weights)

    def attend_parts(self, queries: list[list[torch.Tensor]], keys: list[list[torch.Tensor]],
                     values: list[list[torch.Tensor]], scaling: float | None, into: torch.Tensor,
                     at: list[int]) -> None:
        """Segments side by side in one call without gradients, each given as the parts (L_j, h, D) of its q, k and
        v and stacked straight from them (_padded_stack: no padded copy first, no concatenation of a swap tree's
        prefix keys with a continuing segment's own); segment i's output (L_i, H, D) is written into `into` (the
        row's (T, H, D)) from row at[i]. Either every segment has as many keys as queries, or one segment continues
        the keys before its queries."""
        kv_heads, dim = keys[0][0].shape[1], keys[0][0].shape[2]
        lengths = [sum(len(part) for part in parts) for parts in queries]
        seen = [sum(len(part) for part in parts) for parts in keys]
        if len(queries) > 1 and lengths != seen:
            raise ValueError("attend_parts: several segments in one call each attend their own queries' keys only")
        stacked = [_padded_stack(parts, kv_heads, max(sizes)) for parts, sizes in
                   ((queries, lengths), (keys, seen), (values, seen))]
        groups = queries[0][0].shape[1] // kv_heads
        scaling = dim**-0.5 if scaling is None else scaling
        blocks = query_blocks(len(lengths), max(lengths), max(seen))
        output, _ = self.forward_graph(*stacked, scaling, groups, blocks, False)
        padded = output.view(len(lengths), kv_heads, max(lengths), groups, dim)
        for i, (first, size) in enumerate(zip(at, lengths, strict=True)):
            into[first : first + size].view(size, kv_heads, groups, dim).copy_(padded[i, :, :size].transpose(0, 1))


def _stacked(tensor: torch.Tensor, kv_heads: int, lengths: tuple[int, ...] | None = None) -> torch.Tensor:
    """(B, h, T, D) -> (B * H_kv, T * h / H_kv, D), token by token (causal_attention_forward's layout): always a new
    contiguous tensor, never a view, the one kind of input the graphs see (dynamo guards on a view's base, a stride
    pattern, a storage offset, requires_grad: each would be a graph of its own). One copy of q, k or v (the
    projections lay them out as (B, T, h, D), so regrouping copies anyway).

    With `lengths` (B = 1, the row's sequences in order): (S * H_kv, L * h / H_kv, D), L the longest, sequence by
    sequence, each followed by zeros up to L: the same one copy, the padding only in this layout (a sequence's
    padding comes after its tokens, so causal attention keeps it from them; zeros keep its products finite)."""
    batch, heads, length, dim = tensor.shape
    groups = heads // kv_heads
    if lengths is None:
        stacked = torch.empty(batch * kv_heads, length * groups, dim, dtype=tensor.dtype, device=tensor.device)
        by_token = tensor.transpose(1, 2).reshape(batch, length, kv_heads, groups, dim)
        stacked.view(batch, kv_heads, length, groups, dim).copy_(by_token.transpose(1, 2))
        return stacked
    return _padded_stack([[piece] for piece in tensor[0].transpose(0, 1).split(lengths)], kv_heads, max(lengths))


def _padded_stack(segments: list[list[torch.Tensor]], kv_heads: int, longest: int) -> torch.Tensor:
    """Segments, each the parts (L_j, h, D) of its tokens in order -> (S * H_kv, longest * h / H_kv, D): segment
    by segment, its tokens token by token (causal_attention_forward's layout), then zeros up to `longest`. One
    copy of each part."""
    first = segments[0][0]
    heads, dim = first.shape[1:]
    groups = heads // kv_heads
    stacked = torch.empty(len(segments) * kv_heads, longest * groups, dim, dtype=first.dtype, device=first.device)
    padded = stacked.view(len(segments), kv_heads, longest, groups, dim)
    for i, parts in enumerate(segments):
        at = 0
        for part in parts:
            padded[i, :, at : at + len(part)].copy_(part.reshape(len(part), kv_heads, groups, dim).transpose(0, 1))
            at += len(part)
        padded[i, :, at:].zero_()
    return stacked


def _unstacked(stacked: torch.Tensor, shape: torch.Size, lengths: tuple[int, ...] | None = None) -> torch.Tensor:
    """_stacked's inverse: (B * H_kv, T * h / H_kv, D) -> (B, h, T, D), a view of a (B, T, h, D) tensor (the layout
    the caller's transpose makes contiguous). One copy for a query's h > H_kv; a view for k and v. With `lengths`:
    one copy of each sequence's tokens into a new (1, T, h, D) tensor, the padding left out."""
    batch, heads, length, dim = shape
    kv_heads = stacked.shape[0] // (batch if lengths is None else len(lengths))
    groups = heads // kv_heads
    if lengths is None:
        by_token = stacked.view(batch, kv_heads, length, groups, dim).transpose(1, 2)  # (B, T, H_kv, g, D)
        return by_token.reshape(batch, length, heads, dim).transpose(1, 2)
    padded = stacked.view(len(lengths), kv_heads, max(lengths), groups, dim)
    flat = torch.empty(length, kv_heads, groups, dim, dtype=stacked.dtype, device=stacked.device)  # (T, H_kv, g, D)
    start = 0
    for i, size in enumerate(lengths):
        flat[start : start + size].copy_(padded[i, :, :size].transpose(0, 1))
        start += size
    return flat.view(1, length, heads, dim).transpose(1, 2)


class KeptWeightsAttention(torch.autograd.Function):
    """Causal attention of q (B, H, T, D), k and v (B, H_kv, T, D) -> (B, H, T, D) through CompiledCausalAttention's
    two graphs; keeps q, k, v, the output and the softmax weights (bf16, the blocks' 5/8 of each (T, T) square per
    key/value head and query head of its group) for the backward, which then has no weights to recompute.

    The weights are what the forward's product with v took, so the backward differentiates exactly that forward.
    Memory: the weights of every layer until its backward: rows x tokens x (at most FLOAT32_MAX_ROW keys) x query
    heads x 2 bytes x 5/8 a layer, ~12 MB a layer for a micro-batch of 4 x 512 tokens and 9 heads. Measured on an
    AMD EPYC with AVX-512 BF16 (2 threads, the bench's micro-batches, forward + backward of one layer): see the
    module's docstring."""

    @staticmethod
    def forward(ctx, query, key, value, scaling, graphs, lengths=None):
        output, saved = graphs.attend(query, key, value, scaling, keep_weights=True, lengths=lengths)
        ctx.save_for_backward(*saved)
        ctx.scaling, ctx.groups, ctx.lengths = scaling, query.shape[1] // key.shape[1], lengths
        ctx.graphs, ctx.shapes = graphs, (query.shape, key.shape)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query_shape, key_shape = ctx.shapes
        query, key, value, output, *weights = ctx.saved_tensors
        lengths = ctx.lengths
        grad_stacked = _stacked(grad_output, key_shape[1], lengths)  # zero at the padding: it reaches no gradient
        grad_query, grad_key, grad_value = ctx.graphs.backward_graph(query, key, value, output, tuple(weights),
                                                                     grad_stacked, ctx.scaling, ctx.groups)
        return (_unstacked(grad_query, query_shape, lengths), _unstacked(grad_key, key_shape, lengths),
                _unstacked(grad_value, key_shape, lengths), None, None, None)


@functools.cache
def process_compiled_attention() -> CompiledCausalAttention:
    """The process's one CompiledCausalAttention: its graphs serve every model built in the process; its C++
    segment attention where that runs (lmsys.modeling.segment_attention)."""
    return CompiledCausalAttention(segment_attention if segment_attention_op() is not None else None)


def compile_attention(model: torch.nn.Module) -> tuple[int, int]:
    """Give every attention module of `model` (a family's *Attention with q_proj) the compiled causal attention, which
    cpu_sdpa then uses in bf16, and the compiled rotary embedding (lmsys.modeling.rotary); returns how many modules
    have each. The module tree and parameters are unchanged."""
    modules = [module for module in model.modules() if type(module).__name__.endswith("Attention")
               and isinstance(getattr(module, "q_proj", None), torch.nn.Module)]
    for module in modules:  # not a submodule: names and checkpoints stay the family's
        module.__dict__["compiled_attention"] = process_compiled_attention()
    return len(modules), sum(compile_rotary(module) for module in modules)


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True: attend) as the flash kernel takes it, 0 or -inf in `dtype`, as sdpa converts it."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def attend_segments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: list[int], dropout: float,
                    scaling: float | None, kernel=None, shared_prefixes: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each packed segment on its own; `lengths` tile the flattened rows in order.
    query (R, H, T, D), key/value (R, H_kv, T, D) -> (R, T, H, D). `kernel`: bf16_kernel's, or None (torch's sdpa).
    `shared_prefixes` (K, 3), swap trees' (lmsys.data.batching.Batch): a segment starting at a listed flattened index
    continues the listed prefix, whose keys and values go before its own.

    Rows of one segment each (sequence_bounds) attend in one call as they are; every segment in one call of the C++
    segment attention where it runs (_fused); else (a row of real tokens: model.unpad_rows) in calls of several
    segments padded to their longest (padded_groups), in the compiled kernel's own copies (_stacked) where one call
    takes the row, else by pad_sequence; a continuing segment alone; prediction's trees by _attend_trees. The flat
    (R * T, H, D) views and their split are free, the split's backward one concatenation (slicing would zero-fill a
    full-size gradient per segment)."""
    rows, heads, length, dim = query.shape

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # (B, h, L, D) -> (B, L, H, D)
        if kernel is not None:  # bf16: bf16_kernel
            return kernel(q, k, v, None, scaling, q.shape[2] > 1).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=q.shape[2] > 1,
                                              enable_gqa=heads != key.shape[1]).transpose(1, 2)

    if len(lengths) == rows and shared_prefixes is None:  # every row one segment
        return attend(query, key, value)

    prefixes = {} if shared_prefixes is None else {first: (start, size)
                                                   for first, start, size in shared_prefixes.tolist()}
    flat_key, flat_value = _flat(key), _flat(value)
    if _fused(kernel, query, prefixes):  # every segment and swap tree in one C++ call
        output = kernel.attend_flat(_flat(query), flat_key, flat_value, lengths, prefixes, scaling)  # (R * T, H, D)
        return output.view(rows, length, heads, dim)
    pieces = [t.split(lengths) for t in (_flat(query), flat_key, flat_value)]  # each segment's (L, h, D)
    firsts = list(itertools.accumulate(lengths[:-1], initial=0))  # each segment's first flattened index
    if prefixes and isinstance(kernel, CompiledCausalAttention) and not torch.is_grad_enabled():
        return _attend_trees(kernel, pieces, (flat_key, flat_value), firsts, prefixes, scaling).view(
            rows, length, heads, dim)
    outputs = _continuing_outputs(pieces, (flat_key, flat_value), firsts, prefixes, dropout, scaling, kernel)
    plain = [i for i, first in enumerate(firsts) if first not in prefixes]
    groups = [[plain[j] for j in group] for group in padded_groups([lengths[i] for i in plain])]
    if rows == 1 and len(groups) == 1 and len(plain) == len(lengths) and isinstance(kernel, CompiledCausalAttention):
        # one row of sequences in one call, padded inside the kernel's own copies (_stacked)
        return kernel(query, key, value, None, scaling, True, tuple(lengths)).transpose(1, 2)
    for members in groups:
        for i, output in zip(members, _attend_padded([[piece[i] for i in members] for piece in pieces], attend),
                             strict=True):
            outputs[i] = output
    return torch.cat(outputs).view(rows, length, heads, dim)


def _continuing_outputs(pieces: list[tuple[torch.Tensor, ...]], flat: tuple[torch.Tensor, torch.Tensor],
                        firsts: list[int], prefixes: dict[int, tuple[int, int]], dropout: float,
                        scaling: float | None, kernel) -> list[torch.Tensor | None]:
    """attend_segments' outputs of swap trees' continuing segments (L, H, D), each alone with its prefix's keys and
    values before its own (attend_continuing); None in the other segments' places."""
    outputs: list[torch.Tensor | None] = [None] * len(firsts)
    for i, first in enumerate(firsts):
        if first in prefixes:
            start, size = prefixes[first]
            q, k, v = (piece[i] for piece in pieces)
            k, v = (torch.cat([whole[start : start + size], own]) for whole, own in zip(flat, (k, v), strict=True))
            outputs[i] = attend_continuing(*map(_heads_first, (q, k, v)), dropout, scaling, kernel)[0]
    return outputs


def _segment_table(lengths: list[int], prefixes: dict[int, tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """segment_attention's table of segments tiling the flattened rows: (first, length, prefix's first, prefix's
    length), the prefix (0, 0) where a segment continues none."""
    firsts = itertools.accumulate(lengths[:-1], initial=0)
    return [(first, size, *prefixes.get(first, (0, 0))) for first, size in zip(firsts, lengths, strict=True)]


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """(R, h, T, D), laid out (R, T, h, D) -> its (R * T, h, D) view."""
    return tensor.transpose(1, 2).reshape(-1, tensor.shape[1], tensor.shape[-1])


def _fused(kernel, query: torch.Tensor, prefixes: dict[int, tuple[int, int]]) -> bool:
    """Whether attend_segments' call goes to the C++ segment attention: the compiled kernel's, where it runs, on
    heads it takes; with gradients, no swap trees (its backward has no prefixes; training has none)."""
    training = torch.is_grad_enabled() and query.requires_grad
    return isinstance(kernel, CompiledCausalAttention) and kernel.fuses(query) and not (prefixes and training)


def _attend_trees(kernel: CompiledCausalAttention, pieces: list[tuple[torch.Tensor, ...]],
                  flat: tuple[torch.Tensor, torch.Tensor], firsts: list[int], prefixes: dict[int, tuple[int, int]],
                  scaling: float | None) -> torch.Tensor:
    """The output (T, H, D) of prediction's swap trees through the compiled kernel (attend_parts), each segment's
    written at its first index: a continuing segment alone with its prefix's keys and values first (one query
    token: torch's sdpa, attend_continuing), the others in padded_groups' calls. The same calls' arithmetic as the
    padded path, to the bit, without its padded copies and concatenations (the bench's TTA passes 0.955 of the
    time, AMD EPYC with AVX-512 BF16)."""
    output = pieces[0][0].new_empty(sum(len(piece) for piece in pieces[0]), *pieces[0][0].shape[1:])
    for i, first in enumerate(firsts):
        if first not in prefixes:
            continue
        start, size = prefixes[first]
        q, k, v = (piece[i] for piece in pieces)
        keys, values = ([whole[start : start + size], own] for whole, own in zip(flat, (k, v), strict=True))
        if len(q) > 1:
            kernel.attend_parts([[q]], [keys], [values], scaling, output, [first])
        else:
            output[first : first + 1] = attend_continuing(*map(_heads_first, (q, torch.cat(keys), torch.cat(values))),
                                                          0.0, scaling, kernel)[0]
    plain = [i for i, first in enumerate(firsts) if first not in prefixes]
    for group in padded_groups([len(pieces[0][i]) for i in plain]):
        members = [plain[j] for j in group]
        kernel.attend_parts(*([[piece[i]] for i in members] for piece in pieces), scaling, output,
                            [firsts[i] for i in members])
    return output


def _heads_first(piece: torch.Tensor) -> torch.Tensor:
    """A segment's (L, h, D) as (1, h, L, D): sdpa's flash kernel takes 4-D inputs only."""
    return piece.transpose(0, 1).unsqueeze(0)


def _attend_padded(segments: list[list[torch.Tensor]], attend) -> list[torch.Tensor]:
    """The outputs (L_i, H, D) of `attend` on segments' q, k and v (each a list of (L_i, h, D)) in one call, each
    padded to the longest after its tokens (causal: no token sees its padding)."""
    queries, keys, values = segments
    if len(queries) == 1:
        return [attend(_heads_first(queries[0]), _heads_first(keys[0]), _heads_first(values[0]))[0]]
    padded = [pad_sequence(pieces, batch_first=True).transpose(1, 2) for pieces in segments]  # (G, h, L_max, D)
    batch = attend(*padded)  # (G, L_max, H, D)
    # unbound first: the backward of batch[j, :L] zero-fills a whole (G, L_max, H, D) gradient per segment and sums
    # them; unbind's backward stacks the pieces' gradients once. Same bits; measured 0.91 of the call's forward +
    # backward time (float32, 8 sequences of 187-246 tokens, AMD EPYC with AVX2, 2 threads, median of 10)
    return [output[: len(q)] for output, q in zip(batch.unbind(0), queries, strict=True)]


PADDING_WASTE = 2.0  # a padded call's attention against its segments' own, at most (padded_groups)


def padded_groups(lengths: list[int]) -> list[list[int]]:
    """Indices of segments attended in one call, padded to the call's longest: the segments longest first, each
    group while its padded square products (members x longest^2) stay within PADDING_WASTE of the members' own
    (sum of length^2). Padding costs attention only (the tokens' projections are computed unpadded:
    model.unpad_rows); one call instead of one per segment saves the per-call work of every layer."""
    groups: list[list[int]] = []
    own = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] ** 2 <= PADDING_WASTE * (own + lengths[i] ** 2):
            groups[-1].append(i)
            own += lengths[i] ** 2
        else:
            groups.append([i])
            own = lengths[i] ** 2
    return groups


def attend_continuing(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float,
                      scaling: float | None, kernel=None) -> torch.Tensor:
    """Causal attention of query (1, H, L, D), a swap tree's continuing segment, over key, value (1, h, P + L, D):
    the P tokens of its shared prefix and its own -> (1, L, H, D). The compiled kernel where attend_segments has
    one (two query tokens or more), else torch's sdpa with the causal mask shifted by P."""
    if isinstance(kernel, CompiledCausalAttention) and query.shape[2] > 1:
        return kernel(query, key, value, None, scaling, True).transpose(1, 2)
    before = key.shape[2] - query.shape[2]
    mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril(before)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                          enable_gqa=query.shape[1] != key.shape[1]).transpose(1, 2)


def packed_sequences(cu_seq_lens: torch.Tensor | None, sliding_window: int | None = None) -> list[int] | None:
    """The lengths of the packed sequences from their cumulative lengths over the flattened rows, or None: no
    bounds, or a sequence longer than the sliding window (then the mask holds the window)."""
    if cu_seq_lens is None:
        return None
    lengths = cu_seq_lens.diff().tolist()  # a CPU tensor of a few entries: microseconds, once a layer
    if sliding_window and max(lengths) > sliding_window:
        return None
    return lengths


def sequence_bounds(position_ids: torch.Tensor, last_tokens: torch.Tensor | None = None,
                    max_length: int | None = None) -> torch.Tensor:
    """Cumulative lengths (S + 1,) of the packed sequences of position_ids (R, T) over the flattened rows: a
    sequence starts where its positions restart at 0 (each row starts one, and so does a row's pad tail).

    With `last_tokens`, the flattened index of every real sequence's last token, a row's pad tail joins the
    sequence before it (unless that makes a segment longer than `max_length`, a sliding window): under causal
    attention no real token sees the tail, and the tail's own outputs reach no loss, so the real tokens attend
    exactly as alone; a row of one sequence and its tail is then one segment (attend_segments)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    if last_tokens is not None and len(starts) > 1:
        width = position_ids.shape[-1]
        last_real = rows_last_tokens(last_tokens.to(starts.dtype), position_ids.shape[0], width)
        ends = torch.cat([starts[1:], starts.new_tensor([flat.numel()])])
        tail = (starts % width != 0) & (starts > last_real[starts // width])
        if max_length:
            tail &= ends - torch.cat([starts[:1], starts[:-1]]) <= max_length  # the joined segment's length
        starts = starts[~tail]
    return torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)


def rows_last_tokens(last_tokens: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """(R,) the flattened index of each row's last pooled token among `last_tokens` (N * S,) over rows of `width`
    tokens; -1 where a row has none. What follows it in its row is the row's pad tail."""
    return torch.full((rows,), -1, dtype=last_tokens.dtype, device=last_tokens.device).scatter_reduce(
        0, last_tokens // width, last_tokens, "amax")


AttentionInterface.register(CPU_SDPA, cpu_sdpa)
AttentionMaskInterface.register(CPU_SDPA, sdpa_mask)


def attention_kernel(attn_implementation: str, dtype: torch.dtype, device: torch.device) -> str:
    """The name to load the backbone with: CPU_SDPA for sdpa on CPU (see the module's docstring)."""
    if attn_implementation == "sdpa" and device.type == "cpu":
        return CPU_SDPA
    return attn_implementation
