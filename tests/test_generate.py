"""Response-pair generation: every prompt answered once by two different tiny models (seeded), multi-turn prompts
answered turn by turn, the parquet read back by read_pairs and labelled by pseudo_label."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_predict import make_checkpoint
from transformers import AutoTokenizer

from lmsys.builders import build_tokenizer
from lmsys.cli import parse_config
from lmsys.data.io import read_pairs
from lmsys.generate import GenerateConfig, main
from lmsys.generation import (
    HfEngine,
    answer_conversations,
    draw_model_pairs,
    prompt_budget,
    render_prompt_ids,
    stop_token_ids,
)
from lmsys.modeling.model_facts import position_limit
from lmsys.pseudo_label import main as pseudo_label_main

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPTS = ["hello world", json.dumps(["what is the capital of france", "and of rome ?"]), "two plus three equals",
           json.dumps(["yes"]), "which answer is better", "four minus one", "hello", json.dumps(["a", "b", "c"])]


def chat_model(source: Path, target: Path, template: str | None = CHATML) -> Path:
    shutil.copytree(source, target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models) -> dict:
    root = tmp_path_factory.mktemp("generate")
    models = [chat_model(tiny_models[kind], root / name)
              for kind, name in (("llama", "tiny-llama"), ("gemma3", "tiny-gemma3"), ("gemma2", "tiny-gemma2"))]
    prompts = root / "prompts.csv"
    pd.DataFrame({"id": [f"p{i}" for i in range(len(PROMPTS))], "prompt": PROMPTS}).to_csv(prompts, index=False)
    return {"root": root, "models": models, "prompts": prompts}


def run(setup, output: Path, models: list[Path] | None = None, **overrides) -> pd.DataFrame:
    args = {"prompts": setup["prompts"], "output": output, "max_new_tokens": 5, "batch_size": 3, **overrides}
    models = setup["models"] if models is None else models
    main([f"models=[{','.join(str(m) for m in models)}]", *(f"{k}={v}" for k, v in args.items())])
    return pd.read_parquet(output)


def test_every_prompt_answered_once_by_two_different_models(setup, tmp_path):
    frame = run(setup, tmp_path / "pairs.parquet")
    assert frame["id"].tolist() == [f"p{i}" for i in range(len(PROMPTS))]
    assert (frame["model_a"] != frame["model_b"]).all()
    assert set(frame["model_a"]) | set(frame["model_b"]) <= {"tiny-llama", "tiny-gemma3", "tiny-gemma2"}
    pairs = read_pairs(tmp_path / "pairs.parquet", require_labels=False)
    assert [p.prompts for p in pairs][:2] == [("hello world",), ("what is the capital of france", "and of rome ?")]
    assert all(len(p.responses_a) == len(p.responses_b) == len(p.prompts) for p in pairs)  # one answer per turn
    assert {p.meta["source"] for p in pairs} == {"generated"} and all(p.target is None for p in pairs)


def test_answers_are_the_drawn_models_own(setup, tmp_path):
    """A model's greedy answer to a prompt does not depend on the side it was drawn for, on the other model or on
    batching with left padding: each row's answers equal that model answering the prompt alone."""
    frame = run(setup, tmp_path / "pairs.parquet", max_new_tokens=4)
    config = GenerateConfig(prompts="unused.csv", models=["a", "b"], output="unused.parquet", max_new_tokens=4,
                            batch_size=1)
    singles = {}
    for path in setup["models"]:
        engine = HfEngine(str(path), build_tokenizer(path, False), config)
        singles[path.name] = answer_conversations(engine, [tuple(json.loads(p)) if p.startswith("[") else (p,)
                                                           for p in PROMPTS])
    for i, row in frame.iterrows():
        assert list(row["response_a"]) == singles[row["model_a"]][i]
        assert list(row["response_b"]) == singles[row["model_b"]][i]


def test_left_padding_keeps_greedy_answers(setup):
    """Batched generation (prompts of different lengths, left-padded) gives the tokens of one-at-a-time generation;
    right padding would put pad tokens between a prompt and its answer."""
    path = setup["models"][0]
    tokenizer = build_tokenizer(path, False)
    conversations = [[{"role": "user", "content": text}] for text in ("hello", "what is the capital of france paris")]
    answers = {}
    for batch_size in (1, 2):
        config = GenerateConfig(prompts="u.csv", models=["a", "b"], output="u.parquet", max_new_tokens=6,
                                batch_size=batch_size)
        engine = HfEngine(str(path), tokenizer, config)
        ids = [render_prompt_ids(tokenizer, c, 100) for c in conversations]
        answers[batch_size] = [engine._generate([x]) for x in ids] if batch_size == 1 else engine._generate(ids)
    assert [a[0] for a in answers[1]] == answers[2]


def test_seeded_reproducible_and_seed_changes_the_draw(setup, tmp_path):
    first = run(setup, tmp_path / "a.parquet", sampling="sample", seed=3)
    again = run(setup, tmp_path / "b.parquet", sampling="sample", seed=3)
    pd.testing.assert_frame_equal(first, again)
    other = run(setup, tmp_path / "c.parquet", sampling="sample", seed=4)
    assert (first[["model_a", "model_b"]].to_numpy() != other[["model_a", "model_b"]].to_numpy()).any()


def test_draw_covers_every_ordered_pair():
    pairs = draw_model_pairs(3000, 3, seed=0)
    assert (pairs[:, 0] != pairs[:, 1]).all()
    counts = pd.Series([tuple(p) for p in pairs.tolist()]).value_counts()
    assert len(counts) == 6 and counts.min() > 400  # 3 x 2 ordered pairs, ~500 each: A/B order is random too


def test_generated_pairs_are_pseudo_labelled(setup, tmp_path, tiny_models):
    pairs = tmp_path / "pairs.parquet"
    run(setup, pairs, models=setup["models"][:2])
    checkpoint = make_checkpoint(tmp_path / "ckpt", tiny_models["llama"], seed=0)
    pseudo_label_main([f"checkpoints=[{checkpoint}]", f"data.test_path={pairs}", f"output={tmp_path / 'pl.parquet'}",
                       "show_progress=false"])
    labelled = read_pairs(tmp_path / "pl.parquet", require_labels=True)
    assert [p.id for p in labelled] == [f"p{i}" for i in range(len(PROMPTS))]
    assert all(abs(sum(p.target) - 1.0) < 1e-6 for p in labelled)


def test_txt_prompts_and_plain_fallback(setup, tmp_path, tiny_models):
    """A .txt file holds one prompt per line (blank lines skipped); a model without a chat template is refused
    unless template_fallback=true, which prompts it with 'User:'/'Assistant:' text."""
    (tmp_path / "p.txt").write_text("hello world\n\nwhat is the capital of france\n")
    plain = chat_model(tiny_models["llama"], tmp_path / "plain-llama", template=None)
    models = [setup["models"][0], plain]
    with pytest.raises(SystemExit) as refused:
        run(setup, tmp_path / "x.parquet", models=models, prompts=tmp_path / "p.txt")
    assert refused.value.code == 2 and not (tmp_path / "x.parquet").exists()
    frame = run(setup, tmp_path / "x.parquet", models=models, prompts=tmp_path / "p.txt", template_fallback="true")
    assert frame["id"].tolist() == ["0", "1"]
    assert render_prompt_ids(build_tokenizer(plain, False), [{"role": "user", "content": "hello"}], 100) == \
        build_tokenizer(plain, False)("User: hello\n\nAssistant:")["input_ids"]


@pytest.mark.parametrize(("override", "message"), [
    ("max_new_tokns=5", "max_new_tokns"),
    ("engine=vllm", "vllm"),
    ("sampling=beam", "sampling"),
    ("output=out.csv", "parquet"),
])
def test_bad_input_fails_in_one_line_before_loading(setup, tmp_path, capsys, override, message):
    if override == "engine=vllm" and torch.cuda.is_available():
        pytest.skip("vllm may be installed on a GPU machine")
    with pytest.raises(SystemExit) as failed:
        main([f"prompts={setup['prompts']}", f"models=[{setup['models'][0]},{setup['models'][1]}]",
              f"output={tmp_path / 'o.parquet'}", override])
    err = capsys.readouterr().err.strip()
    assert failed.value.code == 2 and message in err and len(err.splitlines()) == 1


def test_an_output_inside_a_model_or_over_a_directory_is_refused_before_loading(setup, tmp_path, capsys):
    (tmp_path / "dir.parquet").mkdir()
    models = f"models=[{setup['models'][0]},{setup['models'][1]}]"
    for output, message in ((Path(setup["models"][1]) / "pairs.parquet", "lies inside the input models[1]"),
                            (tmp_path / "dir.parquet", "is an existing directory")):
        with pytest.raises(SystemExit) as failed:
            main([f"prompts={setup['prompts']}", models, f"output={output}", "overwrite=true"])
        err = capsys.readouterr().err.strip()
        assert failed.value.code == 2 and message in err and len(err.splitlines()) == 1
    assert not (Path(setup["models"][1]) / "pairs.parquet").exists()


def test_a_model_without_weights_or_tokenizer_fails_before_any_model_loads(setup, tmp_path, capsys, monkeypatch):
    """config.json alone is no model: missing weights were a traceback after the other models had answered, a
    missing tokenizer a few-token one that answered everything with empty text."""
    no_weights, no_tokenizer, bin_only = (shutil.copytree(setup["models"][1], tmp_path / name)
                                          for name in ("no_weights", "no_tokenizer", "bin_only"))
    (no_weights / "model.safetensors").unlink()
    (bin_only / "model.safetensors").rename(bin_only / "pytorch_model.bin")
    for path in no_tokenizer.glob("tokenizer*"):
        path.unlink()
    monkeypatch.setattr("lmsys.generation.AutoModelForCausalLM.from_pretrained", lambda *a, **k: 1 / 0)
    for model, message in ((no_weights, (f"models: {no_weights}: no model.safetensors (nor "
                                         f"model.safetensors.index.json): the weights are missing")),
                           (bin_only, "pytorch_model.bin is not read here, save the model as safetensors"),
                           (no_tokenizer, f"{no_tokenizer}: no tokenizer (none of tokenizer.json, ")):
        with pytest.raises(SystemExit) as failed:
            main([f"prompts={setup['prompts']}", f"models=[{setup['models'][0]},{model}]",
                  f"output={tmp_path / 'o.parquet'}"])
        err = capsys.readouterr().err.strip()
        assert failed.value.code == 2 and err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.parquet").exists()


def test_a_prompt_keeps_what_the_models_positions_hold(setup, tmp_path, capsys):
    """max_prompt_tokens=2048 on a 1024-position model ran past its positions (transformers only warned): the prompt
    keeps its last 1024 - max_new_tokens tokens; a max_new_tokens that fills the positions is refused."""
    model = str(setup["models"][0])
    config = parse_config(GenerateConfig, [f"prompts={setup['prompts']}", f"models=[{model},{setup['models'][1]}]",
                                           "output=o.parquet", "max_new_tokens=24"])
    assert position_limit(model) == 1024 and prompt_budget(model, config) == 1000
    assert prompt_budget(model, replace(config, max_prompt_tokens=300)) == 300
    with pytest.raises(SystemExit) as refused:
        run(setup, tmp_path / "o.parquet", max_new_tokens=1024)
    err = capsys.readouterr().err
    assert refused.value.code == 2 and err.startswith(f"error: models: {setup['models'][0]} has 1024 positions, which "
                                                      f"max_new_tokens=1024 fills without a prompt")


def test_ctrl_c_is_one_line_and_writes_nothing(setup, tmp_path, monkeypatch, capsys):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("lmsys.generation.generate_pairs", interrupted)
    with pytest.raises(SystemExit) as stopped:
        run(setup, tmp_path / "o.parquet")
    err = capsys.readouterr().err
    assert stopped.value.code == 130 and "stopped by SIGINT before the generation finished: nothing written" in err
    assert "Traceback" not in err and not list(tmp_path.iterdir())


def test_bad_prompt_names_file_row_and_column(setup, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"id": ["x1", "x2"], "prompt": ["fine", ""]}).to_csv(bad, index=False)
    with pytest.raises(SystemExit):
        main([f"prompts={bad}", f"models=[{setup['models'][0]},{setup['models'][1]}]", f"output={tmp_path / 'o.parquet'}"])
    err = capsys.readouterr().err
    assert str(bad) in err and "id=x2" in err and "'prompt'" in err


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0 and "prompts=FILE models=[M1,M2,...]" in capsys.readouterr().out


def test_stop_tokens_include_the_templates_turn_end(setup):
    """The tiny models' eos is <eos>, but the ChatML template ends an assistant turn with <|im_end|>."""
    tokenizer = build_tokenizer(setup["models"][0], False)
    ids = stop_token_ids(tokenizer, 2)
    assert tokenizer.convert_ids_to_tokens(ids) == ["<eos>", "<|im_end|>"]
