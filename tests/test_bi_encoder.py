"""Bi-encoders (`model.architecture=bi_encoder`): each pair read as two sequences, (prompt, A) and (prompt, B), by
one backbone; the head compares the two pooled states and is swap-equivariant by construction (checked without TTA,
packed decoder and padded encoder); packed == padded; golden strings of the two sequences; a run through the entry
point whose checkpoint `python -m lmsys.predict` reads and whose oof.csv `python -m lmsys.ensemble` takes beside a
cross-encoder run's; warm starts and soups across architectures refused, naming the field."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import tiny
import torch
from accelerate import Accelerator
from entry_runs import ENTRY, REPO, finish, read_oof, run_entry, start, tiny_overrides
from safetensors.torch import load_file
from test_predict import make_checkpoint

from lmsys.bench import load_config as load_bench_config
from lmsys.builders import build_encoders, build_model, build_prediction_spec, build_spec
from lmsys.cli import parse_config
from lmsys.config import (
    Architecture,
    ComputeDtype,
    ConfigError,
    DataConfig,
    Family,
    HeadInit,
    HeadType,
    InputFormat,
    LoraConfig,
    ModelConfig,
    PaddingSide,
    Quantization,
    Template,
    TrainConfig,
    TrainerConfig,
)
from lmsys.data.batching import collate, collate_packed
from lmsys.data.dataset import encode_split
from lmsys.data.formatting import ResponseEncoder
from lmsys.data.io import pairs_from_frame, read_pairs
from lmsys.data.schema import Pair, swap_pair
from lmsys.data.templates import CHAT_MARKERS, chat_markers
from lmsys.evaluation.predict_loop import predict_split
from lmsys.kaggle.estimate import units_by_max_length
from lmsys.merging import run_export
from lmsys.modeling.checkpoint import SPEC_FILE, CheckpointError, read_spec, save_checkpoint
from lmsys.modeling.heads import BiEncoderHead, PreferenceHead
from lmsys.modeling.warm_start import check_warm_start
from lmsys.prediction import predict_checkpoint
from lmsys.prediction_config import ExportConfig, PredictConfig
from lmsys.soup import check_compatible, read_ingredient

CPU = torch.device("cpu")
BI = {"architecture": Architecture.bi_encoder}
PROBS = ["winner_model_a", "winner_model_b", "winner_tie"]
# Swapping a pair moves its sequences within their packed row (B's before A's), which may move a float32 logit by
# rounding; packed on CPU, the row's pad tail also joins the other sequence's attention segment (causal: the same
# attention over a longer block, summed in another order). Measured: exactly 0 padded (NF4 Llama, DeBERTa), 2.1e-6
# NF4 Llama packed (logits of ~1-11), 6e-8 for an unquantized Llama packed; the cross-encoder controls miss by 1-7.
SWAP_TOLERANCE = 1e-5


def perturbed(model):
    """tiny.perturb, then eval mode (no dropout in the comparisons)."""
    tiny.perturb(model)
    return model.eval()


@pytest.fixture(scope="module")
def arena_pairs():
    return pairs_from_frame(tiny.arena_frame(6, seed=11), "mem.csv", require_labels=True)


@pytest.fixture(scope="module")
def llama_bi(tiny_models):
    model, spec, tokenizer = tiny.build_preference_model(tiny_models["llama"], "llama", "nf4", **BI)
    return perturbed(model), spec, tokenizer


def logits(model, spec, tokenizer, pairs, packed: bool) -> np.ndarray:
    """(N, C) logits of the pairs as given, no TTA, through the prediction loop."""
    split = encode_split(pairs, build_encoders(spec, tokenizer))
    batching = tiny.batching(packed, tokenizer.pad_token_id, spec.padding_side, spec.max_length, max_tokens=2048,
                             batch_size=4)
    return predict_split(model, split, False, batching, Accelerator(cpu=True), show_progress=False).logits_ab


def test_the_head_is_swap_equivariant_to_the_bit():
    torch.manual_seed(0)
    h_a, h_b = torch.randn(5, 64) * 3, torch.randn(5, 64) * 3
    for kind in (HeadType.linear, HeadType.mlp):
        head = BiEncoderHead(64, kind, 0.0, HeadInit.normal, 0.5)
        out, swapped = head(h_a, h_b), head(h_b, h_a)  # (5, 3) each
        assert torch.equal(swapped, out[:, [1, 0, 2]])
        assert (out[:, 0] - out[:, 1]).abs().min() > 1e-4 and out[:, 2].std() > 1e-3  # it reads the states
    two = BiEncoderHead(64, HeadType.linear, 0.0, HeadInit.normal, 0.5, num_classes=2)
    assert two.tie is None and torch.equal(two(h_b, h_a), two(h_a, h_b)[:, [1, 0]])



def test_a_fresh_head_starts_as_near_uniform_as_the_cross_encoders():
    """States with an outlier dimension, as a decoder's (SmolLM2-135M: |h| = 56, one dimension 43): the product
    feature of the raw states would square it (logits ~100x the cross-encoder head's); of the unit states it does not."""
    torch.manual_seed(0)
    h_a, h_b = torch.randn(64, 64) * 2, torch.randn(64, 64) * 2
    h_a[:, 7], h_b[:, 7] = 40.0 + h_a[:, 7], 40.0 + h_b[:, 7]
    bi, cross, raw = [], [], []
    for _ in range(50):  # the root mean square logit over many fresh heads
        head = BiEncoderHead(64, HeadType.linear, 0.0, HeadInit.normal, 0.02)
        bi.append(head(h_a, h_b))  # (64, 3)
        raw.append(head.win(torch.cat([h_a, h_b, h_a - h_b, h_a * h_b], dim=-1)))  # (64, 1) the raw product's
        cross.append(PreferenceHead(64, HeadType.linear, 0.0, HeadInit.normal, 0.02)(h_a))  # (64, 3)
    rms = {name: torch.cat(values).pow(2).mean().sqrt().item() for name, values in
           (("bi", bi), ("cross", cross), ("raw", raw))}
    assert 0.5 * rms["cross"] < rms["bi"] < 1.2 * rms["cross"], rms
    assert rms["raw"] > 10 * rms["cross"], rms  # what the unit states avoid


@pytest.mark.parametrize("packed", [True, False])
def test_a_decoder_bi_encoder_is_swap_equivariant_without_tta(llama_bi, arena_pairs, tiny_models, packed):
    model, spec, tokenizer = llama_bi
    ours = logits(model, spec, tokenizer, arena_pairs, packed)  # (N, 3)
    mirrored = logits(model, spec, tokenizer, [swap_pair(p) for p in arena_pairs], packed)
    assert np.abs(mirrored - ours[:, [1, 0, 2]]).max() <= SWAP_TOLERANCE
    assert np.abs(ours[:, 0] - ours[:, 1]).min() > 1e-4  # A and B get different logits: the check is not vacuous
    # control: a cross-encoder of the same backbone is not swap-equivariant without TTA
    cross, cross_spec, _ = tiny.build_preference_model(tiny_models["llama"], "llama", "nf4")
    perturbed(cross)
    plain = logits(cross, cross_spec, tokenizer, arena_pairs, packed)
    plain_mirrored = logits(cross, cross_spec, tokenizer, [swap_pair(p) for p in arena_pairs], packed)
    assert np.abs(plain_mirrored - plain[:, [1, 0, 2]]).max() > 1e-3


def test_an_encoder_bi_encoder_is_swap_equivariant_without_tta(tiny_models, arena_pairs):
    model, spec, tokenizer = tiny.build_preference_model(
        tiny_models["deberta_v2"], "deberta", packing=False, lora_targets=tiny.DEBERTA_LORA_TARGETS, **BI)
    perturbed(model)
    assert spec.first_token_pooling and spec.template == Template.sep
    ours = logits(model, spec, tokenizer, arena_pairs, packed=False)
    mirrored = logits(model, spec, tokenizer, [swap_pair(p) for p in arena_pairs], packed=False)
    assert np.abs(mirrored - ours[:, [1, 0, 2]]).max() <= SWAP_TOLERANCE
    assert np.abs(ours[:, 0] - ours[:, 1]).min() > 1e-4


def test_packed_and_padded_bi_encoder_logits_are_equal(llama_bi, arena_pairs):
    model, spec, tokenizer = llama_bi
    split = encode_split(arena_pairs, build_encoders(spec, tokenizer))
    examples = split.forward + split.swapped
    assert all(ex.second_start is not None for ex in examples)
    pad = tokenizer.pad_token_id

    def run(batch):
        with torch.no_grad():
            return model(**batch.model_inputs(CPU))

    alone = torch.cat([run(collate([ex], tiny.batching(False, pad, PaddingSide.right, 128))) for ex in examples])
    for row_tokens in (spec.max_length, 300, 10_000):  # a pair a row; several pairs and a pad tail; one row
        packed = collate(examples, tiny.batching(True, pad, PaddingSide.left, row_tokens))
        assert packed.pool_rows.shape == (2 * len(examples),)  # (prompt, A) and (prompt, B) pooled apart
        torch.testing.assert_close(run(packed), alone, atol=1e-4, rtol=0)
    for side in (PaddingSide.left, PaddingSide.right):
        padded = collate(examples, tiny.batching(False, pad, side, 128))
        assert padded.input_ids.shape[0] == 2 * len(examples)  # one row per sequence
        torch.testing.assert_close(run(padded), alone, atol=1e-4, rtol=0)
    # control: positions that do not restart at B's sequence let it see (prompt, A), and the test notices
    leaky = collate_packed(examples[:1], 10_000, pad)
    leaky.position_ids = torch.arange(leaky.input_ids.shape[1])[None]
    assert (run(leaky) - alone[:1]).abs().max() > 1e-3


SINGLE = Pair("1", ("What is the capital of France?",), ("Paris.",), ("It is Rome, I think.",), (1.0, 0.0, 0.0))
MULTI = Pair("2", ("hello", "and 2 plus 2?"), ("hi there", "4"), ("hey", ""), (0.0, 1.0, 0.0))
LLAMA_USER = "<|start_header_id|>user<|end_header_id|>\n\nHow well does the response answer the conversation?\n\n"
LLAMA_ASSISTANT = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


def sequence_texts(encoder: ResponseEncoder, pair: Pair, swapped: bool = False) -> list[str]:
    sequences = encoder.sequences(encoder.tokenize([pair])[0], swapped=swapped)
    assert all(len(ids) <= encoder.max_length for ids in sequences)  # max_length holds for each sequence
    return [encoder.tokenizer.decode(ids, skip_special_tokens=False) for ids in sequences]


def test_the_two_sequences_of_a_pair_golden_strings():
    tokenizer = tiny.build_tokenizer(add_bos=False)  # the tiny Llama's
    pab = ResponseEncoder(tokenizer, CHAT_MARKERS[Template.llama3], InputFormat.pab, 512, 0.2, 1, 1, 0.5)
    assert sequence_texts(pab, SINGLE) == [
        LLAMA_USER + "# Prompt\nWhat is the capital of France?\n\n# Response\nParis." + LLAMA_ASSISTANT,
        LLAMA_USER + "# Prompt\nWhat is the capital of France?\n\n# Response\nIt is Rome, I think." + LLAMA_ASSISTANT,
    ]
    papb = ResponseEncoder(tokenizer, CHAT_MARKERS[Template.llama3], InputFormat.papb, 512, 0.2, 1, 1, 0.5)
    assert sequence_texts(papb, MULTI) == [
        LLAMA_USER + "# Conversation\n## User\nhello\n## Assistant\nhi there\n## User\nand 2 plus 2?\n## Assistant\n4"
        + LLAMA_ASSISTANT,
        LLAMA_USER + "# Conversation\n## User\nhello\n## Assistant\nhey\n## User\nand 2 plus 2?\n## Assistant\n"
        + LLAMA_ASSISTANT,
    ]
    # the sequence of (prompt, A) is the same whichever side A is shown on: swapping only reorders the sequences
    for encoder, pair in ((pab, SINGLE), (papb, MULTI)):
        tokens = encoder.tokenize([pair])[0]
        assert encoder.sequences(tokens, swapped=True) == encoder.sequences(tokens)[::-1]
        assert encoder.sequences(encoder.tokenize([swap_pair(pair)])[0]) == encoder.sequences(tokens)[::-1]


def test_each_sequence_is_truncated_on_its_own():
    """One token per character: [CLS] prompt [SEP] response [SEP] in 30 tokens leaves 27 for the texts, shared
    0.2 : 0.8 by water-filling (5.4 and 21.6: 5 for the prompt, 22 for the response, head 8 + ' [...] ' + tail 7,
    the leftover token to the larger remainder); the short
    response's sequence keeps the whole prompt."""
    tokenizer = tiny.build_char_tokenizer(False, tuple(tiny.ENCODER_TOKENS))
    encoder = ResponseEncoder(tokenizer, chat_markers(Template.sep, tokenizer), InputFormat.pab, 30, 0.2, 1, 1, 0.5)
    pair = Pair("1", ("abcdefghij",), ("0123456789ABCDEFGHIJKLMNOPQRST",), ("short",))
    assert sequence_texts(encoder, pair) == ["[CLS]abcde[SEP]01234567 [...] NOPQRST[SEP]",
                                             "[CLS]abcdefghij[SEP]short[SEP]"]
    papb = ResponseEncoder(tokenizer, chat_markers(Template.sep, tokenizer), InputFormat.papb, 128, 0.2, 1, 1, 0.5)
    assert sequence_texts(papb, MULTI) == ["[CLS]hello[SEP]hi there[SEP]and 2 plus 2?[SEP]4[SEP]",
                                           "[CLS]hello[SEP]hey[SEP]and 2 plus 2?[SEP][SEP]"]


def test_a_packed_bi_encoder_run_needs_room_for_both_sequences():
    model = ModelConfig(path="unused", family=Family.llama, max_length=512, **BI)
    with pytest.raises(ConfigError, match=r"max_tokens must be at least model.max_length x 2 \(model.architecture"):
        TrainConfig(model=model, data=DataConfig(train_path="unused"), trainer=TrainerConfig(max_tokens=768))
    TrainConfig(model=model, data=DataConfig(train_path="unused"), trainer=TrainerConfig(max_tokens=1024,
                                                                                         eval_max_tokens=1024))


def test_the_bench_refuses_to_compare_a_bi_encoder_with_the_cross_encoder_peer():
    with pytest.raises(ConfigError, match="hf_trainer_typical, hf_trainer_strong .the HF Trainer peer. is a cross"):
        load_bench_config("conf_r_llama_smol_bi", [])
    config = load_bench_config("conf_r_llama_smol_bi", ["bench.modes=[padded,packed]"])
    assert config.model.architecture == Architecture.bi_encoder
    assert load_bench_config("conf_r_llama_smol", []).bench.modes[-1] == "hf_trainer_strong"


# --- checkpoints: warm starts, soups, old specs ----------------------------------------------------------------------

LORA = LoraConfig(r=8, alpha=16, dropout=0.0)  # the shape of make_checkpoint's adapter


def bi_spec(tiny_models, **extra):
    config = ModelConfig(path=str(tiny_models["llama"]), family=Family.llama, max_length=128, **BI, **extra)
    return config, build_spec(config, DataConfig(train_path="unused"), packing=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_models):
    """A cross-encoder and a bi-encoder checkpoint of the same base model and LoRA shape."""
    root = tmp_path_factory.mktemp("bi_checkpoints")
    cross = make_checkpoint(root / "cross", tiny_models["llama"])
    config, spec = bi_spec(tiny_models, head_init_std=0.5)
    torch.manual_seed(0)
    model = perturbed(build_model(spec, config, LORA, CPU))
    save_checkpoint(root / "bi", model, tiny.build_tokenizer(False), spec)
    return {"cross": cross, "bi": root / "bi"}


def test_a_warm_start_across_architectures_fails_naming_it(tiny_models, checkpoints):
    _, spec = bi_spec(tiny_models)
    with pytest.raises(ConfigError, match="architecture differs: checkpoint cross_encoder, this run bi_encoder"):
        check_warm_start(spec, LORA, str(checkpoints["cross"]))
    cross = replace(spec, architecture=Architecture.cross_encoder)
    with pytest.raises(ConfigError, match="architecture differs: checkpoint bi_encoder, this run cross_encoder"):
        check_warm_start(cross, LORA, str(checkpoints["bi"]))
    check_warm_start(spec, LORA, str(checkpoints["bi"]))


def test_a_three_class_bi_head_starts_a_two_class_run(tiny_models, checkpoints):
    config, spec = bi_spec(tiny_models, num_classes=2, init_from=str(checkpoints["bi"]))
    check_warm_start(spec, LORA, str(checkpoints["bi"]))
    warm = build_model(spec, config, LORA, CPU)
    source = build_model(read_spec(checkpoints["bi"]), None, None, CPU, adapter_dir=checkpoints["bi"])
    assert warm.head.tie is None
    for key, value in source.head.win.state_dict().items():
        torch.testing.assert_close(warm.head.win.state_dict()[key], value, atol=0, rtol=0)


def test_a_soup_across_architectures_fails_naming_it(checkpoints):
    with pytest.raises(CheckpointError, match="field architecture is 'bi_encoder', but .* has 'cross_encoder'"):
        check_compatible(read_ingredient(checkpoints["cross"]), read_ingredient(checkpoints["bi"]))


def test_a_version_3_spec_reads_as_a_cross_encoder(checkpoints, tmp_path):
    payload = json.loads((checkpoints["cross"] / SPEC_FILE).read_text())
    assert payload["format_version"] == 4 and payload["architecture"] == "cross_encoder"
    del payload["architecture"]
    (tmp_path / SPEC_FILE).write_text(json.dumps({**payload, "format_version": 3}))
    for path in checkpoints["cross"].iterdir():
        if path.name != SPEC_FILE:
            (tmp_path / path.name).write_bytes(path.read_bytes())
    spec = read_spec(tmp_path)
    assert spec.architecture == Architecture.cross_encoder and spec.format_version == 4
    assert read_spec(checkpoints["bi"]).architecture == Architecture.bi_encoder


def test_an_exported_bi_encoder_predicts_as_its_adapter(checkpoints, tmp_path):
    merged = run_export(parse_config(ExportConfig, [f"checkpoint={checkpoints['bi']}", f"output_dir={tmp_path / 'm'}",
                                                    "dtype=float32"]))
    spec = read_spec(merged)
    assert spec.merged and spec.architecture == Architecture.bi_encoder
    tiny.arena_frame(8, seed=4, labelled=False).to_csv(tmp_path / "test.csv", index=False)
    pairs = read_pairs(tmp_path / "test.csv", False)

    def predicted(checkpoint, **spec_changes):
        config = PredictConfig(checkpoint=str(checkpoint), output="unused.csv", show_progress=False)
        spec = replace(build_prediction_spec(config.checkpoint, config), **spec_changes)
        return predict_checkpoint(config.checkpoint, spec, pairs, config, Accelerator(cpu=True)).logits_ab

    adapter = predicted(checkpoints["bi"], quantization=Quantization.none, compute_dtype=ComputeDtype.float32)
    assert np.abs(predicted(merged) - adapter).max() <= 1e-4
    assert np.abs(adapter[:, 0] - adapter[:, 1]).min() > 1e-4


def test_the_kaggle_estimate_counts_each_sequence_on_its_own(tiny_models, arena_pairs):
    """The estimate's max_length search stops at the first length (a multiple of 128) that truncates no sequence, and
    a pair costs the sum of its two sequences' units, not those of one sequence as long as both."""
    _, spec = bi_spec(tiny_models)
    spec = replace(spec, max_length=512)
    tokenizer = tiny.build_tokenizer(False)
    examples = encode_split(arena_pairs, build_encoders(spec, tokenizer)).forward
    lengths = [len(s) for ex in examples for s in ex.sequences()]
    first_untruncated = 128 * (max(lengths) // 128 + 1)  # 256 here (the longest sequence: 135 tokens)
    assert first_untruncated < 128 * (max(len(ex.ids) for ex in examples) // 128 + 1)  # both together: 265
    tokens = build_encoders(spec, tokenizer)[0].tokenize(arena_pairs)
    units, untruncated = units_by_max_length(spec, tokenizer, tokens, 100.0, limit=1024)  # the tiny model's positions
    assert untruncated == first_untruncated
    expected = sum(n * (1 + n / 100.0) for n in lengths) / len(arena_pairs)
    assert units[first_untruncated] == pytest.approx(expected)


# --- a run through the entry point, prediction, the ensemble ----------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tiny_models, arena_files, tmp_path_factory):
    """A bi-encoder run (conf_r_llama_smol_bi) and a cross-encoder run (conf_r_llama_smol) of the tiny Llama."""
    root = tmp_path_factory.mktemp("bi_runs")
    overrides = tiny_overrides(tiny_models["llama"], arena_files["train"], arena_files["valid"], trainer__max_steps=2)
    bi_log = root / "bi.log"
    bi = start([sys.executable, str(ENTRY), "--config-name", "conf_r_llama_smol_bi", *overrides,
                f"hydra.run.dir={root / 'bi'}"], bi_log)
    finish(bi, bi_log)
    run_entry([*overrides, f"hydra.run.dir={root / 'cross'}"], root / "cross.log")
    return {"bi": root / "bi", "cross": root / "cross"}


def test_a_bi_encoder_run_predicts_and_ensembles_beside_a_cross_encoder(runs, arena_files, tmp_path):
    spec = read_spec(runs["bi"] / "checkpoint")
    assert spec.architecture == Architecture.bi_encoder
    assert read_spec(runs["cross"] / "checkpoint").architecture == Architecture.cross_encoder
    adapter = load_file(str(runs["bi"] / "checkpoint" / "adapter_model.safetensors"))
    assert any(t.abs().max() > 0 for key, t in adapter.items() if ".lora_B." in key)  # the backbone trained
    assert set(load_file(str(runs["bi"] / "checkpoint" / "head.safetensors"))) == {
        "win.1.weight", "win.1.bias", "tie.1.weight", "tie.1.bias"}
    oof = read_oof(runs["bi"])
    assert len(oof) == 6 and np.isfinite(json.loads((runs["bi"] / "metrics.json").read_text())["best"]["log_loss"])
    out = tmp_path / "submission.csv"
    command = [sys.executable, "-m", "lmsys.predict", f"checkpoint={runs['bi'] / 'checkpoint'}",
               f"data.test_path={arena_files['valid']}", f"output={out}", "tta=false", "dense_weights=false",
               "show_progress=false"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    predicted = pd.read_csv(out).sort_values("id").reset_index(drop=True)
    assert predicted["id"].tolist() == oof["id"].tolist()
    # the checkpoint predicts what the run's evaluation saw (oof.csv: the same model, no TTA)
    np.testing.assert_allclose(predicted[PROBS].to_numpy(), oof[PROBS].to_numpy(), atol=1e-5)
    ensemble = tmp_path / "ensemble"
    command = [sys.executable, "-m", "lmsys.ensemble", "--oof", str(runs["bi"] / "oof.csv"),
               str(runs["cross"] / "oof.csv"), "--out", str(ensemble)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    saved = json.loads((ensemble / "weights.json").read_text())
    assert saved["models"] == [str(runs["bi"] / "oof.csv"), str(runs["cross"] / "oof.csv")]
    assert len(saved["weights"]) == 2 and abs(sum(saved["weights"]) - 1.0) <= 1e-9
