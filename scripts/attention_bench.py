"""Forward + backward time of one attention layer on this CPU: transformers' sdpa over a packed row's block-diagonal
causal mask against lmsys.modeling.attention.cpu_sdpa (each packed sequence on its own; in bf16 training bf16's
forward and a float32 backward), on packed rows of SmolLM2-135M's shape (9 query and 3 key/value heads of 64).
Prints a markdown table of medians per dtype.

    python scripts/attention_bench.py [--repeats 5] [--dtypes float32 bfloat16]
    python scripts/attention_bench.py --micro-batches [--repeats 9]
    python scripts/attention_bench.py --compiled [--repeats 9]

The second form times float32 attention of whole packed micro-batches (the bench's shapes on
../shared/data/hh_rlhf_harmless.csv: rows of one sequence and a pad tail, rows of several sequences) as
cpu_sdpa computes it (pad tails joined to their sequence, so that rows of one sequence attend in one call) against
one call per sequence and per tail, the two alternating; prints each micro-batch's medians
and their ratio. The third times bf16 training attention on the bench's micro-batch shapes with
model.attention_kernel=eager (torch's flash forward, a float32 backward) and compiled, taking turns.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's lmsys, installed or not
from lmsys.modeling.attention import CompiledCausalAttention, attend_segments, cpu_sdpa

ROWS = [(256,) * 4, (170,) * 6, (512, 300, 212), (1024,), (100,) * 10, (180,)]  # sequence lengths of one packed row
HEADS, KV_HEADS, DIM = 9, 3, 64
MODULE = SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, is_causal=True, training=True)


def packed_mask(lengths: tuple[int, ...]) -> torch.Tensor:
    """(1, 1, T, T) bool: causal within each sequence, nothing across."""
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    causal = torch.ones(len(segment), len(segment), dtype=torch.bool).tril()
    return (causal & (segment[:, None] == segment[None, :]))[None, None]


def one_pass(kernel: str, lengths: tuple[int, ...], dtype: torch.dtype) -> float:
    tokens = sum(lengths)
    query = torch.randn(1, HEADS, tokens, DIM, dtype=dtype, requires_grad=True)
    key, value = (torch.randn(1, KV_HEADS, tokens, DIM, dtype=dtype, requires_grad=True) for _ in "kv")
    grad = torch.randn(1, tokens, HEADS, DIM, dtype=dtype)
    mask = packed_mask(lengths)
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    start = time.perf_counter()
    if kernel == "sdpa, packed mask":
        output, _ = sdpa_attention_forward(MODULE, query, key, value, mask, scaling=DIM ** -0.5)
    else:
        output, _ = cpu_sdpa(MODULE, query, key, value, mask, scaling=DIM ** -0.5, cu_seq_lens_q=bounds)
    output.backward(grad)
    return time.perf_counter() - start


# micro-batches: each row's sequences, then its pad tail (0: none)
MICRO_BATCHES = [
    [((238,), 0), ((236,), 2), ((208,), 30), ((203,), 35)],
    [((170,), 0), ((169,), 1), ((160,), 10), ((160,), 10), ((158,), 12), ((155,), 15)],
    [((246, 196), 2), ((244, 200), 0)],
    [((512,), 0), ((481,), 31)],
    [((154, 137), 37), ((130, 123, 75), 0), ((122, 121, 81), 4)],
]


def micro_batch_pass(rows: list[tuple[tuple[int, ...], int]], joined: bool) -> float:
    """Forward + backward of one micro-batch's attention in float32: joined (cpu_sdpa's segments: a pad tail
    joins the sequence before it) or one call per sequence and per pad tail."""
    width = sum(rows[0][0]) + rows[0][1]
    query = torch.randn(len(rows), HEADS, width, DIM, requires_grad=True)
    key, value = (torch.randn(len(rows), KV_HEADS, width, DIM, requires_grad=True) for _ in "kv")
    grad = torch.randn(len(rows), width, HEADS, DIM)
    if joined:
        lengths = [n for sequences, tail in rows for n in (*sequences[:-1], sequences[-1] + tail)]
    else:
        lengths = [n for sequences, tail in rows for n in (*sequences, tail) if n]
    start = time.perf_counter()
    output = attend_segments(query, key, value, lengths, 0.0, DIM ** -0.5)
    output.backward(grad)
    return time.perf_counter() - start


def compare_micro_batches(repeats: int) -> None:
    times: dict[tuple[int, bool], list[float]] = {}
    for repeat in range(repeats + 1):  # the first round warms up
        for k, rows in enumerate(MICRO_BATCHES):
            for joined in (True, False) if repeat % 2 else (False, True):
                seconds = micro_batch_pass(rows, joined)
                if repeat:
                    times.setdefault((k, joined), []).append(seconds)
    print(f"torch threads {torch.get_num_threads()}; float32 forward + backward, median of {repeats}\n")
    print("| micro-batch (rows: sequences (+ pad tail)) | one call per sequence, ms | cpu_sdpa, ms | ratio |")
    print("|---|---|---|---|")
    for k, rows in enumerate(MICRO_BATCHES):
        alone, joined = (1e3 * statistics.median(times[(k, j)]) for j in (False, True))
        name = ", ".join("+".join(map(str, sequences)) + (f" (+{tail})" if tail else "") for sequences, tail in rows)
        print(f"| {name} | {alone:.1f} | {joined:.1f} | {joined / alone:.2f} |")


# rows x tokens of the bench's packed micro-batches on ../shared/data/hh_rlhf_harmless.csv (rows of one sequence and
# its pad tail; the lone sequences of a split row attend one by one, as 1 x T)
TRAINING_SHAPES = [(4, 444), (8, 223), (4, 512), (4, 364), (6, 340), (4, 265), (1, 180), (1, 130)]


def training_pass(module: SimpleNamespace, rows: int, length: int) -> float:
    """Forward + backward of bf16 training attention through cpu_sdpa, q, k, v laid out as the projections make
    them ((B, T, h, D) seen as (B, h, T, D))."""
    query = torch.randn(rows, length, HEADS, DIM, dtype=torch.bfloat16).transpose(1, 2).requires_grad_(True)
    key, value = (torch.randn(rows, length, KV_HEADS, DIM, dtype=torch.bfloat16).transpose(1, 2).requires_grad_(True)
                  for _ in "kv")
    grad = torch.randn(rows, length, HEADS, DIM, dtype=torch.bfloat16)
    start = time.perf_counter()
    output, _ = cpu_sdpa(module, query, key, value, None, scaling=DIM ** -0.5)
    output.backward(grad)
    return time.perf_counter() - start


def compare_compiled(repeats: int) -> None:
    """model.attention_kernel: eager (flash forward in bf16, float32 backward) against compiled, taking turns."""
    compiled = SimpleNamespace(**vars(MODULE), compiled_attention=CompiledCausalAttention())
    kernels = {"eager (float32 backward)": MODULE, "compiled": compiled}
    times: dict[tuple, list[float]] = {}
    for repeat in range(repeats + 2):  # the first two rounds compile and warm up
        for shape in TRAINING_SHAPES:
            for name in list(kernels)[:: 1 if repeat % 2 else -1]:
                seconds = training_pass(kernels[name], *shape)
                if repeat > 1:
                    times.setdefault((shape, name), []).append(seconds)
    print(f"torch threads {torch.get_num_threads()}; bf16 training attention, forward + backward, median of {repeats}")
    print("\n| rows x tokens | " + " | ".join(f"{r} x {t}" for r, t in TRAINING_SHAPES) + " | total |")
    print("|---" * (len(TRAINING_SHAPES) + 2) + "|")
    for name in kernels:
        medians = [1e3 * statistics.median(times[(shape, name)]) for shape in TRAINING_SHAPES]
        print(f"| {name}, ms | " + " | ".join(f"{m:.1f}" for m in medians) + f" | {sum(medians):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--micro-batches", action="store_true", help="time whole packed micro-batches")
    parser.add_argument("--compiled", action="store_true", help="time model.attention_kernel=eager vs compiled")
    args = parser.parse_args()
    if args.compiled:
        compare_compiled(args.repeats)
        return
    if args.micro_batches:
        compare_micro_batches(args.repeats)
        return
    kernels = ("sdpa, packed mask", "lmsys cpu_sdpa")
    print(f"torch threads {torch.get_num_threads()}; forward + backward, median of {args.repeats}")
    for name in args.dtypes:
        dtype = getattr(torch, name)
        times: dict[tuple, list[float]] = {}
        for repeat in range(args.repeats + 1):  # the first round warms up
            for lengths in ROWS:
                for kernel in kernels:
                    seconds = one_pass(kernel, lengths, dtype)
                    if repeat:
                        times.setdefault((lengths, kernel), []).append(seconds)
        print(f"\n{name}:\n| one row of | " + " | ".join(_row_name(lengths) for lengths in ROWS) + " |")
        print("|---" * (len(ROWS) + 1) + "|")
        for kernel in kernels:
            medians = [1e3 * statistics.median(times[(lengths, kernel)]) for lengths in ROWS]
            print(f"| {kernel}, ms | " + " | ".join(f"{m:.1f}" for m in medians) + " |")


def _row_name(lengths: tuple[int, ...]) -> str:
    return f"{len(lengths)} x {lengths[0]}" if len(set(lengths)) == 1 else " + ".join(map(str, lengths))


if __name__ == "__main__":
    main()
