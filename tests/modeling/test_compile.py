"""model.torch_compile=true on CPU: every decoder layer compiled in place (inductor's generated C++), the same logits
and the same loss curve as eager on the tiny NF4 model, the parameter names (and so checkpoints) unchanged."""

import tiny
import torch
from torch._dynamo.utils import counters

from lmsys.builders import build_encoders
from lmsys.config import PaddingSide
from lmsys.data.batching import collate
from lmsys.data.dataset import encode_split
from lmsys.data.io import pairs_from_frame
from lmsys.modeling.losses import soft_cross_entropy

CPU = torch.device("cpu")
UPDATES = 3


def curve(model_dir, compiled: bool):
    """The first forward's logits and the loss of each of 3 AdamW updates on one packed micro-batch."""
    model, spec, tokenizer = tiny.build_preference_model(model_dir, "llama", "nf4", torch_compile=compiled)
    pairs = pairs_from_frame(tiny.arena_frame(6, seed=11), "mem.csv", require_labels=True)
    split = encode_split(pairs, build_encoders(spec, tokenizer))
    batch = collate(split.forward, tiny.batching(True, tokenizer.pad_token_id, PaddingSide.left, 300))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    logits, losses = None, []
    for _ in range(UPDATES):
        out = model(**batch.model_inputs(CPU))  # (6, 3)
        logits = out.detach() if logits is None else logits
        loss = soft_cross_entropy(out, batch.targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, logits, torch.tensor(losses)


def test_compiled_layers_give_the_eager_logits_and_loss_curve(tiny_models):
    torch._dynamo.reset()
    counters.clear()
    eager, eager_logits, eager_losses = curve(tiny_models["llama"], compiled=False)
    assert counters["stats"]["unique_graphs"] == 0
    compiled, compiled_logits, compiled_losses = curve(tiny_models["llama"], compiled=True)
    layers = compiled.backbone.base_model.model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)  # both decoder layers
    assert 1 <= counters["stats"]["unique_graphs"] <= 2 * len(layers)  # really compiled, one graph reused
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    torch.testing.assert_close(compiled_logits, eager_logits, atol=1e-5, rtol=0)
    assert eager_losses[-1] < eager_losses[0]  # the updates move the model
    torch.testing.assert_close(compiled_losses, eager_losses, atol=1e-5, rtol=0)
