"""The work of `python -m lmsys.warmup` (lmsys/warmup.py, which imports this module only once its arguments are
checked): TRL's SFT or DPO trainer on a LoRA adapter, then the adapter merged into an unquantized base and saved."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import Dataset
from omegaconf import OmegaConf
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from lmsys.builders import build_tokenizer, check_position_limit
from lmsys.cli import CommandError
from lmsys.config import LoraConfig
from lmsys.data.io import DataError, read_pairs
from lmsys.data.schema import Pair
from lmsys.data.truncation import head_tail, water_fill
from lmsys.logs import setup_logging
from lmsys.modeling.backbone import checkpointing_renames_quietly, quantization_config, resolve_dtype
from lmsys.output_paths import check_output_paths
from lmsys.runs import write_file, write_json
from lmsys.warmup import DEFAULT_LR, MARKER, Stage, WarmupConfig

log = logging.getLogger("lmsys")


@dataclass
class Selection:
    """The TRL examples built from the rows, and why the others were skipped."""

    examples: list[dict]
    ties: int = 0  # argmax = tie
    uncertain: int = 0  # soft labels whose winner beats the loser by less than data.label_margin
    identical: int = 0  # both responses the same text: nothing to prefer
    shortened: int = 0  # examples whose texts were cut (head + tail) to fit max_length

    def counts(self) -> dict[str, int]:
        return {"used": len(self.examples), "skipped_ties": self.ties, "skipped_uncertain": self.uncertain,
                "skipped_identical": self.identical, "shortened": self.shortened}


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
    check_position_limit(config.max_length, model, "max_length")
    check_output_paths({"model_path": model, "data.train_path": config.data.train_path}, {"output_dir": output},
                       directory_outputs=frozenset({"output_dir"}))
    if output.exists() and not (config.overwrite and (output / MARKER).is_file()):
        raise CommandError(f"output_dir: {output} exists; choose another, or pass overwrite=true to replace an "
                           f"earlier warm-up result (a directory holding {MARKER})")
    tokenizer = build_tokenizer(model, config.trust_remote_code)
    if tokenizer.chat_template is None:
        raise CommandError(f"model_path: {model} has no chat template (the warm-up trains on conversations)")
    try:
        pairs = read_pairs(config.data.train_path, require_labels=True)[: config.data.max_pairs]
    except DataError as err:
        raise CommandError(str(err)) from err
    selection = select_examples(pairs, config.stage, config.data.label_margin)
    if not selection.examples:
        raise CommandError(f"{config.data.train_path}: no usable rows for {config.stage.value} "
                           f"({selection.counts()})")
    fit_examples(selection, tokenizer, config.max_length)
    return selection


ELLIPSIS = " [...] "
TEMPLATE_SLACK = 4  # tokens kept free: a text's tokens may merge differently with the markers around it


def fit_examples(selection: Selection, tokenizer, max_length: int) -> None:
    """Cut the texts of every example longer than max_length (head + tail of each text, the budget water-filled
    over the texts), in place: TRL keeps only the start of a long example, cutting away the answer the loss is on,
    and then drops the example. A DPO pair's shared user turns are cut alike in both conversations."""
    for k, example in enumerate(selection.examples):
        conversations = _conversations(example)
        if max(_chat_length(tokenizer, messages) for messages in conversations) <= max_length:
            continue  # most examples: one template pass each
        overhead = max(_chat_length(tokenizer, messages) - sum(map(_text_length(tokenizer), messages))
                       for messages in conversations)
        if overhead + TEMPLATE_SLACK >= max_length:
            raise CommandError(f"max_length={max_length} leaves no room for text after the chat template's "
                               f"{overhead} tokens; raise max_length")
        budget = max_length - overhead - TEMPLATE_SLACK
        while max(_chat_length(tokenizer, messages) for messages in conversations) > max_length:
            conversations = _cut(conversations, tokenizer, budget)
            budget -= TEMPLATE_SLACK  # a rare re-merge at a cut: shrink until it fits
        if conversations != _conversations(example):
            selection.examples[k] = _rebuilt(example, conversations)
            selection.shortened += 1


def _conversations(example: dict) -> list[list[dict]]:
    if "completion" in example:
        return [example["prompt"] + example["completion"]]
    return [example["chosen"], example["rejected"]]


def _rebuilt(example: dict, conversations: list[list[dict]]) -> dict:
    if "completion" in example:
        return {"prompt": conversations[0][:-1], "completion": conversations[0][-1:]}
    return {"chosen": conversations[0], "rejected": conversations[1]}


def _chat_length(tokenizer, messages: list[dict]) -> int:
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def _text_length(tokenizer):
    return lambda message: len(tokenizer(message["content"], add_special_tokens=False)["input_ids"])


def _cut(conversations: list[list[dict]], tokenizer, budget: int) -> list[list[dict]]:
    """Every conversation's texts within `budget` tokens in all: the user turns (the same in every conversation)
    and, per turn, the longest answer share it by water-filling; each text keeps its head and tail."""
    tokens = [[tokenizer(m["content"], add_special_tokens=False)["input_ids"] for m in messages]
              for messages in conversations]
    demands = [max(len(texts[i]) for texts in tokens if i < len(texts)) for i in range(max(map(len, tokens)))]
    allocation = water_fill(demands, [1.0] * len(demands), budget)
    ellipsis = tokenizer(ELLIPSIS, add_special_tokens=False)["input_ids"]
    return [[{**message, "content": tokenizer.decode(head_tail(text, allocation[i], 0.5, ellipsis))
              if len(text) > allocation[i] else message["content"]}
             for i, (message, text) in enumerate(zip(messages, texts, strict=True))]
            for messages, texts in zip(conversations, tokens, strict=True)]


def trainer_args(config: WarmupConfig, output_dir: str, dtype: torch.dtype):
    """TRL's SFTConfig / DPOConfig from ours; checkpoints are not saved (the merged model is the result)."""
    common = dict(  # noqa: C408 (the TRL configs' keyword arguments, read as such)
        output_dir=output_dir, max_steps=config.max_steps or -1, num_train_epochs=1,
        learning_rate=config.lr or DEFAULT_LR[config.stage.value], per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, max_length=config.max_length,
        # transformers 5's name; TRL's configs default the deprecated alias `gradient_checkpointing` to True, which
        # warns unless this is set (TRL reads the alias, which mirrors it)
        activation_checkpointing=config.gradient_checkpointing, logging_steps=config.logging_steps,
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
    # TRL wraps the model with peft, and DPO's reference pass switches checkpointing off and on by the old names
    with checkpointing_renames_quietly():
        trainer = trainer_class(
            model=config.model_path, args=trainer_args(config, str(work_dir / "trainer"), dtype),
            train_dataset=Dataset.from_list(selection.examples),
            processing_class=build_tokenizer(config.model_path, config.trust_remote_code),
            peft_config=peft_config(config.lora),
            quantization_config=quantization_config(config.quantization, config.double_quant, dtype),
        )
        check_kept(len(trainer.train_dataset), selection)
        trainer.train()
    trainer.model.save_pretrained(work_dir / "adapter")
    return trainer.state.log_history


def check_kept(kept: int, selection: Selection) -> None:
    """TRL drops examples it truncated to nothing to learn from; fit_examples should leave none, so say so if not."""
    dropped = len(selection.examples) - kept
    if kept == 0:
        raise CommandError(f"TRL dropped all {dropped} examples after truncating them; raise max_length")
    if dropped:
        log.warning("TRL dropped %d of %d examples after truncating them", dropped, len(selection.examples))


def merge_into_base(config: WarmupConfig, adapter_dir: Path):
    """The adapter folded into an unquantized copy of the base in merge_dtype (merging into 4-bit weights would
    round the update away): a plain causal LM, without peft."""
    base = AutoModelForCausalLM.from_pretrained(
        config.model_path, dtype=getattr(torch, config.merge_dtype.value), trust_remote_code=config.trust_remote_code,
        use_safetensors=True,
    )
    with checkpointing_renames_quietly():
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


def logged_warmup(config: WarmupConfig) -> Path:
    setup_logging()
    return run_warmup(config)
