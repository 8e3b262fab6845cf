"""Does compiling the elementwise work between the matmuls, or computing sibling projections as one product, pay
on this CPU? Forward + backward time of a packed micro-batch of the embedded model (4-bit base, LoRA r16 on every
projection, the CPU kernels of lmsys.modeling: the dense LoRA kernel with its projection groups and per-sequence
attention) in variants built side by side in one process:

- eager: RMSNorm eager;
- norms: every RMSNorm module compiled (torch.compile, dynamic shapes): its float32 upcast, square, mean, rsqrt and
  two products become one generated loop forward and one backward (`model.norm_kernel=compiled`, bf16's default);
- layers: every decoder layer compiled, the dense LoRA function and the attention kept as graph breaks
  (torch.compiler.disable), so that RMSNorm, RoPE, SiLU x up and the residual adds between them are generated code;
- ungrouped: norms, with each projection computed alone (no ProjectionGroup for q, k, v and for gate, up);
- mlps: norms, and every gated MLP's act(gate) * up compiled from the gate|up product whole
  (`model.mlp_kernel=compiled`, bf16's default: lmsys/modeling/gated_mlp.py).

The variants take turns on the same micro-batches (packed rows of several sequence mixes), so the host's drift
(this project's virtual machines move 2x within a minute) hits all of them alike; printed per variant: each step's
ms, the total, and the median of its per-step ratio to the first variant with the range; and how far its logits are
from the first variant's.

    python scripts/elementwise_bench.py [--model models/SmolLM2-135M-Instruct] [--steps 24] [--dtype bfloat16]
        [--variants eager,norms,layers]     # e.g. --variants ungrouped,norms: the projection groups' gain;
                                            # --variants norms,mlps: the compiled MLPs' gain
    python scripts/elementwise_bench.py --projection-calls 300

The second form times only one layer's q, k, v, gate and up (forward + backward, LoRA B non-zero) with and without
their projection groups, alternating, on packed sizes of 760-1,020 tokens, and prints the per-pair ratio's median
and quartiles and each side's fastest call and 10th and 25th percentiles (the low percentiles are the least
disturbed by the host).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.modeling_layers import GradientCheckpointingLayer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's lmsys, installed or not
from lmsys.config import LoraKernel, Quantization
from lmsys.modeling import attention
from lmsys.modeling.backbone import add_lora, load_backbone
from lmsys.modeling.cpu_allocator import keep_freed_memory
from lmsys.modeling.gated_mlp import compile_gated_mlps
from lmsys.modeling.lora_kernel import DenseLoraForward, use_lora_kernel
from lmsys.modeling.model import PreferenceModel

VARIANTS = ("eager", "norms", "layers", "ungrouped", "mlps")
ROWS = [(128,) * 8, (100, 200, 300, 400), (256,) * 4, (90, 150, 210, 300, 250), (512, 512), (60,) * 16]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Head(torch.nn.Module):
    """A float32 linear head on the pooled states (the real head's cost is negligible here)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden, 3)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear(pooled.float())


def build(variant: str, model_dir: str, dtype: torch.dtype) -> PreferenceModel:
    torch.manual_seed(0)
    backbone = load_backbone(model_dir, Quantization.nf4, True, dtype, attention.CPU_SDPA, torch.device("cpu"), False,
                             dtype)
    peft_model = add_lora(backbone, 16, 32, 0.0, TARGETS, False, False)
    use_lora_kernel(peft_model, LoraKernel.dense)
    model = PreferenceModel(peft_model, Head(backbone.config.hidden_size)).train()
    for module in model.modules():
        if variant == "ungrouped":
            module.__dict__.pop("projection_group", None)  # each projection alone, as before the groups
        if variant in ("norms", "ungrouped", "mlps") and type(module).__name__.endswith("RMSNorm"):
            module.compile(dynamic=True)
        if variant == "layers" and isinstance(module, GradientCheckpointingLayer):
            module.compile(dynamic=True)
    if variant == "mlps":
        compile_gated_mlps(model)
    return model


def projection_groups(model: PreferenceModel, calls: int) -> None:
    """Time one layer's grouped projections with and without their groups (see the module's docstring)."""
    layer = next(m for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
    members = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj,
               layer.mlp.up_proj]
    groups = {member: member.__dict__["projection_group"] for member in members}
    for member in members:
        torch.nn.init.normal_(member.lora_B["default"].weight, std=0.01)

    def call(tokens: int, grouped: bool) -> float:
        for member, group in groups.items():
            member.__dict__["projection_group"] = group if grouped else None
        x = torch.randn(1, tokens, members[0].in_features, dtype=torch.bfloat16, requires_grad=True)
        start = time.perf_counter()
        sum(member(x).float().sum() for member in members).backward()
        return time.perf_counter() - start

    sizes = [760, 888, 892, 952, 1020]
    for tokens in sizes:  # warm-up: each size's matmul kernels built once
        call(tokens, True)
        call(tokens, False)
    times = {True: [], False: []}
    for k in range(calls):
        for grouped in (True, False) if k % 2 else (False, True):
            times[grouped].append(call(sizes[k % len(sizes)], grouped))
    ratios = sorted(g / a for g, a in zip(times[True], times[False], strict=True))
    print(f"grouped / alone per pair: median {statistics.median(ratios):.3f} (quartiles {ratios[calls // 4]:.3f}-"
          f"{ratios[3 * calls // 4]:.3f})")
    for grouped, name in ((True, "grouped"), (False, "alone")):
        ms = sorted(t * 1e3 for t in times[grouped])
        print(f"{name}: fastest {ms[0]:.1f} ms, 10th percentile {ms[calls // 10]:.1f}, 25th {ms[calls // 4]:.1f}")


def micro_batch(lengths: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """One packed row: input ids (1, T), pool rows and columns (S,), position ids (1, T)."""
    ids = torch.randint(0, 49_000, (1, sum(lengths)), generator=torch.Generator().manual_seed(sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return ids, torch.zeros(len(lengths), dtype=torch.long), torch.tensor(lengths).cumsum(0) - 1, positions


def step(model: PreferenceModel, batch: tuple[torch.Tensor, ...]) -> tuple[float, torch.Tensor]:
    ids, rows, cols, positions = batch
    start = time.perf_counter()
    logits = model(ids, rows, cols, position_ids=positions)
    logits.sum().backward()
    return time.perf_counter() - start, logits.detach().float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--variants", default="eager,norms,layers", help=f"comma-separated, from {VARIANTS}")
    parser.add_argument("--projection-calls", type=int, default=0, help="time the projection groups alone")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if not set(variants) <= set(VARIANTS):
        parser.error(f"--variants: choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(2)
    keep_freed_memory()
    # graph breaks for the layers variant; outside a compiled frame the wrappers only call through
    DenseLoraForward.forward = torch.compiler.disable(DenseLoraForward.forward)
    AttentionInterface.register(attention.CPU_SDPA, torch.compiler.disable(attention.cpu_sdpa))
    if args.projection_calls:
        projection_groups(build("eager", args.model, torch.bfloat16), args.projection_calls)
        return
    models = {variant: build(variant, args.model, getattr(torch, args.dtype)) for variant in variants}
    base = variants[0]
    first = {}
    for variant, model in models.items():  # warm-up: compilation, two shapes
        start = time.perf_counter()
        first[variant] = [step(model, micro_batch(lengths))[1] for lengths in ROWS[:2]][-1]
        print(f"{variant}: warm-up {time.perf_counter() - start:.1f} s, logits max |diff| from {base} "
              f"{(first[variant] - first[base]).abs().max().item():.3g}")
    times = {variant: [] for variant in variants}
    for k in range(args.steps):
        batch = micro_batch(ROWS[k % len(ROWS)])
        for variant in variants[k % len(variants):] + variants[: k % len(variants)]:  # each goes first in turn
            times[variant].append(step(models[variant], batch)[0])
    for variant in variants:
        ratios = sorted(t / e for t, e in zip(times[variant], times[base], strict=True))
        print(f"{variant}: total {sum(times[variant]):.1f} s; per step / {base}: median "
              f"{statistics.median(ratios):.3f} (range {ratios[0]:.2f}-{ratios[-1]:.2f}); "
              f"ms {' '.join(f'{t * 1e3:.0f}' for t in times[variant])}")


if __name__ == "__main__":
    main()
