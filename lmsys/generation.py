"""The work of `python -m lmsys.generate` (lmsys/generate.py, which imports this module only once its arguments
are checked): answer prompts with two different local models each and write the pairs."""

from __future__ import annotations

import gc
import importlib.util
import logging
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import AutoModelForCausalLM, set_seed

from lmsys.builders import build_tokenizer
from lmsys.cli import CommandError
from lmsys.data.io import DataError, read_prompts
from lmsys.generate import Engine, GenerateConfig, Sampling, model_name
from lmsys.logs import setup_logging
from lmsys.modeling.backbone import resolve_dtype
from lmsys.modeling.model_facts import position_limit, require_weights
from lmsys.output_paths import check_output_paths
from lmsys.runs import write_file

log = logging.getLogger("lmsys")
SOURCE = "generated"
# Plain rendering for models without a chat template (template_fallback=true); generation stops at the next "User:".
PLAIN_USER, PLAIN_ASSISTANT, PLAIN_STOP = "User: ", "Assistant:", "\nUser:"
TURN_MARK = "\u2063lmsys-answer\u2063"  # a text no template alters, to find what follows an assistant turn


def draw_model_pairs(n_prompts: int, n_models: int, seed: int) -> np.ndarray:
    """(n_prompts, 2) model indices: two different models per prompt, in a random order (A, B)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(n_models, size=2, replace=False) for _ in range(n_prompts)])


def chat_messages(user_turns: tuple[str, ...], answers: list[str]) -> list[dict]:
    """The conversation so far: user turns interleaved with the model's own earlier answers."""
    messages = []
    for k, user in enumerate(user_turns):
        messages.append({"role": "user", "content": user})
        if k < len(answers):
            messages.append({"role": "assistant", "content": answers[k]})
    return messages


def prompt_budget(path: str, config: GenerateConfig) -> int:
    """The prompt tokens a model answers from: max_prompt_tokens, less where the model's positions cannot hold them
    and max_new_tokens (a longer prompt keeps its last tokens rather than run past the positions)."""
    limit = position_limit(path)
    return config.max_prompt_tokens if limit is None else min(config.max_prompt_tokens, limit - config.max_new_tokens)


def render_prompt_ids(tokenizer, messages: list[dict], max_prompt_tokens: int) -> list[int]:
    """Token ids ending where the answer starts: the chat template with its generation prompt, or the plain
    'User:'/'Assistant:' layout for a tokenizer without one; longer prompts keep their last tokens."""
    if tokenizer.chat_template is not None:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template holds its special tokens
    else:
        lines = [(PLAIN_USER if m["role"] == "user" else f"{PLAIN_ASSISTANT} ") + m["content"] for m in messages]
        ids = tokenizer("\n\n".join([*lines, PLAIN_ASSISTANT]))["input_ids"]
    return ids[-max_prompt_tokens:]


def stop_token_ids(tokenizer, model_eos: int | list[int] | None) -> list[int]:
    """The model's eos ids, its tokenizer's, and the special token its chat template closes an assistant turn
    with (<end_of_turn>, <|im_end|>, <|eot_id|>): a model whose generation_config lists only <eos> would
    otherwise write past the end of its turn."""
    ids = [model_eos] if isinstance(model_eos, int) else list(model_eos or [])
    ids.append(tokenizer.eos_token_id)
    if tokenizer.chat_template is not None:
        messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": TURN_MARK}]
        after = tokenizer.apply_chat_template(messages, tokenize=False).split(TURN_MARK, 1)[1]
        following = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
        ids += [i for i in following if i in tokenizer.all_special_ids or i in tokenizer.added_tokens_decoder]
    return sorted({i for i in ids if i is not None})


def clean_answer(text: str, plain: bool) -> str:
    return (text.split(PLAIN_STOP)[0] if plain else text).strip()


class HfEngine:
    """transformers generate on batches of similar length, left-padded so that every answer starts at the end."""

    def __init__(self, path: str, tokenizer, config: GenerateConfig) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=resolve_dtype(config.compute_dtype, self.device, path), device_map={"": self.device},
            trust_remote_code=config.trust_remote_code, use_safetensors=True,
        ).eval()
        self.tokenizer, self.config, self.budget = tokenizer, config, prompt_budget(path, config)
        self.tokenizer.padding_side = "left"
        self.plain = tokenizer.chat_template is None
        self.stop_ids = stop_token_ids(tokenizer, self.model.generation_config.eos_token_id)

    def respond(self, conversations: list[list[dict]]) -> list[str]:
        ids = [render_prompt_ids(self.tokenizer, c, self.budget) for c in conversations]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: little padding
        answers: list[str] = [""] * len(ids)
        for start in range(0, len(order), self.config.batch_size):
            chunk = order[start : start + self.config.batch_size]
            for i, text in zip(chunk, self._generate([ids[i] for i in chunk]), strict=True):
                answers[i] = clean_answer(text, self.plain)
        return answers

    @torch.no_grad()
    def _generate(self, batch_ids: list[list[int]]) -> list[str]:
        batch = self.tokenizer.pad({"input_ids": batch_ids}, return_tensors="pt").to(self.device)  # (B, T) left
        sample = self.config.sampling == Sampling.sample
        out = self.model.generate(
            **batch, max_new_tokens=self.config.max_new_tokens, do_sample=sample,
            temperature=self.config.temperature if sample else None, top_p=self.config.top_p if sample else None,
            top_k=None, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.stop_ids,
            **({"stop_strings": [PLAIN_STOP], "tokenizer": self.tokenizer} if self.plain else {}),
        )  # (B, T + new)
        return self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    def close(self) -> None:
        del self.model
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class VllmEngine:
    """vLLM over the same rendered token ids (so both engines see identical prompts)."""

    def __init__(self, path: str, tokenizer, config: GenerateConfig) -> None:
        from vllm import LLM, SamplingParams

        self.tokenizer, self.config, self.budget = tokenizer, config, prompt_budget(path, config)
        self.plain = tokenizer.chat_template is None
        self.llm = LLM(model=path, seed=config.seed, trust_remote_code=config.trust_remote_code,
                       max_model_len=self.budget + config.max_new_tokens)
        sample = config.sampling == Sampling.sample
        self.params = SamplingParams(
            temperature=config.temperature if sample else 0.0, top_p=config.top_p if sample else 1.0,
            max_tokens=config.max_new_tokens, seed=config.seed, stop=[PLAIN_STOP] if self.plain else None,
            stop_token_ids=stop_token_ids(tokenizer, self.llm.get_tokenizer().eos_token_id),
        )

    def respond(self, conversations: list[list[dict]]) -> list[str]:
        prompts = [{"prompt_token_ids": render_prompt_ids(self.tokenizer, c, self.budget)}
                   for c in conversations]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        return [clean_answer(output.outputs[0].text, self.plain) for output in outputs]

    def close(self) -> None:
        del self.llm
        gc.collect()
        torch.cuda.empty_cache()


ENGINES = {Engine.hf: HfEngine, Engine.vllm: VllmEngine}


def answer_conversations(engine, prompts: list[tuple[str, ...]]) -> list[list[str]]:
    """One answer per user turn: turn k of every prompt that has it, in one engine call, after the model's own
    answers to the earlier turns."""
    answers: list[list[str]] = [[] for _ in prompts]
    for turn in range(max(len(p) for p in prompts)):
        active = [i for i, p in enumerate(prompts) if len(p) > turn]
        conversations = [chat_messages(prompts[i][: turn + 1], answers[i]) for i in active]
        for i, text in zip(active, engine.respond(conversations), strict=True):
            answers[i].append(text)
    return answers


def check_inputs(config: GenerateConfig) -> tuple[list[tuple[str, tuple[str, ...]]], list]:
    """Everything that can be wrong, found before a model is loaded: the prompts, the output path, the engine,
    each model directory and its chat template. Returns the prompts and the tokenizers."""
    output = Path(config.output)
    check_output_paths({"prompts": config.prompts, **{f"models[{k}]": path for k, path in enumerate(config.models)}},
                       {"output": output})
    if output.exists() and not config.overwrite:
        raise CommandError(f"{output} exists; choose another output or pass overwrite=true")
    if config.engine == Engine.vllm and importlib.util.find_spec("vllm") is None:
        raise CommandError("engine=vllm needs the vllm package (pip install vllm, on a GPU machine); "
                           "engine=hf runs everywhere")
    try:
        prompts = read_prompts(config.prompts)
    except DataError as err:
        raise CommandError(str(err)) from err
    return prompts, [_checked_tokenizer(path, config) for path in config.models]


def _checked_tokenizer(path: str, config: GenerateConfig):
    """The model directory's tokenizer, once config.json, the weights and the tokenizer's files are known there."""
    if not (Path(path) / "config.json").is_file():
        raise CommandError(f"models: {path} is not a model directory (no config.json)")
    require_weights(path, f"models: {path}")
    if prompt_budget(path, config) < 1:
        raise CommandError(f"models: {path} has {position_limit(path)} positions, which max_new_tokens="
                           f"{config.max_new_tokens} fills without a prompt; lower max_new_tokens")
    tokenizer = build_tokenizer(path, config.trust_remote_code)
    if tokenizer.chat_template is None and not config.template_fallback:
        raise CommandError(f"models: {path} has no chat template; pass template_fallback=true to prompt it with "
                           f"plain 'User:'/'Assistant:' text")
    return tokenizer


def generate_pairs(config: GenerateConfig, prompts: list[tuple[str, tuple[str, ...]]], tokenizers: list) -> pd.DataFrame:
    """Each model loaded once, in turn, answering every prompt it was drawn for (as A or as B)."""
    pairs = draw_model_pairs(len(prompts), len(config.models), config.seed)  # (N, 2)
    responses: dict[tuple[int, int], list[str]] = {}  # (prompt index, side) -> turns
    for m, (path, tokenizer) in enumerate(zip(config.models, tokenizers, strict=True)):
        jobs = [(i, side) for i in range(len(prompts)) for side in (0, 1) if pairs[i, side] == m]
        if not jobs:
            continue
        log.info("%s answers %d prompts (%s engine)", model_name(path), len(jobs), config.engine.value)
        set_seed(config.seed + m)
        engine = ENGINES[config.engine](path, tokenizer, config)
        for job, answer in zip(jobs, answer_conversations(engine, [prompts[i][1] for i, _ in jobs]), strict=True):
            responses[job] = answer
        engine.close()
    empty = sum(not text for turns in responses.values() for text in turns)
    if empty:
        log.warning("%d of %d answers are empty (the model ended its turn at once)", empty,
                    sum(len(turns) for turns in responses.values()))
    names = [model_name(path) for path in config.models]
    return pd.DataFrame({
        "id": [row_id for row_id, _ in prompts],
        "prompt": [list(turns) for _, turns in prompts],
        "response_a": [responses[(i, 0)] for i in range(len(prompts))],
        "response_b": [responses[(i, 1)] for i in range(len(prompts))],
        "model_a": [names[pairs[i, 0]] for i in range(len(prompts))],
        "model_b": [names[pairs[i, 1]] for i in range(len(prompts))],
        "source": SOURCE,
    })


def run_generate(config: GenerateConfig) -> Path:
    setup_logging()
    prompts, tokenizers = check_inputs(config)
    try:
        frame = generate_pairs(config, prompts, tokenizers)
    except KeyboardInterrupt:  # Ctrl-C: one line, as predict's stop, not a traceback from inside generate()
        log.error("stopped by SIGINT before the generation finished: nothing written")
        raise SystemExit(128 + signal.SIGINT) from None
    output = Path(config.output)
    write_file(output, lambda tmp: frame.to_parquet(tmp, index=False))
    log.info("wrote %s (%d pairs from %d models)", output, len(frame), len(config.models))
    return output
