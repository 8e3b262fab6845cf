"""Early stopping, driven in process on the tiny model: with trainer.patience=2 and evaluations scripted to get
worse after update 2, the run stops at update 4, and the checkpoint on disk is update 2's (the best), not the last."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from test_config import compose_config
from tiny import arena_frame

from lmsys.config import validated_config
from lmsys.evaluation.validation import evaluate
from lmsys.modeling.checkpoint import HEAD_FILE
from lmsys.training.recipe import TrainingRecipe, release, warn_idle_patience

SCRIPTED_LOG_LOSS = {1: 1.0, 2: 0.5, 3: 0.7, 4: 0.9, 5: 0.1, 6: 0.1}  # 5 and 6 would win: they must never run


@pytest.fixture()
def config(tmp_path, tiny_models):
    arena_frame(48, seed=1).to_csv(tmp_path / "train.csv", index=False)
    arena_frame(6, seed=2, start_id=900).to_csv(tmp_path / "valid.csv", index=False)
    return validated_config(compose_config("conf_r_llama_smol", (
        f"model.path={tiny_models['llama']}", f"data.train_path={tmp_path / 'train.csv'}",
        f"data.valid_path={tmp_path / 'valid.csv'}", "model.max_length=128", "trainer.max_tokens=512",
        "trainer.batch_size=4", "trainer.max_steps=6", "trainer.eval_frequency=1", "trainer.patience=2",
        "optimizer.lr=1e-2", "optimizer.head_lr=1e-2")))


def test_patience_stops_the_run_and_the_best_checkpoint_survives(config, tmp_path, monkeypatch):
    recipe = TrainingRecipe.setup(config, tmp_path / "run", "early: {}\n")
    heads = {}

    def scripted_evaluate(model, validation, accelerator):
        """The real evaluation (its probabilities go to oof.csv), with the log loss of the script; the head's
        weights at each evaluation kept to compare with the checkpoint."""
        step = recipe.state.step
        heads[step] = {k: v.detach().float().clone() for k, v in recipe.unwrapped.head.state_dict().items()}
        result = evaluate(model, validation, accelerator)
        return dataclasses.replace(result, metrics={**result.metrics, "log_loss": SCRIPTED_LOG_LOSS[step]})

    monkeypatch.setattr("lmsys.training.recipe.evaluate", scripted_evaluate)
    try:
        state = recipe.train()
        summary = recipe.finish()
    finally:
        release(recipe.accelerator)
    assert state.step == 4 and state.stopped_early and summary["stopped_early"]
    assert [h["step"] for h in summary["history"]] == [1, 2, 3, 4]
    assert state.best_step == 2 and summary["best"]["log_loss"] == 0.5
    saved = load_file(str(tmp_path / "run" / "checkpoint" / HEAD_FILE))
    best, last = heads[2], heads[4]
    for name, tensor in saved.items():
        key = next(k for k in best if name.endswith(k))
        torch.testing.assert_close(tensor, best[key], rtol=0, atol=0)
    assert any((saved[name] - last[next(k for k in last if name.endswith(k))]).abs().max() > 1e-6 for name in saved)


@pytest.mark.parametrize("eval_frequency,total_updates,patience,warned", [
    (0, 10, 1, True),  # one evaluation, at the end
    (50, 10, 1, True),  # the period is longer than the run
    (3, 10, 4, True),  # evaluations at 3, 6, 9 and 10: four, never five
    (3, 10, 3, False),
    (3, 9, 2, False),
])
def test_patience_that_cannot_stop_the_run_is_said(eval_frequency, total_updates, patience, warned, caplog):
    settings = type("Settings", (), {"eval_frequency": eval_frequency, "total_updates": total_updates,
                                     "patience": patience})()
    with caplog.at_level("WARNING", logger="lmsys"):
        warn_idle_patience(settings)
    assert any(f"trainer.patience={patience} cannot stop this run" in r.getMessage() for r in caplog.records) == warned
