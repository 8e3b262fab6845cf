"""What differs between model families, in one table: accepted architectures, chat template, attention kernel."""

from __future__ import annotations

from dataclasses import dataclass

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


def resolve_attention(family: Family, model_type: str, requested: Attention, packing: bool) -> Attention:
    """The attention kernel to load; with packing, refuse one that would let packed pairs see each other."""
    safe = FAMILIES[family].packed_attention[model_type]
    if requested == Attention.auto:
        return safe
    packing_safe = {safe, Attention.flash_attention_2, Attention.flex_attention}
    if packing and requested not in packing_safe:
        raise FamilyError(
            f"model.attn_implementation={requested.value} mixes packed pairs for {model_type}; "
            f"use {safe.value} (or trainer.packing=false)"
        )
    return requested
