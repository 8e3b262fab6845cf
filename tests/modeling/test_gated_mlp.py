"""model.mlp_kernel=compiled (lmsys/modeling/gated_mlp.py): act(gate) * up compiled, from the dense LoRA kernel's
gate|up product whole or from gate and up apart; the same logits and LoRA gradients as the family's eager MLP,
one (tokens, intermediate) tensor fewer kept for the backward, and the module tree and checkpoint unchanged."""

import pytest
import tiny
import torch
from torch._dynamo.utils import counters

from lmsys.builders import build_encoders
from lmsys.config import PaddingSide
from lmsys.data.batching import collate
from lmsys.data.dataset import encode_split
from lmsys.data.io import pairs_from_frame
from lmsys.modeling.gated_mlp import CompiledGatedMLP, is_gated_mlp
from lmsys.modeling.lora_kernel import ProjectionGroup

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from a clean slate: graphs another test of this process compiled (other dtypes, ranks,
    activations) count towards dynamo's limit of recompiles per function."""
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def arena_pairs():
    return pairs_from_frame(tiny.arena_frame(6, seed=5), "mem.csv", require_labels=True)


def built(tiny_models, arena_pairs, kind, family, quantization, mlp_kernel, **kwargs):
    model, spec, tokenizer = tiny.build_preference_model(tiny_models[kind], family, quantization,
                                                         mlp_kernel=mlp_kernel, **kwargs)
    tiny.perturb(model, seed=2)
    split = encode_split(arena_pairs, build_encoders(spec, tokenizer))
    batch = collate(split.forward + split.swapped, tiny.batching(True, tokenizer.pad_token_id, PaddingSide.left, 300))
    return model.train(), batch


def logits_grads_and_saved(model, batch):
    """Logits, LoRA gradients, and the bytes of the distinct storages the forward kept for the backward."""
    storages = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        logits = model(**batch.model_inputs(CPU))
    (logits.float() * torch.linspace(-1.0, 1.0, logits.numel()).view_as(logits)).sum().backward()
    grads = {name: p.grad.float().clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float(), grads, sum(storages.values())


@pytest.mark.parametrize("kind,family,quantization,whole,checkpointing", [
    ("llama", "llama", "nf4", True, False),  # dense LoRA kernel: gate and up are one product, taken whole
    ("gemma3", "gemma", "none", False, False),  # gelu-tanh; gate and up apart (groups are for 4-bit bases)
    ("qwen2", "qwen", "nf4", True, True),  # recomputed in the backward
])
def test_compiled_mlps_keep_logits_and_gradients(tiny_models, arena_pairs, monkeypatch, kind, family, quantization,
                                                 whole, checkpointing):
    eager, batch = built(tiny_models, arena_pairs, kind, family, quantization, "eager",
                         gradient_checkpointing=checkpointing)
    compiled, _ = built(tiny_models, arena_pairs, kind, family, quantization, "compiled",
                        gradient_checkpointing=checkpointing)
    mlps = [module for module in compiled.modules() if is_gated_mlp(module)]
    assert mlps and all(isinstance(mlp, CompiledGatedMLP) for mlp in mlps)
    assert not any(isinstance(module, CompiledGatedMLP) for module in eager.modules())
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    assert [name for name, _ in compiled.named_modules()] == [name for name, _ in eager.named_modules()]
    calls = []
    original = ProjectionGroup.whole_output
    monkeypatch.setattr(ProjectionGroup, "whole_output", lambda self, x: calls.append(x.shape) or original(self, x))

    logits, grads, saved = logits_grads_and_saved(compiled, batch)
    eager_logits, eager_grads, eager_saved = logits_grads_and_saved(eager, batch)

    assert len(calls) == (len(mlps) * (1 + checkpointing) if whole else 0)
    assert eager_logits.std(0).min() > 0.05  # the pairs differ: equal logits mean something
    torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=0)
    assert grads.keys() == eager_grads.keys() and any("mlp" in name and "lora" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # eager keeps act(gate) for the backward; the compiled function recomputes it (the last layer's MLP sees the
    # pooled rows only: lmsys/modeling/pooled_tail.py)
    if not checkpointing:  # (checkpointed layers keep their inputs only)
        intermediate = mlps[0].gate_proj.base_layer.out_features
        # packed rows lose their pad tails without a sliding window (model.unpad_rows): real tokens only
        packed_real = batch.attention_mask is None and not eager.sliding_window
        tokens = batch.n_real_tokens if packed_real else batch.input_ids.numel()
        kept_by_eager = (len(mlps) - 1) * tokens * intermediate * 4
        assert eager_saved - saved >= kept_by_eager


def test_bfloat16_compiled_mlps_agree_within_a_rounding(tiny_models, arena_pairs):
    # the attention kernel held to one (the compiled attention's bf16 backward would add its own roundings)
    eager, batch = built(tiny_models, arena_pairs, "llama", "llama", "nf4", "eager", compute_dtype="bfloat16",
                         attention_kernel="eager")
    compiled, _ = built(tiny_models, arena_pairs, "llama", "llama", "nf4", "compiled", compute_dtype="bfloat16",
                        attention_kernel="eager")
    logits, grads, _ = logits_grads_and_saved(compiled, batch)
    eager_logits, eager_grads, _ = logits_grads_and_saved(eager, batch)
    torch.testing.assert_close(logits, eager_logits, atol=0.05, rtol=0.02)
    for name, grad in grads.items():
        scale = eager_grads[name].abs().max()
        assert (grad - eager_grads[name]).abs().max() <= 0.05 * scale, name


def test_one_graph_per_grad_mode_whatever_the_rows(tiny_models):
    """Ranks 2 and 3, one row and many, with and without gradients: one compiled graph for each grad mode (dynamo
    would otherwise compile one per rank and per lone row, and past its limit of 8 fall back to eager for good)."""
    model, _, _ = tiny.build_preference_model(tiny_models["llama"], "llama", "nf4", mlp_kernel="compiled")
    mlp = next(module for module in model.modules() if is_gated_mlp(module))
    counters.clear()
    for shape in [(3, 7), (2, 5), (1, 1), (9,), (1,), (4, 1)]:
        x = torch.randn(*shape, mlp.gate_proj.in_features, requires_grad=True)
        mlp(x).sum().backward()
        with torch.no_grad():
            mlp(x)
        with torch.inference_mode():
            mlp(x)
    assert counters["stats"]["unique_graphs"] <= 3
