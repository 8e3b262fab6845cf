"""The work of tests/modeling/test_compile.py, as a process of its own: a tiny NF4 Llama trained for 3 AdamW updates
eager and with model.torch_compile=true (float32), and in bfloat16 all eager, with model.norm_kernel=compiled, with
model.mlp_kernel=compiled and with model.attention_kernel=compiled (each alone). Most of it is g++ compiling inductor's kernels on one core, so the suite starts it as a background job (tests/background.py)
and the test reads its results at the end of the suite.

    PYTHONPATH=.:tests python tests/modeling/compile_check.py OUT_DIR      (writes OUT_DIR/results.pt)
"""

from __future__ import annotations

import sys
from pathlib import Path

import tiny
import torch
from torch._dynamo.utils import counters

from lmsys.builders import build_encoders
from lmsys.config import PaddingSide
from lmsys.data.batching import collate
from lmsys.data.dataset import encode_split
from lmsys.data.io import pairs_from_frame
from lmsys.modeling.gated_mlp import CompiledGatedMLP
from lmsys.modeling.losses import soft_cross_entropy
from lmsys.modeling.rotary import CompiledRotary

CPU = torch.device("cpu")
UPDATES = 3


def curve(model_dir: Path, **model_kwargs) -> dict:
    """The first forward's logits (6, 3), the loss of each update on one packed micro-batch, the first backward's
    gradients of the trained parameters (float64, flattened), and what the compile did to the model (ModelConfig
    `model_kwargs`)."""
    model, spec, tokenizer = tiny.build_preference_model(model_dir, "llama", "nf4", **model_kwargs)
    pairs = pairs_from_frame(tiny.arena_frame(6, seed=11), "mem.csv", require_labels=True)
    split = encode_split(pairs, build_encoders(spec, tokenizer))
    batch = collate(split.forward, tiny.batching(True, tokenizer.pad_token_id, PaddingSide.left, 300))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    logits, losses, gradients = None, [], None
    trained = [p for p in model.parameters() if p.requires_grad]
    for _ in range(UPDATES):
        out = model(**batch.model_inputs(CPU))  # (6, 3)
        logits = out.detach() if logits is None else logits
        loss = soft_cross_entropy(out, batch.targets)
        loss.backward()
        if gradients is None:
            gradients = torch.cat([p.grad.double().flatten() for p in trained])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    layers = model.backbone.base_model.model.layers
    norms = [module for module in model.modules() if type(module).__name__ == "LlamaRMSNorm"]
    mlps = [module for module in model.modules() if type(module).__name__.endswith("LlamaMLP")]
    return {"logits": logits, "losses": torch.tensor(losses), "gradients": gradients, "names": [n for n, _ in model.named_parameters()],
            "layers": len(layers), "layers_compiled": sum(layer._compiled_call_impl is not None for layer in layers),
            "norms": len(norms), "norms_compiled": sum(norm._compiled_call_impl is not None for norm in norms),
            "mlps": len(mlps), "mlps_compiled": sum(isinstance(mlp, CompiledGatedMLP) for mlp in mlps),
            "attention_compiled": sum("compiled_attention" in module.__dict__ for module in model.modules()),
            "rotary_compiled": sum(isinstance(module, CompiledRotary) for module in model.modules()),
            "unique_graphs": counters["stats"]["unique_graphs"]}


def main(out_dir: Path) -> None:
    model_dir = tiny.save_tiny_model("llama", out_dir / "llama")
    torch._dynamo.reset()
    counters.clear()
    results = {"eager": curve(model_dir), "compiled": curve(model_dir, torch_compile=True)}
    torch._dynamo.reset()
    counters.clear()
    for name, norms, mlps, attention in (("eager", "eager", "eager", "eager"), ("norms", "compiled", "eager", "eager"),
                                         ("mlps", "eager", "compiled", "eager"),
                                         ("attention", "eager", "eager", "compiled")):
        results[f"bf16 {name}"] = curve(model_dir, compute_dtype="bfloat16", norm_kernel=norms, mlp_kernel=mlps,
                                        attention_kernel=attention)
    torch.save(results, out_dir / "results.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
