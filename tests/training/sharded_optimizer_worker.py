"""Run by tests/training/test_optim.py as `torchrun --nproc_per_node 2 sharded_optimizer_worker.py OUT.pt`: each of
our optimizers steps a small layer sharded by FSDP2 (`fully_shard`, DTensor parameters, gloo on CPU), and rank 0
writes the gathered weights beside what one process computes from the same gradients, and what StableAdamW would
compute if its update clipping saw only a rank's shard.

The gradients are small and even, except at step 3, where the rows rank 0 holds get a spike: StableAdamW's
per-tensor update RMS then exceeds 1 and scales that step's lr down, by a different amount for the whole tensor
than for rank 0's half alone.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor

from lmsys.config import OptimizerName
from lmsys.training.optim import create_optimizer

STEPS, SPIKE_STEP, LR = 4, 3, 1e-2
CASES = [(name, dtype) for name in (OptimizerName.adamw, OptimizerName.stable_adamw)
         for dtype in (torch.float32, torch.bfloat16)]


def gradient(step: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    grad = torch.linspace(-1e-3, 2e-3, shape.numel()).view(shape) * step
    if step == SPIKE_STEP:
        grad[: shape[0] // 4] = 1.0  # rank 0's rows (FSDP shards dim 0 in halves)
    return grad.to(dtype)


def layer(dtype: torch.dtype) -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(16, 8).to(dtype)


def train(params: list[torch.nn.Parameter], name: OptimizerName, sharded: bool) -> None:
    """`params` with 2-D weights decaying and 1-D ones not, as parameter_groups builds them."""
    groups = [{"params": [p for p in params if p.ndim == ndim], "lr": LR, "weight_decay": decay}
              for ndim, decay in ((2, 0.01), (1, 0.0))]
    optimizer = create_optimizer(groups, name, (0.9, 0.99), 1e-8, None, sharded)
    for step in range(1, STEPS + 1):
        for param in params:
            full = gradient(step, param.shape, param.dtype)
            param.grad = distribute_tensor(full, param.device_mesh, param.placements) if sharded else full
        optimizer.step()
        optimizer.zero_grad()


def one_process(name: OptimizerName, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    reference = layer(dtype)
    train(list(reference.parameters()), name, sharded=False)
    return {"weight": reference.weight.detach(), "bias": reference.bias.detach()}


def per_shard(name: OptimizerName, dtype: torch.dtype) -> torch.Tensor:
    """The weight as if each rank's half were a tensor of its own (the gradient of each half as in the full one)."""
    halves = [torch.nn.Parameter(half.clone()) for half in layer(dtype).weight.detach().chunk(2)]
    groups = [{"params": halves, "lr": LR, "weight_decay": 0.01}]
    optimizer = create_optimizer(groups, name, (0.9, 0.99), 1e-8, None, False)
    for step in range(1, STEPS + 1):
        for half, grad in zip(halves, gradient(step, torch.Size((8, 16)), dtype).chunk(2), strict=True):
            half.grad = grad.clone()
        optimizer.step()
    return torch.cat([half.detach() for half in halves])


def eight_bit_steps_dtensors() -> bool:
    import bitsandbytes as bnb

    model = layer(torch.float32)
    fully_shard(model)
    optimizer = bnb.optim.AdamW8bit(model.parameters(), lr=LR)
    for param in model.parameters():
        param.grad = distribute_tensor(gradient(1, param.shape, param.dtype), param.device_mesh, param.placements)
    try:
        optimizer.step()
    except RuntimeError:
        return False
    return True


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    results = {}
    for name, dtype in CASES:
        model = layer(dtype)
        start = {"weight": model.weight.detach().clone(), "bias": model.bias.detach().clone()}
        fully_shard(model)
        train(list(model.parameters()), name, sharded=True)
        sharded = {"weight": model.weight.full_tensor(), "bias": model.bias.full_tensor()}
        results[f"{name.value}/{str(dtype).removeprefix('torch.')}"] = {
            "start": start, "sharded": sharded, "one_process": one_process(name, dtype),
            "per_shard_weight": per_shard(name, dtype)}
    results["eight_bit_steps_dtensors"] = eight_bit_steps_dtensors()
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
