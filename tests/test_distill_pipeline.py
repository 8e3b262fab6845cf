"""examples/distill_pipeline.sh end to end on tiny in-process models (the embedded models replaced through its
override variables): k-fold teachers -> joined out-of-fold logits -> distilled and label-only students -> soups ->
submissions with swap TTA -> scores on the held-out pairs."""

import os
import subprocess
from pathlib import Path

import pandas as pd
import tiny

REPO = Path(__file__).resolve().parents[1]


def test_the_distillation_pipeline_runs_end_to_end(tiny_models, tmp_path):
    data = tmp_path / "pairs.csv"
    tiny.arena_frame(30, seed=5).to_csv(data, index=False)
    small = "model.max_length=128 trainer.max_tokens=512 trainer.eval_max_tokens=512 trainer.batch_size=4"
    env = {**os.environ, "PYTHONPATH": str(REPO), "FOLDS": "2", "STEPS": "2", "MAXLEN": "128", "HOLDOUT": "0.2",
           "KINDS": "distilled",  # the label-only students run the same commands with other loss weights
           "TEACHER_OVERRIDES": f"model.path={tiny_models['gemma3']} {small}",
           "STUDENT_OVERRIDES": f"model.path={tiny_models['llama']} model.template=llama3 {small}"}
    work = tmp_path / "work"
    done = subprocess.run(["bash", str(REPO / "examples" / "distill_pipeline.sh"), str(data), str(work)], env=env,
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    held = pd.read_csv(work / "heldout.csv", dtype={"id": str})
    teacher = pd.read_parquet(work / "train_with_teacher.parquet")
    assert len(teacher) + len(held) == 30 and teacher["teacher_logits"].map(len).eq(3).all()
    for kind in ("distilled",):
        sub = pd.read_csv(work / f"submission_{kind}.csv", dtype={"id": str})
        assert list(sub.id) == list(held.id)
        assert (sub[["winner_model_a", "winner_model_b", "winner_tie"]].sum(1) - 1).abs().max() < 1e-6
        assert (work / f"soup_{kind}" / "soup.json").is_file()
    assert "student soup, distilled" in done.stdout and "swap-symmetric class prior" in done.stdout
