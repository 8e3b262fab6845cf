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


def test_an_output_under_a_directory_that_takes_no_files_is_refused_before_the_work(tmp_path, monkeypatch):
    """predict on a read-only mount ran the whole prediction and then failed at the write with a traceback."""
    readonly = tmp_path / "ro"
    readonly.mkdir()
    real_access = os.access

    def access(path, mode):  # root may write anywhere but on a read-only mount, which CI cannot make
        return False if str(path) == str(readonly) else real_access(path, mode)

    monkeypatch.setattr(os, "access", access)
    for output in (readonly / "sub.csv", readonly / "new" / "deeper" / "sub.csv"):
        with pytest.raises(ConfigError, match=rf"^output={output}: {readonly} is not writable"):
            check_output_paths({}, {"output": output})
    check_output_paths({}, {"output": tmp_path / "elsewhere" / "sub.csv"})


def test_an_output_below_an_existing_file_is_refused_before_the_work(tmp_path):
    """output=prompts.csv/x.parquet ran every model and then failed at mkdir ("File exists", no key named)."""
    (tmp_path / "prompts.csv").write_text("id,prompt\n")
    for output in (tmp_path / "prompts.csv" / "x.parquet", tmp_path / "prompts.csv" / "deeper" / "x.parquet"):
        with pytest.raises(ConfigError, match=rf"^output={output}: {tmp_path / 'prompts.csv'} is a file, so no "
                                              rf"directory can be made there"):
            check_output_paths({}, {"output": output})
    with pytest.raises(ConfigError, match="is a file, so no directory"):
        check_output_paths({}, {"output_dir": tmp_path / "prompts.csv" / "out"},
                           directory_outputs=frozenset({"output_dir"}))
    check_output_paths({}, {"output": tmp_path / "prompts.csv"})  # the file itself may be replaced (no input)


def test_a_full_or_read_only_file_system_is_one_error_line(capsys):
    import errno

    from lmsys.cli import command_errors

    for number, text in ((errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")):
        with pytest.raises(SystemExit) as exit_info, command_errors():
            raise OSError(number, text, "/data/out/.state.x1y2z3w4/optimizer.pt")
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.startswith(f"error: {text}: /data/out/.state.x1y2z3w4/optimizer.pt")
    with pytest.raises(ConnectionResetError), command_errors():  # not the file system's: a traceback as before
        raise ConnectionResetError(errno.ECONNRESET, "reset")


def test_no_output_of_any_command_goes_into_a_run_dir(tmp_path):
    """predict's output=RUN/oof.csv replaced the run's out-of-fold file with a submission (sweep and oof join were
    refused already): the rule is now every command's."""
    from lmsys.prediction_config import PredictConfig
    from lmsys.runs import RunDir

    run = tmp_path / "run"
    RunDir(run, is_main=True).claim(overwrite=False, resume=False)
    for key, target in (("output", run / "oof.csv"), ("probs_output", run / "sub" / "probs.csv")):
        settings = {"checkpoint": str(tmp_path / "ckpt"), "output": str(tmp_path / "sub.csv"), key: str(target)}
        with pytest.raises(ConfigError, match=rf"^{key}={target} lies inside the run dir {run}, which holds only"):
            PredictConfig(**settings)
    with pytest.raises(ConfigError, match=rf"^output_dir={run / 'merged'} lies inside the run dir {run}"):
        check_output_paths({}, {"output_dir": run / "merged"}, directory_outputs=frozenset({"output_dir"}))
    check_output_paths({}, {"output": tmp_path / "beside_the_run.csv"})



def test_a_run_is_told_by_its_marker_and_a_run_dir_is_no_directory_output(tmp_path):
    """A project dir holding a metrics.json or a state/ folder of another tool blocked every output under it; and
    `ensemble --out RUN` or `prepare output_dir=RUN` wrote into a run's directory itself."""
    from lmsys.runs import RunDir

    (tmp_path / "project" / "state").mkdir(parents=True)
    (tmp_path / "project" / "metrics.json").write_text("{}")
    check_output_paths({}, {"output": tmp_path / "project" / "preds" / "sub.csv"})
    run = tmp_path / "run"
    RunDir(run, is_main=True).claim(overwrite=False, resume=False)
    with pytest.raises(ConfigError, match=rf"^--out={run} is the run dir of a training run, which holds only"):
        check_output_paths({}, {"--out": run}, directory_outputs=frozenset({"--out"}))
    check_output_paths({}, {"the run dir": run}, directory_outputs=frozenset({"the run dir"}),
                       run_dir_outputs=frozenset({"the run dir"}))  # training's own, resumed or overwritten
