"""torch.compile where it pays: whole decoder layers (`model.torch_compile=true`) or only the RMSNorm modules
(`model.norm_kernel`).

**Layers** (`compile_layers`): each decoder layer compiled in place ("regional compilation"), to fuse the
elementwise work between the matmuls (RMSNorm, SiLU x up, RoPE, residual adds, the LoRA path) into generated
kernels (C++/OpenMP on CPU, Triton on GPU). Per layer rather than the whole backbone: the layers share their code,
so one graph serves all of them (two: the first layer's input needs no gradient, the others' do) and compilation
costs the same for 2 layers or 30; and the modules stay where they were, so parameter names, checkpoints and
fold_into_dense are unchanged (a whole-model torch.compile wraps the backbone and prefixes every name with
`_orig_mod.`). dynamic=True: packed micro-batches change shape at every step, and one shape-generic graph avoids a
static compile thrown away at the second shape.

**Norms** (`compile_norms`): eager RMSNorm in a bf16 model is nine passes over the activations forward (cast up,
square, mean, rsqrt, product, cast down, weight product) and more backward; compiled, one loop each way, the
float32 arithmetic unchanged (outputs within a bf16 rounding of eager's). `python scripts/elementwise_bench.py`
(SmolLM2-135M, 4-bit + LoRA r16, the CPU kernels, packed micro-batches of 1,024 tokens, forward + backward, the
variants taking turns) on the Intel Xeon with AMX, 2 threads: bf16 per-step ratio to eager 0.88, 0.85 and 0.97 in
three runs (totals 0.90, 0.85); fp32 0.98 (within the noise). Compiling whole layers with the dense LoRA function
and the attention as graph breaks: 0.93, 0.97, 1.01 in bf16. So `auto` compiles the norms for bf16 on CPU, where
the rest of the update is the AMX-fast part, and nowhere else unmeasured: not on GPU (where fused norms are
Triton's or Liger's business), not in float32, not under FSDP (sharded norm weights) or with torch_compile=true
(the layers hold the norms), and not without a C++ compiler, which inductor needs on CPU.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from lmsys.config import ConfigError, ElementwiseKernel


def compile_layers(model: nn.Module) -> int:
    """Compile every decoder layer of `model` in place; returns how many."""
    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def is_rms_norm(module: nn.Module) -> bool:
    """The families' RMSNorm classes (LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm, Gemma3RMSNorm, ...)."""
    return type(module).__name__.endswith("RMSNorm")


def compile_norms(model: nn.Module) -> int:
    """Compile every RMSNorm module of `model` in place (one shape-generic graph shared by those of one shape);
    returns how many."""
    norms = [module for module in model.modules() if is_rms_norm(module)]
    for norm in norms:
        norm.compile(dynamic=True)
    return len(norms)


def resolve_elementwise_kernel(option: str, kernel: ElementwiseKernel, device: torch.device, dtype: torch.dtype,
                               sharded: bool, torch_compile: bool) -> ElementwiseKernel:
    """`auto` made concrete for `option`, the setting's name as the user writes it (model.norm_kernel,
    model.mlp_kernel, model.attention_kernel: see the module's docstring, gated_mlp's and attention's; the predict
    command's kernels, all three at once); `sharded`: the model will be sharded by FSDP."""
    if kernel == ElementwiseKernel.compiled and device.type == "cpu" and not cpp_compiler_found():
        raise ConfigError(f"{option}=compiled needs a C++ compiler on CPU (inductor generates C++), and none "
                          f"was found: install g++ or use {option}=auto or eager")
    if kernel != ElementwiseKernel.auto:
        return kernel
    measured = device.type == "cpu" and dtype == torch.bfloat16
    if measured and not sharded and not torch_compile and cpp_compiler_found():
        return ElementwiseKernel.compiled
    return ElementwiseKernel.eager


def cpp_compiler_found() -> bool:
    """Whether inductor finds the C++ compiler it would build CPU kernels with (its own search: $CXX, g++, ...)."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except RuntimeError:
        return False
    return True
