"""The benchmark command end to end on a tiny model: every mode runs in its own process, the table and the JSON
line carry the keys the README documents, and the padded baseline really pads."""

import json
import subprocess
import sys
from pathlib import Path

import tiny

REPO = Path(__file__).resolve().parents[1]
KEYS = [f"{metric}_{mode}" for mode in ("padded", "padded_grouped", "packed")
        for metric in ("train_real_tokens_per_s", "predict_pairs_per_s", "peak_rss_mb")]


def test_bench_prints_a_table_and_one_json_line(tiny_models, tmp_path):
    train = tmp_path / "train.csv"
    tiny.arena_frame(16, seed=5).to_csv(train, index=False)
    done = subprocess.run(
        [sys.executable, "-m", "lmsys.bench", "--config-name", "conf_r_llama_smol",
         f"model.path={tiny_models['llama']}", "model.max_length=128", f"data.train_path={train}", "bench.n_pairs=16",
         "trainer.batch_size=4", "trainer.grad_accum=2", "trainer.max_tokens=256", "trainer.eval_max_tokens=512"],
        cwd=REPO, capture_output=True, text=True, timeout=400, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert sorted(result) == sorted(KEYS)
    assert all(value > 0 for value in result.values())
    table = [line for line in lines if line.startswith("| ")]
    assert table[0].split("|")[2:5] == [f" {m:>14} " for m in ("padded", "padded_grouped", "packed")]
    padding = next(line for line in table if "train padding share" in line).split("|")[2:5]
    share = {mode: float(cell) for mode, cell in zip(("padded", "padded_grouped", "packed"), padding, strict=True)}
    assert share["padded"] > share["padded_grouped"] > share["packed"] >= 0.0
