"""The run directory: atomic writes never replace a directory by a file (or the reverse), and claiming a directory
removes only what a run wrote, refusing any directory that is not a run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmsys.config import ConfigError
from lmsys.runs import LOCK_FILE, RUN_MARKER, FinishedRun, RunDir, RunDirError, release_lock, write_file

REPO = Path(__file__).resolve().parents[1]


def test_write_refuses_to_replace_a_directory_with_a_file(tmp_path):
    (tmp_path / "out.csv").mkdir()
    (tmp_path / "out.csv" / "keep.txt").write_text("mine")
    with pytest.raises(RunDirError, match="out.csv is an existing directory; refusing to replace it with a file"):
        RunDir(tmp_path, True).write_text("out.csv", "a,b\n")
    assert (tmp_path / "out.csv" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]  # no temporary left behind


def test_write_refuses_to_replace_a_file_with_a_directory(tmp_path):
    (tmp_path / "checkpoint").write_text("a file")
    with pytest.raises(RunDirError, match="existing file; refusing to replace it with a directory"):
        RunDir(tmp_path, True).write("checkpoint", lambda p: p.mkdir())
    assert (tmp_path / "checkpoint").read_text() == "a file"


def test_write_replaces_the_same_kind(tmp_path):
    run = RunDir(tmp_path, True)
    run.write_text("a.txt", "one")
    run.write_text("a.txt", "two")
    run.write("d", lambda p: (p.mkdir(), (p / "x").write_text("1")))
    run.write("d", lambda p: (p.mkdir(), (p / "y").write_text("2")))
    assert (tmp_path / "a.txt").read_text() == "two" and [p.name for p in (tmp_path / "d").iterdir()] == ["y"]


def finished_run(path):
    run = RunDir(path, True)
    run.claim(overwrite=False, resume=False)
    run.write_text("config.yaml", "seed: 1\n")
    run.append_line("train.log", "update 1 loss 1.0")
    run.write("checkpoint", lambda p: (p.mkdir(), (p / "head.safetensors").write_bytes(b"w")))
    run.write_json("metrics.json", {"best": {}})
    return run


def test_replacing_a_file_leaves_its_neighbours_alone(tmp_path):
    """A file is replaced by one rename: a user's `.<name>.old` beside it (file or folder) is not ours to remove."""
    (tmp_path / ".sub.csv.old").mkdir()
    (tmp_path / ".sub.csv.old" / "precious.txt").write_text("mine")
    (tmp_path / "sub.csv").write_text("first")
    write_file(tmp_path / "sub.csv", lambda tmp: tmp.write_text("second"))
    assert (tmp_path / "sub.csv").read_text() == "second"
    assert (tmp_path / ".sub.csv.old" / "precious.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".sub.csv.old", "sub.csv"]  # no temporary left


def test_overwrite_removes_only_what_a_run_wrote(tmp_path):
    finished_run(tmp_path)
    (tmp_path / "notes.md").write_text("the user's")
    (tmp_path / ".checkpoint.abc_1234").mkdir()  # a temporary of a killed write (mkdtemp's 8 characters)
    (tmp_path / ".config.yaml.bak").write_text("the user's too")  # named alike, not ours
    RunDir(tmp_path, True).claim(overwrite=True, resume=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".config.yaml.bak", LOCK_FILE, RUN_MARKER, "notes.md"]


def test_a_kill_between_the_two_renames_of_a_directory_keeps_the_old_copy(tmp_path, monkeypatch):
    """Killed between `state -> .state.old` and `tmp -> state`, then killed again in the next save: the second save
    removed .state.old (the only complete state) before its own copy was in place, and the run restarted from 0."""
    (tmp_path / ".state.old").mkdir()
    (tmp_path / ".state.old" / "loop.json").write_text('{"step": 2}')

    def killed(*args):
        raise KeyboardInterrupt  # stands for SIGKILL at the rename

    monkeypatch.setattr("lmsys.runs.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_file(tmp_path / "state", lambda p: (p.mkdir(), (p / "loop.json").write_text('{"step": 3}')))
    assert (tmp_path / ".state.old" / "loop.json").read_text() == '{"step": 2}'
    monkeypatch.undo()
    write_file(tmp_path / "state", lambda p: (p.mkdir(), (p / "loop.json").write_text('{"step": 3}')))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_a_kill_during_the_cleanup_leaves_a_run_that_overwrite_cleans_again(tmp_path, monkeypatch):
    """The marker went first: killed after it, the directory was no run's and refused for good."""
    finished_run(tmp_path)
    removed = []

    def remove_then_kill(path):
        if len(removed) == 3:
            raise KeyboardInterrupt
        removed.append(path.name)
        original(path)

    original = __import__("lmsys.runs", fromlist=["_remove"])._remove
    monkeypatch.setattr("lmsys.runs._remove", remove_then_kill)
    with pytest.raises(KeyboardInterrupt):
        RunDir(tmp_path, True).claim(overwrite=True, resume=False)
    monkeypatch.undo()
    assert RUN_MARKER not in removed and RunDir(tmp_path, True).is_run()
    RunDir(tmp_path, True).claim(overwrite=True, resume=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE, RUN_MARKER]


def test_temporaries_a_kill_left_go_with_the_next_write_or_resume(tmp_path):
    (tmp_path / ".sub.csv.k2j_9x0a").mkdir()  # predict killed mid-write
    (tmp_path / ".sub.csv.k2j_9x0a" / "sub.csv").write_text("half")
    write_file(tmp_path / "sub.csv", lambda tmp: tmp.write_text("whole"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.csv"]
    run = RunDir(tmp_path / "run", True)
    run.claim(overwrite=False, resume=False)
    run.write("state", lambda p: (p.mkdir(), (p / "loop.json").write_text("{}")))
    for leftover in (".state.a1b2c3d4", ".checkpoint.zz99yy88", ".metrics.json.q0w9e8r7"):
        (tmp_path / "run" / leftover).mkdir()
    (tmp_path / "run" / ".state.old").mkdir()  # a resume may need it
    RunDir(tmp_path / "run", True).claim(overwrite=False, resume=True)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE, ".state.old", RUN_MARKER, "state"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_non_empty_directory_that_is_not_a_run_is_refused(tmp_path, overwrite):
    (tmp_path / "train.csv").write_text("id\n1\n")
    (tmp_path / "src").mkdir()
    with pytest.raises(RunDirError, match=r"is not a run directory and is not empty \(holds \['src', 'train.csv'\]\)"):
        RunDir(tmp_path, True).claim(overwrite=overwrite, resume=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "train.csv"]


def test_an_empty_or_new_directory_is_claimed(tmp_path):
    RunDir(tmp_path, True).claim(overwrite=False, resume=False)
    RunDir(tmp_path / "new", True).claim(overwrite=True, resume=False)
    assert (tmp_path / RUN_MARKER).is_file() and (tmp_path / "new" / RUN_MARKER).is_file()


def test_a_killed_run_without_state_is_refused_or_restarted_with_fresh_logs(tmp_path):
    run = RunDir(tmp_path, True)
    run.claim(overwrite=False, resume=False)
    run.append_line("train.log", "update 1 loss 1.0")  # killed here, before the first state save
    run.append_line("metrics.jsonl", '{"step": 1}')
    with pytest.raises(RunDirError, match="stopped before saving a training state; pass overwrite=true"):
        RunDir(tmp_path, True).claim(overwrite=False, resume=False)
    assert (tmp_path / "train.log").is_file()
    RunDir(tmp_path, True).claim(overwrite=False, resume=True)  # nothing to resume: a fresh start, fresh logs
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE, RUN_MARKER]


def test_a_resume_forgets_the_logged_lines_after_its_state(tmp_path):
    from lmsys.tracking import METRICS_LOG, forget_after

    run = RunDir(tmp_path, True)
    for step in (1, 2, 3, 3, 4):
        run.append_line(METRICS_LOG, f'{{"step": {step}, "train/loss": 1.0}}')
    run.append_line(METRICS_LOG, '{"step": 5, "train/lo')  # cut short by the kill
    assert forget_after(run, 3) == 2
    assert [line[:10] for line in (tmp_path / METRICS_LOG).read_text().splitlines()] == ['{"step": 1', '{"step": 2',
                                                                                          '{"step": 3', '{"step": 3']
    assert forget_after(run, 3) == 0 and forget_after(RunDir(tmp_path / "none", True), 3) == 0


def test_a_run_dir_in_use_by_a_live_process_is_refused(tmp_path):
    """A second run (or resume=true) of a dir whose run was still training was told it had "stopped", and the
    suggested resume removed the live run's files; a killed run's lock goes with its process."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom lmsys.runs import RunDir\n"
        f"RunDir({str(tmp_path / 'run')!r}, True).claim(overwrite=False, resume=False)\nprint('claimed', flush=True)\n"
        "time.sleep(60)")], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "claimed"
        for resume, overwrite in ((False, False), (True, False), (False, True)):
            with pytest.raises(RunDirError, match=r"run is in use by a run that is still going .*; wait for it"):
                RunDir(tmp_path / "run", True).claim(overwrite=overwrite, resume=resume)
    finally:
        holder.kill()
        holder.wait()
    RunDir(tmp_path / "run", True).claim(overwrite=False, resume=True)  # killed: its lock went with it
    RunDir(tmp_path / "run", True).claim(overwrite=False, resume=True)  # this process's own claim, again


def test_a_run_over_in_its_process_frees_its_dir(tmp_path):
    """An in-process sweep kept every finished job's lock until the sweep ended: a resume of a finished job from
    another shell was told its run was "still going". The lock is released when the job is over."""
    run = RunDir(tmp_path / "run", True)
    run.claim(overwrite=False, resume=False)
    take_lock = [sys.executable, "-c", (
        "import fcntl, sys\n"
        f"handle = open({str(tmp_path / 'run' / LOCK_FILE)!r}, 'a')\n"
        "try:\n    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(1)\n")]
    assert subprocess.run(take_lock, check=False).returncode == 1  # held while the run goes on
    release_lock(tmp_path / "run")
    release_lock(tmp_path / "run")  # released already: nothing to do
    assert subprocess.run(take_lock, check=False).returncode == 0


def test_a_run_dir_inside_another_run_is_refused_and_what_hydra_made_there_goes(tmp_path):
    """Hydra makes hydra.run.dir before the run's checks: the refusal left empty directories in the other run."""
    from lmsys.training.recipe import open_run_dir

    other = tmp_path / "other"
    RunDir(other, True).claim(overwrite=False, resume=False)
    (other / "checkpoint").mkdir()
    (other / "checkpoint" / "adapter.safetensors").write_text("weights")
    nested = other / "checkpoint" / "sub" / "deeper"
    nested.mkdir(parents=True)  # as Hydra makes it
    config = SimpleNamespace(model=SimpleNamespace(path=str(tmp_path / "model"), init_from=None), overwrite=False,
                             resume=False, data=SimpleNamespace(train_path=str(tmp_path / "t.csv"), valid_path=None))
    with pytest.raises(ConfigError, match=rf"^the run dir={nested} lies inside the run dir {other}"):
        open_run_dir(nested, config, SimpleNamespace(is_main_process=True, num_processes=1), {})
    assert sorted(p.name for p in (other / "checkpoint").iterdir()) == ["adapter.safetensors"]
    (tmp_path / "mine" / "deeper").mkdir(parents=True)  # outside any run: a refusal there leaves the user's dirs
    with pytest.raises(ConfigError):
        open_run_dir(tmp_path / "mine" / "deeper", SimpleNamespace(**{**vars(config), "model": SimpleNamespace(
            path=str(tmp_path / "mine"), init_from=None)}), SimpleNamespace(is_main_process=True, num_processes=1), {})
    assert (tmp_path / "mine" / "deeper").is_dir()


def test_a_finished_run_is_skipped_only_under_its_plan_and_its_evaluation(tmp_path):
    """resume=true on a finished run: beyond its plan (which leaves out what does not change its updates: paths
    by content, the process layout, log frequencies), how it was evaluated decides its results too."""
    from lmsys.training.recipe import skip_finished_run

    (tmp_path / "metrics.json").write_text('{"best": {"step": 2}}')
    (tmp_path / "config.yaml").write_text("trainer:\n  eval_tta: true\n  log_frequency: 10\n  batch_size: 4\n")

    def skip(plan_changes, current):
        finished = FinishedRun(f"{tmp_path} holds a finished run")
        finished.plan_changes = plan_changes
        return skip_finished_run(tmp_path, finished, current)

    assert skip([], "trainer:\n  eval_tta: true\n  log_frequency: 7\n  batch_size: 2\n") == {"best": {"step": 2}}
    with pytest.raises(RunDirError, match=r"finished under other settings \(trainer.eval_tta: True -> False\)"):
        skip([], "trainer:\n  eval_tta: false\n  log_frequency: 10\n  batch_size: 4\n")
    with pytest.raises(RunDirError, match=r"other settings \(seed: 1 in the run, 2 now\)"):
        skip(["seed: 1 in the run, 2 now"], "trainer:\n  eval_tta: true\n  log_frequency: 10\n  batch_size: 4\n")
    with pytest.raises(RunDirError, match=r"other settings \(trainer.batch_size: 4 -> 2; trainer.log_frequency"):
        skip(None, "trainer:\n  eval_tta: true\n  log_frequency: 7\n  batch_size: 2\n")  # no plan: every setting


def test_resume_of_a_finished_run_says_so_and_is_told_apart_from_a_refusal(tmp_path):
    RunDir(tmp_path, True).claim(overwrite=False, resume=False)
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(FinishedRun, match=r"holds a finished run: nothing to resume \(its results are in metrics"):
        RunDir(tmp_path, True).claim(overwrite=False, resume=True)
    with pytest.raises(RunDirError, match=r"already holds a finished run; choose another hydra.run.dir") as refused:
        RunDir(tmp_path, True).claim(overwrite=False, resume=False)
    assert not isinstance(refused.value, FinishedRun)



def test_json_has_no_nan_tokens(tmp_path):
    """A two-class validation of split ties only has no accuracy (NaN): Python wrote the bare token NaN, which
    strict JSON readers refuse."""
    from lmsys.runs import write_json

    write_json(tmp_path / "m.json", {"accuracy": float("nan"), "subsets": [{"loss": float("inf"), "n": 2}], "ok": 1.5})
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=pytest.fail) == {
        "accuracy": None, "subsets": [{"loss": None, "n": 2}], "ok": 1.5}
