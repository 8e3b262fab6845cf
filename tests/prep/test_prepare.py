"""The prepare step on small fixtures written here: every source format, dedup, folds, rejects, report, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lmsys.cli import CommandError
from lmsys.config import ConfigError
from lmsys.data.io import DataError, read_pairs
from lmsys.data.split import prompt_group
from lmsys.prep.config import PrepareConfig
from lmsys.prep.prepare import prepare

REPO_ROOT = Path(__file__).resolve().parents[2]
ONE_HOT = {"a": (1, 0, 0), "b": (0, 1, 0), "tie": (0, 0, 1)}


def kaggle_row(row_id: str, prompts: list, response_a: list, response_b: list, winner: str | None) -> dict:
    """A row of Kaggle train.csv (test.csv when `winner` is None): texts as JSON lists, labels one-hot."""
    row = {"id": row_id, "prompt": json.dumps(prompts, ensure_ascii=False),
           "response_a": json.dumps(response_a, ensure_ascii=False),
           "response_b": json.dumps(response_b, ensure_ascii=False)}
    if winner is not None:
        row = {"id": row_id, "model_a": "m-a", "model_b": "m-b", **{k: v for k, v in row.items() if k != "id"}}
        row.update(zip(("winner_model_a", "winner_model_b", "winner_tie"), ONE_HOT[winner], strict=True))
    return row


def write_csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def distinct_rows(n: int, prefix: str = "") -> list[dict]:
    """`n` labelled Kaggle rows with distinct prompts and the three labels in turn."""
    winners = ("a", "b", "tie")
    return [kaggle_row(f"{prefix}{i}", [f"{prefix}question {i}"], [f"answer {i} a"], [f"answer {i} b"], winners[i % 3])
            for i in range(n)]


def run(tmp_path: Path, inputs: list[Path], **options) -> tuple[Path, pd.DataFrame]:
    out = tmp_path / "out"
    accounting = prepare(PrepareConfig(inputs=[str(p) for p in inputs], output_dir=str(out), **{"k_folds": 2, **options}))
    return out, accounting


def test_kaggle_train_csv_null_turns_non_ascii_multi_turn(tmp_path):
    rows = [
        kaggle_row("10", ["Привет, как дела? 你好 🙂"], ["Хорошо! ça va"], [None], "a"),
        kaggle_row("11", ["first", "second"], ["one", None], ["uno", "dos"], "tie"),
        *distinct_rows(4),
    ]
    out, accounting = run(tmp_path, [write_csv(tmp_path / "train.csv", rows)])
    frame = pd.read_parquet(out / "train.parquet")
    pairs = {pair.id: pair for pair in read_pairs(out / "train.parquet", require_labels=True)}
    assert len(pairs) == 6 and set(frame["source"]) == {"train"} and set(frame["fold"]) == {0, 1}
    assert pairs["10"].prompts == ("Привет, как дела? 你好 🙂",) and pairs["10"].responses_b == ("",)
    assert pairs["11"].prompts == ("first", "second") and pairs["11"].responses_a == ("one", "")
    assert pairs["10"].target == (1.0, 0.0, 0.0) and pairs["11"].target == (0.0, 0.0, 1.0)
    assert list(frame["model_a"].unique()) == ["m-a"]
    assert accounting.loc[0, ["rows read", "rejected", "duplicates removed", "kept"]].tolist() == [6, 0, 0, 6]


def test_kaggle_test_csv_goes_to_unlabeled_parquet(tmp_path):
    rows = [kaggle_row(str(i), [f"q{i}"], [f"a{i}"], [f"b{i}"], None) for i in range(3)]
    out, _ = run(tmp_path, [write_csv(tmp_path / "test.csv", rows)])
    assert not (out / "train.parquet").exists()
    frame = pd.read_parquet(out / "unlabeled.parquet")
    assert "label" not in frame and "fold" not in frame and list(frame["id"]) == ["0", "1", "2"]
    assert all(pair.target is None for pair in read_pairs(out / "unlabeled.parquet", require_labels=False))


def test_wsdm_parquet_keeps_language(tmp_path):
    path = tmp_path / "wsdm.parquet"
    pd.DataFrame({
        "id": ["w1", "w2", "w3", "w4"], "prompt": ["p1", "p2", "p3", "p4"], "response_a": ["a1", "a2", "a3", "a4"],
        "response_b": ["b1", "b2", "b3", "b4"], "winner": ["model_a", "model_b", "model_b", "model_a"],
        "model_a": ["x"] * 4, "model_b": ["y"] * 4, "language": ["English", "Russian", "Chinese", "English"],
    }).to_parquet(path)
    out, _ = run(tmp_path, [path])
    pairs = {pair.id: pair for pair in read_pairs(out / "train.parquet", require_labels=True)}
    assert pairs["w2"].target == (0.0, 1.0, 0.0) and pairs["w2"].meta["language"] == "Russian"
    assert pairs["w1"].prompts == ("p1",) and pairs["w1"].meta["source"] == "wsdm"


def hh_dialogue(turns: list[str]) -> str:
    roles = ["Human", "Assistant"] * len(turns)
    return "".join(f"\n\n{role}: {text}" for role, text in zip(roles, turns))


def test_hh_rlhf_dialogues_split_into_turns_in_seeded_random_order(tmp_path):
    rows = [{"chosen": hh_dialogue([f"hi {i}", "hello", f"how to bake {i}?", f"good {i}"]),
             "rejected": hh_dialogue([f"hi {i}", "hello", f"how to bake {i}?", f"bad {i}"])} for i in range(20)]
    path = write_csv(tmp_path / "hh.csv", rows)
    out, _ = run(tmp_path, [path], seed=3)
    pairs = read_pairs(out / "train.parquet", require_labels=True)
    first = next(pair for pair in pairs if pair.id == "hh-0")
    assert first.prompts == ("hi 0", "how to bake 0?")
    assert {first.responses_a, first.responses_b} == {("hello", "good 0"), ("hello", "bad 0")}
    for pair in pairs:
        chosen = pair.responses_a if pair.label == 0 else pair.responses_b
        assert chosen[-1].startswith("good")
    assert {pair.label for pair in pairs} == {0, 1}
    again, _ = run(tmp_path / "again", [path], seed=3)
    assert pd.read_parquet(again / "train.parquet").equals(pd.read_parquet(out / "train.parquet"))
    assert "no `id` column" in (out / "report.md").read_text()


def test_prompt_chosen_rejected_columns(tmp_path):
    path = tmp_path / "prefs.parquet"
    pd.DataFrame({"prompt": [f"prompt {i}" for i in range(10)], "chosen": [f"yes {i}" for i in range(10)],
                  "rejected": [f"no {i}" for i in range(10)]}).to_parquet(path)
    out, _ = run(tmp_path, [path], seed=0)
    pairs = read_pairs(out / "train.parquet", require_labels=True)
    assert len(pairs) == 10 and {pair.label for pair in pairs} == {0, 1}
    for pair in pairs:
        chosen, rejected = (pair.responses_a, pair.responses_b) if pair.label == 0 else (pair.responses_b, pair.responses_a)
        number = pair.prompts[0].split()[-1]
        assert chosen == (f"yes {number}",) and rejected == (f"no {number}",)


def test_pseudo_labels_keep_probabilities_and_hard_labels_become_probabilities(tmp_path):
    pseudo = tmp_path / "pseudo.parquet"
    pd.DataFrame({"id": ["p1", "p2"], "prompt": [["q1"], ["q2"]], "response_a": [["a1"], ["a2"]],
                  "response_b": [["b1"], ["b2"]], "label": [[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]}).to_parquet(pseudo)
    out, _ = run(tmp_path, [pseudo, write_csv(tmp_path / "train.csv", distinct_rows(4))])
    pairs = {pair.id: pair for pair in read_pairs(out / "train.parquet", require_labels=True)}
    assert np.allclose(pairs["p1"].target, (0.5, 0.3, 0.2)) and pairs["1"].target == (0.0, 1.0, 0.0)
    assert all(len(label) == 3 for label in pd.read_parquet(out / "train.parquet")["label"])


def test_teacher_logits_are_kept_from_every_input_or_refused_when_some_lack_them(tmp_path):
    # One input with teacher logits beside one without: a traceback, or (the other order) the logits of every row
    # silently dropped.
    def with_logits(name: str, prefix: str) -> Path:
        rows = [{**row, "teacher_logits": json.dumps([0.5, -0.2, 0.1])} for row in distinct_rows(4, prefix=prefix)]
        return write_csv(tmp_path / name, rows)

    out, _ = run(tmp_path, [with_logits("t1.csv", "x"), with_logits("t2.csv", "y")])
    assert pd.read_parquet(out / "train.parquet")["teacher_logits"].map(list).tolist() == [[0.5, -0.2, 0.1]] * 8
    plain = write_csv(tmp_path / "plain.csv", distinct_rows(4, prefix="z"))
    for inputs in ([tmp_path / "t1.csv", plain], [plain, tmp_path / "t1.csv"]):
        with pytest.raises(DataError, match=rf"t1.csv: column 'teacher_logits' is given, but not in \['{plain}'\]"):
            run(tmp_path, inputs)


def test_duplicates_in_swapped_order_removed_and_counted(tmp_path):
    first = write_csv(tmp_path / "first.csv", [
        kaggle_row("1", ["same prompt"], ["left"], ["right"], "a"),
        kaggle_row("2", ["same prompt"], ["right"], ["left"], "b"),  # the same battle, swapped
        kaggle_row("3", ["same prompt"], ["left"], ["other"], "a"),  # a different pair with the same prompt
        *distinct_rows(3, prefix="x"),
    ])
    second = write_csv(tmp_path / "second.csv", [kaggle_row("9", ["same prompt"], ["right"], ["left"], "a")])
    out, accounting = run(tmp_path, [first, second])
    assert accounting["duplicates removed"].tolist() == [1, 1] and accounting["kept"].tolist() == [5, 0]
    duplicates = pd.read_csv(out / "duplicates.csv")
    assert duplicates[["source", "id", "kept_id", "same_label"]].values.tolist() == [
        ["first", 2, 1, True], ["second", 9, 1, False]]
    assert "| first | 1 | 0 |" in (out / "report.md").read_text()
    assert "| second | 1 | 1 |" in (out / "report.md").read_text()


def test_folds_group_prompts_and_stratify_labels(tmp_path):
    winners = ("a", "b", "tie")
    rows = [kaggle_row(f"{i}-{j}", [f"prompt {i}"], [f"a {i} {j}"], [f"b {i} {j}"], winners[i % 3])
            for i in range(30) for j in range(2)]
    out, _ = run(tmp_path, [write_csv(tmp_path / "train.csv", rows)], k_folds=5, seed=1)
    pairs = read_pairs(out / "train.parquet", require_labels=True)
    folds_of_prompt = pd.DataFrame({"group": [prompt_group(p) for p in pairs],
                                    "fold": [p.meta["fold"] for p in pairs], "label": [p.label for p in pairs]})
    assert folds_of_prompt.groupby("group")["fold"].nunique().max() == 1
    per_fold = pd.crosstab(folds_of_prompt["fold"], folds_of_prompt["label"])
    assert per_fold.shape == (5, 3) and (per_fold.max() - per_fold.min()).max() <= 2


def fold_by_prompt(path: Path) -> dict[str, int]:
    return {pair.prompts[0]: pair.meta["fold"] for pair in read_pairs(path, require_labels=True)}


def test_folds_from_an_earlier_output_keep_every_earlier_prompt_in_its_fold(tmp_path):
    """v2 = v1's source + a new one: without folds_from the folds are re-drawn; with it every v1 prompt keeps its
    fold (also for a new pair on a v1 prompt), and the new prompts are spread stratified over all folds."""
    winners = ("a", "b", "tie")
    first = write_csv(tmp_path / "first.csv", [kaggle_row(f"{i}", [f"prompt {i}"], [f"a {i}"], [f"b {i}"],
                                                          winners[i % 3]) for i in range(30)])
    extra = write_csv(tmp_path / "extra.csv", [kaggle_row(f"x{i}", [f"prompt {i}"], [f"c {i}"], [f"d {i}"],
                                                          winners[i % 3]) for i in range(25, 60)])
    v1, v2, redrawn = tmp_path / "v1", tmp_path / "v2", tmp_path / "redrawn"
    prepare(PrepareConfig(inputs=[str(first)], output_dir=str(v1), k_folds=3, seed=0))
    prepare(PrepareConfig(inputs=[str(first), str(extra)], output_dir=str(v2), k_folds=3, seed=0,
                          folds_from=str(v1 / "train.parquet")))
    prepare(PrepareConfig(inputs=[str(first), str(extra)], output_dir=str(redrawn), k_folds=3, seed=0))
    before, after = fold_by_prompt(v1 / "train.parquet"), fold_by_prompt(v2 / "train.parquet")
    assert all(after[prompt] == fold for prompt, fold in before.items())
    assert sum(fold_by_prompt(redrawn / "train.parquet")[prompt] != fold for prompt, fold in before.items()) > 5
    pairs = read_pairs(v2 / "train.parquet", require_labels=True)
    assert len(pairs) == 65 and all(pair.meta["fold"] == before[pair.prompts[0]] for pair in pairs if pair.id in
                                    {f"x{i}" for i in range(25, 30)})  # new pairs on v1 prompts
    new_folds = Counter(after[f"prompt {i}"] for i in range(30, 60))
    assert sorted(new_folds) == [0, 1, 2] and max(new_folds.values()) - min(new_folds.values()) <= 2
    assert "35 of the 65 labelled pairs have a prompt there and keep its fold" in (v2 / "report.md").read_text()


def test_a_few_new_prompts_fill_the_smallest_folds_and_bad_earlier_folds_are_named(tmp_path):
    first = write_csv(tmp_path / "first.csv", distinct_rows(7))
    v1, _ = run(tmp_path, [first], k_folds=3, seed=0)
    sizes = Counter(pair.meta["fold"] for pair in read_pairs(v1 / "train.parquet", require_labels=True))
    extra = write_csv(tmp_path / "extra.csv", distinct_rows(1, prefix="new "))
    v2 = tmp_path / "v2"
    prepare(PrepareConfig(inputs=[str(first), str(extra)], output_dir=str(v2), k_folds=3,
                          folds_from=str(v1 / "train.parquet")))
    assert fold_by_prompt(v2 / "train.parquet")["new question 0"] == min(sizes, key=lambda fold: (sizes[fold], fold))
    with pytest.raises(DataError, match=r"train.parquet: row id=\S+ column 'fold': 2 is not a fold of k_folds=2"):
        prepare(PrepareConfig(inputs=[str(first)], output_dir=str(tmp_path / "v3"), k_folds=2,
                              folds_from=str(v1 / "train.parquet")))
    # more folds than the earlier file's: the new prompts alone filled folds 3 and 4 (a one-source validation fold)
    with pytest.raises(DataError, match=r"train.parquet: column 'fold': folds 0..2 only, not a train.parquet of "
                                        r"k_folds=5 \(folds_from needs the earlier file's k_folds: 3\?\)"):
        prepare(PrepareConfig(inputs=[str(first), str(extra)], output_dir=str(tmp_path / "v3"), k_folds=5,
                              folds_from=str(v1 / "train.parquet")))
    split = pd.read_parquet(v1 / "train.parquet")
    split = pd.concat([split, split.head(1).assign(id="again", fold=(split.loc[0, "fold"] + 1) % 3)])
    split.to_parquet(tmp_path / "split.parquet", index=False)
    with pytest.raises(DataError, match=r"split.parquet: row id=again column 'fold': \d, but its prompt is in fold"):
        prepare(PrepareConfig(inputs=[str(first)], output_dir=str(tmp_path / "v4"), k_folds=3,
                              folds_from=str(tmp_path / "split.parquet")))
    assert not (tmp_path / "v3").exists() and not (tmp_path / "v4").exists()


BAD_ROWS = [
    kaggle_row("1", ["fine"], ["x"], ["y"], "a"),
    {**kaggle_row("2", ["q"], ["x"], ["y"], "a"), "prompt": '["unclosed'},
    {**kaggle_row("3", ["q3"], ["x"], ["y"], "a"), "winner_model_b": 1},
    kaggle_row("1", ["again"], ["x"], ["y"], "b"),
    kaggle_row("", ["no id"], ["x"], ["y"], "b"),
    {**kaggle_row("5", ["q5"], ["x"], ["y"], "a"), "response_a": "[]"},
    kaggle_row("6", ["fine too"], ["x"], ["y"], "tie"),
]


def test_lenient_writes_every_skipped_row_to_rejects(tmp_path):
    arena = write_csv(tmp_path / "arena.csv", BAD_ROWS)
    hh = write_csv(tmp_path / "hh.csv", [
        {"chosen": hh_dialogue(["q", "good"]), "rejected": hh_dialogue(["q", "bad"])},
        {"chosen": "preamble" + hh_dialogue(["q", "good"]), "rejected": hh_dialogue(["q", "bad"])},
        {"chosen": hh_dialogue(["q", "a", "q2", "good"]), "rejected": hh_dialogue(["q", "b", "q2", "bad"])},
        {"chosen": hh_dialogue(["q3", "good"]), "rejected": "\n\nHuman: q3\n\nHuman: again"},
    ])
    out, accounting = run(tmp_path, [arena, hh], strict=False)
    rejects = pd.read_csv(out / "rejects.csv", keep_default_na=False, dtype=str)
    assert list(rejects.columns) == ["file", "row_id", "column", "reason"]
    found = {(Path(r.file).name, r.row_id, r.column): r.reason for r in rejects.itertuples()}
    expected = {
        ("arena.csv", "", "id"): "missing id", ("arena.csv", "1", "id"): "duplicate id",
        ("arena.csv", "2", "prompt"): "malformed JSON",
        ("arena.csv", "3", "['winner_model_a', 'winner_model_b', 'winner_tie']"): "labels must be one-hot",
        ("arena.csv", "5", "response_a"): "empty list of turns",
        ("hh.csv", "hh-1", "chosen"): "text before the first 'Human:' turn",
        ("hh.csv", "hh-2", "rejected"): "the dialogue differs from 'chosen' before",
        ("hh.csv", "hh-3", "rejected"): "expected alternating 'Human:'/'Assistant:' turns",
    }
    assert set(found) == set(expected)
    assert {key: found[key][: len(reason)] for key, reason in expected.items()} == expected
    assert accounting[["rows read", "rejected", "kept"]].values.tolist() == [[7, 5, 2], [4, 3, 1]]
    assert sorted(pd.read_parquet(out / "train.parquet")["id"]) == ["1", "6", "hh-0"]


def test_strict_stops_at_the_first_bad_row_naming_file_row_and_column(tmp_path):
    path = write_csv(tmp_path / "arena.csv", [BAD_ROWS[0], BAD_ROWS[1]])
    with pytest.raises(DataError, match=rf"{path}: row id=2 column 'prompt': malformed JSON"):
        run(tmp_path, [path])
    hh = write_csv(tmp_path / "hh.csv", [{"chosen": "no turns", "rejected": hh_dialogue(["q", "bad"])}])
    with pytest.raises(DataError, match=rf"{hh}: row id=hh-0 column 'chosen': text before the first"):
        run(tmp_path, [hh])
    assert not (tmp_path / "out").exists()


def test_ids_shared_by_two_sources_get_a_prefix(tmp_path):
    first = write_csv(tmp_path / "first.csv", distinct_rows(3))
    second = write_csv(tmp_path / "second.csv", distinct_rows(3, prefix="other "))
    second_rows = pd.read_csv(second).assign(id=["0", "1", "7"])
    second_rows.to_csv(second, index=False)
    out, accounting = run(tmp_path, [first, second], sources=["kaggle", "extra"])
    ids = pd.read_parquet(out / "train.parquet")["id"].tolist()
    assert sorted(ids) == sorted(["kaggle:0", "kaggle:1", "2", "extra:0", "extra:1", "7"])
    assert accounting["ids prefixed"].tolist() == [2, 2]
    assert "prefix `<source>:`" in (out / "report.md").read_text()


def test_a_prefixed_id_that_a_row_already_has_is_named_as_such(tmp_path):
    """An earlier prepared output (ids `kaggle:0`, ...) prepared again with one of its sources: the prefix given to
    id 0 is a row's own id, which distinct source names cannot fix, so the error does not advise them."""
    first = write_csv(tmp_path / "kaggle.csv", distinct_rows(3))
    again = pd.read_csv(write_csv(tmp_path / "v1.csv", distinct_rows(3, prefix="v1 ")))
    again.assign(id=["kaggle:0", "0", "5"]).to_csv(tmp_path / "v1.csv", index=False)
    named = r"row id=kaggle:0 column 'id': a row's own id, and the id given to a row"
    with pytest.raises(DataError, match=named) as err:
        run(tmp_path, [first, tmp_path / "v1.csv"])
    assert "sources=" not in str(err.value) and not (tmp_path / "out").exists()


def test_report_tables_and_histograms_in_words(tmp_path):
    rows = [*distinct_rows(6), kaggle_row("m", ["one two", "three"], ["four", "five"], ["six", "seven"], "a")]
    out, _ = run(tmp_path, [write_csv(tmp_path / "train.csv", rows)], max_length=70)
    report = (out / "report.md").read_text()
    for expected in ("## Rows per input", "## Label balance per fold", "## Per source", "p10 | median | p90",
                     "whitespace-separated words (no tokenizer_path given", "Multi-turn rows: 14.3%",
                     "plus 64 for the instruction and template markers"):
        assert expected in report
    # Every row is 3 words + 3 words + 3 words (+64) = 73 > 70 except the multi-turn one (7 words + 64 = 71 > 70).
    assert "would cut: 100.0%" in report
    for column in ("prompt", "response_a", "response_b"):
        assert (out / f"lengths_{column}.png").read_bytes().startswith(b"\x89PNG")


def save_char_tokenizer(path: Path) -> None:
    """One token per character, and a bos token that the counts must leave out."""
    vocab = {token: i for i, token in enumerate(["<unk>", "<bos>", *"abcdefghijklmnopqrstuvwxyz"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<bos>").save_pretrained(path)


def test_report_counts_tokens_with_a_tokenizer(tmp_path):
    tokenizer_dir = tmp_path / "tokenizer"
    save_char_tokenizer(tokenizer_dir)
    rows = [kaggle_row(str(i), ["abcd"], ["ab"], ["abcdef"], "a") for i in range(2)]
    rows[1]["prompt"] = json.dumps(["abcde"])
    out, _ = run(tmp_path, [write_csv(tmp_path / "train.csv", rows)], tokenizer_path=str(tokenizer_dir))
    report = (out / "report.md").read_text()
    assert f"tokens of the tokenizer in {tokenizer_dir}" in report
    assert "| response_b | 6 | 6 | 6 | 6 |" in report


def test_a_tokenizer_path_without_a_local_tokenizer_fails_before_the_data_work(tmp_path, monkeypatch):
    """Checked first and locally only: a Hub id or a typo must not start a download, nor fail after the data work."""
    train = write_csv(tmp_path / "train.csv", distinct_rows(4))
    with pytest.raises(ConfigError, match="tokenizer_path=HuggingFaceTB/SmolLM2-135M is not a local directory"):
        run(tmp_path, [train], tokenizer_path="HuggingFaceTB/SmolLM2-135M")
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr("lmsys.prep.prepare.read_source", lambda *args: pytest.fail("the data was read first"))
    with pytest.raises(CommandError, match=f"tokenizer_path={tmp_path / 'empty'}: no tokenizer there"):
        run(tmp_path, [train], tokenizer_path=str(tmp_path / "empty"))
    assert not (tmp_path / "out").exists()


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "lmsys.prepare", *args], check=False, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_only_its_outputs_and_rejects_a_typo(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    path = write_csv(tmp_path / "train.csv", distinct_rows(4))
    done = cli([f"inputs=[{path}]", f"output_dir={tmp_path / 'out'}", "k_folds=2"], work)
    assert done.returncode == 0, done.stderr
    assert list(work.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "duplicates.csv", "lengths_prompt.png", "lengths_response_a.png", "lengths_response_b.png", "report.md",
        "train.parquet"]
    typo = cli([f"inputs=[{path}]", f"output_dir={tmp_path / 'out'}", "k_fold=2"], work)
    assert typo.returncode != 0 and "k_fold" in typo.stderr


def test_a_failing_run_keeps_the_previous_outputs_and_its_inputs(tmp_path):
    out, _ = run(tmp_path, [write_csv(tmp_path / "train.csv", distinct_rows(8))])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError, match="k_folds=50 but the labelled rows hold only 8 distinct prompts"):
        run(tmp_path, [tmp_path / "train.csv"], k_folds=50)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "train.csv"]  # no staging directory left


def test_an_output_dir_that_contains_an_input_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    source = write_csv(out / "train.csv", distinct_rows(8))
    before = source.read_bytes()
    with pytest.raises(ConfigError, match=r"output_dir=.*out contains the input inputs\[0\]"):
        prepare(PrepareConfig(inputs=[str(source)], output_dir=str(out), k_folds=50))
    assert source.read_bytes() == before and [p.name for p in out.iterdir()] == ["train.csv"]


def test_a_rerun_replaces_its_outputs_and_leaves_other_files(tmp_path):
    lenient, _ = run(tmp_path, [write_csv(tmp_path / "a.csv", [*distinct_rows(4, prefix="r"), BAD_ROWS[1]])], strict=False)
    (lenient / "notes.md").write_text("mine")
    run(tmp_path, [tmp_path / "a.csv"], strict=False, sources=["second"])
    assert (lenient / "notes.md").read_text() == "mine" and (lenient / "rejects.csv").is_file()
    assert set(pd.read_parquet(lenient / "train.parquet")["source"]) == {"second"}
    run(tmp_path, [write_csv(tmp_path / "b.csv", distinct_rows(4))])  # strict: no rejects.csv of its own
    assert not (lenient / "rejects.csv").exists()


def test_lenient_skips_a_file_that_is_not_utf8_and_goes_on(tmp_path):
    good = write_csv(tmp_path / "good.csv", distinct_rows(4))
    latin = tmp_path / "latin.csv"
    latin.write_bytes(write_csv(tmp_path / "x.csv", distinct_rows(4, prefix="l")).read_bytes().replace(
        b"question", "quéstion".encode("latin-1")))
    with pytest.raises(DataError, match=rf"{latin}: not UTF-8 text: byte 0xe9 at byte offset \d+ \(line 2\)"):
        run(tmp_path, [good, latin])
    out, accounting = run(tmp_path, [good, latin], strict=False)
    rejects = pd.read_csv(out / "rejects.csv", keep_default_na=False, dtype=str)
    assert rejects[["file", "row_id", "column"]].values.tolist() == [[str(latin), "", ""]]
    assert rejects["reason"][0].startswith("not UTF-8 text") and "whole file is skipped" in rejects["reason"][0]
    assert sorted(pd.read_parquet(out / "train.parquet")["id"]) == ["0", "1", "2", "3"]
    assert accounting["kept"].tolist() == [4, 0] and f"`{latin}` was skipped" in (out / "report.md").read_text()


def test_lenient_rechecks_rows_with_the_whole_files_text_schema(tmp_path):
    """A test file whose one malformed cell would, alone, look like plain text: still rejected row by row."""
    rows = [{k: v for k, v in row.items() if k in ("id", "prompt", "response_a", "response_b")}
            for row in distinct_rows(4)]
    rows[1]["prompt"] = '["unclosed'
    out, _ = run(tmp_path, [write_csv(tmp_path / "test.csv", rows)], strict=False)
    rejects = pd.read_csv(out / "rejects.csv", keep_default_na=False, dtype=str)
    assert rejects[["row_id", "column"]].values.tolist() == [["1", "prompt"]]
    assert sorted(pd.read_parquet(out / "unlabeled.parquet")["id"]) == ["0", "2", "3"]
