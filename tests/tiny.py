"""Tiny random models and an in-process trained tokenizer: real architectures, no downloads."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    DebertaV2Config,
    DebertaV2Model,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

SPECIAL_TOKENS = [
    "<pad>", "<bos>", "<eos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
]
# Mistral v0.3's control tokens: special in its tokenizer, so only the Mistral tokenizer has them (appended, so that
# the other tokenizers' ids are unchanged)
MISTRAL_TOKENS = ["[INST]", "[/INST]"]
ENCODER_TOKENS = ["[CLS]", "[SEP]"]  # DeBERTa-v3's cls and sep (appended, like Mistral's)
_VOCABULARY = ("what is the capital of france paris rome berlin answer question response better tie which conversation "
               "prompt user assistant model two three four five plus minus equals yes no maybe hello world "
               "# ## --- [...] A B : ? ! . , 0 1 2 3 4 5 6 7 8 9 é ü 中 文")
WORDS = _VOCABULARY.split()


def corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) for _ in range(n_lines)]


def build_tokenizer(add_bos: bool, extra_special: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a small corpus, with the chat-template special tokens."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[*SPECIAL_TOKENS, *extra_special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus() + [" ".join(WORDS)], trainer)
    return _wrap(tok, add_bos)


def build_char_tokenizer(add_bos: bool, extra_special: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """One token per byte (a byte-level BPE without merges): token counts are character counts for ASCII text,
    so truncation results can be written down by hand."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([*SPECIAL_TOKENS, *extra_special])
    return _wrap(tok, add_bos)


def _wrap(tok: Tokenizer, add_bos: bool) -> PreTrainedTokenizerFast:
    if add_bos:
        bos = tok.token_to_id("<bos>")
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    encoder = tok.token_to_id("[CLS]") is not None
    if encoder:  # as DeBERTa-v3's tokenizer: [CLS] text [SEP] with special tokens
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[(t, tok.token_to_id(t)) for t in ENCODER_TOKENS])
    extra = {"cls_token": "[CLS]", "sep_token": "[SEP]"} if encoder else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", **extra)


def _llama(vocab: int):
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=True))


def _gemma2(vocab: int):
    return Gemma2ForCausalLM(Gemma2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, sliding_window=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2))


def _gemma3(vocab: int):
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, sliding_window=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, layer_types=["sliding_attention", "full_attention"]))


def _qwen2(vocab: int):
    # Qwen2 has biases on q, k and v (Llama has none)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, eos_token_id=2, tie_word_embeddings=True))


def _qwen3(vocab: int):
    # Qwen3: no q/k/v biases but RMSNorm on q and k per head, and an explicit head_dim
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, pad_token_id=0, eos_token_id=2,
        tie_word_embeddings=True))


MISTRAL_WINDOW = 64  # shorter than the test pairs (98-128 tokens), so packed rows must apply it per pair; two layers
# of it still reach back past the start of a 98-token pair, so a leak between packed pairs shows


def _mistral(vocab: int):
    return MistralForCausalLM(MistralConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, sliding_window=MISTRAL_WINDOW,
        pad_token_id=0, bos_token_id=1, eos_token_id=2))


def _deberta_v2(vocab: int):
    # DeBERTa-v3's attention: relative positions (c2p and p2c, log buckets), no absolute position embeddings
    return DebertaV2Model(DebertaV2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, relative_attention=True, position_buckets=32, max_relative_positions=-1,
        pos_att_type=["p2c", "c2p"], position_biased_input=False, norm_rel_ebd="layer_norm", share_att_key=True,
        pad_token_id=0))


# kind -> (model builder, tokenizer adds a bos, extra special tokens)
BUILDERS = {
    "llama": (_llama, False, ()), "gemma2": (_gemma2, True, ()), "gemma3": (_gemma3, True, ()),
    "qwen2": (_qwen2, False, ()), "qwen3": (_qwen3, False, ()), "mistral": (_mistral, True, tuple(MISTRAL_TOKENS)),
    "deberta_v2": (_deberta_v2, False, tuple(ENCODER_TOKENS)),
}
DEBERTA_LORA_TARGETS = ["query_proj", "key_proj", "value_proj", "dense"]
# kind -> the lmsys family that trains it
FAMILY_OF = {"llama": "llama", "gemma2": "gemma", "gemma3": "gemma", "qwen2": "qwen", "qwen3": "qwen",
             "mistral": "mistral", "deberta_v2": "deberta"}


def save_llama_1b(directory: Path, seed: int = 0) -> Path:
    """A random ~1B-parameter Llama (TinyLlama's shape: 22 layers of width 2048) in bf16 with the tiny tokenizer,
    for GPU throughput (scripts/gpu_check.sh)."""
    tokenizer = build_tokenizer(add_bos=False)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory




def save_tiny_model(kind: str, directory: Path, seed: int = 0) -> Path:
    """Write a tiny random model of architecture `kind` and its tokenizer to `directory`."""
    build, add_bos, extra_special = BUILDERS[kind]
    tokenizer = build_tokenizer(add_bos, extra_special)
    torch.manual_seed(seed)
    model = build(len(tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def arena_frame(n: int, seed: int = 0, labelled: bool = True, start_id: int = 0) -> pd.DataFrame:
    """Kaggle-schema rows with multi-turn rows, null turns and non-ASCII text."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        n_turns = 2 if i % 5 == 0 else 1
        prompt = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) for _ in range(n_turns)]
        a = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30))) for _ in range(n_turns)]
        b = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30))) for _ in range(n_turns)]
        if i % 7 == 3:
            b[-1] = None
        row = {"id": start_id + i, "prompt": json.dumps(prompt), "response_a": json.dumps(a),
               "response_b": json.dumps(b, ensure_ascii=False)}
        if labelled:
            label = i % 3
            row.update(model_a="m1", model_b="m2", winner_model_a=int(label == 0), winner_model_b=int(label == 1),
                       winner_tie=int(label == 2))
        rows.append(row)
    return pd.DataFrame(rows)


def model_settings(model_dir: Path, family: str, quantization: str = "none", max_length: int = 128,
                   packing: bool = True, **model_kwargs):
    """ModelConfig, DataConfig and ModelSpec for a tiny model directory (lazy imports keep this module light)."""
    from lmsys.builders import build_spec
    from lmsys.config import DataConfig, Family, ModelConfig, Quantization

    model = ModelConfig(path=str(model_dir), family=Family(family), quantization=Quantization(quantization),
                        max_length=max_length, **model_kwargs)
    data = DataConfig(train_path="unused.csv")
    return model, data, build_spec(model, data, packing=packing)


def build_preference_model(model_dir: Path, family: str, quantization: str = "none", lora_dropout: float = 0.0,
                           seed: int = 0, lora_targets: list[str] | None = None, **model_kwargs):
    """(model, spec, tokenizer) through lmsys.builders, as the trainer builds them, on the CPU."""
    from lmsys.builders import build_model
    from lmsys.builders import build_tokenizer as build_lmsys_tokenizer
    from lmsys.config import LoraConfig

    model_cfg, _, spec = model_settings(model_dir, family, quantization, **model_kwargs)
    torch.manual_seed(seed)
    lora = LoraConfig(dropout=lora_dropout, **({"target_modules": lora_targets} if lora_targets else {}))
    model = build_model(spec, model_cfg, lora, torch.device("cpu"))
    return model, spec, build_lmsys_tokenizer(model_dir, False)


def batching(packed: bool, pad_id: int, padding_side, row_tokens: int, max_tokens: int = 1 << 20,
             batch_size: int = 1 << 20, attention_width: float | None = None):
    """A `Batching` for collating in tests: by default one micro-batch of everything."""
    from lmsys.data.batching import Batching

    return Batching(packed, max_tokens, row_tokens, batch_size, pad_id, padding_side, attention_width)


def spec_stub():
    """A ModelSpec of a SmolLM2-shaped Llama, for tests of what is derived from a spec (nothing is loaded)."""
    from lmsys.config import Attention, ComputeDtype, Family, HeadType, InputFormat, PaddingSide, Quantization, Template
    from lmsys.modeling.checkpoint import ModelSpec
    from lmsys.modeling.model_facts import ModelFacts

    return ModelSpec(
        base_model_path="unused", facts=ModelFacts("llama", 576, 9, 64, 3, 1536), family=Family.llama,
        template=Template.llama3, max_length=128, quantization=Quantization.nf4, double_quant=False,
        compute_dtype=ComputeDtype.float32, attn_implementation=Attention.sdpa, head=HeadType.linear,
        input_formats=(InputFormat.pab,), prompt_share=0.2, keep_first_turns=1, keep_last_turns=1, text_head_share=0.5,
        padding_side=PaddingSide.left,
    )


def perturb(model, seed: int = 1) -> None:
    """Nonzero LoRA-B (peft starts it at zero) and a head with O(1) logits, so that every part matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            elif name.startswith("head.") and param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
