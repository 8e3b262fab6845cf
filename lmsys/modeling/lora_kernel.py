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
forward and backward agree to ~1e-6 in float32 (tests/modeling/test_lora_kernel.py). Siblings that read one
input on 4-bit bases (q, k and v; gate and up) are computed as one product each step (ProjectionGroup).

Layers it does not compute (the peft forward runs for them): DoRA and other variants, several active adapters,
per-call adapter names, merged or disabled adapters, an int8 base (its outlier decomposition is its own).
`auto`: dense on CPU, where it measured faster (docs/measurements.md); peft on GPU, where a dense copy of a
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
    """y (M, N) = x (M, in) W^T + bias + (x_d A^T) B^T, W frozen; x_d is x after LoRA dropout (or x).

    One projection, or several that read the same x side by side (q, k and v; gate and up: see ProjectionGroup):
    W (N, in) and the bias are their rows stacked, A (R, in) their A stacked, B (N, R) block-diagonal with each
    block B_i (n_i, r_i) times its scaling. So one product per step where each projection had its own: y = x W^T,
    h = x_d A^T (M, R), y_i += h_i B_i^T; backward g_i = dy_i B_i (g (M, R)), dx = dy W + g A, dA = g^T x_d,
    dB_i = dy_i^T h_i, where y_i, dy_i are projection i's columns and h_i, g_i its rank's.

    B's blocks are multiplied one by one rather than as the block-diagonal whole, whose zero blocks are as many
    products again for q, k and v (2/3 of them) and for gate and up (1/2): on SmolLM2-135M's shapes (2,048 tokens,
    bf16, 2 threads, AMD EPYC with AVX-512 BF16) y += h B^T, g = dy B and dB each took 0.64-0.75 of the whole's time.
    """

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, scalings, *lora):  # lora: A_1, B_1, A_2, B_2, ...
        a_params, b_params = lora[0::2], lora[1::2]
        a = torch.cat([p.to(x.dtype) for p in a_params]) if len(a_params) > 1 else a_params[0].to(x.dtype)
        blocks = [p.to(x.dtype) * s for p, s in zip(b_params, scalings, strict=True)]  # (n_i, r_i): small, per call
        h = x_lora @ a.t()  # (M, R)
        y = F.linear(x, weight, bias)  # (M, N)
        spans = _spans(blocks)
        for (rows, ranks), block in zip(spans, blocks, strict=True):
            y[:, rows].addmm_(h[:, ranks], block.t())  # in place in y's columns of this projection
        ctx.save_for_backward(x_lora, weight, a, h, *blocks)
        ctx.scalings, ctx.shared_input, ctx.spans = scalings, x_lora is x, spans
        ctx.param_dtypes = [p.dtype for p in lora]
        return y

    @staticmethod
    def backward(ctx, dy):
        x_lora, weight, a, h, *blocks = ctx.saved_tensors
        spans = ctx.spans
        g = torch.cat([dy[:, rows] @ block for (rows, _), block in zip(spans, blocks, strict=True)], dim=1)  # (M, R)
        dx = dx_lora = None
        if ctx.needs_input_grad[0]:
            dx = dy @ weight  # (M, in)
            if ctx.shared_input:
                dx.addmm_(g, a)
        if ctx.needs_input_grad[1] and not ctx.shared_input:
            dx_lora = g @ a
        da = g.t() @ x_lora  # (R, in)
        grads = []
        for (rows, ranks), s, (a_dtype, b_dtype) in zip(spans, ctx.scalings, zip(ctx.param_dtypes[0::2],
                                                                               ctx.param_dtypes[1::2])):
            grads.append(da[ranks].to(a_dtype))
            grads.append(((h[:, ranks].t() @ dy[:, rows]).t() * s).to(b_dtype))  # h_i^T dy_i: measured faster on CPU
        return dx, dx_lora, None, None, None, *grads


def _spans(blocks: list[torch.Tensor]) -> list[tuple[slice, slice]]:
    """(output columns, rank columns) of each block (n_i, r_i) of a block-diagonal B, in order."""
    spans, row, col = [], 0, 0
    for block in blocks:
        n, r = block.shape
        spans.append((slice(row, row + n), slice(col, col + r)))
        row, col = row + n, col + r
    return spans


class DenseLoraForward:
    """The `dense` kernel's forward for a peft LoRA layer (mixed into its class by `use_lora_kernel`); the layer's
    own forward where the kernel does not apply."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self._dense_adapter(kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        group = self.__dict__.get("projection_group")
        output = None if group is None else group.output(self, x, adapter, kwargs)
        return self.dense_forward(x, adapter) if output is None else output

    def dense_forward(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """This projection alone: (..., in) -> (..., out) in x's dtype."""
        weight, bias = self.dense_base_weight()
        dropout = self.lora_dropout[adapter]
        x2 = x.reshape(-1, x.shape[-1]).to(weight.dtype)  # (M, in)
        x_lora = dropout(x2) if self.uses_dropout(adapter) else x2
        y = LoraLinearFunction.apply(x2, x_lora, weight, bias, (self.scaling[adapter],),
                                     self.lora_A[adapter].weight, self.lora_B[adapter].weight)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)

    def uses_dropout(self, adapter: str) -> bool:
        return self.training and not isinstance(self.lora_dropout[adapter], torch.nn.Identity)

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
        cached = getattr(self, "_dense_weight", None)
        if not self.holds_dense_weight(cached):
            cached = self._dense_weight = self.dequantize_into(None)
        return cached, None if bias is None else bias.to(cached.dtype)

    def dense_dtype(self) -> torch.dtype:
        """The dtype a 4-bit base computes in, and its dense weight is kept in."""
        return self.base_layer.compute_dtype or torch.float32

    def holds_dense_weight(self, weight: torch.Tensor | None) -> bool:
        """Whether `weight` is on the 4-bit base's device in its compute dtype."""
        return weight is not None and weight.device == self.base_layer.weight.device and weight.dtype == (
            self.dense_dtype())

    def dequantize_into(self, rows: torch.Tensor | None) -> torch.Tensor:
        """The 4-bit base weight dequantized, in the compute dtype: copied into `rows` (out, in), or a new tensor.
        A normal tensor even when first made in an evaluation under inference_mode: training saves it."""
        base = self.base_layer
        with torch.inference_mode(False), torch.no_grad():
            weight = dequantize_4bit(base.weight.data, base.weight.quant_state)
            return weight.to(self.dense_dtype()) if rows is None else rows.copy_(weight)


PROJECTION_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # siblings reading one input


class ProjectionGroup:
    """Sibling LoRA projections on 4-bit bases that read the same input (an attention's q, k and v, an MLP's gate
    and up) computed by one LoraLinearFunction: one product per step instead of one per projection (on the
    embedded SmolLM2 in bf16, one layer's q, k, v, gate and up forward + backward took 0.94-0.97 of the time:
    `python scripts/elementwise_bench.py --projection-calls 300`).

    The first member's call computes every member's output and keeps the others' parts, each handed to its member
    when that member is called next with the same tensor, unchanged since (HF's attention and MLP call q, k, v
    and gate, up in a row on one hidden state). Anything else computes alone as before: a later member called with
    another input, a first member whose siblings the kernel would not compute the same way (another active
    adapter, LoRA dropout in training). The members' dequantized weights are rows of one tensor (kept once).
    """

    def __init__(self, members: list[DenseLoraForward]) -> None:
        self.members = members
        self.sizes = [member.base_layer.out_features for member in members]
        self.weight: torch.Tensor | None = None
        self._input: tuple[torch.Tensor, int] | None = None  # the first member's last input and its version
        self._pending: dict[int, torch.Tensor] = {}  # id(member) -> its output from that input

    def output(self, member: DenseLoraForward, x: torch.Tensor, adapter: str, kwargs: dict) -> torch.Tensor | None:
        """`member`'s output from the group's product, or None: the member computes alone."""
        if member is self.members[0]:
            self._input, self._pending = None, {}
            if not self._computable(adapter, kwargs):
                return None
            first, *rest = self._forward_all(x, adapter)
            self._input = (x, _version(x))
            self._pending = {id(m): part for m, part in zip(self.members[1:], rest, strict=True)}
            return first
        same_input = self._input is not None and self._input[0] is x and self._input[1] == _version(x)
        part = self._pending.pop(id(member), None) if same_input else None
        if part is None or not self._pending:
            self._input, self._pending = None, {}  # nothing held beyond its use
        return part

    def whole_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every member's output from x (..., in) side by side (..., sum of outs), for a caller that takes them
        whole (gated_mlp.CompiledGatedMLP); None where the members would not compute as one product."""
        self._input, self._pending = None, {}
        adapter = self.members[0]._dense_adapter({})
        if adapter is None or not self._computable(adapter, {}):
            return None
        return self._product(x, adapter)

    def _computable(self, adapter: str, kwargs: dict) -> bool:
        return all(m._dense_adapter(kwargs) == adapter and not m.uses_dropout(adapter) for m in self.members)

    def _forward_all(self, x: torch.Tensor, adapter: str) -> list[torch.Tensor]:
        """Every member's output from x (..., in): column blocks of one product, as views."""
        return list(self._product(x, adapter).split(self.sizes, dim=-1))

    def _product(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """x (..., in) -> (..., sum of outs) in x's dtype: one LoraLinearFunction over the members."""
        weight, bias = self.dense_weight()
        x2 = x.reshape(-1, x.shape[-1]).to(weight.dtype)  # (M, in)
        lora = [p for m in self.members for p in (m.lora_A[adapter].weight, m.lora_B[adapter].weight)]
        y = LoraLinearFunction.apply(x2, x2, weight, bias, tuple(m.scaling[adapter] for m in self.members), *lora)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)

    def dense_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The members' dequantized weights stacked (sum of outs, in), and their biases. Each member dequantizes
        straight into its rows, which become its own weight (no member keeps a copy); made again if a member's
        weight was made anew, e.g. after `model.to`."""
        weight, first = self.weight, self.members[0]
        held = [getattr(member, "_dense_weight", None) for member in self.members]
        if not first.holds_dense_weight(weight) or any(w is None or w._base is not weight for w in held):
            base = first.base_layer
            with torch.inference_mode(False):
                weight = torch.empty(sum(self.sizes), base.in_features, dtype=first.dense_dtype(),
                                     device=base.weight.device)
            for member, rows in zip(self.members, weight.split(self.sizes), strict=True):
                member._dense_weight = member.dequantize_into(rows)
            self.weight = weight
        biases = [member.base_layer.bias for member in self.members]
        bias = None if biases[0] is None else torch.cat([b.to(weight.dtype) for b in biases])
        return weight, bias


def _version(x: torch.Tensor) -> int | None:
    """x's in-place change counter (an inference-mode tensor keeps none)."""
    return None if x.is_inference() else x._version


def group_projections(model: torch.nn.Module) -> None:
    """Give the dense-kernel siblings of PROJECTION_GROUPS in each module a ProjectionGroup. Members need 4-bit
    bases of one input size and compute dtype, with biases on all or none."""
    for module in model.modules():
        for names in PROJECTION_GROUPS:
            members = [getattr(module, name, None) for name in names]
            if _groupable(members):
                group = ProjectionGroup(members)
                for member in members:
                    member.projection_group = group


def _groupable(members: list) -> bool:
    if not all(isinstance(m, DenseLoraForward) and isinstance(m.base_layer, Linear4bit) for m in members):
        return False
    bases = [m.base_layer for m in members]
    return (len({(b.in_features, b.compute_dtype) for b in bases}) == 1
            and len({b.bias is None for b in bases}) == 1)


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
    group_projections(model)
    return count
