"""The benchmark command end to end on a tiny model: every mode (ours and the HF Trainer peer) runs in its own
process, the table carries the roofline and packed's ratio to each baseline, the JSON line carries the keys the
README documents, and the padded baseline really pads. The commands run in tests/bench_check.py, a background job
of the suite (tests/background.py); these tests, moved to the end of the suite, read what they printed."""

import json
from pathlib import Path

import background
import pytest
import tiny
from bench_check import COMMANDS

from lmsys.bench import _cell, _ratio
from lmsys.roofline import ProjectionShapes

OURS = ("padded", "padded_grouped", "packed")
PEERS = ("hf_trainer_typical", "hf_trainer_strong")
KEYS = [f"{metric}_{mode}" for mode in OURS + PEERS
        for metric in ("train_real_tokens_per_s", "train_roofline_fraction", "predict_pairs_per_s",
                       "predict_single_pairs_per_s", "peak_rss_mb")]
KEYS += ["matmul_gflops_float32"]


def cells(table: list[str], label: str) -> list[str]:
    return [cell.strip() for cell in next(line for line in table if line.startswith(f"| {label} ")).split("|")[2:-1]]


@pytest.fixture(scope="module")
def bench_run() -> Path:
    """The directory of the bench job (tests/bench_check.py, started with the suite): its tiny Llama and the output
    of each of its commands."""
    return background.finished("test_bench.py")


@pytest.fixture(scope="module")
def bench_output(bench_run) -> dict[str, list[str]]:
    """The output lines of the bench job's commands, by name."""
    return {name: (bench_run / f"{name}.txt").read_text().strip().splitlines() for name in COMMANDS}


def test_one_mode_prints_its_rows_only(bench_output):
    """Without a baseline there are no ratio columns and no row of packed's TTA over a baseline's single pass. Two
    rounds: the cells are the medians and each round's values are listed."""
    lines = bench_output["packed"]
    rounds = next(line for line in lines if line.startswith("  train real tokens/s packed: "))
    per_round = [float(value) for value in rounds.split(": ")[1].split(", ")]
    assert len(per_round) == 2 and "2 rounds (each cell above is the median):" in lines
    table = [line for line in lines if line.startswith("| ")]
    assert [cell.strip() for cell in table[0].split("|")[2:-1] if cell.strip()] == ["packed"]  # no ratio columns
    assert float(cells(table, "train real tokens/s")[0]) == pytest.approx(sum(per_round) / 2, abs=0.06)
    assert not any(line.startswith("| packed TTA / their 1 pass") for line in table)
    single = [float(value) for value in next(
        line for line in lines if line.startswith("  predict pairs/s (1 pass) packed: ")).split(": ")[1].split(", ")]
    assert float(cells(table, "predict pairs/s (1 pass)")[0]) == pytest.approx(sum(single) / 2, abs=0.06)
    assert sorted(json.loads(lines[-1])) == sorted(
        [f"{metric}_packed" for metric in ("train_real_tokens_per_s", "train_roofline_fraction", "predict_pairs_per_s",
                                           "predict_single_pairs_per_s", "peak_rss_mb")] + ["matmul_gflops_float32"])


def test_bench_prints_a_table_and_one_json_line(bench_run, bench_output):
    lines = bench_output["all"]
    result = json.loads(lines[-1])
    assert sorted(result) == sorted(KEYS)
    assert all(value > 0 for value in result.values())
    roofline = next(line for line in lines if line.startswith("roofline: matmul float32 "))
    assert "4 x 0.07M projection weights a trained token (6 x with gradient checkpointing)" in roofline
    table = [line for line in lines if line.startswith("| ")]
    header = [cell.strip() for cell in table[0].split("|")[2:-1]]
    assert header == [*OURS, *PEERS, "packed/padded", "packed/hf_trainer_typical", "packed/hf_trainer_strong"]
    assert cells(table, "compute dtype")[:5] == ["float32"] * 3 + ["float32 +ckpt", "float32"]
    padding = dict(zip(OURS, map(float, cells(table, "train padding share %")), strict=False))
    assert padding["padded"] > padding["padded_grouped"] > padding["packed"] == 0.0  # pad tails dropped (unpad_rows)
    # packed over each baseline, like for like, from the modes' own cells; then packed's TTA over their single pass
    speed = dict(zip(header, map(float, cells(table, "train real tokens/s")), strict=True))
    assert abs(speed["packed/hf_trainer_strong"] - speed["packed"] / speed["hf_trainer_strong"]) < 0.02
    tta = dict(zip(header, map(float, cells(table, "predict pairs/s (TTA)")), strict=True))
    single = dict(zip(header, map(float, cells(table, "predict pairs/s (1 pass)")), strict=True))
    tta_over_single = dict(zip(header, cells(table, "packed TTA / their 1 pass"), strict=True))
    assert [tta_over_single[mode] for mode in OURS + PEERS] == ["-"] * 5
    for baseline in ("padded", *PEERS):  # the cells are rounded: within 2%
        like_for_like = single["packed"] / single[baseline]
        assert single[f"packed/{baseline}"] == pytest.approx(like_for_like, rel=0.02, abs=0.01)
        tta_cost = tta["packed"] / single[baseline]
        assert float(tta_over_single[f"packed/{baseline}"]) == pytest.approx(tta_cost, rel=0.02, abs=0.01)
    # each mode's limit is the matmul rate measured around its own training over 4 (6 with checkpointing) FLOPs a
    # projection weight and token
    params = ProjectionShapes.from_model_dir(bench_run / "llama").matmul_params()
    limit = dict(zip(header, map(float, cells(table, "roofline tokens/s")), strict=True))
    gflops = dict(zip(header, map(float, cells(table, "matmul GFLOP/s (during)")), strict=False))
    for mode in OURS + PEERS:
        flops = (6 if mode == "hf_trainer_typical" else 4) * params
        assert limit[mode] == pytest.approx(gflops[mode] * 1e9 / flops, rel=0.02)


def test_a_ratio_over_a_zero_baseline_is_left_out():
    """A baseline cell of 0 (a padding share of a batch without pads) gives no ratio ('-'), not a division error."""
    results = {"packed": {"train_padding_share": 0.0, "predict_pairs_per_s": 3.0},
               "padded": {"train_padding_share": 0.0, "predict_single_pairs_per_s": 2.0}}
    assert _ratio(results, "train_padding_share", "train_padding_share", "padded") is None
    assert _cell(None, 1, 2, 6) == "     -"
    assert _ratio(results, "predict_pairs_per_s", "predict_single_pairs_per_s", "padded") == 1.5


@pytest.mark.parametrize("override,line", [
    ("trainer.eval_frequncy=5", ("error: Could not override 'trainer.eval_frequncy': trainer.eval_frequncy: Key "
                                 "'eval_frequncy' not in 'TrainerConfig'")),
    ("bench.repeats=0", "error: bench.repeats must be >= 1"),
])
def test_a_bad_bench_config_is_one_error_line(override, line, capsys):
    """As the training entry points: a typo or a broken rule was a 60-line traceback and exit 1."""
    from lmsys.bench import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--config-name", "conf_r_llama_smol", override])
    assert (exit_info.value.code, capsys.readouterr().err) == (2, line + "\n")


@pytest.mark.parametrize("override,start", [
    ("bench.modes=[]", "error: bench.modes: one or more of"),
    ("bench.modes=[packed,packed]", "error: bench.modes: one or more of"),
    ("bench.n_pairs=17", "error: bench.n_pairs=17, but data.train_path="),
    ("data.train_path=/nonexistent.csv", "error: /nonexistent.csv: no such file"),
])
def test_bad_modes_and_data_are_one_error_line_before_any_mode_runs(override, start, capsys, tmp_path, monkeypatch):
    """An empty mode list crashed the table; more pairs than the file holds ran on the file's, the header saying
    the number asked for; a bad file was a traceback from each mode's process."""
    from lmsys import bench

    tiny.arena_frame(16, seed=5).to_csv(tmp_path / "train.csv", index=False)
    monkeypatch.setattr(bench, "run_child", lambda *args: pytest.fail("a mode ran"))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--config-name", "conf_r_llama_smol", f"data.train_path={tmp_path / 'train.csv'}", override])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(start) and len(err.splitlines()) == 1


def test_an_encoder_is_not_benched_packed(capsys):
    """DeBERTa's packed mode failed in its child process after the padded modes had run (two tracebacks)."""
    from lmsys import bench

    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--config-name", "conf_r_deberta_v3_large", "bench.modes=[padded,packed]"])
    assert (exit_info.value.code, capsys.readouterr().err) == (2, (
        "error: bench.modes: packed; the deberta family is an encoder, whose bidirectional attention cannot be "
        "packed: pass bench.modes=[padded,padded_grouped]\n"))
