"""`model.mlp_kernel`: how a gated MLP, down(act(gate(x)) * up(x)) (Llama, Mistral, Qwen2, Gemma 2 and 3),
computes the activation between its products.

`eager`: the family's forward. act(gate), then the product with up: two passes forward over (tokens, intermediate)
tensors, act's output kept for the backward; backward the product's two gradients and act's, and, with the dense
LoRA kernel (whose gate and up are the column blocks of one product: lora_kernel.ProjectionGroup), the
concatenation of the two into that product's gradient: a pass each.

`compiled`: act(gate) * up as one torch.compile'd function of the gate|up product whole (or of gate and up, where
the LoRA kernel computes them apart): one generated loop forward, one backward that writes the product's gradient
directly (no concatenation), act recomputed there instead of kept (the saved activations shrink by one
(tokens, intermediate) tensor a layer). The float32 arithmetic inside is eager's; in bfloat16 the result differs
from eager's by at most a rounding (eager rounds act(gate) to bf16 before the product, the loop does not).
`auto`: compiled where the norms are (compile.resolve_elementwise_kernel: bf16 on CPU with a C++ compiler).

Measured on an Intel Xeon with AMX (2 threads, bf16, SmolLM2-135M 4-bit + LoRA r16, the dense LoRA kernel):
`python scripts/elementwise_bench.py --variants norms,mlps --steps 48` (forward + backward of packed micro-batches,
the two variants taking turns) gave 0.916 of the time, total and per-step median (range 0.46-2.23: the host's
noise); one layer's MLP forward + backward on the bench's micro-batch sizes took 0.90-0.94 of eager's time at
1,640-2,048 tokens (22.4-28.0 against 24.0-29.9 ms) and 1.00-1.03 at 180-1,456; whole micro-batches of the bench,
alternating, 0.977 and 0.972 of the time in two rounds. Gemma's gelu-tanh is not measured apart (the embedded
Gemma 3 runs in fp32 on CPU, where `auto` stays eager).
"""

from __future__ import annotations

import torch
from torch import nn

from lmsys.modeling.lora_kernel import ProjectionGroup


class GatedActivation(nn.Module):
    """act(gate) * up: from gate and up (..., F) each, or from their product (..., 2F) = [gate | up]."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.act = act

    def forward(self, gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
        if up is None:
            gate, up = gate.chunk(2, dim=-1)
        return self.act(gate) * up


class CompiledGatedMLP:
    """The `compiled` forward of a gated MLP (mixed into its class by `compile_gated_mlps`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self._gate_up(x)  # (..., 2F) or None
        if gate_up is None:
            return self.down_proj(self._activate(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(self._activate(gate_up))

    def _activate(self, gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
        """act(gate) * up on rows flattened to (M, F) or (M, 2F), so that the compiled graph sees one rank (the last
        layer's MLP gets the pooled rows alone, 2-D: pooled_tail); a lone row runs the same function eagerly. Each
        rank and each size 0 or 1 (which dynamo specializes) would be a graph of its own, and past dynamo's
        recompile limit (8 per function) every later call runs eagerly."""
        activation = self.gated_activation
        width = gate.shape[-1]
        rows = gate.numel() // width
        if rows <= 1:
            return GatedActivation.forward(activation, gate, up)
        hidden = activation(gate.reshape(rows, width), None if up is None else up.reshape(rows, width))
        return hidden.view(*gate.shape[:-1], hidden.shape[-1])

    def _gate_up(self, x: torch.Tensor) -> torch.Tensor | None:
        """gate and up side by side from the dense LoRA kernel's one product, or None where it does not make it."""
        group: ProjectionGroup | None = self.gate_proj.__dict__.get("projection_group")
        if group is None or group.members != [self.gate_proj, self.up_proj]:
            return None
        return group.whole_output(x)


def is_gated_mlp(module: nn.Module) -> bool:
    """A family's MLP computing down(act(gate(x)) * up(x)) from those four modules."""
    return type(module).__name__.endswith("MLP") and all(
        isinstance(getattr(module, name, None), nn.Module) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))


_COMPILED_CLASSES: dict[type, type] = {}


def compile_gated_mlps(model: nn.Module) -> int:
    """Give every gated MLP of `model` the compiled forward (one shape-generic graph per activation and input
    form, shared by the layers); returns how many. Parameters, names and checkpoints are unchanged."""
    mlps = [module for module in model.modules() if is_gated_mlp(module) and not isinstance(module, CompiledGatedMLP)]
    for mlp in mlps:
        cls = type(mlp)
        if cls not in _COMPILED_CLASSES:
            _COMPILED_CLASSES[cls] = type(f"Compiled{cls.__name__}", (CompiledGatedMLP, cls), {})
        mlp.__class__ = _COMPILED_CLASSES[cls]
        activation = GatedActivation(mlp.act_fn)
        activation.compile(dynamic=True)
        mlp.__dict__["gated_activation"] = activation  # not a submodule: the module tree stays the family's
    return len(mlps)
