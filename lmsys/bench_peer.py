"""The benchmark's peer: what a user would write with the HF stack instead of this framework. transformers' Trainer
+ AutoModelForSequenceClassification(num_labels=3) + peft LoRA (the same rank, alpha, dropout and targets) on the
same 4-bit base, DataCollatorWithPadding, the same pairs as the same token ids (lmsys's PairEncoder, so the inputs
are identical), the same max_length, micro-batch size, gradient accumulation and learning rate.

    hf_trainer_typical  peft's k-bit recipe (prepare_model_for_kbit_training: gradient checkpointing on, norms and
                        embeddings upcast to fp32), random order: the script of most QLoRA tutorials
    hf_trainer_strong   no checkpointing (the model fits), train_sampling_strategy="group_by_length": the best the
                        stock Trainer offers against padding

Both compute in `bench.peer_dtype` (auto: the faster of fp32 and bf16 on this CPU, as for our modes; bf16 on
CUDA), with `bf16=True` in TrainingArguments when that is bf16, as QLoRA scripts set it. Counted like our modes:
real (non-pad) tokens trained per second in one epoch (every pair once) after `bench.warmup_updates` updates (at
most an epoch's), the matmul rate just before and after its training, padding share, peak RSS; prediction
with Trainer.predict in batches of `bench.predict_batch_size` pairs, single pass (A, B) and TTA (A, B then B, A).
"""

from __future__ import annotations

import resource
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import PartialState
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from lmsys.config import Quantization, TrainConfig
from lmsys.roofline import ProjectionShapes, rate_around

N_CLASSES = 3  # the peer is the LMSYS three-class model
REENTRANT = {"use_reentrant": True}  # the typical peer's checkpointing, as peft's recipe runs it by default


@dataclass(frozen=True)
class PeerVariant:
    kbit_recipe: bool  # peft.prepare_model_for_kbit_training, which turns gradient checkpointing on
    sampling: str  # TrainingArguments.train_sampling_strategy


PEER_VARIANTS = {
    "hf_trainer_typical": PeerVariant(kbit_recipe=True, sampling="random"),
    "hf_trainer_strong": PeerVariant(kbit_recipe=False, sampling="group_by_length"),
}


def measure_peer(config: TrainConfig, mode: str) -> dict:
    """Train the peer over the pairs once (after warm-up updates) and predict them, single pass and with TTA."""
    from lmsys.builders import build_encoders, build_spec, build_tokenizer
    from lmsys.data.dataset import encode_split
    from lmsys.data.io import read_pairs
    from lmsys.modeling.backbone import resolve_dtype

    variant = PEER_VARIANTS[mode]
    pairs = read_pairs(config.data.train_path, require_labels=True)[: config.bench.n_pairs]
    spec = build_spec(config.model, config.data, packing=False)
    tokenizer = build_tokenizer(config.model.path, config.model.trust_remote_code)
    tokenizer.padding_side = config.data.padding_side.value
    split = encode_split(pairs, build_encoders(spec, tokenizer))
    device = PartialState().device
    dtype = resolve_dtype(config.bench.peer_dtype, device, config.model.path)
    model = build_peer_model(config, spec.attn_implementation.value, tokenizer.pad_token_id, dtype, variant, device)
    with tempfile.TemporaryDirectory(prefix="lmsys-bench-peer-") as output_dir:
        trainer = _CountingTrainer(
            model=model, args=peer_arguments(config, variant, len(split), dtype, device, output_dir),
            train_dataset=rows(split.forward, with_labels=True), data_collator=DataCollatorWithPadding(tokenizer),
        )
        clock = StepClock()
        trainer.add_callback(clock)
        trainer.remove_callback(PrinterCallback)  # its end-of-training summary would interleave with the table
        gflops = train_peer(trainer, config, len(split), dtype, device)
        train = trainer.counted(clock)
        predict = _time_prediction(trainer, split, config.bench.warmup_pairs)
    return {**train, **predict, "train_matmul_gflops": gflops,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "compute_dtype": str(dtype).removeprefix("torch."),
            "gradient_checkpointing": model.get_base_model().is_activation_checkpointing}


def build_peer_model(config: TrainConfig, attention: str, pad_id: int, dtype: torch.dtype, variant: PeerVariant,
                     device: torch.device):
    """The stock model: the library's classification head (`score`, trained via modules_to_save) on the last
    non-pad token, LoRA on the same targets; bitsandbytes' own CPU inference path left as it is."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from lmsys.modeling.backbone import quantization_config

    model = AutoModelForSequenceClassification.from_pretrained(
        config.model.path, num_labels=N_CLASSES,
        quantization_config=quantization_config(config.model.quantization, config.model.double_quant, dtype),
        dtype=dtype, attn_implementation=attention, device_map={"": device},
        trust_remote_code=config.model.trust_remote_code, use_safetensors=True,
    )
    model.config.pad_token_id = pad_id
    model.config.use_cache = False
    if variant.kbit_recipe and config.model.quantization != Quantization.none:
        # use_gradient_checkpointing=True, its default; reentrant as torch's checkpoint does when not told (said
        # explicitly: torch warns that it will require the argument)
        model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs=REENTRANT)
    elif variant.kbit_recipe:  # an unquantized base: what the recipe does for checkpointing, without the casts
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=REENTRANT)
        model.enable_input_require_grads()
    lora = config.lora
    return get_peft_model(model, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
        use_dora=lora.use_dora, bias="none", task_type="SEQ_CLS",
    ))


def train_peer(trainer: _CountingTrainer, config: TrainConfig, n_pairs: int, dtype: torch.dtype,
               device: torch.device) -> float:
    """The warm-up updates (at most an epoch's, as our modes'), then one whole epoch, timed: every pair once, as in
    our modes' timed epoch (a window of updates running on into a second epoch would count some pairs twice and
    others not at all). Returns the matmul rate measured around the timed epoch."""
    pairs_per_update = config.trainer.batch_size * config.trainer.grad_accum
    warmup = min(config.bench.warmup_updates, -(-n_pairs // pairs_per_update))
    if warmup:
        trainer.args.max_steps = warmup
        trainer.train()
    trainer.args.max_steps = -1  # num_train_epochs=1
    trainer.micro_batches.clear()
    _, gflops = rate_around(trainer.train, ProjectionShapes.from_model_dir(config.model.path), dtype,
                            config.bench.roofline_tokens, device)
    return gflops


def peer_arguments(config: TrainConfig, variant: PeerVariant, n_pairs: int, dtype: torch.dtype, device: torch.device,
                   output_dir: str) -> TrainingArguments:
    """One epoch over the pairs (`train_peer` runs the warm-up first); nothing saved, logged or evaluated during
    training."""
    trainer, optimizer = config.trainer, config.optimizer
    return TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=trainer.batch_size,
        gradient_accumulation_steps=trainer.grad_accum, num_train_epochs=1,
        learning_rate=optimizer.lr, weight_decay=optimizer.weight_decay, warmup_steps=optimizer.warmup_ratio,
        max_grad_norm=trainer.max_grad_norm, train_sampling_strategy=variant.sampling,
        bf16=dtype == torch.bfloat16, use_cpu=device.type == "cpu", per_device_eval_batch_size=config.bench.predict_batch_size,
        seed=config.seed, report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0,
    )


def rows(examples, with_labels: bool) -> list[dict]:
    """The Trainer's dataset: the encoded token ids unpadded (the collator pads), the label the target's argmax."""
    if with_labels:
        return [{"input_ids": ex.ids.tolist(), "labels": int(np.argmax(ex.target))} for ex in examples]
    return [{"input_ids": ex.ids.tolist()} for ex in examples]


class StepClock(TrainerCallback):
    """The time at the start of training and at the end of each optimizer update."""

    def __init__(self) -> None:
        self.begin = 0.0
        self.update_ends: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = time.perf_counter()
        self.update_ends = []  # the timed call's alone

    def on_step_end(self, args, state, control, **kwargs):
        self.update_ends.append(time.perf_counter())


class _CountingTrainer(Trainer):
    """Records the real and padded token counts of each micro-batch it trains on, with the update it belongs to."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.micro_batches: list[tuple[int, int, int]] = []  # (update index from 0, real tokens, tokens with pads)

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs["attention_mask"]  # (B, T): 1 on real tokens
        self.micro_batches.append((self.state.global_step, int(mask.sum()), mask.numel()))
        return super().training_step(model, inputs, num_items_in_batch)

    def counted(self, clock: StepClock) -> dict:
        """The last `train` call's updates: tokens and seconds from its start to its last update's end."""
        seconds = clock.update_ends[-1] - clock.begin
        timed = [(real, total) for _, real, total in self.micro_batches]
        real_tokens = sum(real for real, _ in timed)
        return {"train_seconds": seconds, "train_updates": len(clock.update_ends), "train_real_tokens": real_tokens,
                "train_real_tokens_per_s": real_tokens / seconds,
                "train_padding_share": 1.0 - real_tokens / sum(total for _, total in timed)}


def _time_prediction(trainer: Trainer, split, warmup_pairs: int) -> dict:
    if warmup_pairs:  # untimed, as our modes' warm-up
        trainer.predict(rows(split.forward[:warmup_pairs], with_labels=False))
    start = time.perf_counter()
    trainer.predict(rows(split.forward, with_labels=False))
    single = time.perf_counter() - start
    trainer.predict(rows(split.swapped, with_labels=False))
    both = time.perf_counter() - start
    return {"predict_single_seconds": single, "predict_single_pairs_per_s": len(split) / single,
            "predict_seconds": both, "predict_pairs_per_s": len(split) / both}
