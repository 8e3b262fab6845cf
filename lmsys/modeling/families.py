"""What differs between model families, in one table: accepted architectures, chat template, attention kernel."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from lmsys.config import Attention, Family, Template


@dataclass(frozen=True)
class FamilySpec:
    model_types: tuple[str, ...]
    template: Template
    # model_type -> attention kernel that keeps packed pairs apart with restarting position_ids (checked)
    packed_attention: dict[str, Attention]
    # An encoder (bidirectional attention): pooled at its first token ([CLS]), padded batches only, since
    # transformers has no packed layout (restarting position_ids) for its attention.
    encoder: bool = False


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
    # DeBERTa-v2/v3 and mDeBERTa; its disentangled attention has only the eager kernel in transformers
    Family.deberta: FamilySpec(("deberta-v2",), Template.sep, {"deberta-v2": Attention.eager}, encoder=True),
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
    """The family's template for `auto`; `sep` ([CLS] prompt [SEP] A [SEP] B [SEP]) is the encoders' layout only,
    and an encoder reads no chat template."""
    spec = FAMILIES[family]
    if template == Template.auto:
        return spec.template
    if (template == Template.sep) != spec.encoder:
        kind = "an encoder: it reads the sep layout" if spec.encoder else "a decoder: it reads a chat template"
        raise FamilyError(f"model.template={template.value} does not fit the {family.value} family, {kind} "
                          f"(model.template=auto gives {spec.template.value})")
    return template


SUPPORT_FLAGS = {Attention.sdpa: "_supports_sdpa", Attention.flash_attention_2: "_supports_flash_attn",
                 Attention.flex_attention: "_supports_flex_attn"}  # transformers' model classes declare them


def check_model_supports(model_type: str, requested: Attention, safe: Attention) -> None:
    """A kernel the model's transformers class does not implement (DeBERTa-v2 has eager only) is refused here,
    not by transformers once the model loads, after the run dir is claimed."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    model_class = getattr(transformers, MODEL_MAPPING_NAMES.get(model_type, ""), None)
    if requested in SUPPORT_FLAGS and model_class is not None and not getattr(model_class, SUPPORT_FLAGS[requested],
                                                                              True):
        raise FamilyError(f"attention {requested.value}: transformers' {model_class.__name__} does not implement it; "
                          f"set model.attn_implementation (predict: attn_implementation) to {safe.value}")


def resolve_attention(family: Family, model_type: str, requested: Attention, packing: bool) -> Attention:
    """The attention kernel to load; with packing, refuse one that would let packed pairs see each other."""
    if packing and FAMILIES[family].encoder:
        raise FamilyError(
            f"the {family.value} family is an encoder: its bidirectional attention cannot be packed; "
            "use padded batches (packing=false)"
        )
    safe = FAMILIES[family].packed_attention[model_type]
    if requested == Attention.auto:
        return safe
    packing_safe = {safe, Attention.flash_attention_2, Attention.flex_attention}
    if packing and requested not in packing_safe:
        raise FamilyError(
            f"model.attn_implementation={requested.value} mixes packed pairs for {model_type}; "
            f"use {safe.value} (or trainer.packing=false)"
        )
    check_model_supports(model_type, requested, safe)
    if requested == Attention.flash_attention_2 and importlib.util.find_spec("flash_attn") is None:
        # transformers says so only when the model loads, after the run dir is claimed
        raise FamilyError(f"attention flash_attention_2 needs the flash-attn package (CUDA GPUs): set "
                          f"model.attn_implementation (predict: attn_implementation) to {safe.value} here")
    return requested
