"""Optimizer parameter groups (head lr, LoRA-B multiplier, no decay on 1-D tensors), the optimizers (Kahan-summed
updates for bf16 weights) and the warmup + cosine schedule."""

import io
import itertools
import logging
import math
from pathlib import Path

import pytest
import tiny
import torch

from lmsys.config import HeadType, OptimizerName
from lmsys.training.optim import create_optimizer, parameter_groups, warmup_cosine, warmup_cosine_scheduler

LR, HEAD_LR, MULTIPLIER, DECAY = 2e-4, 1e-3, 8.0, 0.01


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny.build_preference_model(tiny_models["llama"], "llama", head=HeadType.mlp)[0]


@pytest.fixture(scope="module")
def groups(model):
    return parameter_groups(model, LR, HEAD_LR, MULTIPLIER, DECAY)


def test_every_trainable_parameter_is_in_exactly_one_group(model, groups):
    grouped = [id(p) for group in groups for p in group["params"]]
    assert len(grouped) == len(set(grouped))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(grouped) == trainable
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert any("embed_tokens" in name for name in frozen) and any("q_proj.base_layer" in name for name in frozen)
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in name or name.startswith("head.") for name in names)


def test_group_learning_rates_and_decay(model, groups):
    by_id = {id(p): name for name, p in model.named_parameters()}
    seen = set()
    for group in groups:
        names = [by_id[id(p)] for p in group["params"]]
        seen.add(group["name"])
        for name, param in zip(names, group["params"], strict=True):
            if name.startswith("head."):
                assert group["lr"] == HEAD_LR, name
            elif ".lora_B." in name:
                assert group["lr"] == pytest.approx(LR * MULTIPLIER), name
            else:
                assert ".lora_A." in name and group["lr"] == LR, name
            assert group["weight_decay"] == (DECAY if param.ndim >= 2 else 0.0), name
    # the mlp head has biases: 1-D, never decayed
    assert {"head", "head_no_decay", "lora_b", "backbone"} <= seen


@pytest.mark.parametrize("name,kahan_summation", [(OptimizerName.adamw, None), (OptimizerName.adamw_8bit, None),
                                                  (OptimizerName.adamw, True), (OptimizerName.stable_adamw, None)])
def test_each_group_steps_with_its_lr_and_decay(model, name, kahan_summation):
    """One real step of each optimizer create_optimizer makes (AdamW8bit keeps a 32-bit state for tensors under
    4096 elements, as all of the tiny model's are: this checks the groups reach it, not its 8-bit rounding) with
    every gradient 1: Adam's first step is then lr * m_hat / (sqrt(v_hat) + eps) = lr / (1 + eps), and decoupled decay
    takes lr * wd * p, so each parameter moves by -lr * (wd * p + 1) with its own group's lr and wd."""
    groups = parameter_groups(model, LR, HEAD_LR, MULTIPLIER, 0.5)  # a decay large enough to see beside the lr
    params = [p for group in groups for p in group["params"]]
    before = [p.detach().clone() for p in params]
    optimizer = create_optimizer(groups, name, (0.9, 0.95), 1e-8, kahan_summation)
    group = optimizer.param_groups[0]
    assert (group["betas"] if "betas" in group else (group["beta1"], group["beta2"])) == (0.9, 0.95)
    for param in params:
        param.grad = torch.ones_like(param)
    try:
        optimizer.step()
        for group in groups:
            lr, decay = group["lr"], group["weight_decay"]
            assert decay == (0.5 if group["params"][0].ndim >= 2 else 0.0)
            for param in group["params"]:
                old = before[next(i for i, p in enumerate(params) if p is param)]
                expected = -lr * (decay * old + 1.0)
                torch.testing.assert_close(param.detach() - old, expected, rtol=0, atol=2e-3 * lr)
    finally:
        with torch.no_grad():
            for param, old in zip(params, before, strict=True):
                param.copy_(old)
                param.grad = None


# a bf16 weight matrix fitted by 150 small AdamW updates (lr 1e-5 on weights of ~0.02: an update is about a tenth
# of such a weight's bf16 rounding step, 2^-13), against the same updates on float32 weights
KAHAN_STEPS, KAHAN_LR = 150, 1e-5


def fit(dtype: torch.dtype, kahan_summation: bool | None) -> tuple[torch.Tensor, torch.Tensor, torch.optim.Optimizer]:
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(96, 64, generator=generator) * 0.02
    inputs, targets = torch.randn(256, 64, generator=generator), torch.randn(256, 96, generator=generator) * 0.1
    weight = torch.nn.Parameter(start.to(dtype, copy=True))
    optimizer = create_optimizer([{"params": [weight], "lr": KAHAN_LR, "weight_decay": 0.0}], OptimizerName.adamw,
                                 (0.9, 0.999), 1e-8, kahan_summation)
    for _ in range(KAHAN_STEPS):
        optimizer.zero_grad()
        ((inputs.to(dtype) @ weight.T).float() - targets).pow(2).mean().backward()
        optimizer.step()
    return start.to(dtype).float(), weight.detach().float(), optimizer


def test_bf16_weights_keep_their_small_updates_with_kahan_summation():
    """Plain AdamW on bf16 weights rounds most of these updates away (measured: 84% of the entries never move, the
    weights end 88% of the float32 run's movement away from it); Kahan summation, on by default for bf16 weights,
    carries each rounding error into the next update and follows the float32 run (measured: 2.0%)."""
    start, reference, _ = fit(torch.float32, None)
    moved = (reference - start.float()).abs().mean()
    # (kahan_summation, bounds of the share of entries never moved, bounds of the distance to the float32 run)
    cases = ((False, (0.5, 1.0), (0.5, 1.5)), (None, (0.0, 0.01), (0.0, 0.05)))
    for kahan_summation, unchanged_share, distance in cases:
        start, weight, optimizer = fit(torch.bfloat16, kahan_summation)
        assert type(optimizer).__module__.startswith("optimi" if kahan_summation is None else "torch")
        assert unchanged_share[0] <= (weight == start).float().mean() <= unchanged_share[1], kahan_summation
        assert distance[0] <= (weight - reference).abs().mean() / moved <= distance[1], kahan_summation


def test_the_compensation_survives_a_state_dict_round_trip():
    """What a resume does (the optimizer's state_dict written, read back and loaded into a fresh optimizer): the
    compensation buffer comes back, and the next updates equal the uninterrupted optimizer's bit for bit."""
    _, _, optimizer = fit(torch.bfloat16, None)
    weight = optimizer.param_groups[0]["params"][0]
    saved, buffer = {k: v.clone() for k, v in optimizer.state[weight].items()}, io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()))
    assert saved["kahan_comp"].dtype == torch.bfloat16 and saved["kahan_comp"].abs().max() > 0
    twin = torch.nn.Parameter(weight.detach().clone())
    restored = create_optimizer([{"params": [twin], "lr": KAHAN_LR, "weight_decay": 0.0}], OptimizerName.adamw,
                                (0.9, 0.999), 1e-8, None)
    restored.load_state_dict(state)
    assert torch.equal(restored.state[twin]["kahan_comp"], saved["kahan_comp"])
    for _ in range(5):
        for param, opt in ((weight, optimizer), (twin, restored)):
            param.grad = torch.linspace(-1e-3, 1e-3, param.numel()).view_as(param).to(param.dtype)
            opt.step()
    assert torch.equal(twin, weight)


def test_sharded_parameters_take_the_per_tensor_loop():
    """FSDP's DTensors: torch-optimi must not pick its Triton kernels (its CUDA default, which take plain tensors) nor
    its foreach path (DTensor has no `_foreach_copy_`); unsharded, optimi decides at the first step."""
    for sharded, implementation in ((True, (False, False)), (False, (None, None))):
        weight = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
        optimizer = create_optimizer([{"params": [weight], "lr": 1e-3}], OptimizerName.adamw, (0.9, 0.999), 1e-8,
                                     None, sharded)
        assert (optimizer.param_groups[0]["triton"], optimizer.param_groups[0]["foreach"]) == implementation


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> dict:
    """tests/training/sharded_optimizer_worker.py on two gloo processes (~7 s)."""
    from entry_runs import finish, start, torchrun_command

    out = tmp_path_factory.mktemp("sharded_optimizer")
    worker = Path(__file__).with_name("sharded_optimizer_worker.py")
    finish(start(torchrun_command(worker, [str(out / "results.pt")]), out / "log.txt"), out / "log.txt", timeout=300)
    return torch.load(out / "results.pt")


@pytest.mark.parametrize("case", ["adamw/float32", "adamw/bfloat16", "stable_adamw/float32", "stable_adamw/bfloat16"])
def test_fsdp_sharded_parameters_step_like_one_process(sharded_runs, case):
    """Each optimizer on FSDP2's DTensors (2 ranks) gives the weights one process computes from the same gradients
    (bf16: Kahan-summed; measured: equal, 1.5e-8 in float32), and StableAdamW's update clipping, which a gradient
    spike in rank 0's rows engages, is computed over the whole tensor: clipped over each rank's half alone, the
    weights would end 1.4e-3 (float32) to 2.0e-3 (bf16) away, ~4-6% of their movement."""
    run = sharded_runs[case]
    for key in ("weight", "bias"):
        moved = (run["one_process"][key].float() - run["start"][key].float()).abs().max()
        assert moved > 0.02
        torch.testing.assert_close(run["sharded"][key].float(), run["one_process"][key].float(), atol=1e-6, rtol=0)
    if case.startswith("stable_adamw"):
        adamw = sharded_runs[case.replace("stable_adamw", "adamw")]["one_process"]["weight"].float()
        assert (run["one_process"]["weight"].float() - adamw).abs().max() > 1e-3  # the clipping engaged
        assert (run["per_shard_weight"].float() - run["sharded"]["weight"].float()).abs().max() > 1e-3
    else:
        torch.testing.assert_close(run["per_shard_weight"], run["one_process"]["weight"], atol=1e-6, rtol=0)


def test_eight_bit_adamw_is_refused_under_fsdp(sharded_runs, monkeypatch):
    """bitsandbytes' 8-bit AdamW cannot step DTensors (the worker's try fails), so an FSDP run asking for it fails
    before any model loads, naming the alternatives."""
    from lmsys.builders import check_optimizer
    from lmsys.config import ConfigError, OptimizerConfig

    assert sharded_runs["eight_bit_steps_dtensors"] is False
    for name in OptimizerName:
        monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
        check_optimizer(OptimizerConfig(name=name))
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        if name == OptimizerName.adamw_8bit:
            with pytest.raises(ConfigError, match="optimizer.name=adamw_8bit cannot step FSDP's sharded parameters"):
                check_optimizer(OptimizerConfig(name=name))
        else:
            check_optimizer(OptimizerConfig(name=name))


def test_the_choice_is_logged_and_a_loss_of_updates_warned_about(caplog):
    weight = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    head = torch.nn.Parameter(torch.zeros(4))
    groups = [{"params": [weight, head], "lr": 1e-3, "weight_decay": 0.0}]
    with caplog.at_level(logging.INFO, logger="lmsys"):
        create_optimizer(groups, OptimizerName.adamw, (0.9, 0.999), 1e-8)
        create_optimizer(groups, OptimizerName.adamw_8bit, (0.9, 0.999), 1e-8)
        create_optimizer(groups, OptimizerName.adamw, (0.9, 0.999), 1e-8, False)
    lost = ("updates weights stored in bfloat16 without Kahan summation: updates below half a weight's rounding step "
            "are lost")
    assert [record.getMessage() for record in caplog.records] == [
        "optimizer: optimi.AdamW, Kahan summation on (trainable weights in bfloat16, float32; it compensates bf16/fp16 "
        + "ones)",
        f"optimizer.name=adamw_8bit {lost} (optimizer.name=adamw keeps them)",
        f"optimizer.name=adamw {lost} (optimizer.kahan_summation=true keeps them)",
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lmsys"):  # float32 weights: torch's AdamW, nothing to say
        optimizer = create_optimizer([{"params": [head], "lr": 1e-3}], OptimizerName.adamw, (0.9, 0.999), 1e-8)
    assert type(optimizer) is torch.optim.AdamW and not caplog.records


def lrs(total: int, warmup_ratio: float, floor: float, peak: float = 1.0) -> list[float]:
    """The lr each update uses: the scheduler's value before update k is stepped."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = warmup_cosine_scheduler(optimizer, total, warmup_ratio, floor)
    values = []
    for _ in range(total + 1):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def test_schedule_values():
    # 10 updates, warmup ceil(0.2 * 10) = 2: 1/2, 2/2, then 0.1 + 0.9 * (1 + cos(pi * (s - 2) / 8)) / 2.
    expected = [0.5, 1.0, 1.0, 0.965746, 0.868198, 0.722207, 0.55, 0.377793, 0.231802, 0.134254, 0.1]
    assert lrs(10, 0.2, 0.1) == pytest.approx(expected, abs=1e-6)


def test_schedule_without_warmup_and_to_zero():
    assert lrs(4, 0.0, 0.0) == pytest.approx([1.0, 0.853553, 0.5, 0.146447, 0.0], abs=1e-6)


def test_schedule_properties():
    for total, warmup_ratio, floor in [(2, 0.05, 0.1), (3, 0.5, 0.0), (37, 0.1, 0.2), (1000, 0.02, 0.1)]:
        values = lrs(total, warmup_ratio, floor, peak=3e-4)
        warmup = math.ceil(warmup_ratio * total)
        assert max(values) == pytest.approx(3e-4)
        assert all(v >= floor * 3e-4 - 1e-12 for v in values[warmup:])  # the warmup may start below the floor
        assert values[-1] == pytest.approx(floor * 3e-4)  # the floor is reached at total_steps
        assert values[:warmup] == sorted(values[:warmup])
        after = values[warmup:]
        assert all(a >= b - 1e-15 for a, b in itertools.pairwise(after))  # monotone decay after the warmup


def test_schedule_scales_every_group():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 10.0}])
    scheduler = warmup_cosine_scheduler(optimizer, 10, 0.2, 0.1)
    for _ in range(6):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.55, 5.5])


def test_warmup_cosine_function():
    assert warmup_cosine(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(150, 100, 10, 0.1) == pytest.approx(0.1)  # past the end: stays on the floor


def test_the_saved_optimizer_state_is_keyed_by_names_and_positional_ones_still_load():
    """One format for every launch (FSDP ranks, DDP, one process): the state names each parameter; a state saved by
    lmsys before that (keyed by position) still loads into the same layout."""
    from lmsys.training.distributed import load_optimizer_state, optimizer_state

    def stepped(model: torch.nn.Module) -> torch.optim.Optimizer:
        optimizer = create_optimizer(parameter_groups(model, 1e-2, 1e-3, 2.0, 0.01), OptimizerName.adamw, (0.9, 0.99),
                                     1e-8)
        for step in range(1, 3):
            for param in model.parameters():
                param.grad = torch.full_like(param, 0.1 * step)
            optimizer.step()
        return optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = stepped(model)
    saved = optimizer_state(model, optimizer)
    model.zero_grad(set_to_none=True)  # as on resume: a fresh model, no gradients yet
    assert sorted(saved["state"]) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    for state in (saved, optimizer.state_dict()):
        fresh = create_optimizer(parameter_groups(model, 1e-2, 1e-3, 2.0, 0.01), OptimizerName.adamw, (0.9, 0.99),
                                 1e-8)
        load_optimizer_state(model, fresh, state)
        for param in model.parameters():
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(fresh.state[param][key], optimizer.state[param][key]), key
        assert [g["lr"] for g in fresh.param_groups] == [g["lr"] for g in optimizer.param_groups]
