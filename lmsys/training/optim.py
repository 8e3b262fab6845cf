"""Optimizer parameter groups (head lr, LoRA-B multiplier, no decay on norms and biases), the optimizer and the lr
schedule."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lmsys.config import ConfigError, OptimizerName

log = logging.getLogger("lmsys")

# weights stored in these dtypes (full fine-tuning in bf16) lose every AdamW update below half their rounding step
# (bf16: 2^-9 of the weight) unless the rounding error is carried over to the next step (Kahan summation)
LOW_PRECISION = (torch.bfloat16, torch.float16)


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


def create_optimizer(groups: list[dict], name: OptimizerName, betas: tuple[float, float], eps: float,
                     kahan_summation: bool | None = None, sharded: bool = False) -> torch.optim.Optimizer:
    """AdamW (torch's), 8-bit AdamW (bitsandbytes') or StableAdamW; with Kahan-summed updates (torch-optimi's AdamW or
    StableAdamW, as the LMSYS 2nd place trained bf16 weights) where `kahan_summation` is true, or where it is None
    and a trainable weight is stored in bf16/fp16. Each group keeps its own lr and weight decay. `sharded`: the
    parameters will be FSDP's DTensors, which take torch-optimi's per-tensor loop only (its Triton kernels, the CUDA
    default, take plain tensors; its foreach path calls `_foreach_copy_`, which DTensor cannot shard in torch 2.13).
    On DTensors each tensor's reductions (StableAdamW's update RMS) cover the whole tensor, not a rank's shard."""
    dtypes = {p.dtype for group in groups for p in group["params"]}
    low_precision = _names(dtype for dtype in dtypes if dtype in LOW_PRECISION)
    kahan = name != OptimizerName.adamw_8bit and (bool(low_precision) if kahan_summation is None else kahan_summation)
    if low_precision and not kahan:
        remedy = ("optimizer.name=adamw keeps them" if name == OptimizerName.adamw_8bit
                  else "optimizer.kahan_summation=true keeps them")
        log.warning("optimizer.name=%s updates weights stored in %s without Kahan summation: updates below half a "
                    "weight's rounding step are lost (%s)", name.value, low_precision, remedy)
    if name == OptimizerName.adamw_8bit:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, betas=betas, eps=eps)
    if not kahan and name == OptimizerName.adamw:
        return torch.optim.AdamW(groups, betas=betas, eps=eps)
    import optimi

    optimizer_class = optimi.StableAdamW if name == OptimizerName.stable_adamw else optimi.AdamW
    log.info("optimizer: optimi.%s, Kahan summation %s (trainable weights in %s; it compensates bf16/fp16 ones)",
             optimizer_class.__name__, "on" if kahan else "off", _names(dtypes))
    # every group sets its own lr and weight_decay; decay stays lr-coupled, as in torch's AdamW
    return optimizer_class(groups, lr=groups[0]["lr"], betas=betas, eps=eps, kahan_sum=kahan,
                           **({"triton": False, "foreach": False} if sharded else {}))


def check_sharded_optimizer(name: OptimizerName, sharded: bool) -> None:
    """Checked before any model loads: bitsandbytes' 8-bit AdamW fails at the first step on FSDP's DTensors (its
    kernel takes plain tensors only)."""
    if sharded and name == OptimizerName.adamw_8bit:
        raise ConfigError("optimizer.name=adamw_8bit cannot step FSDP's sharded parameters (bitsandbytes' 8-bit "
                          "kernels take no DTensors): use optimizer.name=adamw or stable_adamw under FSDP")


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(sorted(str(dtype).removeprefix("torch.") for dtype in dtypes))


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
