"""Reading battles: the Kaggle CSV schema, parquet `label`, the WSDM schema, and clear errors for bad input."""

import json
import re

import numpy as np
import pandas as pd
import pytest
import tiny

from lmsys.data.io import DataError, read_pairs, read_prompts
from lmsys.data.schema import Pair, swap_abt, swap_pair


def write_csv(tmp_path, frame: pd.DataFrame, name: str = "train.csv"):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def assert_names(err: pytest.ExceptionInfo, path, row_id=None, column=None) -> str:
    message = str(err.value)
    assert str(path) in message, message
    if row_id is not None:
        assert re.search(rf"\bid={re.escape(str(row_id))}\b", message), message
    if column is not None:
        assert column in message, message
    return message


def test_kaggle_csv_round_trip(tmp_path):
    frame = tiny.arena_frame(10, seed=4)
    pairs = read_pairs(write_csv(tmp_path, frame), require_labels=True)
    assert [p.id for p in pairs] == [str(i) for i in range(10)]
    for pair, (_, row) in zip(pairs, frame.iterrows(), strict=True):
        assert pair.prompts == tuple(json.loads(row["prompt"]))
        assert pair.responses_a == tuple(json.loads(row["response_a"]))
        assert pair.responses_b == tuple("" if t is None else t for t in json.loads(row["response_b"]))
        assert pair.target == (float(row["winner_model_a"]), float(row["winner_model_b"]), float(row["winner_tie"]))
        assert pair.meta["model_a"] == "m1"
    assert pairs[0].n_turns == 2  # arena_frame: every fifth row has two turns
    assert any("中" in turn for pair in pairs for turn in pair.prompts + pair.responses_a + pair.responses_b)


def test_null_turns_are_empty_strings(tmp_path):
    frame = tiny.arena_frame(8)
    pairs = read_pairs(write_csv(tmp_path, frame), require_labels=True)
    assert pairs[3].responses_b[-1] == ""  # arena_frame writes a null turn in row 3
    for pair in pairs:
        for turn in pair.prompts + pair.responses_a + pair.responses_b:
            assert isinstance(turn, str) and turn != "None"


def test_test_file_without_labels(tmp_path):
    path = write_csv(tmp_path, tiny.arena_frame(4, labelled=False), "test.csv")
    pairs = read_pairs(path, require_labels=False)
    assert [p.target for p in pairs] == [None] * 4 and pairs[0].label is None
    with pytest.raises(DataError) as err:
        read_pairs(path, require_labels=True)
    assert_names(err, path, column="winner_model_a")


def test_ids_stay_strings(tmp_path):
    frame = tiny.arena_frame(2)
    frame["id"] = ["007", "12345678901234567890"]
    pairs = read_pairs(write_csv(tmp_path, frame), require_labels=True)
    assert [p.id for p in pairs] == ["007", "12345678901234567890"]


@pytest.mark.parametrize("cell", ['["unclosed', '{"a": 1', "not json", ""])
def test_malformed_json_names_file_row_and_column(tmp_path, cell):
    frame = tiny.arena_frame(5, start_id=100)
    frame.loc[2, "response_a"] = cell
    path = write_csv(tmp_path, frame)
    with pytest.raises(DataError) as err:
        read_pairs(path, require_labels=True)
    message = assert_names(err, path, row_id=102, column="response_a")
    assert "JSON" in message


@pytest.mark.parametrize("cell", ['{"turn": "x"}', '"just a string"', "[1, 2]", "[]", "null"])
def test_json_that_is_not_a_list_of_strings(tmp_path, cell):
    frame = tiny.arena_frame(3, start_id=7)
    frame.loc[1, "prompt"] = cell
    path = write_csv(tmp_path, frame)
    with pytest.raises(DataError) as err:
        read_pairs(path, require_labels=True)
    assert_names(err, path, row_id=8, column="prompt")


@pytest.mark.parametrize("labels", [
    (1, 1, 0), (0, 0, 0), (2, 0, 0), (0.5, 0.5, 0), (1, -1, 1), ("", 1, 0), ("x", 0, 1),
])
def test_labels_that_are_not_exactly_one_hot(tmp_path, labels):
    frame = tiny.arena_frame(4, start_id=50)
    frame[["winner_model_a", "winner_model_b", "winner_tie"]] = frame[
        ["winner_model_a", "winner_model_b", "winner_tie"]].astype(object)
    frame.loc[3, ["winner_model_a", "winner_model_b", "winner_tie"]] = list(labels)
    path = write_csv(tmp_path, frame)
    with pytest.raises(DataError) as err:
        read_pairs(path, require_labels=True)
    assert_names(err, path, row_id=53, column="winner_model_")


@pytest.mark.parametrize("column", ["id", "prompt", "response_a", "response_b"])
def test_missing_column(tmp_path, column):
    path = write_csv(tmp_path, tiny.arena_frame(3).drop(columns=[column]))
    with pytest.raises(DataError) as err:
        read_pairs(path, require_labels=True)
    assert_names(err, path, column=column)


def test_partial_label_columns(tmp_path):
    path = write_csv(tmp_path, tiny.arena_frame(3).drop(columns=["winner_tie"]))
    with pytest.raises(DataError) as err:
        read_pairs(path, require_labels=False)
    assert_names(err, path, column="winner_tie")


def test_duplicate_ids(tmp_path):
    frame = tiny.arena_frame(6, start_id=20)
    frame.loc[4, "id"] = 21
    path = write_csv(tmp_path, frame)
    with pytest.raises(DataError) as err:
        read_pairs(path, require_labels=True)
    message = assert_names(err, path, row_id=21, column="id")
    assert "duplicate" in message


@pytest.mark.parametrize("content", ["", "id,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "train.csv"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        read_pairs(path, require_labels=True)
    assert "empty" in assert_names(err, path) or "no rows" in str(err.value)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_pairs(tmp_path / "absent.csv", require_labels=True)
    path = tmp_path / "train.json"
    path.write_text("{}")
    with pytest.raises(DataError, match=r"\.json"):
        read_pairs(path, require_labels=True)


def parquet_frame(labels) -> pd.DataFrame:
    return pd.DataFrame({
        "id": list(range(len(labels))),
        "prompt": [["hello", None], ["a question"], ['["x"]'], ["q"]][: len(labels)],
        "response_a": [["hi", "again"], ["answer a"], ["y"], ["a"]][: len(labels)],
        "response_b": [["hey", None], ["answer b"], ["z"], ["b"]][: len(labels)],
        "label": labels,
    })


def test_parquet_class_index_label(tmp_path):
    path = tmp_path / "train.parquet"
    parquet_frame([0, 1, 2]).to_parquet(path)
    pairs = read_pairs(path, require_labels=True)
    assert [p.target for p in pairs] == [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]
    assert pairs[0].prompts == ("hello", "") and pairs[0].responses_b == ("hey", "")
    assert pairs[2].prompts == ('["x"]',)  # a list cell is never parsed again as JSON
    assert [p.id for p in pairs] == ["0", "1", "2"]


def test_parquet_probability_label(tmp_path):
    path = tmp_path / "train.parquet"
    parquet_frame([[0.7, 0.2, 0.1], [0.0, 0.0, 1.0], [1 / 3, 1 / 3, 1 / 3]]).to_parquet(path)
    pairs = read_pairs(path, require_labels=True)
    np.testing.assert_allclose([p.target for p in pairs], [[0.7, 0.2, 0.1], [0, 0, 1], [1 / 3, 1 / 3, 1 / 3]])
    assert [p.label for p in pairs] == [0, 2, 0]


def test_parquet_json_string_texts_and_label(tmp_path):
    frame = parquet_frame([0, 1])
    for column in ("prompt", "response_a", "response_b"):
        frame[column] = [json.dumps(turns) for turns in frame[column]]
    frame["label"] = ["[0.5, 0.25, 0.25]", "[0, 1, 0]"]
    path = tmp_path / "train.parquet"
    frame.to_parquet(path)
    pairs = read_pairs(path, require_labels=True)
    assert pairs[0].prompts == ("hello", "")
    assert pairs[0].target == (0.5, 0.25, 0.25) and pairs[1].target == (0.0, 1.0, 0.0)


@pytest.mark.parametrize("label", [3, -1, 1.5, [0.5, 0.6, 0.1], [0.5, 0.5], [-0.2, 0.6, 0.6], "b"])
def test_parquet_bad_label(tmp_path, label):
    frame = parquet_frame([0, 1])
    first = [1.0, 0.0, 0.0] if isinstance(label, list) else "0" if isinstance(label, str) else 0
    frame["label"] = pd.Series([first, label], dtype=object)  # one parquet type per column
    path = tmp_path / "train.parquet"
    frame.to_parquet(path)
    with pytest.raises(DataError) as err:
        read_pairs(path, require_labels=True)
    assert_names(err, path, row_id=1, column="label")


def wsdm_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "id": ["w1", "w2", "w3"],
        "prompt": ["What is 2+2?", "[not json] plain text", "Bonjour"],
        "response_a": ["4", "a", "Salut"],
        "response_b": ["5", "b", "Bonjour !"],
        "winner": ["model_a", "model_b", "model_a"],
        "model_a": ["m1", "m2", "m3"],
        "model_b": ["m4", "m5", "m6"],
        "language": ["English", "English", "French"],
    })


def test_wsdm_schema(tmp_path):
    path = tmp_path / "wsdm.parquet"
    wsdm_frame().to_parquet(path)
    pairs = read_pairs(path, require_labels=True)
    assert [p.target for p in pairs] == [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0)]
    assert pairs[1].prompts == ("[not json] plain text",)  # plain text, one turn
    assert pairs[2].responses_b == ("Bonjour !",) and pairs[2].meta["language"] == "French"


def test_wsdm_bad_winner(tmp_path):
    frame = wsdm_frame()
    frame.loc[2, "winner"] = "tie"
    path = tmp_path / "wsdm.parquet"
    frame.to_parquet(path)
    with pytest.raises(DataError) as err:
        read_pairs(path, require_labels=True)
    assert_names(err, path, row_id="w3", column="winner")


def test_swap_maps_the_target_and_exchanges_the_responses():
    pair = Pair("1", ("p",), ("a",), ("b",), (0.7, 0.2, 0.1), {"language": "x"})
    swapped = swap_pair(pair)
    assert swapped.responses_a == ("b",) and swapped.responses_b == ("a",) and swapped.prompts == ("p",)
    assert swapped.target == (0.2, 0.7, 0.1) and swapped.meta == {"language": "x"}
    assert swap_pair(swapped) == pair
    np.testing.assert_array_equal(swap_abt(np.array([[1, 2, 3], [4, 5, 6]])), [[2, 1, 3], [5, 4, 6]])


# --- the text schema comes from the label columns, never from `language` (issue 14, item 7) -----------------------


@pytest.mark.parametrize("labelled", [True, False])
def test_a_language_column_does_not_make_malformed_json_plain_text(tmp_path, labelled):
    frame = tiny.arena_frame(5, start_id=100, labelled=labelled).assign(language="English")
    frame.loc[3, "response_b"] = '["unterminated'
    path = write_csv(tmp_path, frame)
    with pytest.raises(DataError, match="malformed JSON") as err:
        read_pairs(path, require_labels=False)
    assert_names(err, path, row_id=103, column="response_b")
    assert "(Unterminated string starting at: char 1): '[\"unterminated'" in str(err.value)  # json's words, once


def test_a_wsdm_test_file_without_winner_is_plain_text(tmp_path):
    path = tmp_path / "wsdm_test.parquet"
    wsdm_frame().drop(columns=["winner", "model_a", "model_b"]).to_parquet(path)
    pairs = read_pairs(path, require_labels=False)
    assert pairs[1].prompts == ("[not json] plain text",) and pairs[0].responses_a == ("4",)
    assert [p.target for p in pairs] == [None] * 3


def test_a_wsdm_test_file_with_a_json_looking_answer_stays_plain_text(tmp_path):
    """One answer that is itself a JSON list of strings ("give me a JSON array") does not make the whole file a
    Kaggle one, in which every plain cell would then be malformed JSON."""
    path = tmp_path / "wsdm_test.parquet"
    frame = wsdm_frame().drop(columns=["winner", "model_a", "model_b"])
    frame.loc[2, "response_a"] = '["apple", "banana", "cherry"]'
    frame.to_parquet(path)
    pairs = read_pairs(path, require_labels=False)
    assert pairs[1].prompts == ("[not json] plain text",) and pairs[0].responses_a == ("4",) and len(pairs) == 3
    assert pairs[2].responses_a == ("apple", "banana", "cherry")  # read as that list, as in the WSDM train schema


# --- ids and encodings (items 8, 11) -------------------------------------------------------------------------------


@pytest.mark.parametrize(("suffix", "value"), [(".csv", ""), (".csv", "  "), (".parquet", None)])
def test_a_blank_or_missing_id_names_the_row(tmp_path, suffix, value):
    frame = tiny.arena_frame(4, labelled=False).astype({"id": object})
    frame.loc[2, "id"] = value
    frame.loc[3, "id"] = value  # two missing ids are not "duplicates"
    path = tmp_path / f"test{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    with pytest.raises(DataError, match=r"data row 2 \(counting from 0\) column 'id': missing id"):
        read_pairs(path, require_labels=False)


def test_non_utf8_text_names_the_file_offset_and_line(tmp_path):
    path = write_csv(tmp_path, tiny.arena_frame(4))
    text = path.read_bytes()
    offset = text.index(b"\n", text.index(b"\n") + 1) + 5  # inside the second data row (line 3)
    path.write_bytes(text[:offset] + "é".encode("latin-1") + text[offset:])
    with pytest.raises(DataError, match=rf"{path}: not UTF-8 text: byte 0xe9 at byte offset {offset} \(line 3\)"):
        read_pairs(path, require_labels=True)


def test_lone_surrogates_become_the_replacement_character(tmp_path, caplog):
    """JSON can escape half of a UTF-16 surrogate pair (a cut emoji); json.loads yields a code point that UTF-8, and
    so the tokenizers, refuse. Such halves become U+FFFD with one warning per file; whole pairs and other text are
    kept as they were."""
    frame = tiny.arena_frame(3)
    frame.loc[1, "prompt"] = '["cut \\ud83d emoji", "kept \\ud83d\\ude00 pair"]'
    frame.loc[2, "response_b"] = '["\\udc00 tail"]'
    path = write_csv(tmp_path, frame)
    with caplog.at_level("WARNING", logger="lmsys"):
        pairs = read_pairs(path, require_labels=True)
    assert pairs[1].prompts == ("cut \ufffd emoji", "kept \U0001F600 pair")
    assert pairs[2].responses_b == ("\ufffd tail",)
    assert pairs[0].prompts == tuple(json.loads(frame.loc[0, "prompt"]))
    assert caplog.text.count("lone UTF-16 surrogates") == 1
    assert f"{path}: 2 text cells held lone UTF-16 surrogates" in caplog.text
    assert "the first: row id=1 column 'prompt'" in caplog.text
    tokenizer = tiny.build_tokenizer(add_bos=True)
    assert all(tokenizer(turn)["input_ids"] for pair in pairs for turn in pair.prompts + pair.responses_b)
    with pytest.raises(TypeError):  # what the tokenizer does with the raw half: the reason for the repair
        tokenizer("cut \ud83d emoji")
    caplog.clear()
    with caplog.at_level("WARNING", logger="lmsys"):  # generation's prompts (python -m lmsys.generate) too
        prompts = read_prompts(path)
    assert prompts[1][1] == pairs[1].prompts and "1 text cell held lone UTF-16 surrogates" in caplog.text


def test_conversations_of_uneven_turn_counts_are_read_with_one_warning(tmp_path, caplog):
    frame = tiny.arena_frame(4, labelled=False)
    frame.loc[1, "response_a"] = json.dumps(["one", "two", "three"])
    frame.loc[3, "prompt"] = json.dumps(["p1", "p2"])
    path = write_csv(tmp_path, frame)
    with caplog.at_level("WARNING", logger="lmsys"):
        pairs = read_pairs(path, require_labels=False)
    assert len(pairs) == 4 and pairs[1].responses_a == ("one", "two", "three")
    assert caplog.text.count("differ in their number of turns") == 1
    assert (f"{path}: 2 row(s) whose prompt and responses differ in their number of turns, the shorter padded with "
            f"empty turns; the first: row id=1 (prompt 1, response_a 3, response_b 1 turns)") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lmsys"):
        read_pairs(write_csv(tmp_path, tiny.arena_frame(4, labelled=False), "even.csv"), require_labels=False)
    assert "number of turns" not in caplog.text


def test_a_prompt_file_with_a_blank_id_names_the_row(tmp_path):
    """Generated pairs carry the prompt's id: a blank one would be refused only later, by training or predict."""
    path = tmp_path / "prompts.csv"
    pd.DataFrame({"id": ["p1", ""], "prompt": ["hello", "world"]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"prompts.csv: data row 1 \(counting from 0\) column 'id': missing id"):
        read_prompts(path)


# --- malformed tables: one error naming the file, never shifted columns or a traceback ---------------------------


def test_a_trailing_comma_on_every_row_fails_instead_of_shifting_the_columns(tmp_path):
    """pandas takes the first column as the index when every data row has one field more than the header: the
    ids would be lost and the prompt read as the id, without a word."""
    path = tmp_path / "test.csv"
    path.write_text("id,prompt,response_a,response_b\n101,hello there,world,there,\n102,second,foo,bar,\n")
    with pytest.raises(DataError, match="more fields than the header's 4 columns") as err:
        read_pairs(path, require_labels=False)
    assert_names(err, path)


def test_a_ragged_csv_names_the_line(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text('id,prompt,response_a,response_b\n1,"[""a""]","[""b""]","[""c""]"\n'
                    '2,"[""a""]","[""b""]","[""c""]",oops\n')
    with pytest.raises(DataError, match="Expected 4 fields in line 3, saw 5") as err:
        read_pairs(path, require_labels=False)
    assert_names(err, path)


@pytest.mark.parametrize("content", [b"", b"id,prompt\n1,2\n"])
def test_a_file_that_is_no_parquet_fails_in_one_line(tmp_path, content):
    path = tmp_path / "test.parquet"
    path.write_bytes(content)
    with pytest.raises(DataError, match="not a readable parquet file") as err:
        read_pairs(path, require_labels=False)
    assert_names(err, path)


def test_a_plain_text_answer_that_is_an_empty_json_array_is_text(tmp_path):
    """`[]` is a legitimate WSDM answer ("give me an empty JSON array"), not an empty list of turns."""
    path = tmp_path / "wsdm.parquet"
    frame = wsdm_frame()
    frame.loc[0, "response_a"] = "[]"
    frame.to_parquet(path)
    pairs = read_pairs(path, require_labels=True)
    assert pairs[0].responses_a == ("[]",) and len(pairs) == 3
    frame.drop(columns=["winner", "model_a", "model_b"]).to_parquet(path)
    assert read_pairs(path, require_labels=False)[0].responses_a == ("[]",)


def test_a_kaggle_cell_that_is_an_empty_list_still_fails(tmp_path):
    frame = tiny.arena_frame(4, start_id=10)
    frame.loc[2, "response_a"] = "[]"
    path = write_csv(tmp_path, frame)
    with pytest.raises(DataError, match="empty list of turns") as err:
        read_pairs(path, require_labels=True)
    assert_names(err, path, row_id=12, column="response_a")


def test_a_null_plain_text_cell_is_empty_text_with_one_warning(tmp_path, caplog):
    path = tmp_path / "wsdm.parquet"
    frame = wsdm_frame()
    frame.loc[1, "response_b"] = None
    frame.loc[2, "prompt"] = None
    frame.to_parquet(path)
    with caplog.at_level("WARNING", logger="lmsys"):
        pairs = read_pairs(path, require_labels=True)
    assert pairs[1].responses_b == ("",) and pairs[2].prompts == ("",) and len(pairs) == 3
    warnings = [r.getMessage() for r in caplog.records if "missing (null)" in r.getMessage()]
    assert len(warnings) == 1 and "2 text cell(s)" in warnings[0] and "row id=w2 column 'response_b'" in warnings[0]


def test_a_csv_whose_answers_all_look_like_numbers_keeps_them_as_written(tmp_path):
    """pandas guessed int/float/bool for such a column ("4", "2.50", "007"): every row was refused as no list of
    strings, or the text changed (2.50 -> 2.5, 007 -> 7)."""
    frame = wsdm_frame()
    frame["response_a"], frame["response_b"] = ["4", "2.50", "007"], ["True", "1e3", "-0"]
    path = write_csv(tmp_path, frame)
    pairs = read_pairs(path, require_labels=True)
    assert [p.responses_a for p in pairs] == [("4",), ("2.50",), ("007",)]
    assert [p.responses_b for p in pairs] == [("True",), ("1e3",), ("-0",)]
    path = write_csv(tmp_path, frame.drop(columns=["winner", "model_a", "model_b"]), "test.csv")
    assert [p.responses_a for p in read_pairs(path, require_labels=False)] == [("4",), ("2.50",), ("007",)]


def test_a_plain_text_answer_that_is_a_json_list_with_null_is_text(tmp_path):
    """Only a JSON list of strings is read as turns in plain text: `[null]` is an answer, not one empty turn."""
    frame = wsdm_frame()
    frame.loc[0, "response_a"], frame.loc[1, "response_a"] = "[null]", '["a", null]'
    path = tmp_path / "wsdm.parquet"
    frame.to_parquet(path)
    pairs = read_pairs(path, require_labels=True)
    assert pairs[0].responses_a == ("[null]",) and pairs[1].responses_a == ('["a", null]',)
