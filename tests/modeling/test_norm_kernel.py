"""model.norm_kernel and model.mlp_kernel: which models get their elementwise work compiled (the same rule), and compile_norms on a tiny model (the
compiled norms' numbers are checked by tests/modeling/test_compile.py, in its background job)."""

import pytest
import tiny
import torch

from lmsys.config import ConfigError, ElementwiseKernel
from lmsys.modeling import compile as compile_module
from lmsys.modeling.compile import compile_norms, is_rms_norm, resolve_elementwise_kernel

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def resolve(kernel, device, dtype, sharded, torch_compile, option="model.norm_kernel"):
    return resolve_elementwise_kernel(option, kernel, device, dtype, sharded, torch_compile)


def test_auto_compiles_the_norms_only_for_bfloat16_on_cpu(monkeypatch):
    monkeypatch.setattr(compile_module, "cpp_compiler_found", lambda: True)
    assert resolve(ElementwiseKernel.auto, CPU, torch.bfloat16, False, False) == ElementwiseKernel.compiled
    assert resolve(ElementwiseKernel.auto, CPU, torch.float32, False, False) == ElementwiseKernel.eager
    assert resolve(ElementwiseKernel.auto, CUDA, torch.bfloat16, False, False) == ElementwiseKernel.eager
    assert resolve(ElementwiseKernel.auto, CPU, torch.bfloat16, True, False) == ElementwiseKernel.eager  # FSDP
    assert resolve(ElementwiseKernel.auto, CPU, torch.bfloat16, False, True) == ElementwiseKernel.eager  # layers
    assert resolve(ElementwiseKernel.compiled, CPU, torch.float32, False, False) == ElementwiseKernel.compiled
    assert resolve(ElementwiseKernel.eager, CPU, torch.bfloat16, False, False) == ElementwiseKernel.eager


def test_without_a_cpp_compiler_auto_stays_eager_and_compiled_fails_at_once(monkeypatch):
    monkeypatch.setattr(compile_module, "cpp_compiler_found", lambda: False)
    assert resolve(ElementwiseKernel.auto, CPU, torch.bfloat16, False, False) == ElementwiseKernel.eager
    with pytest.raises(ConfigError, match="model.norm_kernel=compiled needs a C\\+\\+ compiler on CPU"):
        resolve(ElementwiseKernel.compiled, CPU, torch.bfloat16, False, False)
    with pytest.raises(ConfigError, match="model.mlp_kernel=compiled needs a C\\+\\+ compiler on CPU"):
        resolve(ElementwiseKernel.compiled, CPU, torch.bfloat16, False, False, option="model.mlp_kernel")
    assert resolve(ElementwiseKernel.compiled, CUDA, torch.bfloat16, False, False) == ElementwiseKernel.compiled


def test_this_machine_has_the_compiler_the_suite_compiles_with():
    assert compile_module.cpp_compiler_found()  # the torch.compile tests need it too


def test_compile_norms_compiles_every_rms_norm_and_nothing_else(tiny_models):
    model, _, _ = tiny.build_preference_model(tiny_models["gemma3"], "gemma", "none")
    norms = [module for module in model.modules() if is_rms_norm(module)]
    others = [module for module in model.modules() if not is_rms_norm(module)]
    assert compile_norms(model) == len(norms) > 0  # Gemma 3: four per layer, q_norm, k_norm, the last
    assert all(norm._compiled_call_impl is not None for norm in norms)
    assert all(getattr(module, "_compiled_call_impl", None) is None for module in others)
