"""The benchmark command end to end on a tiny model: every mode (ours and the HF Trainer peer) runs in its own
process, the table carries the roofline and packed's ratio to each baseline, the JSON line carries the keys the
README documents, and the padded baseline really pads."""

import json
import sys
from pathlib import Path

import pytest
import tiny
from entry_runs import run_side_by_side

from lmsys.roofline import ProjectionShapes

REPO = Path(__file__).resolve().parents[1]
OURS = ("padded", "padded_grouped", "packed")
PEERS = ("hf_trainer_typical", "hf_trainer_strong")
KEYS = [f"{metric}_{mode}" for mode in OURS + PEERS
        for metric in ("train_real_tokens_per_s", "train_roofline_fraction", "predict_pairs_per_s", "peak_rss_mb")]
KEYS += [f"predict_single_pairs_per_s_{mode}" for mode in PEERS] + ["matmul_gflops_float32"]


def cells(table: list[str], label: str) -> list[str]:
    return [cell.strip() for cell in next(line for line in table if line.startswith(f"| {label} ")).split("|")[2:-1]]


def bench_command(tiny_models, train: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmsys.bench", "--config-name", "conf_r_llama_smol",
            f"model.path={tiny_models['llama']}", "model.max_length=128", f"data.train_path={train}",
            "bench.n_pairs=16", "trainer.batch_size=4", "trainer.grad_accum=2", "trainer.max_tokens=256", "trainer.eval_max_tokens=512",
            "bench.roofline_tokens=64", *extra]


@pytest.fixture(scope="module")
def bench_output(tiny_models, tmp_path_factory) -> dict[str, list[str]]:
    """The output lines of the two bench commands the tests read, started at once (each mode's process spends most
    of its time importing, which two cores do side by side; the tiny model's timings mean nothing here)."""
    train = tmp_path_factory.mktemp("bench") / "train.csv"
    tiny.arena_frame(16, seed=5).to_csv(train, index=False)
    commands = {"all": bench_command(tiny_models, train),
                "packed": bench_command(tiny_models, train, "bench.modes=[packed]", "bench.repeats=2")}
    results = run_side_by_side(list(commands.values()), cwd=REPO)
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    return {name: result.stdout.strip().splitlines() for name, result in zip(commands, results, strict=True)}


def test_one_mode_prints_its_rows_only(bench_output):
    """Without a peer there is no single-pass prediction row (a row with no cell at all is left out). Two rounds: the
    cells are the medians and each round's values are listed."""
    lines = bench_output["packed"]
    rounds = next(line for line in lines if line.startswith("  train real tokens/s packed: "))
    per_round = [float(value) for value in rounds.split(": ")[1].split(", ")]
    assert len(per_round) == 2 and "2 rounds (each cell above is the median):" in lines
    table = [line for line in lines if line.startswith("| ")]
    assert [cell.strip() for cell in table[0].split("|")[2:-1] if cell.strip()] == ["packed"]  # no ratio columns
    assert float(cells(table, "train real tokens/s")[0]) == pytest.approx(sum(per_round) / 2, abs=0.06)
    assert not any(line.startswith("| predict pairs/s (1 pass)") for line in table)
    assert sorted(json.loads(lines[-1])) == sorted(
        [f"{metric}_packed" for metric in ("train_real_tokens_per_s", "train_roofline_fraction", "predict_pairs_per_s",
                                           "peak_rss_mb")] + ["matmul_gflops_float32"])


def test_bench_prints_a_table_and_one_json_line(tiny_models, bench_output):
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
    assert padding["padded"] > padding["padded_grouped"] > padding["packed"] >= 0.0
    # packed over each baseline, from the modes' own cells (the 1-pass row: packed's TTA rate over the single pass)
    speed = dict(zip(header, map(float, cells(table, "train real tokens/s")), strict=True))
    assert abs(speed["packed/hf_trainer_strong"] - speed["packed"] / speed["hf_trainer_strong"]) < 0.02
    single = cells(table, "predict pairs/s (1 pass)")
    assert single[:3] == ["-"] * 3 and single[5] == "-" and float(single[6]) > 0
    # each mode's limit is the matmul rate measured around its own training over 4 (6 with checkpointing) FLOPs a
    # projection weight and token
    params = ProjectionShapes.from_model_dir(tiny_models["llama"]).matmul_params()
    limit = dict(zip(header, map(float, cells(table, "roofline tokens/s")), strict=True))
    gflops = dict(zip(header, map(float, cells(table, "matmul GFLOP/s (during)")), strict=False))
    for mode in OURS + PEERS:
        flops = (6 if mode == "hf_trainer_typical" else 4) * params
        assert limit[mode] == pytest.approx(gflops[mode] * 1e9 / flops, rel=0.02)
