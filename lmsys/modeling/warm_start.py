"""Warm starts (`model.init_from=RUN/checkpoint`): a run starts from an earlier run's adapter and head, as the
top solutions' later stages did (stage 3 from stage 2; a WSDM two-class head from an LMSYS three-class one). A full
fine-tuning run (`model.finetune=full`, as the LMSYS 2nd place trained its stages) starts from a merged checkpoint:
the whole backbone, loaded in place of model.path's, and the head."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from lmsys.config import ConfigError, FineTune, LoraConfig, Quantization
from lmsys.modeling.checkpoint import ADAPTER_FILES, ModelSpec, load_head_state, read_spec


def check_warm_start(spec: ModelSpec, lora: LoraConfig, checkpoint: str, finetune: FineTune = FineTune.lora) -> None:
    """Refuse, before any model loads, a checkpoint whose base model, family, head or LoRA shape differs from this
    run's (a 3-class head may start a 2-class run: it keeps the A and B rows); a LoRA run starts from an adapter
    checkpoint, a full fine-tuning run from an unquantized merged one."""
    source = read_spec(checkpoint)
    _check_kind(source, finetune, checkpoint)
    checks = [
        ("family", source.family.value, spec.family.value),
        ("base model", (source.facts, Path(source.base_model_path).name), (spec.facts, Path(spec.base_model_path).name)),
        ("head", source.head.value, spec.head.value),
        ("architecture", source.architecture.value, spec.architecture.value),
        *([] if source.merged else _lora_checks(checkpoint, lora)),
    ]
    for name, theirs, ours in checks:
        if theirs != ours:
            raise ConfigError(f"model.init_from={checkpoint}: {name} differs: checkpoint {theirs}, this run {ours}")
    if source.num_classes < spec.num_classes:
        raise ConfigError(f"model.init_from={checkpoint}: a {source.num_classes}-class head cannot start a "
                          f"{spec.num_classes}-class run")


def _lora_checks(checkpoint: str, lora: LoraConfig) -> list[tuple[str, object, object]]:
    adapter = json.loads((Path(checkpoint) / ADAPTER_FILES[0]).read_text())
    return [
        ("lora.r", adapter.get("r"), lora.r),
        ("lora.alpha", adapter.get("lora_alpha"), lora.alpha),
        ("lora.target_modules", sorted(adapter.get("target_modules") or []), sorted(lora.target_modules)),
        ("lora.use_dora", bool(adapter.get("use_dora")), lora.use_dora),
    ]


def _check_kind(source: ModelSpec, finetune: FineTune, checkpoint: str) -> None:
    if finetune == FineTune.full and not source.merged:
        raise ConfigError(f"model.init_from={checkpoint}: model.finetune=full starts from a merged checkpoint (a full "
                          f"fine-tuning run's, or `python -m lmsys.export` of this adapter), not an adapter")
    if finetune == FineTune.lora and source.merged:
        raise ConfigError(f"model.init_from={checkpoint}: a merged checkpoint (the whole backbone, no adapter) starts "
                          f"only a model.finetune=full run")
    if source.merged and source.quantization != Quantization.none:
        raise ConfigError(f"model.init_from={checkpoint}: a {source.quantization.value}-quantized export cannot be "
                          f"fine-tuned in full: export it with quantization=none")


def warm_start_backbone(init_from: str | None) -> str | None:
    """The directory a warm-started run loads its backbone from: a merged checkpoint's own, else None (model.path)."""
    return init_from if init_from and read_spec(init_from).merged else None


def load_warm_start(model: torch.nn.Module, checkpoint: str, backbone_loaded: bool) -> None:
    """The checkpoint's LoRA weights into the run's (trainable) adapter, unless its whole backbone was loaded already
    (`backbone_loaded`: a merged checkpoint, warm_start_backbone), and its head into the run's head."""
    if not backbone_loaded:
        adapter = load_file(str(Path(checkpoint) / ADAPTER_FILES[1]))
        loaded = set_peft_model_state_dict(model.backbone, adapter)
        if loaded.unexpected_keys:
            raise ConfigError(f"model.init_from={checkpoint}: adapter weights this model lacks, e.g. "
                              f"{loaded.unexpected_keys[:3]}")
    head = model.head.state_dict()
    # A 2-class bi-encoder head has no tie scorer: a 3-class one's is left out (check_warm_start matched the rest).
    source = {key: value for key, value in load_head_state(checkpoint).items()
              if key in head or not key.startswith("tie.")}
    # The output layer of a 3-class head: keep its A and B rows for a 2-class run (tie is the third class).
    fitted = {key: value[: head[key].shape[0]] if value.shape != head[key].shape else value
              for key, value in source.items()}
    model.head.load_state_dict(fitted)
