"""Loading the backbone from a local directory: quantized (NF4/FP4/int8) or not, then LoRA (or DoRA) via peft."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModel, BitsAndBytesConfig, PreTrainedModel

from lmsys.config import ComputeDtype, ConfigError, Quantization
from lmsys.modeling.attention import attention_kernel
from lmsys.modeling.compute_dtype import auto_dtype, warn_if_bf16_is_slower
from lmsys.modeling.model_facts import model_skeleton
from lmsys.modeling.precision import saved_quantization

log = logging.getLogger("lmsys")

DTYPES = {ComputeDtype.float32: torch.float32, ComputeDtype.bfloat16: torch.bfloat16, ComputeDtype.float16: torch.float16}


def resolve_dtype(requested: ComputeDtype, device: torch.device, model_dir: str | Path) -> torch.dtype:
    """auto: bfloat16 on GPU; on CPU the faster of float32 and bfloat16 on this machine (a cached probe; without
    AVX-512 BF16 or AMX bf16 matmuls are many times slower, with them 2-3x faster). An explicit bfloat16 on CPU is
    kept, with a warning where the same probe finds it slower than float32."""
    if requested == ComputeDtype.auto:
        return DTYPES[ComputeDtype(auto_dtype(device, model_dir).dtype)]
    if requested == ComputeDtype.bfloat16 and device.type == "cpu":
        warn_if_bf16_is_slower(model_dir)
    return DTYPES[requested]


def quantization_config(
    quantization: Quantization, double_quant: bool, dtype: torch.dtype, quant_storage: torch.dtype | None = None
) -> BitsAndBytesConfig | None:
    """`quant_storage`: the dtype 4-bit weights are stored as (None: bitsandbytes' uint8; FSDP needs a float)."""
    if quantization == Quantization.none:
        return None
    if quantization == Quantization.int8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.value,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=quant_storage or torch.uint8,
    )


def load_backbone(
    path: str | Path,
    quantization: Quantization,
    double_quant: bool,
    dtype: torch.dtype,
    attn_implementation: str,
    device: torch.device,
    trust_remote_code: bool,
    quant_storage: torch.dtype | None = None,
    device_map: dict[str, int | str] | None = None,
) -> PreTrainedModel:
    """The transformer without its LM head (AutoModel), weights from safetensors only; on `device`, or split over
    devices by `device_map` (module name -> device, see lmsys.modeling.precision.plan_device_map)."""
    with warnings.catch_warnings():
        if quantization != Quantization.none and saved_quantization(path) is not None:
            # a pre-quantized export: transformers loads it with its config.json's quantization_config (the one
            # asked for: predict_quantization) and warns that ours is ignored; it still needs ours to load
            warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
        model = AutoModel.from_pretrained(
            str(path),
            quantization_config=quantization_config(quantization, double_quant, dtype, quant_storage),
            dtype=dtype,
            attn_implementation=attention_kernel(attn_implementation, dtype, device),
            device_map=device_map or {"": device},
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
    keep_cpu_4bit_layout(model)
    set_4bit_compute_dtype(model, dtype)
    return model


def set_4bit_compute_dtype(model: PreTrainedModel, dtype: torch.dtype) -> None:
    """A pre-quantized export stores the compute dtype it was saved with; prediction's `compute_dtype` wins."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = dtype


def keep_cpu_4bit_layout(model: PreTrainedModel) -> None:
    """Stop bitsandbytes from repacking 4-bit weights into its bf16 CPU inference layout at the first eval-mode
    forward: the repacking round trip is lossy, so evaluations would move the frozen base (and resumed runs would
    drift from uninterrupted ones); evaluation then computes exactly like training."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def add_lora(
    backbone: PreTrainedModel, r: int, alpha: int, dropout: float, target_modules: list[str], use_dora: bool,
    gradient_checkpointing: bool,
) -> PeftModel:
    """Freeze the backbone and wrap it with trainable LoRA adapters."""
    if gradient_checkpointing:
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    backbone.config.use_cache = False
    _require_targets(backbone, target_modules)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), use_dora=use_dora,
        bias="none", task_type="FEATURE_EXTRACTION",
    )
    with checkpointing_renames_quietly():
        return get_peft_model(backbone, config)


def _require_targets(backbone: torch.nn.Module, target_modules: list[str]) -> None:
    """Every entry of lora.target_modules names linear layers of the model, as peft matches them (a module's name or
    its dotted tail): a misspelt one was dropped without a word. The default names decoder projections; DeBERTa-v2
    calls its own query_proj, key_proj, value_proj, dense."""
    linear = [name for name, module in backbone.named_modules()
              if isinstance(module, (torch.nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    unmatched = [target for target in target_modules
                 if not any(name == target or name.endswith(f".{target}") for name in linear)]
    if unmatched:
        verb = "is not a linear layer" if len(unmatched) == 1 else "are not linear layers"
        short_names = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise ConfigError(f"lora.target_modules: {unmatched} {verb} of this {backbone.config.model_type} model (it has "
                          f"{short_names})")


def check_lora_targets(model_path: str | Path, trust_remote_code: bool, target_modules: list[str]) -> None:
    """`_require_targets` on the model's skeleton (no weights, meta device), before a run dir is claimed."""
    _require_targets(model_skeleton(model_path, trust_remote_code), target_modules)


def make_trainable(backbone: PreTrainedModel, gradient_checkpointing: bool) -> PreTrainedModel:
    """Full fine-tuning: every backbone weight trains (model.finetune=full; the backbone is not quantized)."""
    if gradient_checkpointing:
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    backbone.config.use_cache = False
    return backbone.requires_grad_(True)


def load_adapter(backbone: PreTrainedModel, adapter_dir: str | Path, trainable: bool) -> PeftModel:
    backbone.config.use_cache = False
    with checkpointing_renames_quietly():
        return PeftModel.from_pretrained(backbone, str(adapter_dir), is_trainable=trainable)


DEPRECATED_CHECKPOINTING_NAMES = r"`(is_gradient_checkpointing|gradient_checkpointing_(enable|disable))` is deprecated"


@contextmanager
def checkpointing_renames_quietly() -> Iterator[None]:
    """Without the FutureWarnings transformers 5 raises when peft (0.21) and TRL (1.16) call its checkpointing API
    by the old names (`is_gradient_checkpointing`, `gradient_checkpointing_enable` / `_disable`): printed by every
    command that builds or loads an adapter, and by DPO's reference pass, about code the user cannot change. Every
    other warning passes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=DEPRECATED_CHECKPOINTING_NAMES, category=FutureWarning)
        yield


def fold_into_dense(model: torch.nn.Module) -> int:
    """For prediction: replace each LoRA-wrapped 4-bit (or unquantized) projection by a dense linear layer whose
    weight is the dequantized base plus the LoRA update, in the base's compute dtype. The same function as before
    (the 4-bit path dequantizes to that dtype on every call), computed as one matmul instead of a dequantization,
    a matmul and two LoRA matmuls per call, for full-precision weight memory (bf16: 2 bytes per parameter). The
    model can no longer train or save an adapter. Layers it cannot fold (see `unfoldable_reason`) are left as they
    are, named in a warning. Returns the number of layers folded."""
    from peft.tuners.lora import LoraLayer

    folded, left = 0, {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        reason = unfoldable_reason(module)
        if reason:
            left.setdefault(reason, []).append(name)
            continue
        base = module.base_layer
        if isinstance(base, bnb.nn.Linear4bit):
            dtype = base.compute_dtype or torch.float32
            weight = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).to(torch.float32)
        else:  # an unquantized base (quantization=none): its own weights, in their dtype
            dtype, weight = base.weight.dtype, base.weight.data.to(torch.float32)
        for adapter in module.active_adapters:
            weight += module.get_delta_weight(adapter).to(torch.float32)
        dense = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                                device=weight.device, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if base.bias is not None:
                dense.bias.copy_(base.bias)
        dense.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, dense)
        folded += 1
    for reason, names in left.items():
        log.warning("dense_weights: %d LoRA layer(s) left unfolded, %s: %s", len(names), reason,
                    ", ".join(names[:3]) + (", ..." if len(names) > 3 else ""))
    return folded


def unfoldable_reason(module) -> str | None:
    """Why fold_into_dense leaves a LoRA layer as it is (None: it folds it). DoRA rescales each output row by a
    magnitude over the norm of base + delta, which is no plain delta to add; an int8 (LLM.int8) base is left to
    its own kernels (they keep its outlier decomposition)."""
    if any(module.use_dora.get(adapter, False) for adapter in module.active_adapters):
        return "DoRA (its magnitude rescaling is not a plain weight delta)"
    if isinstance(module.base_layer, bnb.nn.Linear8bitLt):
        return "int8 base (Linear8bitLt keeps its int8 weights and outlier decomposition)"
    if not isinstance(module.base_layer, (bnb.nn.Linear4bit, torch.nn.Linear)):
        return f"{type(module.base_layer).__name__} base (only 4-bit and unquantized bases are folded)"
    return None
