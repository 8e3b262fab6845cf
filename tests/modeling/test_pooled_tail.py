"""The last decoder layer's o_proj and MLP at the pooled tokens only (lmsys/modeling/pooled_tail.py): the same
logits and LoRA gradients as the whole layer, on every decoder family, packed and padded, with real NF4 and with
gradient checkpointing; and the hooks really gather (the MLP's down projection sees one row per pooled token)."""

import pytest
import tiny
import torch

from lmsys.builders import build_encoders
from lmsys.config import PaddingSide
from lmsys.data.batching import collate
from lmsys.data.dataset import encode_split
from lmsys.data.io import pairs_from_frame

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def arena_pairs():
    return pairs_from_frame(tiny.arena_frame(6, seed=5), "mem.csv", require_labels=True)


def logits_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    logits = model(**batch.model_inputs(CPU))
    (logits * torch.linspace(-1.0, 1.0, logits.numel()).view_as(logits)).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def down_proj_rows(model, last_layer, batch) -> list[int]:
    """Rows the last layer's MLP down projection computed in one forward."""
    seen = []
    handle = last_layer.mlp.down_proj.register_forward_hook(lambda module, args, output: seen.append(args[0].numel() // args[0].shape[-1]))
    with torch.no_grad():
        model(**batch.model_inputs(CPU))
    handle.remove()
    return seen


@pytest.mark.parametrize("kind,family,quantization,packed,checkpointing", [
    ("llama", "llama", "nf4", True, False),
    ("llama", "llama", "none", False, True),
    ("gemma2", "gemma", "none", False, False),
    ("gemma3", "gemma", "none", True, False),
    ("qwen2", "qwen", "none", True, True),
    ("mistral", "mistral", "none", True, False),
])
def test_the_pooled_tail_keeps_logits_and_gradients(tiny_models, arena_pairs, kind, family, quantization, packed,
                                                     checkpointing):
    model, spec, tokenizer = tiny.build_preference_model(tiny_models[kind], family, quantization,
                                                         gradient_checkpointing=checkpointing)
    tiny.perturb(model, seed=2)
    model.train()  # dropout 0: training mode for the checkpointed forward
    split = encode_split(arena_pairs, build_encoders(spec, tokenizer))
    exs = split.forward + split.swapped
    batch = collate(exs, tiny.batching(packed, tokenizer.pad_token_id, PaddingSide.left, 300))
    tail = model.pooled_tail
    assert tail is not None
    last_layer = [m for m in model.backbone.modules() if type(m).__name__.endswith("DecoderLayer")][-1]
    assert down_proj_rows(model, last_layer, batch) == [len(exs)]  # one row per pooled token, not R x T

    logits, grads = logits_and_grads(model, batch)
    tail.remove()
    model.pooled_tail = None
    # packed rows without a sliding window lose their pad tails first (model.unpad_rows): real tokens only
    whole = batch.n_real_tokens if packed and not model.sliding_window else batch.input_ids.numel()
    assert whole < batch.input_ids.numel() or not packed or model.sliding_window
    assert down_proj_rows(model, last_layer, batch) == [whole]
    whole_logits, whole_grads = logits_and_grads(model, batch)

    assert whole_logits.std(0).min() > 0.05  # the pairs differ: equal logits mean something
    torch.testing.assert_close(logits, whole_logits, atol=1e-5, rtol=0)
    assert grads.keys() == whole_grads.keys() and any("mlp" in name and "lora" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, whole_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_compiled_layers_keep_the_whole_last_layer(tiny_models):
    model, _, _ = tiny.build_preference_model(tiny_models["llama"], "llama", torch_compile=True)
    assert model.pooled_tail is None
    last_layer = [m for m in model.backbone.modules() if type(m).__name__.endswith("DecoderLayer")][-1]
    assert not last_layer.mlp._forward_pre_hooks and not last_layer.mlp._forward_hooks
