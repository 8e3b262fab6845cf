"""`model.lora_kernel`: how a LoRA-wrapped projection computes `base(x) + scaling * B(A(dropout(x)))`.

`peft`: peft's own layer. On a 4-bit base, every call (forward and backward) dequantizes the weight, and the LoRA
branch adds a defensive copy of the base output, casts of the input to the LoRA weights' dtype and of the output
back, a scaling multiply and an add: each a full pass over the activations.

`dense`: the frozen base weight is dequantized once and kept in the compute dtype (the same values bitsandbytes
dequantizes to on every call: the 4-bit rounding stays; memory is that of the unquantized base), and one
autograd function computes the layer: y = x W^T (+ bias), then y += s (x_d A^T) B^T accumulated into y by the
matrix product itself; the backward dx = dy W (+= s (dy B) A), dA = s (dy B)^T x_d, dB = s dy^T (x_d A^T), and
no gradient of W (frozen). No copy, no cast of the activations (the small A and B are cast to the compute dtype,
as CUDA autocast does), no separate scaling or add. Same function as peft's: on SmolLM2-135M's projections
forward and backward agree to ~1e-6 in float32 (tests/modeling/test_lora_kernel.py).

Layers it does not compute (the peft forward runs for them): DoRA and other variants, several active adapters,
per-call adapter names, merged or disabled adapters, an int8 base (its outlier decomposition is its own).
`auto`: dense on CPU, where it measured faster (the README's benchmark); peft on GPU, where a dense copy of a
9B base would undo the 4-bit memory saving, under FSDP (each rank holds a shard of the 4-bit weight, which only
FSDP's own all-gather inside peft's forward makes whole; `dense` there fails at start-up), and with
`model.torch_compile=true`, which compiles peft's layers (the dense kernel's per-shape autograd function would
recompile for every projection shape).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from bitsandbytes.functional import dequantize_4bit
from bitsandbytes.nn import Linear4bit
from peft.tuners.lora import Linear as PeftLinear
from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

from lmsys.config import ConfigError, LoraKernel


class LoraLinearFunction(torch.autograd.Function):
    """y (M, out) = x (M, in) W^T + bias + scaling * (x_d A^T) B^T, W frozen; x_d is x after LoRA dropout (or x)."""

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_a, lora_b, scaling):
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)  # (r, in), (out, r): small, cast per call
        h = x_lora @ a.t()  # (M, r)
        y = F.linear(x, weight, bias)  # (M, out)
        y.addmm_(h, b.t(), alpha=scaling)
        ctx.save_for_backward(x_lora, weight, a, b, h)
        ctx.scaling, ctx.shared_input = scaling, x_lora is x
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x_lora, weight, a, b, h = ctx.saved_tensors
        s, (a_dtype, b_dtype) = ctx.scaling, ctx.param_dtypes
        g = dy @ b  # (M, r)
        dx = dx_lora = None
        if ctx.needs_input_grad[0]:
            dx = dy @ weight  # (M, in)
            if ctx.shared_input:
                dx.addmm_(g, a, alpha=s)
        if ctx.needs_input_grad[1] and not ctx.shared_input:
            dx_lora = (g @ a).mul_(s)
        da = (g.t() @ x_lora).mul_(s).to(a_dtype)  # (r, in)
        db = (dy.t() @ h).mul_(s).to(b_dtype)  # (out, r)
        return dx, dx_lora, None, None, da, db, None


class DenseLoraForward:
    """The `dense` kernel's forward for a peft LoRA layer (mixed into its class by `use_lora_kernel`); the layer's
    own forward where the kernel does not apply."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self._dense_adapter(kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        weight, bias = self.dense_base_weight()
        dropout = self.lora_dropout[adapter]
        x2 = x.reshape(-1, x.shape[-1]).to(weight.dtype)  # (M, in)
        x_lora = dropout(x2) if self.training and not isinstance(dropout, torch.nn.Identity) else x2
        y = LoraLinearFunction.apply(x2, x_lora, weight, bias, self.lora_A[adapter].weight,
                                     self.lora_B[adapter].weight, self.scaling[adapter])
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)

    def _dense_adapter(self, kwargs: dict) -> str | None:
        """The one plain LoRA adapter to compute, or None (the layer's own forward handles the case)."""
        if self.disable_adapters or self.merged or getattr(self, "fan_in_fan_out", False):
            return None
        if kwargs.get("adapter_names") is not None:
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1 or active[0] in self.lora_variant or self.use_dora.get(active[0], False):
            return None
        return active[0]

    def dense_base_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen base's (out, in) weight in the compute dtype, and its bias: a 4-bit weight is dequantized
        on the first call and kept (the base never changes; `model.to` or a new dtype makes it again)."""
        base = self.base_layer
        bias = base.bias
        if not isinstance(base, Linear4bit):
            return base.weight, bias
        dtype = base.compute_dtype or torch.float32
        cached = getattr(self, "_dense_weight", None)
        if cached is None or cached.device != base.weight.device or cached.dtype != dtype:
            # a normal tensor even when first made in an evaluation under inference_mode: training saves it
            with torch.inference_mode(False), torch.no_grad():
                cached = dequantize_4bit(base.weight.data, base.weight.quant_state).to(dtype)
            self._dense_weight = cached
        return cached, None if bias is None else bias.to(dtype)


_DENSE_CLASSES: dict[type, type] = {}


def _dense_class(layer_class: type) -> type:
    if layer_class not in _DENSE_CLASSES:
        _DENSE_CLASSES[layer_class] = type(f"Dense{layer_class.__name__}", (DenseLoraForward, layer_class), {})
    return _DENSE_CLASSES[layer_class]


def resolve_lora_kernel(kernel: LoraKernel, device: torch.device, sharded: bool) -> LoraKernel:
    """`auto` made concrete; `sharded`: the model will be sharded by FSDP, whose shards the kernel cannot read."""
    if kernel == LoraKernel.dense and sharded:
        raise ConfigError("model.lora_kernel=dense cannot run under FSDP (each rank holds a shard of the base "
                          "weight); use model.lora_kernel=auto or peft")
    if kernel == LoraKernel.auto:
        return LoraKernel.dense if device.type == "cpu" and not sharded else LoraKernel.peft
    return kernel


def use_lora_kernel(model: torch.nn.Module, kernel: LoraKernel) -> int:
    """Give every peft LoRA layer with a 4-bit or unquantized base the `dense` forward (`kernel`, resolved by
    `resolve_lora_kernel`); returns how many. Parameters, their names and the saved adapter are unchanged."""
    if kernel != LoraKernel.dense:
        return 0
    count = 0
    for module in model.modules():
        if type(module) in (PeftLinear4bit, PeftLinear):
            module.__class__ = _dense_class(type(module))
            count += 1
    return count
