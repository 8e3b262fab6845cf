"""Inputs of the throughput check of scripts/gpu_check.sh, built in-process (no network): a random ~1B-parameter
Llama with the tests' tokenizer, and 128 labelled pairs of 100-1,400 words (a long-tailed spread like the arena's).

    python scripts/gpu_bench_inputs.py OUT_DIR   ->  OUT_DIR/llama1b/, OUT_DIR/pairs.csv
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny import WORDS, arena_frame, save_llama_1b


def long_pairs(n: int, seed: int = 0):
    rng = random.Random(seed)
    frame = arena_frame(n, seed=seed)

    def text() -> str:
        return json.dumps([" ".join(rng.choice(WORDS) for _ in range(int(rng.paretovariate(1.5) * 100) % 1400 + 50))])

    frame["response_a"] = [text() for _ in range(n)]
    frame["response_b"] = [text() for _ in range(n)]
    return frame


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    long_pairs(128).to_csv(out / "pairs.csv", index=False)
    save_llama_1b(out / "llama1b")
