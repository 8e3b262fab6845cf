"""The synthetic default dataset: deterministic, Kaggle-schema, labels consistent with the answers' correctness."""

import json
import re

import pandas as pd
import pytest
from synthetic_grading import expected_label, grade, label_of

from lmsys.prep.synthetic import COLUMNS, write_splits

N_TRAIN, N_VALID = 2000, 400


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    paths = write_splits(out, N_TRAIN, N_VALID, seed=0)
    return {split: pd.read_csv(path) for split, path in paths.items()}, paths


def test_same_seed_same_files_other_seed_other_files(tmp_path, splits):
    _, paths = splits
    again = write_splits(tmp_path / "again", N_TRAIN, N_VALID, seed=0)
    other = write_splits(tmp_path / "other", 200, 50, seed=1)
    for split in ("train", "valid"):
        assert again[split].read_bytes() == paths[split].read_bytes()
        assert other[split].read_bytes() != paths[split].read_bytes()


def test_schema(splits):
    dfs, _ = splits
    assert len(dfs["train"]) == N_TRAIN and len(dfs["valid"]) == N_VALID
    for df in dfs.values():
        assert list(df.columns) == COLUMNS
        assert pd.api.types.is_integer_dtype(df["id"])
        assert df["id"].is_unique
        for col in ("winner_model_a", "winner_model_b", "winner_tie"):
            assert pd.api.types.is_integer_dtype(df[col]) and set(df[col]) <= {0, 1}
        assert (df[["winner_model_a", "winner_model_b", "winner_tie"]].sum(axis=1) == 1).all()
        assert (df["model_a"] != df["model_b"]).all()
        for row in df.itertuples():
            prompt, ra, rb = (json.loads(getattr(row, c)) for c in ("prompt", "response_a", "response_b"))
            assert isinstance(prompt, list) and len(prompt) == len(ra) == len(rb) >= 1
            assert all(isinstance(p, str) and p for p in prompt)
            assert all(r is None or isinstance(r, str) for r in ra + rb)
    assert not set(dfs["train"]["id"]) & set(dfs["valid"]["id"])


def test_splits_share_facts_but_not_rows(splits):
    dfs, _ = splits
    def rows(df):
        return set(zip(df.prompt, df.response_a, df.response_b))

    def last_questions(df):
        return {json.loads(p)[-1] for p in df.prompt}

    assert not rows(dfs["train"]) & rows(dfs["valid"])
    # Same questions recur across splits (the facts are learnable in training).
    assert len(last_questions(dfs["train"]) & last_questions(dfs["valid"])) > 50


def test_multi_turn_and_null_turns_present(splits):
    df = splits[0]["train"]
    turns = df["prompt"].map(lambda s: len(json.loads(s)))
    assert 0.06 < (turns > 1).mean() < 0.15 and turns.max() == 3
    has_null = df.apply(lambda r: None in json.loads(r.response_a) + json.loads(r.response_b), axis=1)
    assert 0.015 < has_null.mean() < 0.05
    # A null response is a wrong one: it never wins.
    null_a = df["response_a"].map(lambda s: json.loads(s)[-1] is None)
    null_b = df["response_b"].map(lambda s: json.loads(s)[-1] is None)
    assert (df.loc[null_a, "winner_model_a"] == 0).all() and (df.loc[null_b, "winner_model_b"] == 0).all()


def test_labels_follow_last_turn_correctness(splits):
    for df in splits[0].values():
        for row in df.to_dict("records"):
            assert expected_label(row["prompt"], row["response_a"], row["response_b"]) == label_of(row), row
            # Earlier turns are answered correctly by both sides.
            prompts = json.loads(row["prompt"])
            for i in range(len(prompts) - 1):
                assert grade(prompts[i], json.loads(row["response_a"])[i])
                assert grade(prompts[i], json.loads(row["response_b"])[i])


def _arith_truth(prompt):
    m = re.search(r"(\d+) (\+|-|\*|plus|minus|times) (\d+)", prompt)
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return {"+": a + b, "plus": a + b, "-": a - b, "minus": a - b, "*": a * b, "times": a * b}[op]


def _last_number(response):
    nums = re.findall(r"\d+", response or "")
    return int(nums[-1]) if nums else None


def test_arithmetic_labels_independent_recheck(splits):
    df = splits[0]["train"]
    checked = 0
    for row in df.to_dict("records"):
        prompt = json.loads(row["prompt"])[-1]
        if not re.search(r"\d+ (\+|-|\*|plus|minus|times) \d+", prompt):
            continue
        truth = _arith_truth(prompt)

        ok_a, ok_b = (_last_number(json.loads(row[c])[-1]) == truth for c in ("response_a", "response_b"))
        want = "a" if ok_a and not ok_b else "b" if ok_b and not ok_a else "tie"
        assert want == label_of(row), row
        checked += 1
    assert checked > 0.25 * len(df)


def test_known_facts_graded():
    assert grade("What is the capital of France?", "The capital of France is Paris.")
    assert not grade("What is the capital of France?", "It's Berlin.")
    assert grade("What is 7 + 5?", "7 + 5 = 12.")
    assert not grade("What is 7 + 5?", "7 + 5 = 13.")
    assert grade("How many legs does a spider have?", "Eight legs.")
    assert grade("What sound does a dog make?", 'It says "woof".')
    assert not grade("What is a baby cat called?", "It's called a puppy.")
    assert not grade("What color is a ripe banana?", None)
    assert not grade("What color is a ripe banana?", "I'm not sure, sorry.")


def test_class_balance_and_ties_of_both_kinds(splits):
    df = splits[0]["train"]
    share = df[["winner_model_a", "winner_model_b", "winner_tie"]].mean()
    assert 0.30 < share["winner_model_a"] < 0.40
    assert 0.30 < share["winner_model_b"] < 0.40
    assert 0.25 < share["winner_tie"] < 0.35
    ties = df[df["winner_tie"] == 1]
    last_ok = ties.apply(lambda r: grade(json.loads(r.prompt)[-1], json.loads(r.response_a)[-1]), axis=1)
    assert 0.4 < last_ok.mean() < 0.7  # both-right and both-wrong ties


def test_pairs_are_short_and_length_is_no_cue(splits):
    df = splits[0]["train"]
    lengths = (df.prompt + df.response_a + df.response_b).str.len()
    assert lengths.quantile(0.9) < 500
    # The winner's response is not systematically the longer one.
    len_a = df.response_a.map(lambda s: len(json.loads(s)[-1] or ""))
    len_b = df.response_b.map(lambda s: len(json.loads(s)[-1] or ""))
    wins = df[df.winner_tie == 0]
    a_longer = (len_a > len_b)[wins.index]
    agree = (a_longer == (wins.winner_model_a == 1)).mean()
    assert agree < 0.65


def test_cli_writes_files(tmp_path):
    from lmsys.synthetic import main

    main([f"out={tmp_path}", "n_train=30", "n_valid=10", "seed=3"])
    assert len(pd.read_csv(tmp_path / "train.csv")) == 30 and len(pd.read_csv(tmp_path / "valid.csv")) == 10
