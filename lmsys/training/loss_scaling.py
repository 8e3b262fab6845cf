"""Dynamic loss scaling for float16 compute (`model.compute_dtype=float16`, e.g. V100 or T4 GPUs without bf16).

float16 keeps 5 exponent bits: activation gradients below ~6e-8 vanish and those below ~6e-5 lose precision, and
a preference loss weighted by 1 / (examples in the update) has many such gradients in a deep backbone. The loss is
multiplied by a large scale before backward and the gradients divided by it before clipping and the step; an update
whose gradients overflow is skipped and the scale halved (torch's GradScaler: the scale doubles again after 2,000
clean updates). bf16 and float32 need none of it: the scaler is then disabled, and its calls pass through.
"""

from __future__ import annotations

import torch

from lmsys.config import ComputeDtype, ConfigError


def grad_scaler_for(compute_dtype: ComputeDtype, device_type: str, sharded: bool) -> torch.amp.GradScaler:
    """Enabled exactly for float16 compute. `sharded` (FSDP): each rank sees only its shard of the gradients, so
    ranks could disagree on an overflow and skip different steps: refused."""
    enabled = compute_dtype == ComputeDtype.float16
    if enabled and sharded:
        raise ConfigError("model.compute_dtype=float16 trains with dynamic loss scaling, which FSDP runs do not "
                          "support here (ranks see different gradient shards): use model.compute_dtype=bfloat16")
    return torch.amp.GradScaler(device_type, enabled=enabled)


def no_loss_scaling() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", enabled=False)
