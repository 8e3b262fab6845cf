"""model.lora_kernel=dense: the same function and gradients as peft's LoRA layer on a real NF4 base (and an
unquantized one, and with LoRA dropout), peft's forward wherever the kernel does not apply, the whole model trained
either way to the same loss and gradients, and the saved adapter unchanged."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import tiny
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lmsys.config import ConfigError, LoraKernel
from lmsys.modeling.lora_kernel import DenseLoraForward, ProjectionGroup, resolve_lora_kernel, use_lora_kernel

CPU = torch.device("cpu")


class Projection(nn.Module):
    def __init__(self, n_in: int, n_out: int, quantized: bool, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(n_out, n_in, generator=generator) / n_in**0.5
        if quantized:
            self.proj = bnb.nn.Linear4bit(n_in, n_out, bias=bias, compute_dtype=dtype, quant_type="nf4")
            self.proj.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4").to(CPU)
        else:
            self.proj = nn.Linear(n_in, n_out, bias=bias, dtype=dtype)
            self.proj.weight.data.copy_(weight)
        if bias:
            self.proj.bias.data.copy_(torch.randn(n_out, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def peft_and_dense(module: nn.Module, config: LoraConfig, layers: int):
    """(peft's model of `module`, a deep copy computing with the dense kernel), LoRA B non-zero so that both
    branches count."""
    model = get_peft_model(module, config)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(parameter, std=0.1, generator=torch.Generator().manual_seed(1))
    dense = copy.deepcopy(model)
    assert use_lora_kernel(dense, LoraKernel.dense) == layers
    return model, dense


def lora_pair(quantized: bool = True, bias: bool = False, dropout: float = 0.0, dtype=torch.float32, **lora_kwargs):
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["proj"], **lora_kwargs)
    return peft_and_dense(Projection(48, 80, quantized, bias, dtype), config, 1)


def run(model, x: torch.Tensor, grad: torch.Tensor, seed: int = 0, full_names: bool = False):
    """Output and the gradients of the input and the LoRA weights for one backward of `grad`."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout mask for both kernels
    out = model(x)
    out.backward(grad.to(out.dtype))
    lora = {name if full_names else name.split(".lora_")[1]: p.grad
            for name, p in model.named_parameters() if "lora_" in name}
    return out, x.grad, lora


def inputs(dtype=torch.float32):
    generator = torch.Generator().manual_seed(2)
    return torch.randn(3, 7, 48, generator=generator).to(dtype), torch.randn(3, 7, 80, generator=generator)


@pytest.mark.parametrize("quantized,bias,dropout", [(True, False, 0.0), (True, True, 0.0), (False, True, 0.0),
                                                    (True, False, 0.3)])
def test_dense_kernel_equals_peft_in_float32(quantized, bias, dropout):
    peft_layer, dense = lora_pair(quantized, bias, dropout)
    x, grad = inputs()
    for mode in ("train", "eval"):
        peft_layer.train(mode == "train")
        dense.train(mode == "train")
        expected, dx_expected, lora_expected = run(peft_layer, x, grad)
        out, dx, lora = run(dense, x, grad)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dx, dx_expected, atol=1e-5, rtol=1e-5)
        assert sorted(lora) == ["A.default.weight", "B.default.weight"]
        for name, gradient in lora_expected.items():
            assert gradient.abs().max() > 1e-3  # a gradient worth comparing
            torch.testing.assert_close(lora[name], gradient, atol=1e-5, rtol=1e-5)
        peft_layer.zero_grad()
        dense.zero_grad()


def test_dropout_is_applied_to_the_lora_branch_only():
    """With dropout the training output differs between masks, while eval (no dropout) matches peft's."""
    _, dense = lora_pair(dropout=0.5)
    x, grad = inputs()
    first, second = run(dense, x, grad, seed=0)[0], run(dense, x, grad, seed=1)[0]
    assert (first - second).abs().max() > 1e-3


def test_the_dequantized_base_is_made_once_and_equals_bitsandbytes():
    _, dense = lora_pair()
    layer = next(m for m in dense.modules() if isinstance(m, DenseLoraForward))
    weight, _ = layer.dense_base_weight()
    base = layer.base_layer
    expected = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
    assert torch.equal(weight, expected.float())  # the 4-bit rounding kept, nothing else
    assert layer.dense_base_weight()[0] is weight


def test_bfloat16_compute_trains_close_to_peft():
    peft_layer, dense = lora_pair(dtype=torch.bfloat16)
    x, grad = inputs(torch.bfloat16)
    expected, _, lora_expected = run(peft_layer, x, grad)
    out, dx, lora = run(dense, x, grad)
    assert out.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), atol=0.05, rtol=0.02)
    for name, gradient in lora_expected.items():
        assert lora[name].dtype == torch.float32  # the LoRA weights stay float32
        assert torch.nn.functional.cosine_similarity(lora[name].flatten(), gradient.flatten(), dim=0) > 0.999


def test_layers_the_kernel_does_not_compute_run_peft():
    """DoRA, disabled adapters and a merged adapter go through peft's own forward."""
    peft_layer, dense = lora_pair(use_dora=True)
    x, grad = inputs()
    torch.testing.assert_close(run(dense, x, grad)[0], run(peft_layer, x, grad)[0], atol=0, rtol=0)
    peft_layer, dense = lora_pair()
    with dense.disable_adapter(), peft_layer.disable_adapter():
        torch.testing.assert_close(dense(x), peft_layer(x), atol=0, rtol=0)
    plain = Projection(48, 80, True, False, torch.float32)
    with torch.no_grad():
        assert (dense(x) - plain(x)).abs().max() > 1e-3  # the adapter counts when enabled


def test_auto_is_dense_on_cpu_and_peft_on_gpu_or_under_fsdp():
    assert resolve_lora_kernel(LoraKernel.auto, CPU, sharded=False) == LoraKernel.dense
    assert resolve_lora_kernel(LoraKernel.auto, torch.device("cuda"), sharded=False) == LoraKernel.peft
    assert resolve_lora_kernel(LoraKernel.auto, CPU, sharded=True) == LoraKernel.peft
    assert resolve_lora_kernel(LoraKernel.peft, CPU, sharded=False) == LoraKernel.peft
    with pytest.raises(ConfigError, match="lora_kernel=dense cannot run under FSDP"):
        resolve_lora_kernel(LoraKernel.dense, CPU, sharded=True)
    _, dense = lora_pair()
    peft_only = copy.deepcopy(dense)
    assert use_lora_kernel(peft_only, LoraKernel.peft) == 0


def test_a_model_trains_the_same_with_either_kernel(tiny_models, tmp_path):
    """The tiny NF4 Llama through lmsys.builders: one loss and backward with the dense kernel (the CPU default)
    equals peft's, and the adapter saves under the same names."""
    from lmsys.builders import build_encoders
    from lmsys.data.batching import collate
    from lmsys.data.dataset import encode_split
    from lmsys.data.io import pairs_from_frame

    losses, grads, keys = {}, {}, {}
    for kernel in (LoraKernel.peft, LoraKernel.dense):
        model, spec, tokenizer = tiny.build_preference_model(tiny_models["llama"], "llama", "nf4",
                                                             lora_kernel=kernel)
        tiny.perturb(model, seed=1)
        kinds = {type(m).__name__ for m in model.modules() if "Linear4bit" in type(m).__name__}
        assert ("DenseLinear4bit" in kinds) == (kernel == LoraKernel.dense)
        groups = {id(m.projection_group) for m in model.modules() if "projection_group" in vars(m)}
        assert len(groups) == (2 * model.backbone.config.num_hidden_layers if kernel == LoraKernel.dense else 0)
        pairs = pairs_from_frame(tiny.arena_frame(4, seed=3), "mem.csv", require_labels=True)
        split = encode_split(pairs, build_encoders(spec, tokenizer))
        batch = collate(split.forward, tiny.batching(True, tokenizer.pad_token_id, spec.padding_side, 512))
        model.train()
        logits = model(**batch.model_inputs(CPU))
        loss = torch.nn.functional.cross_entropy(logits, batch.targets)
        loss.backward()
        losses[kernel] = loss.item()
        grads[kernel] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        keys[kernel] = sorted(model.backbone.state_dict())
    assert losses[LoraKernel.dense] == pytest.approx(losses[LoraKernel.peft], abs=1e-5)
    assert grads[LoraKernel.dense].keys() == grads[LoraKernel.peft].keys()
    assert sum("lora_A" in n for n in grads[LoraKernel.peft]) > 0
    for name, gradient in grads[LoraKernel.peft].items():
        torch.testing.assert_close(grads[LoraKernel.dense][name], gradient, atol=1e-5, rtol=1e-4)
    assert keys[LoraKernel.dense] == keys[LoraKernel.peft]


class Siblings(nn.Module):
    """Three 4-bit projections of one input, called in a row as HF's attention calls q, k and v."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.q_proj = Projection(48, 80, True, bias, torch.float32).proj
        self.k_proj = Projection(48, 24, True, bias, torch.float32).proj
        self.v_proj = Projection(48, 32, True, bias, torch.float32).proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)


def sibling_pair(bias: bool = False, dropout: float = 0.0):
    """(peft's layers, a deep copy with the dense kernel and its projection group); ranks and alphas differ per
    projection so that the group's blocks differ in size and scaling."""
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["q_proj", "k_proj", "v_proj"],
                        rank_pattern={"k_proj": 4}, alpha_pattern={"v_proj": 4})
    return peft_and_dense(Siblings(bias), config, 3)


def count_products(group: ProjectionGroup) -> list[int]:
    """A list that grows by one each time the group computes its product."""
    calls: list[int] = []
    original = group._forward_all
    group._forward_all = lambda *args: calls.append(1) or original(*args)
    return calls


def group_of(model) -> ProjectionGroup:
    groups = {id(m.projection_group): m.projection_group for m in model.modules() if "projection_group" in vars(m)}
    assert len(groups) == 1
    return next(iter(groups.values()))


@pytest.mark.parametrize("bias", [False, True])
def test_a_projection_group_equals_peft_in_float32(bias):
    """q, k and v computed as one product (ranks 8, 4, 8; scalings 2, 4, 0.5): the same outputs and gradients as
    peft's three layers, the group's product used for all three, and nothing held after the last of them."""
    peft_layers, dense = sibling_pair(bias)
    group = group_of(dense)
    calls = count_products(group)
    x, _ = inputs()
    grad = torch.randn(3, 7, 136, generator=torch.Generator().manual_seed(5))
    expected, dx_expected, lora_expected = run(peft_layers, x, grad, full_names=True)
    out, dx, lora = run(dense, x, grad, full_names=True)
    assert len(calls) == 1 and group._input is None and not group._pending
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, dx_expected, atol=1e-5, rtol=1e-5)
    assert len(lora) == 6
    for name, gradient in lora_expected.items():
        assert gradient.abs().max() > 1e-3
        torch.testing.assert_close(lora[name], gradient, atol=1e-5, rtol=1e-5)
    members = [dense.base_model.model.q_proj, dense.base_model.model.k_proj, dense.base_model.model.v_proj]
    assert group.weight.shape == (136, 48)
    assert all(m.dense_base_weight()[0]._base is group.weight for m in members)  # the weights kept once


def test_a_member_called_on_another_input_computes_alone():
    """k_proj on a tensor other than q_proj's (or on q_proj's after an in-place change) gets its own product."""
    peft_layers, dense = sibling_pair()
    model, reference = dense.base_model.model, peft_layers.base_model.model
    x, _ = inputs()
    y = x + 1.0
    with torch.no_grad():
        torch.testing.assert_close(model.q_proj(x), reference.q_proj(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.k_proj(y), reference.k_proj(y), atol=1e-5, rtol=1e-5)
        assert group_of(dense)._input is None  # the pending v part was dropped
        z = x.clone()
        model.q_proj(z)
        z.mul_(2.0)
        torch.testing.assert_close(model.k_proj(z), reference.k_proj(z), atol=1e-5, rtol=1e-5)


def test_lora_dropout_in_training_computes_each_projection_alone():
    peft_layers, dense = sibling_pair(dropout=0.3)
    calls = count_products(group_of(dense))
    x, _ = inputs()
    grad = torch.randn(3, 7, 136, generator=torch.Generator().manual_seed(5))
    run(dense.train(), x, grad)
    assert calls == []
    dense.eval()
    peft_layers.eval()
    torch.testing.assert_close(run(dense, x, grad)[0], run(peft_layers, x, grad)[0], atol=1e-5, rtol=1e-5)
    assert calls == [1]  # without dropout (evaluation) the group computes


def test_a_projection_group_computes_under_inference_mode():
    peft_layers, dense = sibling_pair()
    x, _ = inputs()
    with torch.inference_mode():
        torch.testing.assert_close(dense(x), peft_layers(x), atol=1e-5, rtol=1e-5)
    assert group_of(dense).weight is not None
