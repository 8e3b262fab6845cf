"""Encoder cross-encoders (the deberta family): the [CLS] prompt [SEP] A [SEP] B [SEP] layout with the decoders'
truncation, first-token pooling whatever the padding side, LoRA on DeBERTa-v2's own projections, packing refused."""

from __future__ import annotations

import pytest
import tiny
import torch

from lmsys.builders import build_encoders
from lmsys.config import (
    Attention,
    ConfigError,
    DataConfig,
    Family,
    InputFormat,
    ModelConfig,
    PaddingSide,
    Template,
    TrainConfig,
    TrainerConfig,
)
from lmsys.data.batching import collate_padded
from lmsys.data.dataset import encode_split
from lmsys.data.formatting import PairEncoder
from lmsys.data.io import pairs_from_frame
from lmsys.data.schema import Pair
from lmsys.data.templates import chat_markers
from lmsys.modeling.families import FamilyError, resolve_attention

CPU = torch.device("cpu")
PAIR = Pair("1", ("abcdefghij",), ("0123456789ABCDEFGHIJKLMNOPQRST",), ("short",))


def char_encoder(input_format: InputFormat, max_length: int) -> tuple[PairEncoder, object]:
    """One token per character (plus [CLS]/[SEP]), so the truncation can be checked by hand."""
    tokenizer = tiny.build_char_tokenizer(False, tuple(tiny.ENCODER_TOKENS))
    return PairEncoder(tokenizer, chat_markers(Template.sep, tokenizer), input_format, max_length, 0.2, 1, 1,
                       0.5), tokenizer


def encoded_text(input_format: InputFormat, max_length: int, pair: Pair = PAIR, swapped: bool = False) -> str:
    encoder, tokenizer = char_encoder(input_format, max_length)
    ids = encoder.encode(encoder.tokenize([pair])[0], swapped=swapped)
    assert len(ids) <= max_length
    return tokenizer.decode(ids)


def test_the_encoder_layout_golden_strings():
    assert encoded_text(InputFormat.pab, 128) == "[CLS]abcdefghij[SEP]0123456789ABCDEFGHIJKLMNOPQRST[SEP]short[SEP]"
    assert encoded_text(InputFormat.pab, 128, swapped=True) == (
        "[CLS]abcdefghij[SEP]short[SEP]0123456789ABCDEFGHIJKLMNOPQRST[SEP]")
    assert encoded_text(InputFormat.papb, 128) == (
        "[CLS]abcdefghij[SEP]0123456789ABCDEFGHIJKLMNOPQRST[SEP]abcdefghij[SEP]short[SEP]")
    # 40 tokens: 4 markers leave 36; B needs 5, the prompt its 10 (under its 0.2 : 0.4 share of the remaining 31),
    # A keeps 21: head 7 + " [...] " (7) + tail 7
    assert encoded_text(InputFormat.pab, 40) == "[CLS]abcdefghij[SEP]0123456 [...] NOPQRST[SEP]short[SEP]"
    multi_turn = Pair("2", ("ab", "cd"), ("xy", "zw"), ("uv",))
    assert encoded_text(InputFormat.pab, 128, multi_turn) == "[CLS]ab\n---\ncd[SEP]xy\n---\nzw[SEP]uv\n---\n[SEP]"


def test_the_sep_template_needs_the_tokenizers_cls_and_sep():
    with pytest.raises(ValueError, match="cls and sep"):
        chat_markers(Template.sep, tiny.build_char_tokenizer(False))


@pytest.fixture(scope="module")
def deberta(tiny_models):
    """A tiny DeBERTa-v2 preference model with LoRA on its own projections, LoRA B and head made random."""
    model, spec, tokenizer = tiny.build_preference_model(
        tiny_models["deberta_v2"], "deberta", packing=False, lora_targets=tiny.DEBERTA_LORA_TARGETS,
        head_init_std=0.5)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval(), spec, tokenizer


def test_the_deberta_spec(deberta):
    model, spec, _ = deberta
    assert spec.template == Template.sep and spec.attn_implementation == Attention.eager
    assert spec.first_token_pooling and model.first_token_pooling
    lora_layers = {name.split(".lora_A.")[0].rsplit(".", 1)[-1] for name, _ in model.backbone.named_parameters()
                   if ".lora_A." in name}
    assert lora_layers == set(tiny.DEBERTA_LORA_TARGETS)


def test_first_token_pooling_whatever_the_padding_side(deberta):
    model, spec, tokenizer = deberta
    pairs = pairs_from_frame(tiny.arena_frame(5, seed=11), "mem.csv", require_labels=True)
    examples = encode_split(pairs, build_encoders(spec, tokenizer)).forward
    assert len({len(ex.ids) for ex in examples}) > 1  # the batch really pads
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        alone = torch.cat([model(**collate_padded([ex], pad, PaddingSide.right).model_inputs(CPU)) for ex in examples])
        left = model(**collate_padded(examples, pad, PaddingSide.left).model_inputs(CPU))
        right = model(**collate_padded(examples, pad, PaddingSide.right).model_inputs(CPU))
        # the head reads the [CLS] position's hidden state
        ids = torch.as_tensor(examples[0].ids, dtype=torch.long)[None]
        cls = model.head(model.backbone(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[:, 0])
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(cls, alone[:1], atol=1e-6, rtol=0)
    assert examples[0].ids[0] == tokenizer.cls_token_id and examples[0].ids[-1] == tokenizer.sep_token_id
    assert (alone[:, 0] - alone[:, 1]).abs().max() > 1e-3  # a random model, not a constant one


def test_decoder_lora_targets_on_an_encoder_fail_naming_its_layers(tiny_models):
    with pytest.raises(ConfigError, match=r"lora.target_modules: \['q_proj', .*'down_proj'\] are not linear layers of "
                                          r"this deberta-v2 model \(it has \['dense', 'key_proj', 'query_proj', "
                                          r"'value_proj'\]\)"):
        tiny.build_preference_model(tiny_models["deberta_v2"], "deberta", packing=False)


def test_a_misspelt_lora_target_fails_before_the_model_loads(tiny_models):
    """`[q_proj, o_prj]` trained q_proj alone without a word (peft drops a name that matches nothing); found on the
    model's skeleton from its config.json, before the run dir is claimed."""
    from lmsys.modeling.backbone import check_lora_targets

    with pytest.raises(ConfigError, match=r"lora.target_modules: \['o_prj'\] is not a linear layer of this llama "
                                          r"model \(it has \['down_proj', 'gate_proj', 'k_proj', 'o_proj'"):
        check_lora_targets(tiny_models["llama"], False, ["q_proj", "o_prj"])
    check_lora_targets(tiny_models["llama"], False, ["q_proj", "self_attn.o_proj"])  # a dotted tail, as peft reads it


def test_a_max_length_past_the_models_positions_fails_except_with_relative_positions(tiny_models, tmp_path):
    """The tiny decoders have 1024 positions: 2048 would run RoPE past anything trained (and a predict at 100000
    was killed by the kernel after the model loaded); DeBERTa-v3 has relative positions only and reads past 512."""
    from test_predict import make_checkpoint

    from lmsys.builders import build_prediction_spec, build_spec
    from lmsys.modeling.model_facts import position_limit
    from lmsys.prediction_config import PredictConfig

    assert position_limit(tiny_models["llama"]) == 1024 and position_limit(tiny_models["deberta_v2"]) is None
    data = DataConfig(train_path="unused")
    with pytest.raises(ConfigError, match=rf"^model.max_length=1025 exceeds the 1024 positions of the model in "
                                          rf"{tiny_models['llama']} \(max_position_embeddings"):
        build_spec(ModelConfig(path=str(tiny_models["llama"]), family=Family.llama, max_length=1025), data, True)
    assert build_spec(ModelConfig(path=str(tiny_models["llama"]), family=Family.llama, max_length=1024), data,
                      True).max_length == 1024
    deberta = ModelConfig(path=str(tiny_models["deberta_v2"]), family=Family.deberta, max_length=2048,
                          quantization="none")
    assert build_spec(deberta, data, False).max_length == 2048
    checkpoint = make_checkpoint(tmp_path / "checkpoint", tiny_models["llama"], seed=0)
    with pytest.raises(ConfigError, match=r"^max_length=2048 exceeds the 1024 positions"):
        build_prediction_spec(str(checkpoint), PredictConfig(checkpoint=str(checkpoint), output="o.csv",
                                                             max_length=2048))


def test_packing_is_refused_for_encoders():
    model = ModelConfig(path="unused", family=Family.deberta, quantization="none")
    with pytest.raises(ConfigError, match="model.family=deberta needs trainer.packing=false"):
        TrainConfig(model=model, data=DataConfig(train_path="unused"), trainer=TrainerConfig(packing=True))
    TrainConfig(model=model, data=DataConfig(train_path="unused"), trainer=TrainerConfig(packing=False))
    with pytest.raises(FamilyError, match="encoder: its bidirectional attention cannot be packed"):
        resolve_attention(Family.deberta, "deberta-v2", Attention.auto, packing=True)
    assert resolve_attention(Family.deberta, "deberta-v2", Attention.auto, packing=False) == Attention.eager
    # DeBERTa-v2 has eager attention only: sdpa failed in transformers after the model loaded and the run dir was
    # claimed (a traceback, and the corrected rerun refused)
    for kernel in (Attention.sdpa, Attention.flex_attention):
        with pytest.raises(FamilyError, match=rf"^attention {kernel.value}: transformers' DebertaV2Model does not "
                                              rf"implement it; set model.attn_implementation .* to eager$"):
            resolve_attention(Family.deberta, "deberta-v2", kernel, packing=False)
    assert resolve_attention(Family.llama, "llama", Attention.sdpa, packing=False) == Attention.sdpa
