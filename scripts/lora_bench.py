"""What LoRA adds to a projection's forward + backward on this CPU: for each projection (group) of one SmolLM2-135M
decoder layer, the dense base alone (y = x W^T, dx = dy W) against lmsys.modeling.lora_kernel.LoraLinearFunction
(base + rank-r LoRA, the A and B gradients included), taking turns on the same M tokens; then the LoRA function's
rank products one by one, with their GFLOP/s (the base products' rate beside them says how far the thin products
fall short of it).

    python scripts/lora_bench.py [--tokens 2048] [--rank 16] [--repeats 12] [--dtype float32|bfloat16]

Prints two markdown tables: per projection the medians (ms), the time LoRA adds over the base and the arithmetic it
adds, 1.5 (R / N + r / in) of the base's (R the group's rank, r each projection's, N its outputs: 6-12% on these
shapes at r16); per projection, each of its products' median and rate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's lmsys, installed or not
from lmsys.modeling.cpu_allocator import keep_freed_memory
from lmsys.modeling.lora_kernel import LoraLinearFunction, _spans

# SmolLM2-135M: hidden 576, 9 query and 3 key/value heads of 64, MLP 1536; (input size, output sizes of the group)
PROJECTIONS = {"q, k, v": (576, [576, 192, 192]), "o": (576, [576]), "gate, up": (576, [1536, 1536]),
               "down": (1536, [576])}
SCALING = 2.0


def weights(inp: int, outs: list[int], rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, list, list]:
    base = torch.randn(sum(outs), inp, dtype=dtype) * 0.02
    a = [(torch.randn(rank, inp) * 0.02).requires_grad_() for _ in outs]  # float32, as peft keeps them
    b = [(torch.randn(n, rank) * 0.02).requires_grad_() for n in outs]
    return base, a, b


def with_lora(x: torch.Tensor, base: torch.Tensor, a: list, b: list, dy: torch.Tensor) -> None:
    lora = [p for pair in zip(a, b, strict=True) for p in pair]
    LoraLinearFunction.apply(x, x, base, None, tuple(SCALING for _ in a), *lora).backward(dy)


def base_only(x: torch.Tensor, base: torch.Tensor, a: list, b: list, dy: torch.Tensor) -> None:
    F.linear(x, base).backward(dy)


def projection_table(tokens: int, rank: int, repeats: int, dtype: torch.dtype) -> None:
    times: dict[tuple[str, str], list[float]] = {}
    for repeat in range(repeats + 2):  # the first two warm the kernels
        for name, (inp, outs) in PROJECTIONS.items():
            base, a, b = weights(inp, outs, rank, dtype)
            x = torch.randn(tokens, inp, dtype=dtype, requires_grad=True)
            dy = torch.randn(tokens, sum(outs), dtype=dtype)
            order = [("base", base_only), ("base + LoRA", with_lora)]
            for kind, run in order if repeat % 2 else order[::-1]:  # taking turns: the host's drift hits both
                start = time.perf_counter()
                run(x, base, a, b, dy)
                if repeat >= 2:
                    times.setdefault((name, kind), []).append(time.perf_counter() - start)
                x.grad = None
    print(f"| projection ({tokens} tokens, r{rank}, {dtype}) | base ms | base + LoRA ms | time added | "
          f"arithmetic added |")
    print("|---|---|---|---|---|")
    for name, (inp, outs) in PROJECTIONS.items():
        alone, both = (1e3 * statistics.median(times[(name, kind)]) for kind in ("base", "base + LoRA"))
        arithmetic = 1.5 * (rank * len(outs) / sum(outs) + rank / inp)
        print(f"| {name} | {alone:.2f} | {both:.2f} | {both / alone - 1:+.1%} | {arithmetic:+.1%} |")


def rank_products(group: str, tokens: int, rank: int, dtype: torch.dtype) -> dict[str, tuple]:
    """One projection group's products as LoraLinearFunction computes them: name -> (callable, FLOPs)."""
    inp, outs = PROJECTIONS[group]
    n, r = sum(outs), rank * len(outs)
    x, dy = torch.randn(tokens, inp, dtype=dtype), torch.randn(tokens, n, dtype=dtype)
    base, a = torch.randn(n, inp, dtype=dtype), torch.randn(r, inp, dtype=dtype)
    blocks = [torch.randn(o, rank, dtype=dtype) for o in outs]
    spans = _spans(blocks)
    h, g, y, dx = x @ a.t(), torch.randn(tokens, r, dtype=dtype), x @ base.t(), dy @ base
    return {
        "base y = x W^T": (lambda: x @ base.t(), 2 * tokens * inp * n),
        "base dx = dy W": (lambda: dy @ base, 2 * tokens * inp * n),
        "h = x A^T": (lambda: x @ a.t(), 2 * tokens * inp * r),
        "y_i += h_i B_i^T": (lambda: [y[:, c].addmm_(h[:, k], blk.t()) for (c, k), blk in zip(spans, blocks)],
                             2 * tokens * rank * n),
        "g_i = dy_i B_i": (lambda: torch.cat([dy[:, c] @ blk for (c, _), blk in zip(spans, blocks)], 1),
                           2 * tokens * rank * n),
        "dx += g A": (lambda: dx.addmm_(g, a), 2 * tokens * inp * r),
        "dA = g^T x": (lambda: g.t() @ x, 2 * tokens * inp * r),
        "dB_i = h_i^T dy_i": (lambda: [h[:, k].t() @ dy[:, c] for (c, k) in spans], 2 * tokens * rank * n),
    }


def product_table(group: str, tokens: int, rank: int, repeats: int, dtype: torch.dtype) -> None:
    products = rank_products(group, tokens, rank, dtype)
    times: dict[str, list[float]] = {name: [] for name in products}
    for repeat in range(3 * repeats + 3):
        for name, (run, _) in products.items():
            start = time.perf_counter()
            run()
            if repeat >= 3:
                times[name].append(time.perf_counter() - start)
    print(f"\n| {group}: product ({tokens} tokens, r{rank} each, {dtype}) | ms | GFLOP/s |")
    print("|---|---|---|")
    for name, (_, flops) in products.items():
        median = statistics.median(times[name])
        print(f"| {name} | {1e3 * median:.2f} | {flops / median / 1e9:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    keep_freed_memory()  # as build_model sets it for CPU models: no page faults on each new activation
    print(f"torch threads {torch.get_num_threads()}")
    projection_table(args.tokens, args.rank, args.repeats, dtype)
    for group in PROJECTIONS:
        product_table(group, args.tokens, args.rank, args.repeats, dtype)


if __name__ == "__main__":
    main()
