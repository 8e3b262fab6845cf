"""SFT / DPO warm-up of a backbone on our labelled battles, before the preference head is trained on it.

    python -m lmsys.warmup stage=sft|dpo model_path=DIR data.train_path=FILE output_dir=DIR [max_steps=N]
        [lr=...] [max_length=1024] [batch_size=4] [grad_accum=1] [beta=0.1] [data.label_margin=0.1]
        [data.max_pairs=N] [lora.r=16 lora.alpha=32 ...] [quantization=none|nf4|fp4|int8] [merge_dtype=bfloat16]
    python lmsys/code/train_r_llama.py --config-name conf_r_llama_smol model.path=DIR

TRL's SFTTrainer / DPOTrainer train a LoRA adapter (peft; on a 4-bit base with quantization=nf4); the adapter is
then merged into an unquantized copy of the base, saved as a full model directory (config.json, safetensors,
tokenizer, warmup.json) that `model.path=` takes like any base.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import Dataset
from omegaconf import MISSING, OmegaConf
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from lmsys.builders import build_tokenizer
from lmsys.cli import CommandError, run_command
from lmsys.config import ComputeDtype, LoraConfig, Quantization, choices, require
from lmsys.data.io import DataError, read_pairs
from lmsys.data.schema import Pair
from lmsys.modeling.backbone import quantization_config, resolve_dtype
from lmsys.prediction_config import MergeDtype
from lmsys.logs import setup_logging
from lmsys.runs import write_file, write_json

log = logging.getLogger("lmsys")
MARKER = "warmup.json"  # written into every output_dir: overwrite=true replaces only directories that hold it
# LoRA learning rates by stage (TRL's defaults, 2e-5 and 1e-6, are meant for full fine-tuning)
DEFAULT_LR = {"sft": 1e-4, "dpo": 5e-6}

USAGE = __doc__ + """
Keys:
  stage            sft: prompt -> the winning response (loss on the response only);
                   dpo: winner = chosen, loser = rejected (TRL's sigmoid DPO loss, `beta`, the frozen base as the
                   reference: the adapter switched off)
  data.train_path  labelled rows in any schema read_pairs accepts (Kaggle CSV, WSDM parquet, soft `label`)
  data.label_margin  which side won: the larger of P(A), P(B) when it is the argmax and beats the other by at
                   least this margin; ties (argmax = tie) and closer soft labels are skipped and counted
  max_steps        optimizer updates (default: one epoch)
  lr               default 1e-4 (sft) / 5e-6 (dpo), linear decay
  quantization     of the base during training (QLoRA); the adapter is always merged into an unquantized base
  merge_dtype      bfloat16 | float32: the dtype of the merged weights
"""


Stage = choices("Stage", "sft dpo")


@dataclass
class WarmupDataConfig:
    train_path: str = MISSING
    label_margin: float = 0.1
    max_pairs: int | None = None

    def __post_init__(self) -> None:
        require(0.0 <= self.label_margin <= 1.0, "data.label_margin must be in [0, 1]")
        require(self.max_pairs is None or self.max_pairs >= 1, "data.max_pairs must be >= 1")


@dataclass
class WarmupConfig:
    stage: Stage = MISSING
    model_path: str = MISSING  # a local causal LM directory with a chat template
    output_dir: str = MISSING  # the merged model directory to create
    data: WarmupDataConfig = field(default_factory=WarmupDataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: Quantization = Quantization.none
    double_quant: bool = True
    compute_dtype: ComputeDtype = ComputeDtype.auto  # auto: bfloat16 on GPU, float32 on CPU
    merge_dtype: MergeDtype = MergeDtype.bfloat16
    max_steps: int | None = None
    lr: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 1024  # tokens of prompt + response; longer ones are cut at the end
    beta: float = 0.1  # dpo: strength of the pull towards the reference
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    seed: int = 0
    overwrite: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        require(self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1")
        require(self.lr is None or self.lr > 0, "lr must be positive")
        require(self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1")
        require(self.max_length >= 16, "max_length must be at least 16")
        require(self.beta > 0, "beta must be positive")
        require(self.logging_steps >= 1, "logging_steps must be >= 1")


@dataclass
class Selection:
    """The TRL examples built from the rows, and why the others were skipped."""

    examples: list[dict]
    ties: int = 0  # argmax = tie
    uncertain: int = 0  # soft labels whose winner beats the loser by less than data.label_margin
    identical: int = 0  # both responses the same text: nothing to prefer

    def counts(self) -> dict[str, int]:
        return {"used": len(self.examples), "skipped_ties": self.ties, "skipped_uncertain": self.uncertain,
                "skipped_identical": self.identical}


def winning_side(target: tuple[float, float, float], margin: float) -> str:
    """'a', 'b', 'tie' (argmax is the tie) or 'uncertain' (P(winner) - P(loser) < margin)."""
    p_a, p_b, p_tie = target
    if p_tie >= max(p_a, p_b):
        return "tie"
    if abs(p_a - p_b) < margin:
        return "uncertain"
    return "a" if p_a > p_b else "b"


def conversation(prompts: tuple[str, ...], responses: tuple[str, ...]) -> list[dict]:
    messages = []
    for user, assistant in zip(prompts, responses, strict=False):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


def sft_example(pair: Pair, side: str) -> dict:
    """Prompt = the conversation up to the last user turn, with the winner's own earlier answers; completion =
    the winner's last answer (the loss covers it only)."""
    messages = conversation(pair.prompts, pair.responses_a if side == "a" else pair.responses_b)
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def dpo_example(pair: Pair, side: str) -> dict:
    """Both whole conversations; TRL takes their common beginning as the prompt (the first user turn of a
    multi-turn battle, whose later answers differ), so the vote compares the conversations the user saw."""
    a, b = conversation(pair.prompts, pair.responses_a), conversation(pair.prompts, pair.responses_b)
    return {"chosen": a, "rejected": b} if side == "a" else {"chosen": b, "rejected": a}


def select_examples(pairs: list[Pair], stage: Stage, margin: float) -> Selection:
    selection = Selection(examples=[])
    build = sft_example if stage == Stage.sft else dpo_example
    for pair in pairs:
        side = winning_side(pair.target, margin)
        if side == "tie":
            selection.ties += 1
        elif side == "uncertain":
            selection.uncertain += 1
        elif pair.responses_a == pair.responses_b:
            selection.identical += 1
        else:
            selection.examples.append(build(pair, side))
    return selection


def check_inputs(config: WarmupConfig) -> Selection:
    """The output path, the model directory (config.json, chat template) and every data row, before training."""
    output, model = Path(config.output_dir), Path(config.model_path)
    if not (model / "config.json").is_file():
        raise CommandError(f"model_path: {model} is not a model directory (no config.json)")
    if output.resolve() == model.resolve():
        raise CommandError("output_dir must differ from model_path")
    if output.exists() and not (config.overwrite and (output / MARKER).is_file()):
        raise CommandError(f"output_dir: {output} exists; choose another, or pass overwrite=true to replace an "
                           f"earlier warm-up result (a directory holding {MARKER})")
    if build_tokenizer(model, config.trust_remote_code).chat_template is None:
        raise CommandError(f"model_path: {model} has no chat template (the warm-up trains on conversations)")
    try:
        pairs = read_pairs(config.data.train_path, require_labels=True)[: config.data.max_pairs]
    except DataError as err:
        raise CommandError(str(err)) from err
    selection = select_examples(pairs, config.stage, config.data.label_margin)
    if not selection.examples:
        raise CommandError(f"{config.data.train_path}: no usable rows for {config.stage.value} "
                           f"({selection.counts()})")
    return selection


def trainer_args(config: WarmupConfig, output_dir: str, dtype: torch.dtype):
    """TRL's SFTConfig / DPOConfig from ours; checkpoints are not saved (the merged model is the result)."""
    common = dict(
        output_dir=output_dir, max_steps=config.max_steps or -1, num_train_epochs=1,
        learning_rate=config.lr or DEFAULT_LR[config.stage.value], per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, max_length=config.max_length,
        gradient_checkpointing=config.gradient_checkpointing, logging_steps=config.logging_steps,
        save_strategy="no", report_to="none", seed=config.seed, bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, model_init_kwargs={"dtype": dtype}, trust_remote_code=config.trust_remote_code,
        truncation_mode="keep_start", disable_tqdm=True, dataloader_pin_memory=torch.cuda.is_available(),
    )
    if config.stage == Stage.sft:
        return SFTConfig(**common, completion_only_loss=True, packing=False)
    return DPOConfig(**common, beta=config.beta)


def peft_config(lora: LoraConfig) -> PeftLoraConfig:
    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
                      use_dora=lora.use_dora, task_type="CAUSAL_LM")


def train_adapter(config: WarmupConfig, selection: Selection, work_dir: Path) -> list[dict]:
    """Train the LoRA adapter with TRL and save it to work_dir/adapter; returns TRL's log history."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(config.compute_dtype, device, config.model_path)
    trainer_class = SFTTrainer if config.stage == Stage.sft else DPOTrainer
    trainer = trainer_class(
        model=config.model_path, args=trainer_args(config, str(work_dir / "trainer"), dtype),
        train_dataset=Dataset.from_list(selection.examples),
        processing_class=build_tokenizer(config.model_path, config.trust_remote_code),
        peft_config=peft_config(config.lora),
        quantization_config=quantization_config(config.quantization, config.double_quant, dtype),
    )
    trainer.train()
    trainer.model.save_pretrained(work_dir / "adapter")
    return trainer.state.log_history


def merge_into_base(config: WarmupConfig, adapter_dir: Path):
    """The adapter folded into an unquantized copy of the base in merge_dtype (merging into 4-bit weights would
    round the update away): a plain causal LM, without peft."""
    base = AutoModelForCausalLM.from_pretrained(
        config.model_path, dtype=getattr(torch, config.merge_dtype.value), trust_remote_code=config.trust_remote_code,
        use_safetensors=True,
    )
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def save_result(config: WarmupConfig, model, selection: Selection, history: list[dict]) -> Path:
    output = Path(config.output_dir)
    record = {"stage": config.stage.value, "base_model": str(Path(config.model_path).resolve()),
              "data": config.data.train_path, "rows": selection.counts(), "log_history": history,
              "config": OmegaConf.to_container(OmegaConf.structured(config), enum_to_str=True)}

    def produce(tmp: Path) -> None:
        model.save_pretrained(tmp)
        build_tokenizer(config.model_path, config.trust_remote_code).save_pretrained(tmp)
        write_json(tmp / MARKER, record)

    write_file(output, produce)
    return output


def run_warmup(config: WarmupConfig) -> Path:
    selection = check_inputs(config)
    log.info("%s on %s: %s", config.stage.value, config.data.train_path, selection.counts())
    parent = Path(config.output_dir).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    processes = PartialState()  # under accelerate launch TRL trains on every process; the main one writes
    with tempfile.TemporaryDirectory(prefix=".warmup.", dir=parent) as work:
        history = train_adapter(config, selection, Path(work))
        if processes.is_main_process:
            save_result(config, merge_into_base(config, Path(work) / "adapter"), selection, history)
        processes.wait_for_everyone()
    output = Path(config.output_dir)
    log.info("wrote %s (%s warm-up of %s, %s)", output, config.stage.value, config.model_path,
             dataclasses.asdict(config.lora) | {"quantization": config.quantization.value})
    return output


def main(argv: list[str] | None = None) -> Path:
    return run_command(WarmupConfig, USAGE, _logged_warmup, argv)


def _logged_warmup(config: WarmupConfig) -> Path:
    setup_logging()
    return run_warmup(config)


if __name__ == "__main__":
    main()
