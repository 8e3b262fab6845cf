"""Seed sweeps (`-m seed=1,2` in one process, one dir per seed, sweep_summary.json), the summary command over run
dirs, and reproducibility (the same config and seed twice give the same metrics)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from entry_runs import REPO, entry_env, finish, read_metrics, read_oof, start_entry, tiny_overrides
from omegaconf import OmegaConf
from tiny import arena_frame

from lmsys.runs import RunDir
from lmsys.sweep import (
    DEFAULT_SUBDIR,
    SUMMARY_FILE,
    SweepSummaryCallback,
    check_sweep_dir,
    keep_earlier_summary,
    main,
    summarize,
    swept_keys,
    unnamed_keys,
)

SEEDS = (1, 2)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_models) -> SimpleNamespace:
    """`-m seed=1,2` and, at the same time, a single run with seed=2 and otherwise the same config."""
    root = tmp_path_factory.mktemp("sweep")
    arena_frame(16, seed=7).to_csv(root / "train.csv", index=False)
    arena_frame(7, seed=8, start_id=900).to_csv(root / "valid.csv", index=False)
    overrides = tiny_overrides(tiny_models["llama"], root / "train.csv", root / "valid.csv", trainer__max_steps=2)
    sweep_dir, single_dir = root / "sweep", root / "single"
    multirun = start_entry(["-m", f"seed={','.join(map(str, SEEDS))}", *overrides, f"hydra.sweep.dir={sweep_dir}"],
                           root / "sweep.log")
    single = start_entry([*overrides, "seed=2", f"hydra.run.dir={single_dir}"], root / "single.log")
    finish(multirun, root / "sweep.log")
    finish(single, root / "single.log")
    return SimpleNamespace(dir=sweep_dir, single=single_dir, log=(root / "sweep.log").read_text())


def test_one_run_dir_per_seed(sweep):
    assert sorted(p.name for p in sweep.dir.iterdir() if p.is_dir()) == [f"seed{s}" for s in SEEDS]
    for seed in SEEDS:
        run_dir = sweep.dir / f"seed{seed}"
        assert read_metrics(run_dir)["updates"] == 2
        assert re.search(rf"^seed: {seed}$", (run_dir / "config.yaml").read_text(), re.MULTILINE)


def test_seeds_give_different_results(sweep):
    losses = [read_metrics(sweep.dir / f"seed{s}")["best"]["log_loss"] for s in SEEDS]
    assert abs(losses[0] - losses[1]) > 1e-6
    probs = [read_oof(sweep.dir / f"seed{s}").drop(columns="id").to_numpy() for s in SEEDS]
    assert np.abs(probs[0] - probs[1]).max() > 1e-6


def test_sweep_writes_a_summary_with_mean_and_std(sweep):
    summary = json.loads((sweep.dir / SUMMARY_FILE).read_text())
    losses = [read_metrics(sweep.dir / f"seed{s}")["best"]["log_loss"] for s in SEEDS]
    assert [run["seed"] for run in summary["runs"]] == list(SEEDS)
    assert [run["best_log_loss"] for run in summary["runs"]] == losses
    assert [run["run_dir"] for run in summary["runs"]] == [str((sweep.dir / f"seed{s}").resolve()) for s in SEEDS]
    stats = summary["best_log_loss"]
    assert stats["n"] == 2
    assert stats["mean"] == pytest.approx(np.mean(losses), abs=1e-12)
    assert stats["std"] == pytest.approx(np.std(losses, ddof=1), abs=1e-12)
    assert f"mean {np.mean(losses):.6f}" in sweep.log  # the table is printed at the end of the sweep


def test_summary_command_gives_the_same_summary(sweep, tmp_path):
    out = tmp_path / "summary.json"
    command = [sys.executable, "-m", "lmsys.sweep", *(str(sweep.dir / f"seed{s}") for s in SEEDS), "--output", str(out)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=entry_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text()) == json.loads((sweep.dir / SUMMARY_FILE).read_text())
    assert "seed1" in done.stdout and "std" in done.stdout


def test_same_config_and_seed_give_identical_metrics(sweep):
    """The single run and the sweep's second job (run after another job in the same process) are the same run."""
    got, want = read_metrics(sweep.single), read_metrics(sweep.dir / "seed2")
    assert got["history"] == want["history"]
    assert got["best"] == want["best"]
    assert read_oof(sweep.single).equals(read_oof(sweep.dir / "seed2"))


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], check=False, cwd=REPO, capture_output=True, text=True, timeout=30)


def test_run_info_records_code_packages_and_command(sweep):
    info = json.loads((sweep.single / "run_info.json").read_text())
    commit = info["git"]["commit"]
    assert re.fullmatch(r"[0-9a-f]{40}", commit)
    assert git("merge-base", "--is-ancestor", commit, "HEAD").returncode == 0  # others may commit meanwhile
    assert isinstance(info["git"]["dirty"], bool)
    for package in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "torch-optimi", "hydra-core", "wandb"):
        assert info["packages"][package] == version(package)
    command = info["command"]
    assert command[1].endswith("lmsys/code/train_r_llama.py")
    assert "seed=2" in command and f"hydra.run.dir={sweep.single}" in command
    assert "seed: 2" in (sweep.single / "config.yaml").read_text()


def fake_run(root: Path, name: str, log_loss: float, seed: int) -> Path:
    run_dir = root / name
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"best": {"step": 3, "log_loss": log_loss}}))
    (run_dir / "config.yaml").write_text(f"seed: {seed}\n")
    return run_dir


def test_summary_statistics(tmp_path):
    dirs = [fake_run(tmp_path, f"seed{s}", loss, s) for s, loss in ((1, 0.9), (2, 1.1), (3, 1.3))]
    summary = summarize(dirs)
    assert summary["best_log_loss"] == {"n": 3, "mean": pytest.approx(1.1), "std": pytest.approx(0.2)}
    assert [run["seed"] for run in summary["runs"]] == [1, 2, 3]
    assert summarize(dirs[:1])["best_log_loss"]["std"] is None  # one seed has no spread


def test_two_class_and_three_class_runs_are_not_averaged(tmp_path, capsys):
    """A two-class log loss (ln 2 for a prior) beside a three-class one (ln 3): refused by the command; a
    multirun over model.num_classes=2,3 ends without a summary and with one warning, its runs kept."""
    runs = [fake_run(tmp_path, f"seed{s}", loss, s) for s, loss in ((1, 1.05), (2, 0.66), (3, 0.68))]
    for run, classes in zip(runs, (3, 2, 2), strict=True):
        (run / "config.yaml").write_text(f"seed: {run.name[-1]}\nmodel:\n  num_classes: {classes}\n")
        (run / "run_info.json").write_text(json.dumps({"sweep_id": "s1"}))
    assert summarize(runs[1:])["best_log_loss"]["mean"] == pytest.approx(0.67)
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, runs), "--output", str(tmp_path / "summary.json")])
    assert exit_info.value.code == 2 and capsys.readouterr().err == (
        f"error: {runs[1].resolve()} is a two-class run and {runs[0].resolve()} a three-class one: their log losses "
        f"do not average; summarize the runs of one kind\n")
    assert not (tmp_path / "summary.json").exists()
    callback = SweepSummaryCallback()
    callback.sweep_id = "s1"
    callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert capsys.readouterr().err.startswith(f"warning: no {SUMMARY_FILE}: ")
    assert not (tmp_path / SUMMARY_FILE).exists()


def test_the_summary_command_keeps_an_earlier_summary(tmp_path, capsys):
    runs = [fake_run(tmp_path, "seed1", 1.0, 1), fake_run(tmp_path, "seed2", 1.2, 2)]
    main([*map(str, runs), "--output", str(tmp_path / SUMMARY_FILE)])
    first = (tmp_path / SUMMARY_FILE).read_text()
    main([str(runs[0]), "--output", str(tmp_path / SUMMARY_FILE)])
    assert json.loads((tmp_path / SUMMARY_FILE).read_text())["best_log_loss"]["n"] == 1
    kept = [path for path in tmp_path.glob("sweep_summary.*.json")]
    assert len(kept) == 1 and kept[0].read_text() == first and f"as {kept[0].name}" in capsys.readouterr().out


def test_summary_command_rejects_an_unfinished_run(tmp_path, capsys):
    unfinished = tmp_path / "seed4"
    unfinished.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(fake_run(tmp_path, "seed1", 1.0, 1)), str(unfinished)])
    assert exit_info.value.code == 2
    assert "seed4: no metrics.json" in capsys.readouterr().err



@pytest.mark.parametrize("target", ["seed1/metrics.json", "seed1/oof.csv", "seed1"])
def test_the_summary_command_never_writes_over_a_run(tmp_path, capsys, target):
    runs = [fake_run(tmp_path, "seed1", 1.0, 1), fake_run(tmp_path, "seed2", 1.2, 2)]
    (runs[0] / "oof.csv").write_text("id\n1\n")
    before = {path: path.read_bytes() for run in runs for path in run.iterdir()}
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, runs), "--output", str(tmp_path / target)])
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: --output=")
    assert {path: path.read_bytes() for run in runs for path in run.iterdir()} == before
    main([*map(str, runs), "--output", str(tmp_path / "summary.json")])  # beside the runs: written
    assert json.loads((tmp_path / "summary.json").read_text())["best_log_loss"]["n"] == 2


def test_the_summary_command_names_a_metrics_file_that_is_not_a_runs(tmp_path, capsys):
    run = fake_run(tmp_path, "seed1", 1.0, 1)
    (run / "metrics.json").write_text(json.dumps({"runs": []}))  # e.g. a sweep summary written over it
    with pytest.raises(SystemExit) as exit_info:
        main([str(run)])
    assert exit_info.value.code == 2 and "seed1/metrics.json: not a run's metrics.json" in capsys.readouterr().err


def test_the_summary_command_never_writes_into_another_run(tmp_path, capsys):
    """A run dir not summarized is still a run: a summary named its metrics.json would unmake it."""
    runs = [fake_run(tmp_path, "seed1", 1.0, 1), fake_run(tmp_path, "seed2", 1.2, 2)]
    other = fake_run(tmp_path, "seed3", 0.8, 3)
    (other / "lmsys_run.txt").write_text("a run\n")
    before = (other / "metrics.json").read_bytes()
    for target in ("metrics.json", "summary.json", "sub/summary.json"):
        with pytest.raises(SystemExit) as exit_info:
            main([*map(str, runs), "--output", str(other / target)])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.startswith(f"error: --output={other / target} lies inside the run dir {other}")
    assert (other / "metrics.json").read_bytes() == before and sorted(p.name for p in other.iterdir()) == [
        "config.yaml", "lmsys_run.txt", "metrics.json"]


def test_a_run_given_twice_is_refused(tmp_path, capsys):
    run = fake_run(tmp_path, "seed1", 1.0, 1)
    other = fake_run(tmp_path, "seed2", 1.2, 2)
    with pytest.raises(SystemExit) as exit_info:
        main([str(run), str(other), f"{run}/", str(tmp_path / "seed2" / ".." / "seed1")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {run.resolve()} is given twice; name each run once\n"


@pytest.mark.parametrize(("metrics", "config", "message"), [
    ({"best": {"step": 3, "log_loss": "0.8"}}, "seed: 1\n", "best log_loss '0.8' and step 3 are not"),
    ({"best": {"step": 3, "log_loss": None}}, "seed: 1\n", "best log_loss None"),
    ({"best": {"step": 3, "log_loss": float("nan")}}, "seed: 1\n", "best log_loss nan"),
    ({"best": {"step": 2.5, "log_loss": 0.7}}, "seed: 1\n", "and step 2.5 are not"),
    ({"best": {"step": 3, "log_loss": 0.7}}, "seed: [1\n", "config.yaml: not a run's config.yaml"),
    ({"best": {"step": 3, "log_loss": 0.7}}, "seed: ${nowhere}\n", "config.yaml: not a run's config.yaml"),
])
def test_a_malformed_run_is_one_error_line(tmp_path, capsys, metrics, config, message):
    run = fake_run(tmp_path, "seed1", 1.0, 1)
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "config.yaml").write_text(config)
    with pytest.raises(SystemExit) as exit_info:
        main([str(run)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"error: {run}") and message in err and len(
        err.splitlines()) == 1


def test_a_sweep_over_a_key_the_dir_names_lack_fails_before_its_first_job(tmp_path):
    """Run dirs are named by fold and seed: two jobs that differ in lr would share one (the second stopped by the
    first's finished run, or replacing it with overwrite=true). The refusal names the keys and a subdir that works."""
    assert refused_sweep(tmp_path, "optimizer.lr=1e-4,3e-4", "optimizer=adamw_cpu,adamw_kahan_tascj", "seed=1,2") == (
        "error: -m varies optimizer, optimizer.lr, but each job's dir is named by data.valid_fold and seed only, so "
        "the jobs would write the same dir; name them apart with hydra.sweep.subdir, e.g. 'hydra.sweep.subdir=\""
        "optimizer=${hydra:runtime.choices.optimizer}_lr=${optimizer.lr}_${run_name:${data.valid_fold},${seed}}\"'")


def refused_sweep(tmp_path: Path, *overrides: str) -> str:
    """The one error line of a multirun refused before its first job (exit 2, no sweep dir made)."""
    sweep_dir = tmp_path / "sweep"
    done = subprocess.run([sys.executable, str(REPO / "lmsys/code/train_r_llama.py"), "--config-name",
                           "conf_r_llama_smol", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"],
                          capture_output=True, text=True, env=entry_env(), timeout=120, check=False)
    assert done.returncode == 2 and not sweep_dir.exists()
    return done.stderr.strip()


def test_a_custom_subdir_must_name_every_swept_key(tmp_path):
    """`hydra.sweep.subdir=same` passed the check (only the default subdir was checked): job 1 trained, job 2 then
    stopped at its finished run (or replaced it with overwrite=true)."""
    assert unnamed_keys(DEFAULT_SUBDIR, ["data.valid_fold", "seed"]) == []
    assert unnamed_keys("lr=${optimizer.lr}_" + DEFAULT_SUBDIR, ["optimizer.lr", "seed"]) == []
    assert unnamed_keys("${hydra:runtime.choices.optimizer}_${seed}", ["optimizer", "seed"]) == []
    assert unnamed_keys("run${hydra:job.num}", ["optimizer.lr", "seed"]) == []
    assert unnamed_keys("fold${data.valid_fold}", ["data.valid_fold", "seed"]) == ["seed"]
    assert unnamed_keys("${oc.select:optimizer.lr,1e-4}_${seed}", ["optimizer.lr", "seed"]) == []
    assert unnamed_keys("seed_lr=${optimizer.lr}", ["optimizer.lr", "seed"]) == ["seed"]  # the word is no value
    assert refused_sweep(tmp_path, "seed=1,2", "hydra.sweep.subdir=same") == (
        "error: -m varies seed, but each job's dir is named by hydra.sweep.subdir=same, which does not name seed, so "
        "the jobs would write the same dir; name them apart with hydra.sweep.subdir, e.g. 'hydra.sweep.subdir=\""
        "seed=${seed}_same\"'")


def test_a_sweep_dir_is_no_run_dir_nor_inside_one(tmp_path, capsys):
    """hydra.sweep.dir=A_RUN wrote multirun.yaml, the jobs' dirs and sweep_summary.json into a finished run's dir."""
    run = tmp_path / "run"
    RunDir(run, is_main=True).claim(overwrite=False, resume=False)
    for sweep_dir, how in ((run, "is"), (run / "sweeps", "lies inside")):
        with pytest.raises(SystemExit) as exited:
            check_sweep_dir(sweep_dir)
        assert exited.value.code == 2 and capsys.readouterr().err == (
            f"error: hydra.sweep.dir={sweep_dir} {how} the run dir {run}, which holds only its run's files; choose "
            f"another sweep dir\n")
    check_sweep_dir(tmp_path / "sweeps")


def test_swept_keys_come_from_the_command_line_and_the_sweeper_params():
    task = ["seed=1,2", "trainer.max_steps=4", "lora.r=range(8,17,8)"]
    config = OmegaConf.create({"hydra": {"overrides": {"task": task},
                                         "sweeper": {"params": {"optimizer.lr": "1e-4,3e-4", "lora.alpha": "32"}}}})
    assert swept_keys(config) == ["lora.r", "optimizer.lr", "seed"]


def test_an_earlier_sweeps_summary_is_kept_beside_the_new_one(tmp_path):
    path = tmp_path / SUMMARY_FILE
    assert keep_earlier_summary(path) is None
    path.write_text('{"n": 2}')
    os.utime(path, (1_700_000_000, 1_700_000_000))
    kept = keep_earlier_summary(path)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(1_700_000_000))
    assert kept == tmp_path / f"sweep_summary.{stamp}.json" and kept.read_text() == '{"n": 2}' and not path.exists()
    path.write_text('{"n": 1}')
    os.utime(path, (1_700_000_000, 1_700_000_000))  # the same second: a suffix, nothing replaced
    assert keep_earlier_summary(path).name == f"sweep_summary.{stamp}-1.json" and kept.read_text() == '{"n": 2}'
