"""Optimizer parameter groups (head lr, LoRA-B multiplier, no decay on norms and biases) and the lr schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lmsys.config import OptimizerName


def parameter_groups(
    model: nn.Module, lr: float, head_lr: float, lora_b_lr_multiplier: float, weight_decay: float
) -> list[dict]:
    """Trainable parameters split by (lr, decay): head, LoRA-A and others, LoRA-B; 1-D tensors never decay."""
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        role = "head" if name.startswith("head.") else "lora_b" if ".lora_B." in name else "backbone"
        decay = param.ndim >= 2
        buckets.setdefault((role, decay), []).append(param)
    role_lr = {"head": head_lr, "lora_b": lr * lora_b_lr_multiplier, "backbone": lr}
    return [
        {"params": params, "lr": role_lr[role], "weight_decay": weight_decay if decay else 0.0, "name": f"{role}{'' if decay else '_no_decay'}"}
        for (role, decay), params in sorted(buckets.items())
    ]


def create_optimizer(groups: list[dict], name: OptimizerName, betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    if name == OptimizerName.adamw_8bit:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, betas=betas, eps=eps)
    return torch.optim.AdamW(groups, betas=betas, eps=eps)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr: linear warmup, then cosine decay to `min_lr_ratio` at `total_steps`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float, min_lr_ratio: float
) -> LambdaLR:
    warmup_steps = math.ceil(warmup_ratio * total_steps)
    return LambdaLR(optimizer, lambda step: warmup_cosine(step, total_steps, warmup_steps, min_lr_ratio))
