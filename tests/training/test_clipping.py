"""Gradient clipping in the training update: trainer.max_grad_norm, or null for none (the LMSYS 2nd place trained
without), through `TrainingRecipe.update` on a tiny NF4 model with SGD (whose step is the gradient itself, so a
clipped gradient shows in the weights; Adam would normalise it away)."""

import math

import pytest
import tiny
import torch
from accelerate import Accelerator

from lmsys.builders import build_encoders, build_loop_settings
from lmsys.config import ConfigError, DataConfig, Family, ModelConfig, TrainConfig, TrainerConfig
from lmsys.data.dataset import encode_split
from lmsys.data.io import pairs_from_frame
from lmsys.training.optim import warmup_cosine_scheduler
from lmsys.training.plan import iterate_updates
from lmsys.training.recipe import TrainingRecipe


def one_update(tiny_models, max_grad_norm: float | None) -> tuple[dict[str, torch.Tensor], float]:
    """The trainable weights' change after the first update, and the gradient norm it logged."""
    torch.manual_seed(0)
    model, spec, tokenizer = tiny.build_preference_model(tiny_models["llama"], "llama", "nf4")
    split = encode_split(pairs_from_frame(tiny.arena_frame(8, seed=2), "mem.csv", require_labels=True),
                         build_encoders(spec, tokenizer))
    config = TrainConfig(model=ModelConfig(path=str(tiny_models["llama"]), family=Family.llama, max_length=128),
                         data=DataConfig(train_path="mem.csv"),
                         trainer=TrainerConfig(max_steps=1, batch_size=8, max_tokens=512, max_grad_norm=max_grad_norm))
    settings = build_loop_settings(config, spec, len(split), 1, tokenizer.pad_token_id)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    before = {name: p.detach().clone() for name, p in trainable.items()}
    optimizer = torch.optim.SGD(trainable.values(), lr=1.0)
    recipe = TrainingRecipe(Accelerator(cpu=True), model, optimizer,
                            warmup_cosine_scheduler(optimizer, 1, 0.0, 1.0), settings, split)
    stats = recipe.update(next(iterate_updates(split, settings, 0, 1)))
    return {name: before[name] - p.detach() for name, p in trainable.items()}, stats.grad_norm


def test_null_leaves_the_gradient_whole_and_a_norm_clips_it(tiny_models):
    unclipped, norm = one_update(tiny_models, None)
    assert norm > 0.2 and math.isfinite(norm)
    total = torch.cat([step.flatten() for step in unclipped.values()]).norm()
    assert float(total) == pytest.approx(norm, rel=1e-4)  # the whole gradient was the step
    far_above, norm_far_above = one_update(tiny_models, 1e6)
    assert norm_far_above == norm and all(torch.equal(far_above[k], unclipped[k]) for k in unclipped)
    clipped, norm_clipped = one_update(tiny_models, 0.1 * norm)
    assert norm_clipped == pytest.approx(norm)  # the norm before clipping is what is logged
    for name, step in clipped.items():
        torch.testing.assert_close(step, 0.1 * unclipped[name], rtol=1e-3, atol=1e-7)


def test_a_norm_must_be_positive():
    for value in (0.0, -1.0):
        with pytest.raises(ConfigError, match="trainer.max_grad_norm must be positive, or null for no clipping"):
            TrainerConfig(max_grad_norm=value)
