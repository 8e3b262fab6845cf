"""`model.compute_dtype=auto`: bfloat16 on CUDA; on CPU the faster of float32 and bfloat16 on this machine, measured.

CPUs differ: without AVX-512 BF16 or AMX a bf16 matmul is many times slower than fp32; with them it is 2-3x
faster. So on CPU a probe times the model's projection matmuls in both dtypes (lmsys.roofline.matmul_rate, a
fraction of a second), once per machine: the result is cached in ~/.cache/lmsys/compute_dtype.json (or under
$XDG_CACHE_HOME), keyed by CPU model, CPU flags, torch version, thread count and the model's projection shapes.
bf16 costs precision, so it is chosen only when it is clearly faster (BF16_MARGIN). The head and the loss stay
float32 whatever the choice (PreferenceHead casts the pooled state; the loss casts the logits).

$LMSYS_AUTO_CPU_DTYPE=float32|bfloat16 pins the CPU choice without a probe (the test suite pins float32, so that
its tolerances do not depend on the machine).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lmsys.roofline import ProjectionShapes, matmul_rate

log = logging.getLogger("lmsys")

PIN_VARIABLE = "LMSYS_AUTO_CPU_DTYPE"
BF16_MARGIN = 1.2  # bf16 only when its matmuls are at least 20% faster: a tie keeps fp32's precision
PROBE_TOKENS = 256  # rows of the probe's products: a packed micro-batch is a few hundred to ~1000 tokens
PROBE_REPEATS = 3
CANDIDATES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_chosen: dict[str, DtypeChoice] = {}  # per process: the probe or the cache is read once per key
_warned: set[str] = set()  # keys whose explicit bf16 was checked (warn_if_bf16_is_slower)


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # "float32" | "bfloat16"
    source: str  # "cuda" | "other device" | "pinned" | "probe" | "cache"
    gflops: dict[str, float] = field(default_factory=dict)  # the measured matmul rate of each candidate
    key: str = ""

    def record(self) -> dict:
        return asdict(self)


def auto_dtype(device: torch.device, model_dir: str | Path, refresh: bool = False) -> DtypeChoice:
    """What `compute_dtype=auto` means on `device` for the model in `model_dir`."""
    if device.type == "cuda":
        return DtypeChoice("bfloat16", "cuda")
    if device.type != "cpu":
        return DtypeChoice("float32", "other device")
    pinned = os.environ.get(PIN_VARIABLE)
    if pinned:
        if pinned not in CANDIDATES:
            raise ValueError(f"${PIN_VARIABLE}={pinned}: use one of {', '.join(CANDIDATES)}")
        return DtypeChoice(pinned, "pinned")
    return choose_cpu_dtype(ProjectionShapes.from_model_dir(model_dir), refresh)


def choose_cpu_dtype(shapes: ProjectionShapes, refresh: bool = False, announce: bool = True) -> DtypeChoice:
    """The cached choice for this machine and these shapes, or a new probe (refresh=True: always a new probe);
    logged unless `announce` is False.
    Under several processes (DDP on CPU) the main process probes first and the others read its cached result, so
    every rank computes in the same dtype and the probe does not share the cores with its own copies."""
    from accelerate import PartialState

    key = machine_key(shapes)
    if key in _chosen and not refresh:
        return _chosen[key]
    with PartialState().main_process_first():
        cached = None if refresh else _read_cache().get(key)
        if cached is not None:
            choice = DtypeChoice(cached["dtype"], "cache", cached["gflops"], key)
        else:
            gflops = measure_rates(shapes)
            choice = DtypeChoice(faster(gflops), "probe", gflops, key)
            if PartialState().is_main_process:
                _write_cache(key, choice)
    if announce:  # remembered once announced: auto's first call in a process logs its choice
        log.info("compute dtype auto on cpu: %s (%s; matmul GFLOP/s on the model's projections: %s)", choice.dtype,
                 choice.source, rates_text(choice.gflops))
        _chosen[key] = choice
    return choice


def rates_text(gflops: dict[str, float]) -> str:
    return ", ".join(f"{name} {rate:.0f}" for name, rate in gflops.items())


def warn_if_bf16_is_slower(model_dir: str | Path) -> None:
    """An explicit bf16 on CPU is kept, with one warning where this machine's bf16 matmuls are slower than its
    fp32 ones (no AVX-512 BF16 or AMX: bf16 is emulated, ~40x slower on the AVX2 EPYC of docs/measurements.md). A
    bf16 export predicted on such a CPU meets this. The probe is auto's, cached per machine; pinned: no probe."""
    if os.environ.get(PIN_VARIABLE):
        return
    shapes = ProjectionShapes.from_model_dir(model_dir)
    key = machine_key(shapes)
    if key in _warned:
        return
    _warned.add(key)  # once a process: a prediction resolves its dtype in several places
    gflops = choose_cpu_dtype(shapes, announce=False).gflops
    if gflops["bfloat16"] < gflops["float32"]:
        log.warning("compute dtype bfloat16 as configured, on a CPU where bf16 matmuls are %.0fx slower than "
                    "float32's (matmul GFLOP/s on the model's projections: %s): compute_dtype=auto or float32 is "
                    "faster here", gflops["float32"] / gflops["bfloat16"], rates_text(gflops))


def measure_rates(shapes: ProjectionShapes) -> dict[str, float]:
    return {name: matmul_rate(shapes, dtype, PROBE_TOKENS, PROBE_REPEATS) for name, dtype in CANDIDATES.items()}


def faster(gflops: dict[str, float]) -> str:
    return "bfloat16" if gflops["bfloat16"] >= BF16_MARGIN * gflops["float32"] else "float32"


def machine_key(shapes: ProjectionShapes) -> str:
    cpu_model, flags = _cpu_identity()
    flags_hash = hashlib.sha1(flags.encode()).hexdigest()[:12]
    return f"{cpu_model}|flags {flags_hash}|torch {torch.__version__}|threads {torch.get_num_threads()}|{shapes.signature()}"


def _cpu_identity() -> tuple[str, str]:
    """(model name, sorted flags) from /proc/cpuinfo; the platform's processor string elsewhere."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return model, flags
    for line in lines:
        name, _, value = line.partition(":")
        if name.strip() == "model name" and value.strip():
            model = value.strip()
        elif name.strip() in ("flags", "Features") and value.strip():
            flags = " ".join(sorted(value.split()))
        if model and flags:
            break
    return model, flags


def cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "lmsys" / "compute_dtype.json"


def _read_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}  # no cache yet, or an unreadable one: probe again


def _write_cache(key: str, choice: DtypeChoice) -> None:
    """Atomically (a temporary file renamed over the cache); a read-only home only costs a probe next time."""
    path = cache_path()
    entries = {**_read_cache(), key: {"dtype": choice.dtype, "gflops": choice.gflops}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(temporary, path)
    except OSError as error:
        log.warning("could not cache the compute dtype probe in %s: %s", path, error)


def dtype_record(requested: str, device: torch.device, model_dir: str | Path) -> dict:
    """For run_info.json: the configured compute dtype, what it resolved to and why."""
    if requested != "auto":
        return {"requested": requested, "dtype": requested, "source": "configured"}
    return {"requested": requested, **auto_dtype(device, model_dir).record()}
