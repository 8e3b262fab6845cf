"""Forward + backward time of one attention layer in bf16 on this CPU: transformers' sdpa against
lmsys.modeling.attention.sdpa_in_float32 (what a bf16 model trains with on CPU), on packed-row shapes of
SmolLM2-135M (9 query and 3 key/value heads of 64), causal masks. Prints a markdown table of medians.

    python scripts/attention_bench.py [--repeats 5]
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
from lmsys.modeling.attention import FLOAT32_MAX_ROW, sdpa_in_float32  # noqa: E402

SHAPES = [(6, 170), (3, 328), (1, 180), (2, 512), (1, 1024)]  # (rows, tokens) of packed micro-batches
HEADS, KV_HEADS, DIM = 9, 3, 64
MODULE = SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, is_causal=True, training=True)
KERNELS = {"bf16 sdpa": sdpa_attention_forward, "lmsys": sdpa_in_float32}


def one_pass(kernel, rows: int, tokens: int) -> float:
    mask = torch.ones(tokens, tokens, dtype=torch.bool).tril()[None, None].expand(rows, 1, tokens, tokens)
    query = torch.randn(rows, HEADS, tokens, DIM, dtype=torch.bfloat16, requires_grad=True)
    key, value = (torch.randn(rows, KV_HEADS, tokens, DIM, dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
    grad = torch.randn(rows, tokens, HEADS, DIM, dtype=torch.bfloat16)
    start = time.perf_counter()
    output, _ = kernel(MODULE, query, key, value, mask, scaling=DIM ** -0.5)
    output.backward(grad)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    times: dict[tuple, list[float]] = {}
    for repeat in range(repeats + 1):  # the first round warms up
        for shape in SHAPES:
            for name, kernel in KERNELS.items():
                seconds = one_pass(kernel, *shape)
                if repeat:
                    times.setdefault((shape, name), []).append(seconds)
    print(f"torch threads {torch.get_num_threads()}; lmsys computes in float32 up to {FLOAT32_MAX_ROW} tokens a row")
    print("| rows x tokens | " + " | ".join(f"{r} x {t}" for r, t in SHAPES) + " |")
    print("|---" * (len(SHAPES) + 1) + "|")
    for name in KERNELS:
        medians = [1e3 * statistics.median(times[(shape, name)]) for shape in SHAPES]
        print(f"| {name}, ms | " + " | ".join(f"{m:.1f}" for m in medians) + " |")


if __name__ == "__main__":
    main()
