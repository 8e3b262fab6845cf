"""The only place that reads the configuration: each `build_*` turns a config section into a component."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoTokenizer

from lmsys.config import Attention, DataConfig, HeadInit, LoraSettings, ModelConfig, TrainConfig
from lmsys.data.formatting import PairEncoder
from lmsys.data.io import read_pairs
from lmsys.data.schema import Pair
from lmsys.data.split import split_train_valid
from lmsys.data.templates import CHAT_MARKERS
from lmsys.evaluation.predict_loop import InferenceBatching
from lmsys.modeling.backbone import add_lora, load_adapter, load_backbone, read_model_type, resolve_dtype
from lmsys.modeling.checkpoint import ModelSpec, load_head_state
from lmsys.modeling.families import attention_width, check_family, resolve_attention, resolve_template
from lmsys.modeling.heads import PreferenceHead
from lmsys.modeling.model import PreferenceModel
from lmsys.training.plan import Batching

log = logging.getLogger("lmsys")


def build_splits(data: DataConfig) -> tuple[list[Pair], list[Pair]]:
    """Read and validate the training and validation pairs (before any model is loaded)."""
    train = read_pairs(data.train_path, require_labels=True)
    if data.valid_path:
        valid = read_pairs(data.valid_path, require_labels=True)
    else:
        train, valid = split_train_valid(train, data.valid_fold, data.valid_fraction, data.split_seed)
    return train[: data.max_train_pairs], valid[: data.max_valid_pairs]


def build_spec(model: ModelConfig, data: DataConfig, packing: bool) -> ModelSpec:
    """Check the model directory against the family (config.json only) and fix every choice left on auto."""
    model_type = read_model_type(model.path)
    check_family(model.family, model_type, f"model.path={model.path}")
    return ModelSpec(
        base_model_path=str(Path(model.path).resolve()),
        model_type=model_type,
        family=model.family,
        template=resolve_template(model.family, model.template),
        max_length=model.max_length,
        quantization=model.quantization,
        double_quant=model.double_quant,
        compute_dtype=model.compute_dtype,
        attn_implementation=type(model.attn_implementation)(
            resolve_attention(model.family, model_type, model.attn_implementation, packing)
        ),
        head=model.head,
        hidden_size=_hidden_size(model.path),
        input_format=data.format,
        prompt_share=data.prompt_share,
        keep_first_turns=data.keep_first_turns,
        keep_last_turns=data.keep_last_turns,
        head_fraction=data.head_fraction,
        padding_side=data.padding_side,
        trust_remote_code=model.trust_remote_code,
    )


def _hidden_size(path: str) -> int:
    config = json.loads((Path(path) / "config.json").read_text())
    return config.get("text_config", config)["hidden_size"]


def build_tokenizer(path: str | Path, trust_remote_code: bool):
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_encoder(spec: ModelSpec, tokenizer) -> PairEncoder:
    return PairEncoder(
        tokenizer, CHAT_MARKERS[spec.template], spec.input_format, spec.max_length, spec.prompt_share,
        spec.keep_first_turns, spec.keep_last_turns, spec.head_fraction,
    )


def build_model(
    spec: ModelSpec, model: ModelConfig | None, lora: LoraSettings | None, device: torch.device, adapter_dir: str | Path | None = None,
    device_map: dict[str, int | str] | None = None,
) -> PreferenceModel:
    """Backbone (quantized) + LoRA + our head; from a checkpoint when `adapter_dir` is given (frozen, eval).

    A merged checkpoint (spec.merged) is its own backbone: loaded from `adapter_dir`, without peft. `device_map`
    splits the backbone over devices (prediction); the head then sits on `device`.
    """
    dtype = resolve_dtype(spec.compute_dtype, device)
    backbone = load_backbone(
        adapter_dir if spec.merged else spec.base_model_path, spec.quantization, spec.double_quant, dtype,
        spec.attn_implementation.value, device, spec.trust_remote_code, device_map,
    )
    if adapter_dir is not None:
        peft_model = backbone.requires_grad_(False) if spec.merged else load_adapter(backbone, adapter_dir, trainable=False)
        head = PreferenceHead(spec.hidden_size, spec.head, 0.0, HeadInit.torch_default, 1.0)
        head.load_state_dict(load_head_state(adapter_dir))
    else:
        peft_model = add_lora(
            backbone, lora.r, lora.alpha, lora.dropout, lora.target_modules, lora.use_dora, model.gradient_checkpointing
        )
        head = PreferenceHead(spec.hidden_size, spec.head, model.head_dropout, model.head_init, model.head_init_std)
    preference_model = PreferenceModel(peft_model, head.to(device))
    if model is not None and model.torch_compile:
        preference_model.backbone = torch.compile(preference_model.backbone)
    return preference_model


def build_accelerator(config: TrainConfig, run_dir: str | Path) -> Accelerator:
    return Accelerator(log_with="wandb" if config.use_wandb else None, project_dir=str(run_dir))


def build_train_batching(config: TrainConfig) -> Batching:
    trainer = config.trainer
    return Batching(trainer.packing, trainer.max_tokens, row_tokens(config), trainer.batch_size, trainer.group_by_length,
                    build_attention_width(config))


def build_attention_width(config: TrainConfig) -> float | None:
    model = config.model
    attention = resolve_attention(model.family, read_model_type(model.path), model.attn_implementation,
                                  config.trainer.packing)
    return attention_width(model.path, Attention(attention))


def row_tokens(config: TrainConfig) -> int:
    return config.trainer.row_tokens or config.model.max_length


def build_eval_batching(config: TrainConfig, pad_id: int) -> InferenceBatching:
    return InferenceBatching(
        config.trainer.packing, config.trainer.eval_max_tokens, row_tokens(config), config.trainer.batch_size * 2,
        pad_id, config.data.padding_side, build_attention_width(config),
    )
