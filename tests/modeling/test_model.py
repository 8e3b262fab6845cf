"""The preference model on tiny random Llama, Gemma-2, Gemma-3, Qwen2, Qwen3 and Mistral: pooling, packed vs padded logits, real NF4
quantization, the head, and a checkpoint round trip through lmsys.builders.build_model(..., adapter_dir=...)."""

import json
import shutil
import warnings

import bitsandbytes as bnb
import numpy as np
import pytest
import tiny
import torch
from torch import nn

from lmsys.builders import build_encoders, build_model, build_spec
from lmsys.config import Attention, ComputeDtype, DataConfig, Family, HeadInit, HeadType, ModelConfig, PaddingSide
from lmsys.data.batching import Example, collate, collate_packed, collate_padded, last_token_index
from lmsys.data.dataset import encode_split
from lmsys.data.io import pairs_from_frame
from lmsys.modeling.attention import CPU_SDPA
from lmsys.modeling.backbone import checkpointing_renames_quietly, fold_into_dense
from lmsys.modeling.checkpoint import ADAPTER_FILES, HEAD_FILE, CheckpointError, ModelSpec, read_spec, save_checkpoint
from lmsys.modeling.families import FamilyError, check_family, resolve_attention
from lmsys.modeling.heads import PreferenceHead
from lmsys.modeling.model import PreferenceModel, unpad_rows
from lmsys.modeling.model_facts import ModelLoadError, read_model_facts

CPU = torch.device("cpu")
CASES = [
    ("llama", "llama", "none", "eval"),
    ("gemma2", "gemma", "none", "eval"),
    ("gemma3", "gemma", "none", "eval"),
    ("qwen2", "qwen", "none", "eval"),
    ("qwen3", "qwen", "none", "eval"),
    ("mistral", "mistral", "none", "eval"),  # a sliding window shorter than the pairs (tiny.MISTRAL_WINDOW)
    ("llama", "llama", "nf4", "train"),  # dropout 0: the same function in both modes
    # bitsandbytes would run an eval-mode Linear4bit on a CPU with AVX512-BF16 through a bf16 kernel: load_backbone
    # must keep the fp32 path (and the weight layout that training-mode forwards differentiate through)
    ("llama", "llama", "nf4", "eval"),
]


# --- pooling -------------------------------------------------------------------------------------------------------


def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]


class EchoBackbone(nn.Module):
    """Hidden state = one-hot of the token id and of the position id: pooling shows which token it read."""

    def __init__(self, vocab: int = 16, width: int = 32) -> None:
        super().__init__()
        self.vocab, self.width = vocab, width

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        one_hot = nn.functional.one_hot
        hidden = torch.cat([one_hot(input_ids, self.vocab), one_hot(position_ids, self.width)], -1)

        class Out:
            last_hidden_state = hidden.float()

        return Out()


class ReadHead(nn.Module):
    def forward(self, pooled):
        return pooled


def examples(lengths, last_ids):
    out = []
    for i, (length, last) in enumerate(zip(lengths, last_ids, strict=True)):
        ids = np.full(length, 3, dtype=np.int32)
        ids[-1] = last
        out.append(Example(i, ids, False, (1.0, 0.0, 0.0)))
    return out


@pytest.mark.parametrize("side", [PaddingSide.left, PaddingSide.right])
def test_padded_pooling_reads_the_last_real_token(side):
    pad = eos = 2  # the pad token is the eos token, as build_tokenizer makes it when a model has no pad
    exs = examples([3, 7, 1, 5], [eos, 9, 11, eos])
    batch = collate_padded(exs, pad, side)
    pooled = PreferenceModel(EchoBackbone(), ReadHead())(**batch.model_inputs(CPU))
    assert pooled[:, :16].argmax(-1).tolist() == [eos, 9, 11, eos]
    if side == PaddingSide.right:
        assert pooled[:, 16:].argmax(-1).tolist() == [2, 6, 0, 4]
    else:
        assert batch.pool_cols.tolist() == [6, 6, 6, 6]


@pytest.mark.parametrize("row_tokens", [1, 8, 9, 64])
def test_packed_pooling_reads_the_end_of_each_segment(row_tokens):
    exs = examples([3, 7, 1, 5], [4, 9, 11, 2])
    batch = collate_packed(exs, row_tokens, 0)
    assert batch.attention_mask is None and batch.n_real_tokens == 16
    # first-fit decreasing: rows hold at most max(row_tokens, longest pair) tokens, in the capacity that computes
    # the fewest tokens (row_tokens 1: rows 7 wide, so 5 + 1 share one)
    assert batch.input_ids.shape == {1: (3, 7), 8: (2, 8), 9: (2, 8), 64: (1, 16)}[row_tokens]
    pooled = PreferenceModel(EchoBackbone(), ReadHead())(**batch.model_inputs(CPU))
    assert pooled[:, :16].argmax(-1).tolist() == [4, 9, 11, 2]
    assert pooled[:, 16:].argmax(-1).tolist() == [2, 6, 0, 4]  # the last position of each pair
    # every pair's tokens sit in one row with positions 0..n-1
    for ex, row, col in zip(exs, batch.pool_rows.tolist(), batch.pool_cols.tolist(), strict=True):
        n = len(ex.ids)
        assert batch.input_ids[row, col - n + 1 : col + 1].tolist() == ex.ids.tolist()
        assert batch.position_ids[row, col - n + 1 : col + 1].tolist() == list(range(n))


def test_unpadded_rows_keep_every_real_token_in_order():
    # row 0: a 3-token sequence, then a swap tree (2-token prefix + 1, continued by 2 more), no tail;
    # row 1: a 4-token sequence and a 4-token pad tail
    input_ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 0, 0, 0, 0]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 2, 3], [0, 1, 2, 3, 0, 1, 2, 3]])
    last_tokens = torch.tensor([2, 5, 7, 11])  # flattened: row 0 columns 2, 5 and 7; row 1 column 3
    shared = torch.tensor([[6, 3, 2]])  # the tree's second rest starts at column 6 and continues columns 3..4
    ids, positions, last, prefixes = unpad_rows(input_ids, position_ids, last_tokens, shared)
    assert ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 2, 3, 0, 1, 2, 3]]
    assert last.tolist() == [2, 5, 7, 11] and prefixes.tolist() == [[6, 3, 2]]
    # the tail in the first row moves the second row's indices
    input_ids[0, 7], position_ids[0, 7] = 0, 0
    ids, positions, last, prefixes = unpad_rows(input_ids, position_ids, torch.tensor([2, 5, 6, 11]), shared)
    assert ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12]] and last.tolist() == [2, 5, 6, 10]


# --- the real models -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arena_pairs():
    return pairs_from_frame(tiny.arena_frame(5, seed=11), "mem.csv", require_labels=True)


def build(tiny_models, kind, family, quantization, **kwargs):
    model, spec, tokenizer = tiny.build_preference_model(tiny_models[kind], family, quantization, **kwargs)
    tiny.perturb(model, seed=1)
    return model.eval(), spec, tokenizer


def logits_of(model, batch):
    with torch.no_grad():
        return model(**batch.model_inputs(CPU))


@pytest.mark.parametrize("kind,family,quantization,mode", CASES)
def test_packed_and_padded_logits_are_equal(tiny_models, arena_pairs, kind, family, quantization, mode):
    model, spec, tokenizer = build(tiny_models, kind, family, quantization)
    model.train(mode == "train")
    split = encode_split(arena_pairs, build_encoders(spec, tokenizer))
    exs = split.forward + split.swapped
    assert max(len(ex.ids) for ex in exs) > 64  # longer than the Gemma sliding window
    pad = tokenizer.pad_token_id
    reference = torch.cat([logits_of(model, collate_padded([ex], pad, PaddingSide.right)) for ex in exs])
    assert reference.std(0).min() > 0.05  # the pairs get different logits: the comparison means something
    for row_tokens in (spec.max_length, 300, 10_000):  # one pair a row; several pairs and a pad tail; one row
        packed = collate(exs, tiny.batching(True, pad, PaddingSide.left, row_tokens))
        torch.testing.assert_close(logits_of(model, packed), reference, atol=1e-4, rtol=0)
    for side in (PaddingSide.left, PaddingSide.right):
        padded = logits_of(model, collate(exs, tiny.batching(False, pad, side, spec.max_length)))
        torch.testing.assert_close(padded, reference, atol=1e-4, rtol=0)
    # Control: positions that do not restart per pair let the pairs see each other, and the test notices.
    leaky = collate_packed(exs, 10_000, pad)
    leaky.position_ids = torch.arange(leaky.input_ids.shape[1])[None]
    assert (logits_of(model, leaky) - reference).abs().max() > 1e-3


# bfloat16 compute (what compute_dtype=auto picks on a CPU with fast bf16 matmuls): the batch layout moves logits by
# bf16 rounding only. Measured on these tiny models: max |packed or padded - one pair alone| 0.008-0.04 (left
# padding the largest), against ~1 when packed pairs can see each other; the logits stay float32 (the head's).
BF16_PACKING_TOLERANCE = 0.08


@pytest.mark.parametrize("kind,family,quantization", [("llama", "llama", "nf4"), ("gemma2", "gemma", "nf4"),
                                                      ("gemma3", "gemma", "none")])
def test_packed_and_padded_logits_agree_in_bfloat16(tiny_models, arena_pairs, kind, family, quantization):
    model, spec, tokenizer = build(tiny_models, kind, family, quantization, compute_dtype=ComputeDtype.bfloat16)
    assert next(p for n, p in model.backbone.named_parameters() if "norm" in n).dtype == torch.bfloat16
    # sdpa of a bf16 model on CPU runs in float32 (lmsys.modeling.attention); Gemma-2 packs with eager only
    assert model.backbone.config._attn_implementation == ("eager" if kind == "gemma2" else CPU_SDPA)
    split = encode_split(arena_pairs, build_encoders(spec, tokenizer))
    exs, pad = split.forward + split.swapped, tokenizer.pad_token_id
    reference = torch.cat([logits_of(model, collate_padded([ex], pad, PaddingSide.right)) for ex in exs])
    assert reference.dtype == torch.float32 and reference.std(0).min() > 0.05
    layouts = [collate(exs, tiny.batching(True, pad, PaddingSide.left, row_tokens)) for row_tokens in (spec.max_length, 300, 10_000)]
    layouts += [collate(exs, tiny.batching(False, pad, side, spec.max_length)) for side in (PaddingSide.left, PaddingSide.right)]
    for batch in layouts:
        torch.testing.assert_close(logits_of(model, batch), reference, atol=BF16_PACKING_TOLERANCE, rtol=0)
    leaky = collate_packed(exs, 10_000, pad)
    leaky.position_ids = torch.arange(leaky.input_ids.shape[1])[None]
    assert (logits_of(model, leaky) - reference).abs().max() > 5 * BF16_PACKING_TOLERANCE


def test_an_evaluation_pass_does_not_change_training_gradients(tiny_models, arena_pairs):
    from lmsys.modeling.losses import soft_cross_entropy

    def gradients(evaluate_first: bool) -> dict[str, torch.Tensor]:
        model, spec, tokenizer = build(tiny_models, "llama", "llama", "nf4")
        split = encode_split(arena_pairs[:3], build_encoders(spec, tokenizer))
        batch = collate(split.forward, tiny.batching(True, tokenizer.pad_token_id, PaddingSide.left, spec.max_length))
        if evaluate_first:  # what train_loop does every eval_frequency updates
            with torch.inference_mode():
                model(**batch.model_inputs(CPU))
        model.train()
        soft_cross_entropy(model(**batch.model_inputs(CPU)), batch.targets).backward()
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    fresh, after_eval = gradients(False), gradients(True)
    assert fresh.keys() == after_eval.keys()
    for name in fresh:
        torch.testing.assert_close(after_eval[name], fresh[name], atol=1e-6, rtol=1e-4, msg=name)


def test_nf4_quantization_is_real(tiny_models):
    model, spec, _ = build(tiny_models, "llama", "llama", "nf4")
    linears = {name: module for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down in each of the two layers
    for name, module in linears.items():
        assert isinstance(module.weight, bnb.nn.Params4bit), name
        assert module.weight.dtype == torch.uint8 and module.weight.quant_state.quant_type == "nf4", name
        assert module.weight.numel() * 2 == module.in_features * module.out_features  # two 4-bit values a byte
        assert not module.weight.requires_grad
    head_layers = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    assert head_layers and all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in head_layers)
    assert all(p.dtype == torch.float32 for p in model.head.parameters())
    assert spec.attn_implementation == Attention.sdpa


@pytest.mark.parametrize("kind,family", [("llama", "llama"), ("gemma3", "gemma")])
def test_folding_lora_into_dense_weights_keeps_the_logits(tiny_models, arena_pairs, kind, family):
    model, spec, tokenizer = build(tiny_models, kind, family, "nf4")
    split = encode_split(arena_pairs, build_encoders(spec, tokenizer))
    batch = collate(split.forward + split.swapped, tiny.batching(True, tokenizer.pad_token_id, PaddingSide.left, spec.max_length))
    before = logits_of(model, batch)
    assert fold_into_dense(model) == 2 * 7
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert not any(".lora_" in name for name, _ in model.named_parameters())
    after = logits_of(model, batch)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=0)
    # Control: the LoRA update is part of the folded weights (without it the logits move).
    plain, _, _ = build(tiny_models, kind, family, "nf4")
    with torch.no_grad():
        for name, param in plain.named_parameters():
            if ".lora_B." in name:
                param.zero_()
    assert (logits_of(plain, batch) - after).abs().max() > 1e-3


def test_head_layout_and_init():
    mlp = PreferenceHead(64, HeadType.mlp, 0.1, HeadInit.normal, 0.02)
    kinds = [type(m) for m in mlp.layers]
    assert kinds == [nn.Dropout, nn.Linear, nn.Dropout, nn.GELU, nn.Linear]
    assert (mlp.layers[1].in_features, mlp.layers[1].out_features, mlp.layers[4].out_features) == (64, 32, 3)
    assert all((m.bias == 0).all() for m in mlp.layers if isinstance(m, nn.Linear))
    assert 0.01 < mlp.layers[1].weight.std() < 0.03
    zeros = PreferenceHead(64, HeadType.linear, 0.0, HeadInit.zeros, 0.02)
    logits = zeros(torch.randn(5, 64, dtype=torch.bfloat16))
    assert logits.dtype == torch.float32 and (logits == 0).all()  # uniform prediction: loss ln 3 at the start


def test_family_table(tmp_path):
    assert check_family(Family.gemma, "gemma3_text", "x").template.value == "gemma"
    with pytest.raises(FamilyError, match="model_type 'gemma2' is not in family 'llama'"):
        check_family(Family.llama, "gemma2", "model.path=x")
    assert resolve_attention(Family.gemma, "gemma2", Attention.auto, packing=True) == "eager"
    with pytest.raises(FamilyError):
        resolve_attention(Family.gemma, "gemma2", Attention.sdpa, packing=True)
    # transformers' Gemma2Model has no sdpa (it refuses it at load): refused before, whatever the packing
    with pytest.raises(FamilyError, match="transformers' Gemma2Model does not implement it"):
        resolve_attention(Family.gemma, "gemma2", Attention.sdpa, packing=False)
    assert resolve_attention(Family.gemma, "gemma3_text", Attention.sdpa, packing=False) == "sdpa"
    assert check_family(Family.qwen, "qwen2", "x").template.value == "chatml"  # Qwen2 and Qwen2.5
    assert check_family(Family.qwen, "qwen3", "x").template.value == "chatml"
    assert check_family(Family.mistral, "mistral", "x").template.value == "mistral"
    with pytest.raises(FamilyError, match="model_type 'mistral' is not in family 'qwen'"):
        check_family(Family.qwen, "mistral", "model.path=x")
    # sliding-window Mistral packs exactly with sdpa (test_mistral_packed_rows_apply_the_sliding_window)
    assert resolve_attention(Family.mistral, "mistral", Attention.auto, packing=True) == "sdpa"
    # a multimodal Gemma-3 config.json nests the text model's type
    multimodal = {"model_type": "gemma3", "text_config": {"model_type": "gemma3_text", "hidden_size": 8,
                                                          "num_attention_heads": 2, "intermediate_size": 16}}
    (tmp_path / "config.json").write_text(json.dumps(multimodal))
    assert read_model_facts(tmp_path).model_type == "gemma3_text"


@pytest.mark.parametrize("kind,family,quantization", [("llama", "llama", "nf4"), ("gemma3", "gemma", "none")])
def test_checkpoint_round_trip(tiny_models, arena_pairs, tmp_path, kind, family, quantization):
    model, spec, tokenizer = build(tiny_models, kind, family, quantization, head=HeadType.mlp)
    split = encode_split(arena_pairs, build_encoders(spec, tokenizer))
    batch = collate(split.forward + split.swapped, tiny.batching(True, tokenizer.pad_token_id, PaddingSide.left, 300))
    before = logits_of(model, batch)
    directory = tmp_path / "checkpoint"
    save_checkpoint(directory, model, tokenizer, spec)

    assert read_spec(directory) == spec
    assert ModelSpec.from_json(spec.to_json(), "x") == spec
    saved = json.loads((directory / "adapter_config.json").read_text())
    assert saved["r"] == 16 and set(saved["target_modules"]) >= {"q_proj", "down_proj"}
    from safetensors.torch import load_file

    adapter = load_file(str(directory / ADAPTER_FILES[1]))
    assert adapter and all("lora_" in key for key in adapter)  # the frozen base is never saved

    reloaded = build_model(read_spec(directory), None, None, CPU, adapter_dir=directory).eval()
    assert not any(p.requires_grad for n, p in reloaded.named_parameters() if "lora_" in n)
    after = logits_of(reloaded, batch)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert before.std(0).min() > 0.05


def test_an_incomplete_checkpoint_is_refused(tiny_models, tmp_path):
    model, spec, tokenizer = build(tiny_models, "gemma3", "gemma", "none")
    save_checkpoint(tmp_path / "ckpt", model, tokenizer, spec)
    (tmp_path / "ckpt" / HEAD_FILE).unlink()
    with pytest.raises(CheckpointError, match=HEAD_FILE):
        read_spec(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_spec(tmp_path / "absent")


def test_mistral_packed_rows_apply_the_sliding_window(tiny_models, arena_pairs, tmp_path):
    """Packed rows of the windowed Mistral match its padded logits (test above) and differ from the same weights
    with full attention: the window is really applied per packed pair with the family's sdpa kernel."""
    full = tmp_path / "mistral_full"
    shutil.copytree(tiny_models["mistral"], full)
    config = json.loads((full / "config.json").read_text())
    assert config["sliding_window"] == tiny.MISTRAL_WINDOW
    (full / "config.json").write_text(json.dumps({**config, "sliding_window": None}))
    logits = {}
    for name, directory in (("windowed", tiny_models["mistral"]), ("full", full)):
        model, spec, tokenizer = tiny.build_preference_model(directory, "mistral", "none")
        tiny.perturb(model, seed=1)
        assert spec.attn_implementation == Attention.sdpa
        exs = encode_split(arena_pairs, build_encoders(spec, tokenizer)).forward
        assert min(len(ex.ids) for ex in exs) > tiny.MISTRAL_WINDOW
        logits[name] = logits_of(model.eval(), collate(exs, tiny.batching(True, tokenizer.pad_token_id,
                                                                           PaddingSide.left, 10_000)))
    assert (logits["windowed"] - logits["full"]).abs().max() > 1e-3


def test_building_an_adapter_prints_no_peft_deprecation_and_other_warnings_pass(tiny_models):
    """peft reads transformers' deprecated is_gradient_checkpointing when it wraps a model (and TRL calls the old
    gradient_checkpointing_enable / _disable): not the user's to fix, so not printed; any other warning raised inside
    the same block still is."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build(tiny_models, "llama", "llama", "nf4")[0]
        with checkpointing_renames_quietly():
            model.backbone.gradient_checkpointing_enable()
            model.backbone.gradient_checkpointing_disable()
            warnings.warn("another deprecation", FutureWarning, stacklevel=1)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())  # a real 4-bit LoRA model was built
    messages = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert "another deprecation" in messages
    assert not [m for m in messages if "gradient_checkpointing" in m]


def test_a_model_dir_without_its_weights_is_refused_before_a_run_dir_is_claimed(tiny_models, tmp_path):
    """build_spec (a run's first look at model.path, before the claim) finds the safetensors missing, a sharded
    save's missing shard included; transformers would fail later, in a traceback, after the run dir was taken."""
    def spec_of(path):
        return build_spec(ModelConfig(path=str(path), family=Family.llama, max_length=128),
                          DataConfig(train_path="unused"), packing=True)

    weightless = shutil.copytree(tiny_models["llama"], tmp_path / "weightless")
    (weightless / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=rf"^model.path={weightless}: no model.safetensors \(nor "):
        spec_of(weightless)
    sharded = shutil.copytree(tiny_models["llama"], tmp_path / "sharded")
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    weight_map = {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelLoadError, match=r"names 1 shard\(s\) that are missing, e.g. model-00002-of-00002"):
        spec_of(sharded)
    (sharded / "model-00001-of-00002.safetensors").rename(sharded / "model-00002-of-00002.safetensors")
    with pytest.raises(ModelLoadError, match="e.g. model-00001-of-00002"):
        spec_of(sharded)
    assert spec_of(tiny_models["llama"]).base_model_path == str(tiny_models["llama"].resolve())

