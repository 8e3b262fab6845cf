"""The matmul roofline of training: this machine's matmul rate on a model's projection shapes, and the tokens/s it
allows.

A trained token costs, in the frozen base's projections (the matmuls that dominate a QLoRA update), 2 FLOPs per
weight for the forward product and 2 for the activation gradient (no weight gradient: the base is frozen), so
4 x the projection weights; gradient checkpointing recomputes the forward, 6 x. Left out, all small next to that
at these widths: attention scores (4 * T * heads * head_dim a token and layer), the LoRA products (2 * r * (in + out)
a target), norms, activations and the head. The limit is thus an upper bound: the best the projections allow.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F

from lmsys.modeling.model_facts import read_model_facts

T = TypeVar("T")
FORWARD_AND_INPUT_GRADIENT = 4  # FLOPs a weight and trained token: forward + activation gradient (frozen base)
WITH_RECOMPUTED_FORWARD = 6  # the same plus the forward that gradient checkpointing runs again


@dataclass(frozen=True)
class ProjectionShapes:
    """The linear layers of one decoder layer (attention q, k, v, o and the gated MLP), times the layer count."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ProjectionShapes:
        facts = read_model_facts(model_dir)
        return cls(hidden=facts.hidden_size, intermediate=facts.intermediate_size, heads=facts.num_attention_heads,
                   kv_heads=facts.num_key_value_heads, head_dim=facts.head_dim, layers=facts.num_hidden_layers)

    def projections(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of each projection of one layer."""
        attention, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [("q_proj", self.hidden, attention), ("k_proj", self.hidden, kv), ("v_proj", self.hidden, kv),
                ("o_proj", attention, self.hidden), ("gate_proj", self.hidden, self.intermediate),
                ("up_proj", self.hidden, self.intermediate), ("down_proj", self.intermediate, self.hidden)]

    def matmul_params(self) -> int:
        """Weights of all projections: the non-embedding parameters that matmuls touch (norms left out)."""
        return self.layers * sum(n_in * n_out for _, n_in, n_out in self.projections())

    def signature(self) -> str:
        return (f"h{self.hidden}-i{self.intermediate}-q{self.heads}-kv{self.kv_heads}-d{self.head_dim}"
                f"-l{self.layers}")


def flops_per_token(params: int, gradient_checkpointing: bool) -> int:
    return (WITH_RECOMPUTED_FORWARD if gradient_checkpointing else FORWARD_AND_INPUT_GRADIENT) * params


def tokens_per_s_limit(gflops: float, params: int, gradient_checkpointing: bool) -> float:
    """Trained tokens/s that a matmul rate of `gflops` GFLOP/s allows."""
    return gflops * 1e9 / flops_per_token(params, gradient_checkpointing)


def matmul_rate(shapes: ProjectionShapes, dtype: torch.dtype, tokens: int = 512, repeats: int = 5,
                device: torch.device | None = None) -> float:
    """GFLOP/s of one layer's projection products for `tokens` rows, in `dtype`, with torch's current thread count:
    for each projection the forward product x (M, in) @ W^T and the activation gradient dy (M, out) @ W, as a
    training update computes them. One warm-up pass, then the fastest of `repeats` passes (the least disturbed)."""
    device = device or torch.device("cpu")
    generator = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    operands = [(rand(tokens, n_in), rand(n_out, n_in), rand(tokens, n_out)) for _, n_in, n_out in shapes.projections()]
    flops = sum(2 * 2 * tokens * n_in * n_out for _, n_in, n_out in shapes.projections())

    def one_pass() -> float:
        start = time.perf_counter()
        for x, weight, grad_out in operands:
            F.linear(x, weight)  # (M, out)
            grad_out @ weight  # (M, in)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    with torch.inference_mode():
        one_pass()
        best = min(one_pass() for _ in range(max(1, repeats)))
    return flops / best / 1e9


def rate_around(work: Callable[[], T], shapes: ProjectionShapes, dtype: torch.dtype, tokens: int,
                device: torch.device | None = None) -> tuple[T, float]:
    """`work()`'s result and the matmul rate measured just before and just after it (their mean): the machine's
    speed while the work ran. A shared or virtual machine's speed drifts by 20% and more between minutes, so a
    rate measured at another time would move the work's fraction of its limit by as much."""
    before = matmul_rate(shapes, dtype, tokens, device=device)
    result = work()
    return result, (before + matmul_rate(shapes, dtype, tokens, device=device)) / 2


@dataclass(frozen=True)
class Roofline:
    """The training limits of one model's projections at measured matmul rates."""

    shapes: ProjectionShapes
    tokens: int
    threads: int

    def limit(self, gflops: float, gradient_checkpointing: bool) -> float:
        return tokens_per_s_limit(gflops, self.shapes.matmul_params(), gradient_checkpointing)

    def describe(self, gflops: dict[str, float]) -> str:
        rates = ", ".join(f"{name} {rate:.0f} GFLOP/s" for name, rate in gflops.items())
        return (f"roofline: matmul {rates} on the projections (mean over the modes; each mode's own rate is measured "
                f"just before and after its timed training, {self.tokens} tokens, torch threads {self.threads}); "
                f"{FORWARD_AND_INPUT_GRADIENT} x {self.shapes.matmul_params() / 1e6:.2f}M projection weights a "
                f"trained token ({WITH_RECOMPUTED_FORWARD} x with gradient checkpointing)")
