"""What differs between model families, in one table: accepted architectures, chat template, attention kernel."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmsys.config import Attention, Family, Template


@dataclass(frozen=True)
class FamilySpec:
    model_types: tuple[str, ...]
    template: Template
    # model_type -> attention kernel that keeps packed pairs apart with restarting position_ids (checked)
    packed_attention: dict[str, Attention]


FAMILIES: dict[Family, FamilySpec] = {
    Family.llama: FamilySpec(("llama",), Template.llama3, {"llama": Attention.sdpa}),
    Family.gemma: FamilySpec(
        ("gemma", "gemma2", "gemma3", "gemma3_text"),
        Template.gemma,
        # Gemma-2's sdpa path ignores the packed layout (soft-capping forces its own mask): eager only.
        {"gemma": Attention.sdpa, "gemma2": Attention.eager, "gemma3": Attention.sdpa, "gemma3_text": Attention.sdpa},
    ),
    Family.qwen: FamilySpec(("qwen2", "qwen3"), Template.chatml, {"qwen2": Attention.sdpa, "qwen3": Attention.sdpa}),
    Family.mistral: FamilySpec(("mistral",), Template.mistral, {"mistral": Attention.sdpa}),
}


class FamilyError(ValueError):
    """A model or config that does not belong to the family an entry point serves."""


def check_family(family: Family, model_type: str, where: str) -> FamilySpec:
    spec = FAMILIES[family]
    if model_type not in spec.model_types:
        raise FamilyError(
            f"{where}: model_type '{model_type}' is not in family '{family.value}' (accepts {list(spec.model_types)})"
        )
    return spec


def resolve_template(family: Family, template: Template) -> Template:
    return FAMILIES[family].template if template == Template.auto else template


def resolve_attention(family: Family, model_type: str, requested: Attention, packing: bool) -> str:
    """The attention kernel to load; with packing, refuse one that would let packed pairs see each other."""
    safe = FAMILIES[family].packed_attention[model_type]
    if requested == Attention.auto:
        return safe.value
    packing_safe = {safe, Attention.flash_attention_2, Attention.flex_attention}
    if packing and requested not in packing_safe:
        raise FamilyError(
            f"model.attn_implementation={requested.value} mixes packed pairs for {model_type}; "
            f"use {safe.value} (or trainer.packing=false)"
        )
    return requested.value


def attention_width(model_dir: str | Path, attention: Attention) -> float | None:
    """The row width at which a row's attention costs as much as its projections, per token: sdpa and eager compute
    the full square of a packed row (4 * T * heads * head_dim flops a token and layer, against 2 * the layer's
    projection parameters), so packing short pairs into wide rows can cost more than the padding it saves. None
    for kernels that skip the masked blocks (flash attention varlen, flex attention): there width costs nothing."""
    if attention in (Attention.flash_attention_2, Attention.flex_attention):
        return None
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    projections = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * config["intermediate_size"]
    return 2 * projections / (4 * heads * head_dim)
