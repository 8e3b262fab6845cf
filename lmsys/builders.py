"""Each `build_*` turns a config section into a component; the commands and the recipe pass sections, not fields,
and everything downstream takes plain typed values. The only reader of the configuration besides the schema."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoTokenizer

from lmsys.config import (
    ELEMENTWISE_OPTIONS,
    Architecture,
    Attention,
    ConfigError,
    DataConfig,
    ElementwiseKernel,
    Family,
    FineTune,
    HeadInit,
    InputFormat,
    LoraConfig,
    LoraKernel,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    SwapMode,
    TrainConfig,
    TtaMode,
)
from lmsys.data.batching import Batching
from lmsys.data.dataset import EncodedSplit
from lmsys.data.formatting import PairEncoder, ResponseEncoder
from lmsys.data.io import read_pairs
from lmsys.data.labels import require_teachers, to_classes
from lmsys.data.schema import Pair
from lmsys.data.split import split_train_valid
from lmsys.data.templates import chat_markers
from lmsys.evaluation.validation import ValidationSet
from lmsys.modeling.attention import compile_attention
from lmsys.modeling.backbone import (
    add_lora,
    check_lora_targets,
    load_adapter,
    load_backbone,
    make_trainable,
    resolve_dtype,
)
from lmsys.modeling.checkpoint import ModelSpec, load_head_state, read_spec, with_base_model
from lmsys.modeling.compile import compile_layers, compile_norms, resolve_elementwise_kernel
from lmsys.modeling.cpu_allocator import keep_freed_memory
from lmsys.modeling.families import FAMILIES, check_family, resolve_attention, resolve_template
from lmsys.modeling.gated_mlp import compile_gated_mlps
from lmsys.modeling.heads import BiEncoderHead, PreferenceHead
from lmsys.modeling.lora_kernel import resolve_lora_kernel, use_lora_kernel
from lmsys.modeling.losses import LossWeights
from lmsys.modeling.model import PreferenceModel
from lmsys.modeling.model_facts import ModelLoadError, position_limit, read_model_facts, require_weights
from lmsys.modeling.precision import predict_quantization
from lmsys.modeling.warm_start import load_warm_start, warm_start_backbone
from lmsys.prediction_config import InferenceConfig
from lmsys.training.distributed import fsdp_requested, quant_storage_dtype
from lmsys.training.loss_scaling import grad_scaler_for
from lmsys.training.optim import (
    check_sharded_optimizer,
    create_optimizer,
    parameter_groups,
    warmup_cosine_scheduler,
)
from lmsys.training.settings import LoopSettings, total_updates

log = logging.getLogger("lmsys")


def build_splits(config: TrainConfig) -> tuple[list[Pair], list[Pair]]:
    """Read and validate the training and validation pairs (before any model is loaded), with the run's classes."""
    data, num_classes = config.data, config.model.num_classes
    train = to_classes(read_pairs(data.train_path, require_labels=True), num_classes, data.ties, data.train_path)
    if data.valid_path:
        valid = to_classes(read_pairs(data.valid_path, require_labels=True), num_classes, data.ties, data.valid_path)
        warn_shared_ids(train, valid, data.train_path, data.valid_path)
    else:
        train, valid = split_train_valid(train, data.valid_fold, data.valid_fraction, data.split_seed,
                                         f"data.train_path={data.train_path}")
    if build_loss_weights(config.loss).needs_teacher:
        require_teachers(train, data.train_path)
    return train[: data.max_train_pairs], valid[: data.max_valid_pairs]


def warn_shared_ids(train: list[Pair], valid: list[Pair], train_path: str, valid_path: str) -> None:
    """Pairs in both files make the validation score partly in-sample: said once (a deliberate check on training
    data stays possible)."""
    train_ids = {pair.id for pair in train}
    shared = [pair.id for pair in valid if pair.id in train_ids]
    if shared:
        log.warning("%d of the %d validation pairs (%s) are also in data.train_path=%s by id, e.g. %s: the "
                    "validation score is not out of sample", len(shared), len(valid), valid_path, train_path,
                    shared[:3])


def build_spec(model: ModelConfig, data: DataConfig, packing: bool,
               tta_mode: TtaMode = TtaMode.prob) -> ModelSpec:
    """Check the model directory against the family (config.json only) and fix every choice left on auto;
    `tta_mode` is the run's (trainer.tta_mode), which predict then combines the orientations with."""
    facts = read_model_facts(model.path)
    require_weights(model.path, f"model.path={model.path}")
    check_family(model.family, facts.model_type, f"model.path={model.path}")
    check_position_limit(model.max_length, model.path, "model.max_length")
    return ModelSpec(
        base_model_path=str(Path(model.path).resolve()),
        facts=facts,
        family=model.family,
        template=resolve_template(model.family, model.template),
        max_length=model.max_length,
        quantization=model.quantization,
        double_quant=model.double_quant,
        compute_dtype=model.compute_dtype,
        attn_implementation=resolve_attention(model.family, facts.model_type, model.attn_implementation, packing),
        head=model.head,
        input_formats=tuple(data.formats),
        prompt_share=data.prompt_share,
        keep_first_turns=data.keep_first_turns,
        keep_last_turns=data.keep_last_turns,
        text_head_share=data.text_head_share,
        padding_side=data.padding_side,
        trust_remote_code=model.trust_remote_code,
        num_classes=model.num_classes,
        architecture=model.architecture,
        tta_mode=tta_mode,
    )


def build_prediction_spec(checkpoint: str, settings: InferenceConfig) -> ModelSpec:
    """The checkpoint's spec (checked complete) with the inference overrides; the attention kernel is re-checked
    because a checkpoint trained padded may hold one that would let packed pairs see each other."""
    spec = with_base_model(read_spec(checkpoint), checkpoint, settings.base_model_path)
    attention = settings.attn_implementation or spec.attn_implementation
    key = "max_length" if settings.max_length else f"the checkpoint's max_length ({checkpoint})"
    check_position_limit(settings.max_length or spec.max_length, spec.model_dir(checkpoint), key)
    return dataclasses.replace(
        spec,
        quantization=predict_quantization(checkpoint, spec, settings),
        max_length=settings.max_length or spec.max_length,
        input_formats=_prediction_formats(checkpoint, spec.input_formats, settings.formats),
        compute_dtype=settings.compute_dtype or spec.compute_dtype,
        attn_implementation=resolve_attention(spec.family, spec.model_type, attention,
                                              inference_packing(settings, spec.family)),
    )


def check_position_limit(max_length: int, model_dir: str | Path, key: str) -> None:
    """A max_length past the model's positions is refused before the model loads: RoPE positions it never saw
    (predictions silently degrade), or an index past a position-embedding table."""
    limit = position_limit(model_dir)
    if limit is not None and max_length > limit:
        raise ConfigError(f"{key}={max_length} exceeds the {limit} positions of the model in {model_dir} "
                          f"(max_position_embeddings in its config.json); use at most {limit}")


def inference_packing(settings: InferenceConfig, family: Family) -> bool:
    """`packing` as given, else padding-free rows except for an encoder (bidirectional attention spans a row)."""
    return settings.packing if settings.packing is not None else not FAMILIES[family].encoder


def _prediction_formats(checkpoint: str, trained: tuple[InputFormat, ...],
                        requested: list[InputFormat] | None) -> tuple[InputFormat, ...]:
    """The formats to predict in (their probabilities are averaged): `formats=` or the checkpoint's own."""
    if requested is None:
        return trained
    untrained = [fmt.value for fmt in requested if fmt not in trained]
    if untrained:
        log.warning("%s was trained on formats %s, not on %s: predicting in them anyway", checkpoint,
                    [fmt.value for fmt in trained], untrained)
    return tuple(InputFormat(fmt) for fmt in requested)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spm.model", "vocab.json",
                   "vocab.txt")


def build_tokenizer(path: str | Path, trust_remote_code: bool):
    """The directory's tokenizer; one without any tokenizer file is refused (transformers would build a few-token
    tokenizer from config.json alone, and every text would encode as nearly nothing)."""
    if Path(path).is_dir() and not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{path}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the model's "
                             f"tokenizer files into it")
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_encoders(spec: ModelSpec, tokenizer) -> list[PairEncoder]:
    """One encoder per input format of the spec, in its order (format_index k is encoder k); for a bi-encoder,
    encoders of each pair's two sequences, (prompt, A) and (prompt, B)."""
    encoder = ResponseEncoder if spec.architecture == Architecture.bi_encoder else PairEncoder
    return [
        encoder(tokenizer, chat_markers(spec.template, tokenizer), input_format, spec.max_length, spec.prompt_share,
                spec.keep_first_turns, spec.keep_last_turns, spec.text_head_share)
        for input_format in spec.input_formats
    ]


def build_model(
    spec: ModelSpec, model: ModelConfig | None, lora: LoraConfig | None, device: torch.device,
    adapter_dir: str | Path | None = None,
    device_map: dict[str, int | str] | None = None,
) -> PreferenceModel:
    """Backbone (quantized) + LoRA + our head; from a checkpoint when `adapter_dir` is given (frozen, eval).

    A merged checkpoint (spec.merged) is its own backbone: loaded from `adapter_dir`, without peft. `device_map`
    splits the backbone over devices (prediction); the head then sits on `device`.
    """
    if device.type == "cpu":
        keep_freed_memory()
    lora_kernel = None if model is None else resolve_lora_kernel(model.lora_kernel, device, fsdp_requested())
    dtype = resolve_dtype(spec.compute_dtype, device, adapter_dir if spec.merged else spec.base_model_path)
    elementwise = None if model is None else {
        option: resolve_elementwise_kernel(f"model.{option}", getattr(model, option), device, dtype, fsdp_requested(),
                                           model.torch_compile) for option in ELEMENTWISE_OPTIONS}
    # a merged checkpoint's own backbone: predicting it, or a full fine-tuning run warm-started from it
    warm_backbone = warm_start_backbone(model.init_from) if adapter_dir is None and model is not None else None
    backbone_dir = adapter_dir if spec.merged else warm_backbone or spec.base_model_path
    backbone = load_backbone(
        backbone_dir, spec.quantization, spec.double_quant, dtype,
        spec.attn_implementation.value, device, spec.trust_remote_code, quant_storage_dtype(dtype), device_map,
    )
    if adapter_dir is not None:
        peft_model = backbone.requires_grad_(False) if spec.merged else load_adapter(backbone, adapter_dir, trainable=False)
        head = _head_class(spec)(spec.hidden_size, spec.head, 0.0, HeadInit.torch_default, 1.0, spec.num_classes)
        head.load_state_dict(load_head_state(adapter_dir))
    else:
        if model.finetune == FineTune.full:
            peft_model = make_trainable(backbone, model.gradient_checkpointing)
        else:
            peft_model = add_lora(backbone, lora.r, lora.alpha, lora.dropout, lora.target_modules, lora.use_dora,
                                  model.gradient_checkpointing)
        head = _head_class(spec)(spec.hidden_size, spec.head, model.head_dropout, model.head_init,
                                 model.head_init_std, spec.num_classes)
    preference_model = PreferenceModel(peft_model, head.to(device), spec.first_token_pooling)
    if adapter_dir is None and model.init_from:
        load_warm_start(preference_model, model.init_from, backbone_loaded=warm_backbone is not None)
    if model is not None:
        _use_kernels(preference_model, model.torch_compile, lora_kernel, **elementwise)
    return preference_model


def _use_kernels(preference_model: PreferenceModel, torch_compile: bool, lora_kernel: LoraKernel,
                 norm_kernel: ElementwiseKernel, mlp_kernel: ElementwiseKernel,
                 attention_kernel: ElementwiseKernel) -> None:
    """The training model's kernels: whole layers compiled, or the LoRA, norm, MLP and attention kernels."""
    if torch_compile:
        # compiles peft's layers and the masked attention: the dense LoRA kernel and the per-sequence attention's
        # Python loop over sequences would split every layer's graph
        preference_model.passes_sequence_bounds = False
        if preference_model.pooled_tail is not None:  # its rows would be traced into the compiled last layer
            preference_model.pooled_tail.remove()
            preference_model.pooled_tail = None
        compile_layers(preference_model.backbone)
        return
    use_lora_kernel(preference_model.backbone, lora_kernel)
    use_elementwise_kernels(preference_model, norm_kernel, mlp_kernel, attention_kernel)


def use_elementwise_kernels(preference_model: PreferenceModel, norm_kernel: ElementwiseKernel,
                            mlp_kernel: ElementwiseKernel, attention_kernel: ElementwiseKernel) -> None:
    """The norm, MLP and attention kernels (resolved: compiled or eager), for training and prediction alike."""
    if norm_kernel == ElementwiseKernel.compiled:
        log.info("model.norm_kernel: %d RMSNorm modules compiled", compile_norms(preference_model.backbone))
    if mlp_kernel == ElementwiseKernel.compiled:
        log.info("model.mlp_kernel: %d gated MLPs' activations compiled",
                 compile_gated_mlps(preference_model.backbone))
    if attention_kernel == ElementwiseKernel.compiled:
        log.info("model.attention_kernel: %d attention modules' bf16 attention compiled, %d their rotary embedding",
                 *compile_attention(preference_model.backbone))


def _head_class(spec: ModelSpec) -> type[PreferenceHead | BiEncoderHead]:
    return BiEncoderHead if spec.architecture == Architecture.bi_encoder else PreferenceHead


def build_accelerator(config: TrainConfig, run_dir: str | Path) -> Accelerator:
    return Accelerator(log_with="wandb" if config.use_wandb else None, project_dir=str(run_dir))


def build_grad_scaler(model: ModelConfig, device: torch.device) -> torch.amp.GradScaler:
    return grad_scaler_for(model.compute_dtype, device.type, fsdp_requested())


def check_optimizer(optimizer: OptimizerConfig) -> None:
    check_sharded_optimizer(optimizer.name, fsdp_requested())


def check_training_attention(spec: ModelSpec, device: torch.device) -> None:
    """FlexAttention has no backward pass on CPU (torch raises at the first update, after the model loaded)."""
    if spec.attn_implementation == Attention.flex_attention and device.type == "cpu":
        raise ConfigError("model.attn_implementation=flex_attention cannot train on CPU (torch's FlexAttention has no "
                          "backward there); use sdpa")


def check_lora(model: ModelConfig, lora: LoraConfig) -> None:
    """The LoRA targets against the model's skeleton, before the run dir is claimed (full fine-tuning has none)."""
    if model.finetune == FineTune.lora:
        check_lora_targets(model.path, model.trust_remote_code, lora.target_modules)


def build_optimizer(optimizer: OptimizerConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = parameter_groups(model, optimizer.lr, optimizer.head_lr, optimizer.lora_b_lr_multiplier,
                              optimizer.weight_decay)
    return create_optimizer(groups, optimizer.name, tuple(optimizer.betas), optimizer.eps, optimizer.kahan_summation,
                            fsdp_requested())


def build_scheduler(optimizer: OptimizerConfig, torch_optimizer: torch.optim.Optimizer, total: int):
    return warmup_cosine_scheduler(torch_optimizer, total, optimizer.warmup_ratio, optimizer.min_lr_ratio)


def build_loop_settings(config: TrainConfig, spec: ModelSpec, n_train: int, world_size: int, pad_id: int) -> LoopSettings:
    trainer = config.trainer
    pairs_per_update = trainer.batch_size * trainer.grad_accum * world_size
    return LoopSettings(
        total_updates=total_updates(n_train, pairs_per_update, trainer.epochs, trainer.max_steps),
        pairs_per_update=pairs_per_update,
        swap=trainer.swap_augmentation,
        group_by_length=trainer.group_by_length,
        batching=build_train_batching(config, spec, pad_id),
        # no clipping: the norm is still measured (and logged); scaling by min(1, inf / norm) = 1 leaves the gradients
        max_grad_norm=math.inf if trainer.max_grad_norm is None else trainer.max_grad_norm,
        eval_frequency=trainer.eval_frequency,
        patience=trainer.patience,
        log_frequency=trainer.log_frequency,
        state_frequency=trainer.state_frequency,
        loss=build_loss_weights(config.loss),
        seed=config.seed,
    )


def build_loss_weights(loss: LossConfig) -> LossWeights:
    return LossWeights(loss.ce_weight, loss.kl_weight, loss.cosine_weight, loss.kl_temperature, loss.label_smoothing,
                       loss.distill_temperature)


def build_train_batching(config: TrainConfig, spec: ModelSpec, pad_id: int) -> Batching:
    """Padded micro-batches hold batch_size pairs, so as many examples as each pair contributes (two with full
    swap, times the number of data.formats); packed ones trainer.max_tokens."""
    trainer = config.trainer
    examples_per_pair = (2 if trainer.swap_augmentation == SwapMode.full else 1) * len(config.data.formats)
    return Batching(trainer.packing, trainer.max_tokens, _row_tokens(config), trainer.batch_size * examples_per_pair,
                    pad_id, config.data.padding_side, spec.attention_width)


def build_eval_batching(config: TrainConfig, spec: ModelSpec, pad_id: int) -> Batching:
    trainer = config.trainer
    return Batching(trainer.packing, trainer.eval_max_tokens, _row_tokens(config), trainer.batch_size * 2, pad_id,
                    config.data.padding_side, spec.attention_width)


def build_validation(config: TrainConfig, spec: ModelSpec, split: EncodedSplit, pad_id: int) -> ValidationSet:
    return ValidationSet(split, build_eval_batching(config, spec, pad_id), config.trainer.eval_tta,
                         config.trainer.tta_mode)


def build_inference_batching(settings: InferenceConfig, spec: ModelSpec, pad_id: int) -> Batching:
    # Rows at most one sequence wide by default: sdpa/eager attention costs the square of the row width.
    return Batching(inference_packing(settings, spec.family), settings.max_tokens,
                    settings.row_tokens or spec.max_length,
                    settings.batch_size, pad_id, spec.padding_side, spec.attention_width)


def _row_tokens(config: TrainConfig) -> int:
    return config.trainer.row_tokens or config.model.max_length
