"""Sweeps through Hydra's submitit launcher (each job its own process, a job of several tasks one multi-process
run), the sweep summary written by the launching process, and the cluster configs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from entry_runs import REPO, entry_env, finish, read_metrics, start_entry, tiny_overrides
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tiny import arena_frame

from lmsys.runs import FinishedRun, RunDirError
from lmsys.sweep import SUMMARY_FILE


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, tiny_models) -> SimpleNamespace:
    """At once: `-m seed=1,2 hydra/launcher=submitit_local` into a sweep dir that already holds a finished run of an
    earlier sweep (seed9), and `-m seed=3` as one submitit job of 2 tasks (2 CPU processes, gloo)."""
    root = tmp_path_factory.mktemp("cluster")
    arena_frame(16, seed=21).to_csv(root / "train.csv", index=False)
    arena_frame(5, seed=22, start_id=800).to_csv(root / "valid.csv", index=False)
    overrides = tiny_overrides(tiny_models["llama"], root / "train.csv", root / "valid.csv", trainer__max_steps=2)
    two_jobs, two_tasks = root / "two_jobs", root / "two_tasks"
    stale = two_jobs / "seed9"
    stale.mkdir(parents=True)
    (stale / "metrics.json").write_text(json.dumps({"best": {"step": 1, "log_loss": 9.0}}))
    os.utime(stale / "metrics.json", (1e9, 1e9))  # finished long before this sweep
    launcher = ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"]
    jobs = start_entry(["-m", "seed=1,2", *launcher, *overrides, f"hydra.sweep.dir={two_jobs}"], root / "jobs.log")
    other = fake_finished_run(two_jobs / "other", 0.7)  # another sweep's run, or a plain run, finishing meanwhile
    tasks = start_entry(["-m", "seed=3", *launcher, "hydra.launcher.tasks_per_node=2", *overrides,
                         f"hydra.sweep.dir={two_tasks}"], root / "tasks.log", entry_env(ACCELERATE_USE_CPU="true"))
    bad = start_entry(["-m", "seed=4", *launcher, *overrides, f"data.train_path={root / 'missing.csv'}",
                       f"hydra.sweep.dir={root / 'bad'}"], root / "bad.log")
    finish(jobs, root / "jobs.log")
    finish(tasks, root / "tasks.log")
    bad.wait(timeout=400)
    return SimpleNamespace(two_jobs=two_jobs, two_tasks=two_tasks, log=(root / "jobs.log").read_text(), other=other,
                           bad=SimpleNamespace(status=bad.returncode, log=(root / "bad.log").read_text()),
                           missing=root / "missing.csv")


def fake_finished_run(run_dir: Path, log_loss: float) -> Path:
    """A finished run's files, its metrics.json dated an hour ahead (after any sweep's start), of no multirun."""
    run_dir.mkdir(parents=True)
    (run_dir / "run_info.json").write_text(json.dumps({"sweep_id": None}))
    (run_dir / "metrics.json").write_text(json.dumps({"best": {"step": 1, "log_loss": log_loss}}))
    os.utime(run_dir / "metrics.json", (time.time() + 3600, time.time() + 3600))
    return run_dir


def submitit_jobs(sweep_dir: Path) -> list[str]:
    return sorted(p.name for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit())


def test_each_job_of_the_sweep_is_its_own_submitit_job_and_a_full_run(sweeps):
    assert len(submitit_jobs(sweeps.two_jobs)) == 2
    for seed in (1, 2):
        run_dir = sweeps.two_jobs / f"seed{seed}"
        assert read_metrics(run_dir)["updates"] == 2
        assert (run_dir / "checkpoint" / "head.safetensors").is_file()
        assert f"seed: {seed}" in (run_dir / "config.yaml").read_text()


def test_the_summary_is_written_when_the_jobs_finish_and_leaves_out_earlier_runs(sweeps):
    summary = json.loads((sweeps.two_jobs / SUMMARY_FILE).read_text())
    assert [run["seed"] for run in summary["runs"]] == [1, 2]  # not the earlier sweep's seed9, nor `other`
    assert len({json.loads((sweeps.two_jobs / f"seed{s}" / "run_info.json").read_text())["sweep_id"]
                for s in (1, 2)}) == 1
    losses = [read_metrics(sweeps.two_jobs / f"seed{s}")["best"]["log_loss"] for s in (1, 2)]
    assert summary["best_log_loss"]["mean"] == pytest.approx(sum(losses) / 2, abs=1e-12)
    assert "(n=2)" in sweeps.log  # printed by the launching process


def test_each_job_records_its_own_overrides(sweeps):
    """A submitit job's command line is submitit's own; the job's overrides say what it ran with."""
    for seed in (1, 2):
        info = json.loads((sweeps.two_jobs / f"seed{seed}" / "run_info.json").read_text())
        assert f"seed={seed}" in info["overrides"] and "seed=1,2" not in info["overrides"]
        assert "submitit" in " ".join(info["command"])


def test_a_jobs_bad_input_is_its_one_error_line(sweeps):
    """The job inherited HYDRA_FULL_ERROR from the launching process (set there to read Hydra's own errors) and
    took it for the user's: a 29-line traceback, exit 1."""
    assert sweeps.bad.status == 2, sweeps.bad.log[-3000:]
    assert sweeps.bad.log.strip().splitlines()[-1] == f"error: {sweeps.missing}: no such file"
    assert "Traceback" not in sweeps.bad.log


def test_a_job_of_two_tasks_is_one_two_process_run(sweeps):
    job, = submitit_jobs(sweeps.two_tasks)
    assert sorted(p.name for p in (sweeps.two_tasks / ".submitit" / job).glob("*_log.out")) == [
        f"{job}_0_log.out", f"{job}_1_log.out"]
    run_dir = sweeps.two_tasks / "seed3"
    info = json.loads((run_dir / "run_info.json").read_text())
    assert (info["num_processes"], info["distributed_type"]) == (2, "MULTI_CPU")
    assert sum("run dir" in line for line in (run_dir / "train.log").read_text().splitlines()) == 1  # rank 0 only
    assert json.loads((sweeps.two_tasks / SUMMARY_FILE).read_text())["best_log_loss"]["n"] == 1


def test_the_summary_takes_the_runs_of_this_multirun_whenever_they_finished(tmp_path, monkeypatch, capsys):
    """A resumed sweep (`-m seed=1,2 resume=true`) skips its finished jobs (they stopped it before): their runs,
    finished long before, join its summary; a run of another sweep finished meanwhile does not."""
    from lmsys.sweep import SweepSummaryCallback, finished_runs
    from lmsys.training.recipe import skip_finished_run

    callback = SweepSummaryCallback()
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    callback.on_multirun_start(config)
    skipped, other = fake_finished_run(tmp_path / "seed1", 0.5), fake_finished_run(tmp_path / "nested" / "seed3", 0.7)
    os.utime(skipped / "metrics.json", (1e9, 1e9))  # finished in 2001
    (tmp_path / "seed4").mkdir()  # unfinished: no metrics.json
    assert finished_runs(tmp_path) == [tmp_path / "nested" / "seed3", skipped]
    assert skip_finished_run(skipped, FinishedRun(f"{skipped} holds a finished run"), "seed: 1\n") == {
        "best": {"step": 1, "log_loss": 0.5}}
    callback.on_multirun_end(config)
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert [run["run_dir"] for run in summary["runs"]] == [str(skipped)] and "(n=1)" in capsys.readouterr().out
    assert json.loads((other / "run_info.json").read_text())["sweep_id"] is None
    # a finished run of other settings is no result of this config: resume=true refuses it rather than skip it
    (skipped / "config.yaml").write_text("seed: 1\noptimizer:\n  lr: 0.0003\n")
    with pytest.raises(RunDirError, match=r"finished under other settings \(optimizer.lr: 0.0003 -> 0.1\)"):
        skip_finished_run(skipped, FinishedRun("finished"), "seed: 1\nresume: true\noptimizer:\n  lr: 0.1\n")


def test_slurm_launcher_runs_one_task_per_gpu():
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("conf_r_llama_smol", overrides=["hydra/launcher=slurm_gpu8"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8
    assert cfg.hydra.callbacks.submitit_distributed._target_ == "lmsys.cluster.SubmititDistributedEnv"


@pytest.mark.parametrize(("name", "distributed", "machines", "processes"), [
    ("fsdp_qlora", "FSDP", 1, 8), ("fsdp_full", "FSDP", 1, 8), ("multinode_example", "MULTI_GPU", 2, 16)])
def test_scale_out_accelerate_configs(name, distributed, machines, processes):
    config = load_config_from_file(str(REPO / "conf" / "accelerate" / f"{name}.yaml"))
    assert (config.distributed_type.value, config.num_machines, config.num_processes) == (distributed, machines,
                                                                                          processes)
    assert config.mixed_precision == "no"  # the head stays fp32; bf16 comes from model.compute_dtype
    if distributed == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
