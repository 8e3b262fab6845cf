"""What `TrainingRecipe.update` does to the gradients between backward and the step, on a tiny NF4 model with SGD
(whose step is the gradient itself; Adam would normalise a scaled or clipped gradient away):

- clipping: trainer.max_grad_norm, or null for none (the LMSYS 2nd place trained without);
- dynamic loss scaling for float16 compute: float16 steps follow float32's with the scaler, an overflow skips the
  step and backs the scale off, the scale survives a resume, and FSDP refuses float16 training."""

import logging
import math

import pytest
import tiny
import torch
from accelerate import Accelerator

from lmsys.builders import build_encoders, build_loop_settings
from lmsys.config import ComputeDtype, ConfigError, DataConfig, Family, ModelConfig, TrainConfig, TrainerConfig
from lmsys.data.dataset import encode_split
from lmsys.data.io import pairs_from_frame
from lmsys.runs import RunDir
from lmsys.training.loss_scaling import grad_scaler_for
from lmsys.training.optim import warmup_cosine_scheduler
from lmsys.training.plan import iterate_updates
from lmsys.training.recipe import TrainingRecipe
from lmsys.training.state import LoopState, restore_state, save_training_state

N_PAIRS = 16


def recipe_for(tiny_models, dtype: ComputeDtype, grad_scaler: torch.amp.GradScaler,
               max_grad_norm: float | None = None) -> TrainingRecipe:
    """All N_PAIRS pairs in each update, SGD at lr 1 (the step is the gradient)."""
    torch.manual_seed(0)
    model, spec, tokenizer = tiny.build_preference_model(tiny_models["llama"], "llama", "nf4", compute_dtype=dtype)
    tiny.perturb(model)  # nonzero LoRA-B, so that LoRA-A has gradients
    split = encode_split(pairs_from_frame(tiny.arena_frame(N_PAIRS, seed=2), "mem.csv", require_labels=True),
                         build_encoders(spec, tokenizer))
    config = TrainConfig(model=ModelConfig(path=str(tiny_models["llama"]), family=Family.llama, max_length=128),
                         data=DataConfig(train_path="mem.csv"),
                         trainer=TrainerConfig(max_steps=2, batch_size=N_PAIRS, max_tokens=N_PAIRS * 128,
                                               max_grad_norm=max_grad_norm))
    settings = build_loop_settings(config, spec, len(split), 1, tokenizer.pad_token_id)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    return TrainingRecipe(Accelerator(cpu=True), model, optimizer, warmup_cosine_scheduler(optimizer, 2, 0.0, 1.0),
                          settings, split, grad_scaler=grad_scaler)


def first_update(recipe: TrainingRecipe) -> tuple[dict[str, torch.Tensor], float]:
    """Every trainable weight's change in the first update, and the gradient norm the update logged."""
    trainable = {name: p for name, p in recipe.model.named_parameters() if p.requires_grad}
    before = {name: p.detach().clone() for name, p in trainable.items()}
    stats = recipe.update(next(iterate_updates(recipe.train_split, recipe.settings, 0, 1)))
    return {name: before[name] - p.detach() for name, p in trainable.items()}, stats.grad_norm


def clipped_update(tiny_models, max_grad_norm: float | None) -> tuple[dict[str, torch.Tensor], float]:
    return first_update(recipe_for(tiny_models, ComputeDtype.float32, torch.amp.GradScaler("cpu", enabled=False),
                                   max_grad_norm))


def test_null_leaves_the_gradient_whole_and_a_norm_clips_it(tiny_models):
    unclipped, norm = clipped_update(tiny_models, None)
    assert norm > 0.2 and math.isfinite(norm)
    total = torch.cat([step.flatten() for step in unclipped.values()]).norm()
    assert float(total) == pytest.approx(norm, rel=1e-4)  # the whole gradient was the step
    far_above, norm_far_above = clipped_update(tiny_models, 1e6)
    assert norm_far_above == norm and all(torch.equal(far_above[k], unclipped[k]) for k in unclipped)
    clipped, norm_clipped = clipped_update(tiny_models, 0.1 * norm)
    assert norm_clipped == pytest.approx(norm)  # the norm before clipping is what is logged
    for name, step in clipped.items():
        torch.testing.assert_close(step, 0.1 * unclipped[name], rtol=1e-3, atol=1e-7)


def test_a_norm_must_be_positive():
    for value in (0.0, -1.0):
        with pytest.raises(ConfigError, match="trainer.max_grad_norm must be positive, or null for no clipping"):
            TrainerConfig(max_grad_norm=value)


def test_float16_steps_follow_float32_with_the_gradients_unscaled(tiny_models):
    """A scale of 2^8 (no overflow here): the step and the logged norm are the true gradient's, not 256 times it."""
    reference, norm = first_update(recipe_for(tiny_models, ComputeDtype.float32, grad_scaler_for(
        ComputeDtype.float32, "cpu", False)))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    steps, norm16 = first_update(recipe_for(tiny_models, ComputeDtype.float16, scaler))
    assert scaler.get_scale() == 2.0 ** 8  # stepped, not backed off
    assert norm16 == pytest.approx(norm, rel=0.02)
    for name, step in reference.items():
        assert float((steps[name] - step).norm() / step.norm()) < 0.05, name


def test_an_overflow_skips_the_step_and_halves_the_scale(tiny_models, caplog):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)  # beyond float16's range: the gradients overflow
    recipe = recipe_for(tiny_models, ComputeDtype.float16, scaler)
    with caplog.at_level(logging.WARNING, logger="lmsys"):
        steps, _ = first_update(recipe)
    assert all(not step.any() for step in steps.values())  # no weight moved
    assert scaler.get_scale() == 2.0 ** 39 and recipe.scheduler.last_epoch == 0  # the schedule did not advance
    assert "update 1: float16 gradients overflowed at loss scale 1.09951e+12: step skipped, scale now " \
           "5.49756e+11" in caplog.text


def test_the_scale_survives_a_resume(tmp_path):
    """The loss scale and its growth counter are part of the saved training state and come back on resume."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=7)
    scaler.scale(torch.ones(()))
    scaler.update(2.0 ** 11)  # as after an overflow backed it off
    save_training_state(RunDir(tmp_path, True), model, optimizer, warmup_cosine_scheduler(optimizer, 4, 0.0, 1.0),
                        LoopState(step=3), scaler)
    restored = torch.amp.GradScaler("cpu")
    state = restore_state(tmp_path, model, optimizer, warmup_cosine_scheduler(optimizer, 4, 0.0, 1.0), restored)
    assert state.step == 3 and restored.state_dict() == scaler.state_dict()
    assert restored.get_scale() == 2.0 ** 11 and restored.state_dict()["growth_interval"] == 7
    disabled = torch.amp.GradScaler("cpu", enabled=False)  # bf16 / float32 runs: nothing to restore
    assert restore_state(tmp_path, model, optimizer, warmup_cosine_scheduler(optimizer, 4, 0.0, 1.0), disabled)
    assert disabled.state_dict() == {}


def test_only_float16_is_scaled_and_fsdp_refuses_it():
    assert grad_scaler_for(ComputeDtype.float16, "cpu", False).is_enabled()
    for dtype in (ComputeDtype.auto, ComputeDtype.bfloat16, ComputeDtype.float32):
        assert not grad_scaler_for(dtype, "cuda", True).is_enabled()
    with pytest.raises(ConfigError, match="model.compute_dtype=float16 trains with dynamic loss scaling, which FSDP"):
        grad_scaler_for(ComputeDtype.float16, "cuda", True)


def test_a_non_finite_loss_stops_the_run_before_the_step(tiny_models):
    # A diverged weight (or an overflow) makes the loss NaN: stepping on its gradients would make every weight NaN.
    recipe = recipe_for(tiny_models, ComputeDtype.float32, torch.amp.GradScaler("cpu", enabled=False))
    trainable = {name: p for name, p in recipe.model.named_parameters() if p.requires_grad}
    diverged = next(name for name in trainable if "lora_B" in name)
    with torch.no_grad():
        trainable[diverged].fill_(float("inf"))
    before = {name: p.detach().clone() for name, p in trainable.items()}
    with pytest.raises(FloatingPointError, match=r"update 1: the training loss is nan; no step taken"):
        recipe.update(next(iterate_updates(recipe.train_split, recipe.settings, 0, 1)))
    assert all(torch.equal(p, before[name]) for name, p in trainable.items() if name != diverged)
    assert recipe.scheduler.last_epoch == 0
