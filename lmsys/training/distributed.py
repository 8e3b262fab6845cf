"""What changes when accelerate shards the model with FSDP (`conf/accelerate/fsdp_*.yaml`).

FSDP2 (`fully_shard`) turns every sharded parameter into a DTensor holding 1/world of it, so:
- saving gathers the trainable parameters in full on every rank (a collective; only rank 0 then writes),
- resuming scatters the saved full tensors back into the shards,
- the optimizer state is gathered to rank 0 (and broadcast back on resume) by torch.distributed.checkpoint,
- every forward and backward all-gathers the layer's weights, so every rank must run the same number of
  micro-batches per update and per evaluation (ranks with fewer run zero-weight or discarded repeats).
Without FSDP (one process, DDP) every function here is the plain single-process operation.
"""

from __future__ import annotations

import os

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def fsdp_requested() -> bool:
    """`accelerate launch` with an FSDP config sets this before our code runs, so the model can be loaded for
    sharding (4-bit storage dtype) before the Accelerator exists."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def quant_storage_dtype(compute_dtype: torch.dtype) -> torch.dtype | None:
    """bitsandbytes stores 4-bit weights as uint8 by default; FSDP can only shard floating tensors (accelerate
    leaves uint8 4-bit weights unsharded, replicated on every GPU), so under FSDP they are stored as the compute
    dtype: the same packed bytes, viewed as floats, shardable. None: bitsandbytes' default."""
    return compute_dtype if fsdp_requested() else None


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter in full, on the CPU, by name. Under FSDP a collective: call it on every rank, in
    the same order (it is deterministic: named_parameters)."""
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            full = param.full_tensor() if isinstance(param, DTensor) else param
            # a copy: on CPU, .cpu() would alias FSDP's all-gather buffer, which is freed when the layer reshards
            state[name] = full.detach().to("cpu", copy=True).contiguous()
    return state


@torch.no_grad()
def load_full_state(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into the model's parameters, into each rank's shard where they are sharded."""
    params = dict(model.named_parameters())
    for name, value in weights.items():
        param = params[name]
        if isinstance(param, DTensor):
            shard = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(value)


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """The optimizer's state_dict keyed by parameter names, whatever the launch (so a state saved by FSDP ranks
    resumes in one process or under DDP, and the other way round); under FSDP gathered in full to rank 0 (other
    ranks get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=is_sharded(model))
    return get_optimizer_state_dict(model, _inner(optimizer), options=options)


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict) -> None:
    """A name-keyed state into this launch's optimizer (under FSDP broadcast from rank 0 into the shards); one keyed
    by position (saved by lmsys before 2026-12-05) only as saved, into the same launch layout."""
    if all(isinstance(index, int) for group in state["param_groups"] for index in group["params"]):
        optimizer.load_state_dict(state)
        return
    if not state["state"]:  # nothing per parameter (a stateless optimizer): its groups' lr and settings only
        for group, saved in zip(_inner(optimizer).param_groups, state["param_groups"], strict=True):
            group.update({key: value for key, value in saved.items() if key != "params"})
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=is_sharded(model))
    set_optimizer_state_dict(model, _inner(optimizer), optim_state_dict=state, options=options)


def lockstep_count(model: torch.nn.Module, count: int, device: torch.device) -> int:
    """The largest `count` over all ranks under FSDP (each forward is a collective, so every rank must run as
    many as the busiest one); `count` itself otherwise."""
    if not is_sharded(model):
        return count
    value = torch.tensor(count, device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return int(value)
