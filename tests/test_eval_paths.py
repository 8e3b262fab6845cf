"""Evaluation paths that had no test: swap TTA at evaluation is exactly mirror-symmetric (each orientation runs in
its own pass), and gradient checkpointing gives the gradients of the plain backward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from tiny import arena_frame, batching, build_preference_model

from lmsys.builders import build_encoders
from lmsys.config import TtaMode
from lmsys.data.batching import collate
from lmsys.data.dataset import encode_split
from lmsys.data.io import read_pairs
from lmsys.data.schema import swap_abt
from lmsys.evaluation.validation import ValidationSet, evaluate
from lmsys.modeling.losses import soft_cross_entropy


def swapped_copy(frame):
    out = frame.copy()
    out["response_a"], out["response_b"] = frame["response_b"], frame["response_a"]
    out["winner_model_a"], out["winner_model_b"] = frame["winner_model_b"], frame["winner_model_a"]
    return out


@pytest.mark.parametrize("tta_mode", list(TtaMode))
def test_evaluation_with_tta_is_exactly_mirror_symmetric(tiny_models, tmp_path, tta_mode):
    model, spec, tokenizer = build_preference_model(tiny_models["llama"], "llama", head_init_std=0.5)
    frame = arena_frame(20, seed=8)
    frame.to_csv(tmp_path / "valid.csv", index=False)
    swapped_copy(frame).to_csv(tmp_path / "swapped.csv", index=False)
    encoder = build_encoders(spec, tokenizer)
    # a small token budget: several micro-batches, so the two passes group their examples alike or not at all
    settings = batching(True, tokenizer.pad_token_id, spec.padding_side, 128, max_tokens=256)
    probs, log_losses = {}, {}
    for name in ("valid", "swapped"):
        split = encode_split(read_pairs(tmp_path / f"{name}.csv", require_labels=True), encoder)
        for tta in (True, False):
            result = evaluate(model, ValidationSet(split, settings, tta, tta_mode), Accelerator())
            probs[name, tta], log_losses[name, tta] = result.probs, result.metrics["log_loss"]
    np.testing.assert_array_equal(probs["valid", True], swap_abt(probs["swapped", True]))  # to the bit
    assert log_losses["valid", True] == log_losses["swapped", True]
    # without TTA the random model has a position bias, so the equality above is not vacuous
    assert np.abs(probs["valid", False] - swap_abt(probs["swapped", False])).max() > 1e-3


def test_a_model_that_gives_nan_logits_is_named_not_a_numpy_error(tiny_models, tmp_path):
    """A diverged model's NaN logits failed deep in the calibration metrics ("'list' argument must have no
    negative elements")."""
    model, spec, tokenizer = build_preference_model(tiny_models["llama"], "llama")
    with torch.no_grad():
        next(p for name, p in model.named_parameters() if "lora_B" in name).fill_(float("nan"))
    arena_frame(5, seed=8).to_csv(tmp_path / "valid.csv", index=False)
    split = encode_split(read_pairs(tmp_path / "valid.csv", require_labels=True), build_encoders(spec, tokenizer))
    settings = batching(True, tokenizer.pad_token_id, spec.padding_side, 128, max_tokens=256)
    with pytest.raises(FloatingPointError, match=r"^non-finite logits \(inf/NaN\) for 5 of 5 pairs with "
                                                 r"compute_dtype=float32, first ids \['0', '1', '2', '3', '4'\]: .*; "
                                                 r"the run stops here \(its best checkpoint so far is kept\)$"):
        evaluate(model, ValidationSet(split, settings, True, TtaMode.prob), Accelerator())


def test_gradient_checkpointing_gives_the_same_gradients(tiny_models, tmp_path):
    arena_frame(6, seed=9).to_csv(tmp_path / "pairs.csv", index=False)
    pairs = read_pairs(tmp_path / "pairs.csv", require_labels=True)
    grads = {}
    for checkpointing in (False, True):
        model, spec, tokenizer = build_preference_model(tiny_models["llama"], "llama", seed=4, head_init_std=0.5,
                                                        gradient_checkpointing=checkpointing)
        model.train()
        assert model.backbone.is_activation_checkpointing == checkpointing
        split = encode_split(pairs, build_encoders(spec, tokenizer))
        batch = collate(split.forward, batching(True, tokenizer.pad_token_id, spec.padding_side, 128))
        loss = soft_cross_entropy(model(**batch.model_inputs(torch.device("cpu"))), batch.targets)
        loss.backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads[False].keys() == grads[True].keys() and any(".lora_A." in n for n in grads[True])
    for name, grad in grads[False].items():
        assert grad.abs().max() > 0 or "lora_A" in name, name  # LoRA B starts at 0, so A's gradient is 0
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-7, msg=name)

