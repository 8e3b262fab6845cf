"""examples/distill_pipeline.sh end to end on tiny in-process models (the embedded models replaced through its
override variables): k-fold teachers -> joined out-of-fold logits -> distilled and label-only students -> soups ->
submissions with swap TTA -> scores on the held-out pairs. The pipeline runs in tests/distill_check.py, a background
job of the suite (tests/background.py); this test, moved to the end of the suite, checks what it wrote."""

import background
import pandas as pd
from distill_check import N_PAIRS


def test_the_distillation_pipeline_runs_end_to_end():
    out_dir = background.finished("test_distill_pipeline.py")
    work, stdout = out_dir / "work", (out_dir / "stdout.txt").read_text()
    held = pd.read_csv(work / "heldout.csv", dtype={"id": str})
    teacher = pd.read_parquet(work / "train_with_teacher.parquet")
    assert len(teacher) + len(held) == N_PAIRS and teacher["teacher_logits"].map(len).eq(3).all()
    for kind in ("distilled",):
        sub = pd.read_csv(work / f"submission_{kind}.csv", dtype={"id": str})
        assert list(sub.id) == list(held.id)
        assert (sub[["winner_model_a", "winner_model_b", "winner_tie"]].sum(1) - 1).abs().max() < 1e-6
        assert (work / f"soup_{kind}" / "soup.json").is_file()
    assert "student soup, distilled" in stdout and "swap-symmetric class prior" in stdout
