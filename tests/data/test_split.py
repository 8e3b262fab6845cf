"""The validation split without a validation file: prompt-grouped and stratified, or by the `fold` column."""

import random
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import tiny

from lmsys.builders import build_splits
from lmsys.config import ConfigError, DataConfig, TrainConfig
from lmsys.data.io import DataError
from lmsys.data.schema import Pair
from lmsys.data.split import prompt_group, split_train_valid


def splits_of(data: DataConfig):
    """build_splits of a run with this data section and the default model section (three classes)."""
    return build_splits(TrainConfig(data=data))


def pairs_with_shared_prompts(n: int, n_prompts: int, seed: int = 0) -> list[Pair]:
    rng = random.Random(seed)
    prompts = [(f"prompt {k}",) if k % 4 else (f"prompt {k}", f"follow-up {k}") for k in range(n_prompts)]
    pairs = []
    for i in range(n):
        label = rng.randrange(3)
        target = tuple(float(label == c) for c in range(3))
        pairs.append(Pair(str(i), rng.choice(prompts), (f"a{i}",), (f"b{i}",), target))
    return pairs


@pytest.mark.parametrize("fraction,seed", [(0.1, 0), (0.2, 1), (0.5, 2), (0.25, 3)])
def test_no_prompt_on_both_sides(fraction, seed):
    pairs = pairs_with_shared_prompts(400, 60, seed)
    train, valid = split_train_valid(pairs, None, fraction, seed)
    assert sorted(p.id for p in train + valid) == sorted(p.id for p in pairs)  # every pair once
    assert not {p.prompts for p in train} & {p.prompts for p in valid}
    assert not {prompt_group(p) for p in train} & {prompt_group(p) for p in valid}
    assert abs(len(valid) / len(pairs) - fraction) < 0.1
    # stratified: the label mix of the validation side follows the whole set
    whole, side = Counter(p.label for p in pairs), Counter(p.label for p in valid)
    for label in range(3):
        assert abs(side[label] / len(valid) - whole[label] / len(pairs)) < 0.12


def test_split_is_deterministic_for_a_seed():
    pairs = pairs_with_shared_prompts(200, 50)
    first = [p.id for p in split_train_valid(pairs, None, 0.2, 7)[1]]
    assert first == [p.id for p in split_train_valid(pairs, None, 0.2, 7)[1]]
    assert first != [p.id for p in split_train_valid(pairs, None, 0.2, 8)[1]]


def test_prompt_group_separates_turn_boundaries():
    a = Pair("1", ("ab", "c"), ("x",), ("y",))
    b = Pair("2", ("a", "bc"), ("x",), ("y",))
    c = Pair("3", ("abc",), ("x",), ("y",))
    assert len({prompt_group(a), prompt_group(b), prompt_group(c)}) == 3
    assert prompt_group(a) == prompt_group(Pair("4", ("ab", "c"), ("other",), ("answers",)))


def test_fold_column(tmp_path):
    frame = tiny.arena_frame(12)
    frame["fold"] = [i % 3 for i in range(12)]
    path = tmp_path / "train.parquet"
    frame.to_parquet(path)
    train, valid = splits_of(DataConfig(train_path=str(path), valid_fold=1))
    assert [p.id for p in valid] == ["1", "4", "7", "10"]
    assert len(train) == 8 and all(int(p.meta["fold"]) != 1 for p in train)
    with pytest.raises(DataError, match="valid_fold=5"):
        splits_of(DataConfig(train_path=str(path), valid_fold=5))


def test_fold_column_missing(tmp_path):
    path = tmp_path / "train.csv"
    tiny.arena_frame(6).to_csv(path, index=False)
    with pytest.raises(DataError) as error:
        splits_of(DataConfig(train_path=str(path), valid_fold=0))
    assert str(error.value).startswith(f"data.train_path={path}: data.valid_fold=0 needs a 'fold' column")
    frame = tiny.arena_frame(6)
    frame["fold"] = [0, 1, None, 0, 1, 0]
    frame.to_parquet(tmp_path / "gap.parquet")
    with pytest.raises(DataError, match=r"gap.parquet: row id=2 column 'fold': no value, but data.valid_fold=1"):
        splits_of(DataConfig(train_path=str(tmp_path / "gap.parquet"), valid_fold=1))


@pytest.mark.parametrize(("value", "shown"), [("x", "'x'"), ("0.5", "0.5"), ("1e400", "inf")])
def test_a_fold_that_is_not_a_whole_number_is_named(tmp_path, value, shown):
    """A cut or typed-over fold would otherwise stop with int()'s traceback, or (0.5) silently count as fold 0."""
    frame = tiny.arena_frame(6)
    frame["fold"] = ["0", "1", value, "0", "1", "0"]
    frame.to_csv(tmp_path / "folds.csv", index=False)
    with pytest.raises(DataError, match=rf"folds.csv: row id=2 column 'fold': {shown} is not a whole number"):
        splits_of(DataConfig(train_path=str(tmp_path / "folds.csv"), valid_fold=0))
    frame["fold"] = [0, 1, "", 0, 1, 0]  # a blank cell is a missing value, not a parse error
    frame.to_csv(tmp_path / "blank.csv", index=False)
    with pytest.raises(DataError, match=r"blank.csv: row id=2 column 'fold': no value"):
        splits_of(DataConfig(train_path=str(tmp_path / "blank.csv"), valid_fold=0))
    frame["fold"] = [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]  # whole floats, as a parquet column with gaps stores them
    frame.to_parquet(tmp_path / "floats.parquet")
    _train, valid = splits_of(DataConfig(train_path=str(tmp_path / "floats.parquet"), valid_fold=1))
    assert [p.id for p in valid] == ["1", "2", "4"]


def test_valid_fold_and_valid_path_contradict():
    with pytest.raises(ConfigError, match="data.valid_fold .* cannot be combined with data.valid_path"):
        DataConfig(train_path="train.csv", valid_path="valid.csv", valid_fold=0)


def test_build_splits_without_a_validation_file(tmp_path):
    frame = tiny.arena_frame(60, seed=5)
    frame.loc[:9, "prompt"] = frame.loc[0, "prompt"]  # ten pairs share one prompt
    path = tmp_path / "train.csv"
    frame.to_csv(path, index=False)
    train, valid = splits_of(DataConfig(train_path=str(path), valid_fraction=0.2, max_train_pairs=30))
    assert len(train) == 30
    assert not {p.prompts for p in train} & {p.prompts for p in valid}
    ids = {p.id for p in valid}
    assert len({str(i) for i in range(10)} & ids) in (0, 10)  # the shared prompt is on one side only


def test_build_splits_with_a_validation_file(arena_files):
    train, valid = splits_of(DataConfig(train_path=str(arena_files["train"]), valid_path=str(arena_files["valid"]),
                                           max_valid_pairs=4))
    assert len(train) == len(pd.read_csv(arena_files["train"])) and len(valid) == 4
    assert valid[0].id == "1000"


@pytest.mark.parametrize(("n", "fraction"), [(1, 0.5), (3, 0.1), (9, 0.1)])
def test_too_few_rows_to_split_is_a_data_error(n, fraction):
    pairs = [Pair(str(i), (f"prompt {i}",), ("a",), ("b",), (1.0, 0.0, 0.0)) for i in range(n)]
    with pytest.raises(DataError, match=rf"{n} pair\(s\) with {n} distinct prompt\(s\), {n} in the largest class, "
                                        rf"cannot be split.*valid_fraction={fraction}"):
        split_train_valid(pairs, None, fraction, 0)


def test_a_largest_class_smaller_than_the_folds_is_a_data_error():
    """12 distinct prompts are enough for 10 folds, but 4 pairs a class are not: sklearn's stratified folds refuse
    (a ValueError traceback before), here one line naming the file."""
    pairs = [Pair(str(i), (f"prompt {i}",), ("a",), ("b",), tuple(np.eye(3)[i % 3])) for i in range(12)]
    with pytest.raises(DataError, match=r"^train.csv: 12 pair\(s\) with 12 distinct prompt\(s\), 4 in the largest "
                                        r"class, cannot be split .* \(needs at least 10 of both\)"):
        split_train_valid(pairs, None, 0.1, 0, "train.csv")
    assert len(split_train_valid(pairs, None, 0.25, 0, "train.csv")[1]) == 3


def test_validation_pairs_that_are_also_training_pairs_are_counted(tmp_path, caplog):
    tiny.arena_frame(8).to_csv(tmp_path / "train.csv", index=False)
    tiny.arena_frame(4, start_id=6).to_csv(tmp_path / "valid.csv", index=False)  # ids 6..9: 6 and 7 are shared
    with caplog.at_level("WARNING", logger="lmsys"):
        splits_of(DataConfig(train_path=str(tmp_path / "train.csv"), valid_path=str(tmp_path / "valid.csv")))
    assert (f"2 of the 4 validation pairs ({tmp_path / 'valid.csv'}) are also in data.train_path="
            f"{tmp_path / 'train.csv'} by id, e.g. ['6', '7']: the validation score is not out of sample"
            ) in caplog.text
    caplog.clear()
    tiny.arena_frame(4, start_id=100).to_csv(tmp_path / "disjoint.csv", index=False)
    with caplog.at_level("WARNING", logger="lmsys"):
        splits_of(DataConfig(train_path=str(tmp_path / "train.csv"), valid_path=str(tmp_path / "disjoint.csv")))
    assert "not out of sample" not in caplog.text
