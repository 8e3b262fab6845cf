"""The work of tests/test_bench.py, as a background job of the suite (tests/background.py): the benchmark's two
commands on a tiny model, one after the other (every mode runs in its own process, most of which is the ~10 s
import of torch and transformers: two minutes and more of one core), beside the other tests.

    PYTHONPATH=.:tests python tests/bench_check.py OUT_DIR

The tiny Llama is OUT_DIR/llama; each command's stdout goes to OUT_DIR/<name>.txt (COMMANDS' names); exits non-zero
with the failing command's stderr when one fails. The tiny model's timings mean nothing: the tests read the table's
layout and arithmetic.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tiny

REPO = Path(__file__).resolve().parents[1]
N_PAIRS = 16
# name -> the extra overrides of one bench command: every mode, and packed alone over two rounds
COMMANDS = {"all": [], "packed": ["bench.modes=[packed]", "bench.repeats=2"]}


def bench_command(model: Path, train: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmsys.bench", "--config-name", "conf_r_llama_smol",
            f"model.path={model}", "model.max_length=128", f"data.train_path={train}",
            f"bench.n_pairs={N_PAIRS}", "trainer.batch_size=4", "trainer.grad_accum=2", "trainer.max_tokens=256",
            "trainer.eval_max_tokens=512", "bench.roofline_tokens=64", *extra]


def main(out_dir: Path) -> int:
    train = out_dir / "train.csv"
    tiny.arena_frame(N_PAIRS, seed=5).to_csv(train, index=False)
    model = tiny.save_tiny_model("llama", out_dir / "llama")
    for name, extra in COMMANDS.items():
        done = subprocess.run(bench_command(model, train, *extra), cwd=REPO, capture_output=True, text=True,
                              timeout=900, check=False)
        (out_dir / f"{name}.txt").write_text(done.stdout)
        if done.returncode != 0:
            print(f"bench command {name!r} exited {done.returncode}:\n{done.stderr[-3000:]}", file=sys.stderr)
            return done.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
