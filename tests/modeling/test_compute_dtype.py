"""compute_dtype=auto: bfloat16 on CUDA; on CPU the faster of float32 and bfloat16 as measured (the probe's rates
forced here), logged, cached per machine and recorded in run_info.json; a bfloat16 CPU run learns."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from accelerate import Accelerator

from lmsys.builders import build_encoders, build_loop_settings
from lmsys.config import (
    ComputeDtype,
    DataConfig,
    Family,
    LoraConfig,
    ModelConfig,
    OptimizerName,
    Quantization,
    TrainConfig,
    TrainerConfig,
)
from lmsys.data.dataset import encode_split
from lmsys.data.io import read_pairs
from lmsys.modeling import compute_dtype
from lmsys.modeling.backbone import DTYPES, resolve_dtype
from lmsys.roofline import ProjectionShapes
from lmsys.training.optim import create_optimizer, parameter_groups, warmup_cosine_scheduler
from lmsys.training.plan import iterate_updates
from lmsys.training.recipe import TrainingRecipe

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
BF16_CURVE_TOLERANCE = 0.03  # measured: max |bf16 - fp32| 0.008 over the 20 updates


@pytest.fixture
def unpinned(monkeypatch, tmp_path):
    """The probe path: no pin, the cache in a temporary directory, nothing remembered from earlier tests."""
    monkeypatch.delenv(compute_dtype.PIN_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(compute_dtype, "_chosen", {})
    return tmp_path / "cache" / "lmsys" / "compute_dtype.json"


def force_rates(monkeypatch, rates: dict[str, float]) -> list[ProjectionShapes]:
    probed = []

    def measured(shapes):
        probed.append(shapes)
        return dict(rates)

    monkeypatch.setattr(compute_dtype, "measure_rates", measured)
    return probed


@pytest.mark.parametrize("rates,expected", [
    ({"float32": 150.0, "bfloat16": 370.0}, torch.bfloat16),  # AVX-512 BF16 / AMX
    ({"float32": 150.0, "bfloat16": 12.0}, torch.float32),  # AVX2 only: bf16 is emulated
    ({"float32": 150.0, "bfloat16": 170.0}, torch.float32),  # within the margin: keep fp32's precision
])
def test_auto_on_cpu_picks_the_faster_dtype_and_logs_it(tiny_models, unpinned, monkeypatch, caplog, rates, expected):
    probed = force_rates(monkeypatch, rates)
    with caplog.at_level(logging.INFO, logger="lmsys"):
        assert resolve_dtype(ComputeDtype.auto, CPU, tiny_models["llama"]) == expected
    assert probed == [ProjectionShapes.from_model_dir(tiny_models["llama"])]
    name = str(expected).removeprefix("torch.")
    assert f"compute dtype auto on cpu: {name} (probe;" in caplog.text
    assert resolve_dtype(ComputeDtype.float32, CPU, tiny_models["llama"]) == torch.float32  # explicit: no probe
    assert len(probed) == 1


@pytest.mark.parametrize("rates,warned", [({"float32": 140.0, "bfloat16": 3.0}, True),  # AVX2 only
                                          ({"float32": 150.0, "bfloat16": 370.0}, False)])  # AVX-512 BF16
def test_explicit_bf16_on_a_cpu_where_it_is_slower_is_kept_with_one_warning(tiny_models, unpinned, monkeypatch,
                                                                           caplog, rates, warned):
    probed = force_rates(monkeypatch, rates)
    monkeypatch.setattr(compute_dtype, "_warned", set())
    with caplog.at_level(logging.INFO, logger="lmsys"):
        assert resolve_dtype(ComputeDtype.bfloat16, CPU, tiny_models["llama"]) == torch.bfloat16
        assert resolve_dtype(ComputeDtype.bfloat16, CPU, tiny_models["llama"]) == torch.bfloat16  # cached: no probe
    assert len(probed) == 1 and "compute dtype auto" not in caplog.text  # auto's probe, not auto's line
    with caplog.at_level(logging.INFO, logger="lmsys"):
        resolve_dtype(ComputeDtype.auto, CPU, tiny_models["llama"])  # auto later in the process: still logged
    assert "compute dtype auto on cpu: " in caplog.text and len(probed) == 1  # from the cache the probe wrote
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    slower = ("compute dtype bfloat16 as configured, on a CPU where bf16 matmuls are 47x slower than float32's (matmul "
              "GFLOP/s on the model's projections: float32 140, bfloat16 3): compute_dtype=auto or float32 is faster "
              "here")
    assert warnings == ([slower] if warned else [])  # once a process
    monkeypatch.setenv(compute_dtype.PIN_VARIABLE, "float32")  # pinned (the test suite): no probe, no warning
    monkeypatch.setattr(compute_dtype, "_chosen", {})
    assert resolve_dtype(ComputeDtype.bfloat16, CPU, tiny_models["llama"]) == torch.bfloat16 and len(probed) == 1


def test_the_choice_is_cached_per_machine_and_thread_count(tiny_models, unpinned, monkeypatch):
    probed = force_rates(monkeypatch, {"float32": 100.0, "bfloat16": 300.0})
    first = compute_dtype.auto_dtype(CPU, tiny_models["llama"])
    assert (first.dtype, first.source, len(probed)) == ("bfloat16", "probe", 1)
    cached = json.loads(unpinned.read_text())
    assert cached == {first.key: {"dtype": "bfloat16", "gflops": {"float32": 100.0, "bfloat16": 300.0}}}
    assert f"threads {torch.get_num_threads()}" in first.key and torch.__version__ in first.key
    monkeypatch.setattr(compute_dtype, "_chosen", {})  # a new process: reads the cache, no probe
    again = compute_dtype.auto_dtype(CPU, tiny_models["llama"])
    assert (again.dtype, again.source, len(probed)) == ("bfloat16", "cache", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)  # another thread count: another entry, a new probe
    assert compute_dtype.auto_dtype(CPU, tiny_models["llama"]).source == "probe" and len(probed) == 2
    assert len(json.loads(unpinned.read_text())) == 2
    assert compute_dtype.auto_dtype(CPU, tiny_models["llama"], refresh=True).source == "probe" and len(probed) == 3


def test_cuda_means_bfloat16_and_the_pin_skips_the_probe(tiny_models, unpinned, monkeypatch):
    probed = force_rates(monkeypatch, {"float32": 100.0, "bfloat16": 300.0})
    assert resolve_dtype(ComputeDtype.auto, torch.device("cuda"), tiny_models["llama"]) == torch.bfloat16
    monkeypatch.setenv(compute_dtype.PIN_VARIABLE, "float32")
    assert compute_dtype.auto_dtype(CPU, tiny_models["llama"]).source == "pinned"
    assert resolve_dtype(ComputeDtype.auto, CPU, tiny_models["llama"]) == torch.float32
    assert probed == [] and not unpinned.exists()
    monkeypatch.setenv(compute_dtype.PIN_VARIABLE, "fp8")
    with pytest.raises(ValueError, match="LMSYS_AUTO_CPU_DTYPE=fp8: use one of float32, bfloat16"):
        compute_dtype.auto_dtype(CPU, tiny_models["llama"])


def loss_curve(model_dir: Path, train: Path, dtype: ComputeDtype) -> np.ndarray:
    """20 updates (5 epochs of 16 pairs, the loop of tests/test_train_run.py) on the NF4 model in `dtype`, its norms
    and MLPs eager (bf16's default on CPU compiles them: tests/modeling/test_compile.py shows the same curve, and
    test_a_run_logs_and_records_the_choice runs that default through the entry point)."""
    config = TrainConfig(
        model=ModelConfig(path=str(model_dir), family=Family.llama, quantization=Quantization.nf4, max_length=128),
        data=DataConfig(train_path=str(train)), lora=LoraConfig(dropout=0.0),
        trainer=TrainerConfig(epochs=5, batch_size=4, max_tokens=160))
    model, spec, tokenizer = tiny.build_preference_model(model_dir, "llama", "nf4", compute_dtype=dtype,
                                                         norm_kernel="eager", mlp_kernel="eager")
    assert {p.dtype for n, p in model.backbone.named_parameters() if "norm" in n} == {DTYPES[dtype]}
    assert {p.dtype for p in model.head.parameters()} == {torch.float32}  # the head stays fp32
    split = encode_split(read_pairs(train, require_labels=True), build_encoders(spec, tokenizer))
    settings = build_loop_settings(config, spec, len(split), 1, tokenizer.pad_token_id)
    optimizer = create_optimizer(parameter_groups(model, 1e-3, 1e-2, 1.0, 0.0), OptimizerName.adamw, (0.9, 0.999), 1e-8)
    scheduler = warmup_cosine_scheduler(optimizer, settings.total_updates, 0.1, 0.1)
    recipe = TrainingRecipe(Accelerator(cpu=True), model, optimizer, scheduler, settings, split)
    model.train()
    return np.array([recipe.update(update).loss for update in iterate_updates(split, settings, 0, 1)])


def test_a_bfloat16_cpu_run_learns(tiny_models, tmp_path):
    """The loss falls in bf16, along the fp32 curve up to bf16 rounding."""
    train = tmp_path / "train.csv"
    tiny.arena_frame(16, seed=3).to_csv(train, index=False)
    bf16 = loss_curve(tiny_models["llama"], train, ComputeDtype.bfloat16)
    fp32 = loss_curve(tiny_models["llama"], train, ComputeDtype.float32)
    assert len(bf16) == 20 and np.isfinite(bf16).all()
    assert bf16[-4:].mean() < bf16[:4].mean() - 0.1 and bf16[-1] < bf16[0]
    np.testing.assert_allclose(bf16, fp32, atol=BF16_CURVE_TOLERANCE, rtol=0)


def test_a_run_logs_and_records_the_choice(tiny_models, arena_files, tmp_path):
    """The training entry point with compute_dtype=auto and a cached probe that found bf16 faster: the run computes
    in bf16, says so in train.log and records it in run_info.json; with bf16 on CPU, norm_kernel=auto and
    mlp_kernel=auto compile the norms (two per layer and the final one) and the MLPs' activations, and
    attention_kernel=auto the training attention, through training,
    evaluation and the checkpoint."""
    shapes = ProjectionShapes.from_model_dir(tiny_models["llama"])
    key = compute_dtype.machine_key(shapes)  # the child runs with this process's thread count (OMP_NUM_THREADS)
    cache = tmp_path / "cache" / "lmsys" / "compute_dtype.json"
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({key: {"dtype": "bfloat16", "gflops": {"float32": 100.0, "bfloat16": 300.0}}}))
    env = {k: v for k, v in os.environ.items() if k != compute_dtype.PIN_VARIABLE}
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(REPO / "lmsys" / "code" / "train_r_llama.py"), "--config-name", "conf_r_llama_smol",
         f"model.path={tiny_models['llama']}", f"data.train_path={arena_files['train']}",
         f"data.valid_path={arena_files['valid']}", f"hydra.run.dir={run_dir}", "trainer.max_steps=2",
         "model.max_length=128", "trainer.max_tokens=512", "trainer.batch_size=2", "trainer.grad_accum=1"],
        env={**env, "XDG_CACHE_HOME": str(tmp_path / "cache")}, cwd=REPO, capture_output=True, text=True,
        timeout=400, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((run_dir / "run_info.json").read_text())["compute_dtype"]
    assert record == {"requested": "auto", "dtype": "bfloat16", "source": "cache",
                      "gflops": {"float32": 100.0, "bfloat16": 300.0}, "key": key}
    log = (run_dir / "train.log").read_text()
    assert "compute dtype auto on cpu: bfloat16 (cache;" in log
    assert "model.norm_kernel: 5 RMSNorm modules compiled" in log and (run_dir / "checkpoint").is_dir()
    assert "model.mlp_kernel: 2 gated MLPs' activations compiled" in log
    assert "model.attention_kernel: 2 attention modules' bf16 attention compiled, 2 their rotary embedding" in log
