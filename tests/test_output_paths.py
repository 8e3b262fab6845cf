"""The one rule set for output paths: the same file by any name, directories, and inputs inside outputs."""

from __future__ import annotations

import os

import pytest

from lmsys.config import ConfigError
from lmsys.output_paths import check_output_paths


def test_the_same_file_by_another_name_is_the_same_file(tmp_path, monkeypatch):
    data = tmp_path / "test.csv"
    data.write_text("id\n")
    (tmp_path / "link.csv").symlink_to(data)
    os.link(data, tmp_path / "hard.csv")
    monkeypatch.chdir(tmp_path)
    for output in ("test.csv", "./sub/../test.csv", tmp_path / "link.csv", tmp_path / "hard.csv"):
        with pytest.raises(ConfigError, match="is the input data.test_path"):
            check_output_paths({"data.test_path": data}, {"output": output})


def test_directory_outputs(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "in.csv").write_text("id\n")
    with pytest.raises(ConfigError, match=r"output_dir=.*out contains the input inputs\[0\]"):
        check_output_paths({"inputs[0]": tmp_path / "out" / "in.csv"}, {"output_dir": tmp_path / "out"},
                           directory_outputs=frozenset({"output_dir"}))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is an existing file, not a directory"):
        check_output_paths({}, {"output_dir": tmp_path / "file"}, directory_outputs=frozenset({"output_dir"}))


def test_distinct_outputs_beside_their_inputs_pass_and_unset_ones_are_skipped(tmp_path):
    (tmp_path / "test.csv").write_text("id\n")
    check_output_paths({"data.test_path": tmp_path / "test.csv", "base_model_path": None},
                       {"output": tmp_path / "sub.csv", "logits_output": tmp_path / "l.csv", "pseudo_label_output": None})
