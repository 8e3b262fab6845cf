"""model.norm_kernel: which models get their RMSNorm modules compiled, and compile_norms on a tiny model (the
compiled norms' numbers are checked by tests/modeling/test_compile.py, in its background job)."""

import pytest
import tiny
import torch

from lmsys.config import ConfigError, NormKernel
from lmsys.modeling import compile as compile_module
from lmsys.modeling.compile import compile_norms, is_rms_norm, resolve_norm_kernel

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_compiles_the_norms_only_for_bfloat16_on_cpu(monkeypatch):
    monkeypatch.setattr(compile_module, "cpp_compiler_found", lambda: True)
    assert resolve_norm_kernel(NormKernel.auto, CPU, torch.bfloat16, False, False) == NormKernel.compiled
    assert resolve_norm_kernel(NormKernel.auto, CPU, torch.float32, False, False) == NormKernel.eager
    assert resolve_norm_kernel(NormKernel.auto, CUDA, torch.bfloat16, False, False) == NormKernel.eager
    assert resolve_norm_kernel(NormKernel.auto, CPU, torch.bfloat16, True, False) == NormKernel.eager  # FSDP
    assert resolve_norm_kernel(NormKernel.auto, CPU, torch.bfloat16, False, True) == NormKernel.eager  # layers
    assert resolve_norm_kernel(NormKernel.compiled, CPU, torch.float32, False, False) == NormKernel.compiled
    assert resolve_norm_kernel(NormKernel.eager, CPU, torch.bfloat16, False, False) == NormKernel.eager


def test_without_a_cpp_compiler_auto_stays_eager_and_compiled_fails_at_once(monkeypatch):
    monkeypatch.setattr(compile_module, "cpp_compiler_found", lambda: False)
    assert resolve_norm_kernel(NormKernel.auto, CPU, torch.bfloat16, False, False) == NormKernel.eager
    with pytest.raises(ConfigError, match="model.norm_kernel=compiled needs a C\\+\\+ compiler on CPU"):
        resolve_norm_kernel(NormKernel.compiled, CPU, torch.bfloat16, False, False)
    assert resolve_norm_kernel(NormKernel.compiled, CUDA, torch.bfloat16, False, False) == NormKernel.compiled


def test_this_machine_has_the_compiler_the_suite_compiles_with():
    assert compile_module.cpp_compiler_found()  # the torch.compile tests need it too


def test_compile_norms_compiles_every_rms_norm_and_nothing_else(tiny_models):
    model, _, _ = tiny.build_preference_model(tiny_models["gemma3"], "gemma", "none")
    norms = [module for module in model.modules() if is_rms_norm(module)]
    others = [module for module in model.modules() if not is_rms_norm(module)]
    assert compile_norms(model) == len(norms) > 0  # Gemma 3: four per layer, q_norm, k_norm, the last
    assert all(norm._compiled_call_impl is not None for norm in norms)
    assert all(getattr(module, "_compiled_call_impl", None) is None for module in others)
