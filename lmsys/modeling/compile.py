"""`model.torch_compile=true`: torch.compile each decoder layer in place ("regional compilation"), to fuse the
elementwise work between the matmuls (RMSNorm, SiLU x up, RoPE, residual adds, the LoRA path) into generated
kernels (C++/OpenMP on CPU, Triton on GPU).

Per layer rather than the whole backbone: the layers share their code, so one graph serves all of them (two: the
first layer's input needs no gradient, the others' do) and compilation costs the same for 2 layers or 30; and the
modules stay where they were, so parameter names, checkpoints and fold_into_dense are unchanged (a whole-model
torch.compile wraps the backbone and prefixes every name with `_orig_mod.`). dynamic=True: packed micro-batches
change shape at every step, and one shape-generic graph avoids a static compile thrown away at the second shape.
"""

from __future__ import annotations

from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


def compile_layers(model: nn.Module) -> int:
    """Compile every decoder layer of `model` in place; returns how many."""
    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
