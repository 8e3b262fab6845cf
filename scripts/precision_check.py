"""The two low-precision training measurements the README quotes, on this machine, in a few seconds (no network):

1. bf16 weights and small AdamW updates: a 96 x 64 matrix, 150 updates at lr 1e-5, with and without Kahan
   summation (lmsys.training.optim.create_optimizer), against the same updates on float32 weights.
2. float16 activation gradients: one backward of the tests' tiny NF4 Llama (random weights, LoRA-B set nonzero) on
   64 pairs with an example weight of 1e-3, with and without a loss scale of 2^16, against float32.

    python scripts/precision_check.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import tiny

from lmsys.builders import build_encoders
from lmsys.config import ComputeDtype, OptimizerName, PaddingSide
from lmsys.data.batching import collate
from lmsys.data.dataset import encode_split
from lmsys.data.io import pairs_from_frame
from lmsys.training.optim import create_optimizer


def kahan_rows() -> list[str]:
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(96, 64, generator=generator) * 0.02
    inputs, targets = torch.randn(256, 64, generator=generator), torch.randn(256, 96, generator=generator) * 0.1

    def fit(dtype: torch.dtype, kahan: bool | None) -> torch.Tensor:
        weight = torch.nn.Parameter(start.to(dtype, copy=True))
        optimizer = create_optimizer([{"params": [weight], "lr": 1e-5, "weight_decay": 0.0}], OptimizerName.adamw,
                                     (0.9, 0.999), 1e-8, kahan)
        for _ in range(150):
            optimizer.zero_grad()
            ((inputs.to(dtype) @ weight.T).float() - targets).pow(2).mean().backward()
            optimizer.step()
        return weight.detach().float()

    reference = fit(torch.float32, None)
    moved = (reference - start).abs().mean()
    rows = []
    for label, kahan in (("bf16 AdamW", False), ("bf16 AdamW + Kahan", True)):
        weight = fit(torch.bfloat16, kahan)
        unchanged = float((weight == start.bfloat16().float()).float().mean())
        distance = float((weight - reference).abs().mean() / moved)
        rows.append(f"| {label} | {unchanged:.1%} never moved | {distance:.1%} |")
    return rows


def fp16_rows(model_dir: Path) -> list[str]:
    gradients = {}
    for label, dtype, scale in (("float32", ComputeDtype.float32, 1.0), ("float16", ComputeDtype.float16, 1.0),
                                ("float16, loss x 2^16", ComputeDtype.float16, 2.0 ** 16)):
        torch.manual_seed(0)
        model, spec, tokenizer = tiny.build_preference_model(model_dir, "llama", "nf4", compute_dtype=dtype)
        tiny.perturb(model)
        split = encode_split(pairs_from_frame(tiny.arena_frame(64, seed=2), "mem.csv", require_labels=True),
                             build_encoders(spec, tokenizer))
        batch = collate(split.forward, tiny.batching(True, tokenizer.pad_token_id, PaddingSide.left, 128))
        logits = model(**batch.model_inputs(torch.device("cpu")))
        (torch.nn.functional.cross_entropy(logits, batch.targets) * 1e-3 * scale).backward()
        gradients[label] = {n: p.grad.float() / scale for n, p in model.named_parameters() if ".lora_A." in n}
    rows = []
    for label in ("float16", "float16, loss x 2^16"):
        errors = sorted(float((gradients[label][n] - g).norm() / g.norm()) for n, g in gradients["float32"].items())
        rows.append(f"| {label} | {errors[len(errors) // 2]:.1%} | {errors[-1]:.1%} |")
    return rows


if __name__ == "__main__":
    print("| bf16 weights, 150 updates at lr 1e-5 | weights | distance to the float32 run / its movement |")
    print("|---|---|---|")
    print("\n".join(kahan_rows()))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny.save_tiny_model("llama", Path(tmp) / "llama")
        print("\n| LoRA-A gradients, example weight 1e-3 | median error against float32 | largest |")
        print("|---|---|---|")
        print("\n".join(fp16_rows(model_dir)))
