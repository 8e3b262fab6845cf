"""SFT / DPO warm-up with TRL on a tiny Llama: which rows become examples (ties and close soft labels skipped and
counted), the DPO margin growing, and the merged result loading as a base through lmsys.builders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_generate import chat_model
from tiny import arena_frame, model_settings

from lmsys.builders import build_model, build_tokenizer
from lmsys.cli import CommandError
from lmsys.config import LoraConfig
from lmsys.data.schema import Pair
from lmsys.warmup import MARKER, Stage, WarmupConfig, WarmupDataConfig, main
from lmsys.warmup_training import fit_examples, select_examples, trainer_args, winning_side

# transformers 5 renamed its checkpointing switch and methods; the old names, as TRL and peft still use them, warn
GRADIENT_CHECKPOINTING_DEPRECATED = "error:`gradient_checkpointing` is deprecated:FutureWarning"
PEFT_READS_THE_OLD_NAME = "error:`is_gradient_checkpointing` is deprecated:FutureWarning"
TRL_CALLS_THE_OLD_NAMES = "error:`gradient_checkpointing_(enable|disable)` is deprecated:FutureWarning"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models) -> dict:
    root = tmp_path_factory.mktemp("warmup")
    arena_frame(12, seed=0).to_csv(root / "train.csv", index=False)  # labels cycle A, B, tie
    return {"root": root, "base": chat_model(tiny_models["llama"], root / "base"), "train": root / "train.csv",
            "plain": tiny_models["llama"]}


def warmup(setup, output: Path, stage: str, **overrides) -> dict:
    args = {"stage": stage, "model_path": setup["base"], "data.train_path": setup["train"], "output_dir": output,
            "max_steps": 3, "batch_size": 2, "logging_steps": 1, "max_length": 96, "merge_dtype": "float32",
            "lora.dropout": 0.0, **overrides}
    main([f"{k}={v}" for k, v in args.items()])
    return json.loads((output / MARKER).read_text())


def losses(record: dict, key: str = "loss") -> list[float]:
    return [entry[key] for entry in record["log_history"] if key in entry and "train_loss" not in entry]


def test_winning_side_margin_rule():
    assert [winning_side(t, 0.1) for t in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]] == ["a", "b", "tie"]
    assert winning_side((0.45, 0.40, 0.15), 0.1) == "uncertain"  # A is the argmax by only 0.05
    assert winning_side((0.45, 0.40, 0.15), 0.0) == "a"
    assert winning_side((0.30, 0.60, 0.10), 0.1) == "b"
    assert winning_side((0.40, 0.15, 0.45), 0.1) == "tie"  # the tie is the argmax


def test_examples_from_rows():
    pairs = [
        Pair("1", ("q",), ("good",), ("bad",), (1.0, 0.0, 0.0)),
        Pair("2", ("q1", "q2"), ("a1", "a2"), ("b1", "b2"), (0.1, 0.8, 0.1)),
        Pair("3", ("q",), ("x",), ("y",), (0.0, 0.0, 1.0)),
        Pair("4", ("q",), ("x",), ("y",), (0.4, 0.35, 0.25)),
        Pair("5", ("q",), ("same",), ("same",), (1.0, 0.0, 0.0)),
    ]
    sft = select_examples(pairs, Stage.sft, 0.1)
    assert sft.counts() == {"used": 2, "skipped_ties": 1, "skipped_uncertain": 1, "skipped_identical": 1,
                            "shortened": 0}
    user, bot = (lambda text: {"role": "user", "content": text}), (lambda text: {"role": "assistant", "content": text})
    assert sft.examples == [
        {"prompt": [user("q")], "completion": [bot("good")]},
        {"prompt": [user("q1"), bot("b1"), user("q2")], "completion": [bot("b2")]},  # the winner's own history
    ]
    dpo = select_examples(pairs, Stage.dpo, 0.1)
    assert dpo.examples[1] == {"chosen": [user("q1"), bot("b1"), user("q2"), bot("b2")],
                               "rejected": [user("q1"), bot("a1"), user("q2"), bot("a2")]}


def test_sft_result_loads_as_a_base_and_differs(setup, tmp_path):
    record = warmup(setup, tmp_path / "sft", "sft")
    assert record["rows"] == {"used": 8, "skipped_ties": 4, "skipped_uncertain": 0, "skipped_identical": 0,
                              "shortened": 0}
    assert len(losses(record)) == 3
    weights = {}
    for name, path in (("base", setup["base"]), ("warm", tmp_path / "sft")):
        model_cfg, _, spec = model_settings(path, "llama")
        model = build_model(spec, model_cfg, LoraConfig(), torch.device("cpu"))  # like any training base
        weights[name] = {k: v.clone() for k, v in model.backbone.state_dict().items() if "lora_" not in k}
    assert weights["base"].keys() == weights["warm"].keys()
    changed = [k for k in weights["base"] if not torch.equal(weights["base"][k], weights["warm"][k])]
    assert any("q_proj" in k for k in changed) and any("down_proj" in k for k in changed)
    assert not any("embed_tokens" in k or "norm" in k for k in changed)  # LoRA touched only the projections


@pytest.mark.parametrize("stage", list(Stage))
def test_long_examples_are_cut_to_max_length_keeping_every_answer(setup, stage):
    """TRL keeps only the start of a long example, cutting away the answer, then drops it (0 examples: a crash);
    texts are cut head + tail instead, a DPO pair's user turn alike in both conversations."""
    long = [Pair(str(i), ("question " * 150 + f"q{i}",), ("answer a " * 120 + "end a",), ("answer b " * 90 + "end b",),
                 target=(1.0, 0.0, 0.0)) for i in range(3)]
    selection = select_examples(long, stage, 0.0)
    tokenizer = build_tokenizer(setup["base"], False)
    fit_examples(selection, tokenizer, 128)
    assert selection.shortened == 3
    for example in selection.examples:
        conversations = ([example["prompt"] + example["completion"]] if stage == Stage.sft
                         else [example["chosen"], example["rejected"]])
        for messages in conversations:
            assert len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]) <= 128
            assert messages[-1]["content"].startswith("answer") and messages[-1]["content"].endswith("end a" if
                   messages is conversations[0] else "end b") and " [...] " in messages[-1]["content"]
        assert len({messages[0]["content"] for messages in conversations}) == 1  # the user turn cut alike
    with pytest.raises(CommandError, match="max_length=8 leaves no room"):
        fit_examples(select_examples(long, stage, 0.0), tokenizer, 8)


@pytest.mark.filterwarnings(GRADIENT_CHECKPOINTING_DEPRECATED)
@pytest.mark.parametrize("stage", list(Stage))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_trl_config_takes_the_checkpointing_switch_by_its_current_name(tmp_path, stage, checkpointing):
    """TRL's configs default the deprecated `gradient_checkpointing` to True; ours sets transformers 5's
    `activation_checkpointing`, which the old name (what TRL reads) mirrors, without the deprecation warning."""
    config = WarmupConfig(stage=stage, model_path="unused", output_dir=str(tmp_path),
                          data=WarmupDataConfig(train_path="unused"), gradient_checkpointing=checkpointing)
    args = trainer_args(config, str(tmp_path / "trainer"), torch.float32)
    assert args.activation_checkpointing is checkpointing and args.gradient_checkpointing is checkpointing


@pytest.mark.filterwarnings(GRADIENT_CHECKPOINTING_DEPRECATED)
@pytest.mark.filterwarnings(PEFT_READS_THE_OLD_NAME)
@pytest.mark.filterwarnings(TRL_CALLS_THE_OLD_NAMES)
def test_dpo_loss_falls_and_margin_grows(setup, tmp_path):
    """With gradient checkpointing, which DPO's reference pass switches off and on, and none of the deprecation
    warnings transformers 5 raises when peft and TRL use the old names."""
    record = warmup(setup, tmp_path / "dpo", "dpo",
                    **{"data.max_pairs": 3, "max_steps": 6, "lr": 5e-3, "gradient_checkpointing": "true"})
    assert record["rows"]["used"] == 2 and record["rows"]["skipped_ties"] == 1
    loss, margin = losses(record), losses(record, "rewards/margins")
    assert loss[0] == pytest.approx(0.6931, abs=1e-3)  # log 2: the policy starts as the reference
    assert loss[-1] < loss[0] - 0.2 and margin[-1] > margin[0] + 0.5


def test_4bit_base_trains_and_merges_unquantized(setup, tmp_path):
    full = warmup(setup, tmp_path / "full", "sft", max_steps=1)
    nf4 = warmup(setup, tmp_path / "nf4", "sft", max_steps=1, quantization="nf4")
    assert losses(nf4)[0] != pytest.approx(losses(full)[0], abs=1e-6)  # the forward ran on 4-bit weights
    config = json.loads((tmp_path / "nf4" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"


def test_bad_inputs_fail_before_training(setup, tmp_path, capsys):
    unlabelled = tmp_path / "unlabelled.csv"
    arena_frame(3, labelled=False).to_csv(unlabelled, index=False)
    (tmp_path / "someone_elses").mkdir()
    ties = tmp_path / "ties.csv"
    frame = arena_frame(3)
    frame[["winner_model_a", "winner_model_b", "winner_tie"]] = [0, 0, 1]
    frame.to_csv(ties, index=False)
    earlier = tmp_path / "earlier"  # an earlier warm-up result that now also holds the training data
    earlier.mkdir()
    (earlier / MARKER).write_text("")
    held = earlier / "train.csv"
    held.write_bytes(Path(setup["train"]).read_bytes())
    cases = [
        ({"output_dir": earlier, "overwrite": "true", "data.train_path": held},
         f"output_dir={earlier} contains the input data.train_path={held}"),
        ({"output_dir": Path(setup["base"]) / "warm"}, "lies inside the input model_path"),
        ({"data.train_path": unlabelled}, f"{unlabelled}: no label columns"),
        ({"output_dir": tmp_path / "someone_elses", "overwrite": "true"}, "exists"),
        ({"model_path": setup["plain"]}, "no chat template"),
        ({"data.train_path": ties}, "no usable rows"),
        ({"stage": "ppo"}, "stage"),
        ({"max_length": 100000}, "max_length=100000 exceeds the "),  # the positions check training and predict make
        ({"max_stepz": 3}, "max_stepz"),
    ]
    for override, message in cases:
        args = {"stage": "sft", "model_path": setup["base"], "data.train_path": setup["train"],
                "output_dir": tmp_path / "out", **override}
        with pytest.raises(SystemExit) as failed:
            main([f"{k}={v}" for k, v in args.items()])
        err = capsys.readouterr().err.strip()
        assert failed.value.code == 2 and message in err and len(err.splitlines()) == 1, (override, err)
    assert not (tmp_path / "out").exists() and held.is_file() and not (Path(setup["base"]) / "warm").exists()


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0 and "stage=sft|dpo" in capsys.readouterr().out
