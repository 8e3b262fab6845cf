"""The work of tests/test_distill_pipeline.py, as a background job of the suite (tests/background.py): a minute and
more of single-threaded commands in a row, run beside the other tests.

    PYTHONPATH=.:tests python tests/distill_check.py OUT_DIR

examples/distill_pipeline.sh on 30 tiny-model pairs, the embedded models replaced through its override variables
(gemma-3 teachers, Llama students); its work directory is OUT_DIR/work, its output OUT_DIR/stdout.txt; exits with
the pipeline's status.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tiny

REPO = Path(__file__).resolve().parents[1]

N_PAIRS = 30


def main(out_dir: Path) -> int:
    data = out_dir / "pairs.csv"
    tiny.arena_frame(N_PAIRS, seed=5).to_csv(data, index=False)
    teacher, student = (tiny.save_tiny_model(kind, out_dir / "models" / kind) for kind in ("gemma3", "llama"))
    small = "model.max_length=128 trainer.max_tokens=512 trainer.eval_max_tokens=512 trainer.batch_size=4"
    env = {**os.environ, "PYTHONPATH": str(REPO), "FOLDS": "2", "STEPS": "2", "MAXLEN": "128", "HOLDOUT": "0.2",
           "KINDS": "distilled",  # the label-only students run the same commands with other loss weights
           "TEACHER_OVERRIDES": f"model.path={teacher} {small}",
           "STUDENT_OVERRIDES": f"model.path={student} model.template=llama3 {small}"}
    pipeline = ["bash", str(REPO / "examples" / "distill_pipeline.sh"), str(data), str(out_dir / "work")]
    with open(out_dir / "stdout.txt", "w") as stdout:
        # stderr: the job's log
        done = subprocess.run(pipeline, env=env, stdout=stdout, timeout=900, cwd=REPO, check=False)
    if done.returncode != 0:
        print((out_dir / "stdout.txt").read_text()[-3000:], file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
