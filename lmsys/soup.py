"""Soups: the weighted average of several checkpoints' weights, as one checkpoint. LoRA checkpoints average their
adapters and heads; merged checkpoints (full fine-tuning runs, or unquantized exports) their whole backbones and
heads, as fold models of the LMSYS 2nd place's full fine-tuning would be.

    python -m lmsys.soup checkpoints=[RUN1/checkpoint,RUN2/checkpoint,...] output_dir=DIR \\
        [weights=[0.5,0.3,0.2]] [overwrite=true]
    python -m lmsys.predict checkpoint=DIR data.test_path=test.csv output=submission.csv

The checkpoints must be interchangeable: the same base model (path and config facts), LoRA shape
(adapter_config.json: rank, alpha, target modules, DoRA/rsLoRA, patterns), head type and tensor shapes, and every
input setting of the spec (template, max_length, input format, truncation settings); the first mismatch fails,
naming the checkpoint and the field, before anything is written. How a checkpoint is run (quantization,
compute dtype, attention kernel) may differ; the soup keeps the first checkpoint's. Merged checkpoints must hold the
same weight files (the same shards) and be unquantized (a pre-quantized export's packed 4/8-bit codes cannot be
averaged: soup before exporting). Each tensor is averaged on its own (LoRA A and B separately: the mean of the
updates B_i A_i would not be a rank-r adapter), with the weights (default equal; non-negative, normalised to sum to
1), one tensor at a time across the inputs. The output is a complete checkpoint (spec, adapter config or model
config, and tokenizer copied from the first, soup.json recording the inputs and weights): `python -m lmsys.predict`
and `python -m lmsys.export` read it like any run's checkpoint, and so will warm starts (`model.init_from`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import MISSING
from safetensors import safe_open
from safetensors.torch import save_file

from lmsys.cli import run_command
from lmsys.config import ConfigError, require
from lmsys.logs import setup_logging
from lmsys.modeling.checkpoint import (
    ADAPTER_FILES,
    HEAD_FILE,
    SPEC_FILE,
    CheckpointError,
    ModelSpec,
    read_spec,
    weights_fingerprint,
)
from lmsys.modeling.precision import saved_quantization
from lmsys.runs import write_file

log = logging.getLogger("lmsys")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = ADAPTER_FILES
SOUP_RECORD = "soup.json"
# How a checkpoint is run, not what it learned: may differ between the ingredients (the soup keeps the first's).
RUNTIME_FIELDS = ("quantization", "double_quant", "compute_dtype", "attn_implementation", "tta_mode")
# The adapter_config.json entries that fix the LoRA update's shape and scale.
ADAPTER_FIELDS = ("peft_type", "r", "lora_alpha", "target_modules", "use_dora", "use_rslora", "rank_pattern",
                  "alpha_pattern", "layers_to_transform", "layers_pattern", "modules_to_save", "bias")


@dataclass
class SoupConfig:
    checkpoints: list[str] = MISSING  # checkpoint dirs (RUN/checkpoint) of runs on one base model (and LoRA shape)
    output_dir: str = MISSING  # the soup checkpoint to create
    weights: list[float] | None = None  # one per checkpoint, >= 0, normalised to sum to 1; None: equal weights
    overwrite: bool = False  # replace output_dir when it holds an earlier checkpoint

    def __post_init__(self) -> None:
        require(len(self.checkpoints) > 0, "checkpoints must name at least one checkpoint")
        if self.weights is not None:
            require(len(self.weights) == len(self.checkpoints),
                    f"weights has {len(self.weights)} values for {len(self.checkpoints)} checkpoints")
            require(all(math.isfinite(w) and w >= 0 for w in self.weights),
                    f"weights must be finite and non-negative, got {self.weights}")
            require(sum(self.weights) > 0, "weights must not all be zero")
            require(math.isfinite(sum(self.weights)), f"weights overflow when summed: {self.weights}")


@dataclass(frozen=True)
class Ingredient:
    path: Path
    spec: ModelSpec
    adapter_config: dict


def read_ingredient(path: Path) -> Ingredient:
    spec = read_spec(path)  # names any missing file
    if spec.merged:
        stored = saved_quantization(path)
        if stored is not None:
            raise CheckpointError(f"{path}: its weights are stored quantized ({stored.value}), which cannot be "
                                  f"averaged; soup the unquantized checkpoints, then export the soup quantized")
        return Ingredient(path, spec, {})
    try:
        adapter_config = json.loads((path / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: {ADAPTER_CONFIG} is not valid JSON: {err}") from err
    return Ingredient(path, spec, adapter_config)


def check_compatible(first: Ingredient, other: Ingredient) -> None:
    """The first difference between two checkpoints that makes averaging them meaningless, named."""
    for name, mine, theirs in _differences(first.spec, other.spec):
        if name == "base_model_path" and same_base_weights(first, other):
            continue  # the same base model files at another path (another machine's mount)
        if name.split(".")[0] not in RUNTIME_FIELDS:
            raise CheckpointError(f"{other.path}: {SPEC_FILE} field {name} is {_shown(theirs)}, but {first.path} "
                                  f"has {_shown(mine)}; a soup needs checkpoints of one base model and input layout")
    for key in ADAPTER_FIELDS:
        mine, theirs = _adapter_value(first.adapter_config, key), _adapter_value(other.adapter_config, key)
        if mine != theirs:
            raise CheckpointError(f"{other.path}: {ADAPTER_CONFIG} {key} is {theirs!r}, but {first.path} has {mine!r}")
    if weight_files(first) != weight_files(other):
        raise CheckpointError(f"{other.path}: weight files {list(weight_files(other))}, but {first.path} has "
                              f"{list(weight_files(first))}; a soup averages the same files")
    for name in weight_files(first):
        mine, theirs = tensor_shapes(first.path / name), tensor_shapes(other.path / name)
        if mine != theirs:
            key = min(set(mine.items()) ^ set(theirs.items()))[0]
            raise CheckpointError(f"{other.path}: {name} tensor {key} is {theirs.get(key, 'absent')}, but "
                                  f"{first.path} has {mine.get(key, 'absent')}")


def same_base_weights(first: Ingredient, other: Ingredient) -> bool:
    """Whether two adapter checkpoints' base models, named by different paths, hold the same weight files."""
    bases = [ingredient.path / ingredient.spec.base_model_path for ingredient in (first, other)]  # absolute replaces
    if first.spec.merged or not all((base / "config.json").is_file() for base in bases):
        return False
    return weights_fingerprint(str(bases[0])) == weights_fingerprint(str(bases[1]))


def weight_files(ingredient: Ingredient) -> tuple[str, ...]:
    """What a soup averages: an adapter checkpoint's adapter and head; a merged one's backbone (in however many
    shards save_pretrained wrote it) and head."""
    if not ingredient.spec.merged:
        return ADAPTER_WEIGHTS, HEAD_FILE
    return tuple(sorted(path.name for path in ingredient.path.glob("*.safetensors")))


def _differences(mine: object, theirs: object, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted field name, mine, theirs) of every differing leaf field of two dataclasses (the spec, its facts)."""
    found = []
    for field in dataclasses.fields(mine):
        a, b = getattr(mine, field.name), getattr(theirs, field.name)
        if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
            found += _differences(a, b, f"{prefix}{field.name}.")
        elif a != b:
            found.append((f"{prefix}{field.name}", a, b))
    return found


def _adapter_value(config: dict, key: str) -> object:
    value = config.get(key)
    return sorted(value) if key == "target_modules" and isinstance(value, list) else value  # a set in peft


def _shown(value: object) -> str:
    return repr(getattr(value, "value", value))


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor of a safetensors file, read from its header (no tensor is loaded)."""
    with safe_open(str(path), framework="pt") as handle:
        keys = handle.keys()  # safe_open's handle has keys() and no __iter__
        return {key: tuple(handle.get_slice(key).get_shape()) for key in keys}


def weighted_average(paths: list[Path], weights: list[float]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """sum_i weights[i] * tensors_i for every tensor name, summed in float64 and stored in the first file's dtypes
    (so the soup of N copies of one checkpoint is that checkpoint to the bit); and the first file's metadata. One
    tensor at a time across the files: beyond the output, memory holds one tensor in float64."""
    averaged: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(path), framework="pt")) for path in paths]
        for key in handles[0].keys():  # noqa: SIM118 (safe_open's handle has keys() and no __iter__)
            total, dtype = None, None
            for handle, weight in zip(handles, weights, strict=True):
                tensor = handle.get_tensor(key)
                dtype = dtype or tensor.dtype
                term = tensor.to(torch.float64) * weight
                total = term if total is None else total.add_(term)
            averaged[key] = total.to(dtype).contiguous()
        metadata = handles[0].metadata() or {}
    return averaged, metadata


def normalised_weights(weights: list[float] | None, n: int) -> list[float]:
    raw = [1.0] * n if weights is None else [float(w) for w in weights]
    return [w / sum(raw) for w in raw]


def check_output_dir(output_dir: Path, checkpoints: list[Path], overwrite: bool) -> None:
    """The soup never replaces or nests in one of its inputs, nor replaces a directory that is not a checkpoint."""
    target = output_dir.resolve()
    for checkpoint in checkpoints:
        source = checkpoint.resolve()
        if target == source or target.is_relative_to(source) or source.is_relative_to(target):
            raise ConfigError(f"output_dir={output_dir} overlaps the input checkpoint {checkpoint}; choose another")
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} exists; choose another output_dir or pass overwrite=true")
    if output_dir.exists() and not (output_dir / SPEC_FILE).is_file():
        raise FileExistsError(f"{output_dir} exists and is not a checkpoint; overwrite=true replaces only checkpoints")


def make_soup(checkpoints: list[Path], weights: list[float] | None, output_dir: Path, overwrite: bool) -> Path:
    """Check every input, then write the soup checkpoint atomically."""
    check_output_dir(output_dir, checkpoints, overwrite)
    ingredients = [read_ingredient(path) for path in checkpoints]
    for other in ingredients[1:]:
        check_compatible(ingredients[0], other)
    weights = normalised_weights(weights, len(checkpoints))
    first = checkpoints[0]

    files = weight_files(ingredients[0])

    def produce(tmp: Path) -> None:
        shutil.copytree(first, tmp, ignore=shutil.ignore_patterns(*files))  # spec, configs, tokenizer of the first
        for name in files:
            tensors, metadata = weighted_average([path / name for path in checkpoints], weights)
            save_file(tensors, str(tmp / name), metadata=metadata)
        (tmp / SPEC_FILE).write_text(spec_from(first, ingredients[0].spec).to_json())
        record = {"checkpoints": [str(path.resolve()) for path in checkpoints], "weights": weights}
        (tmp / SOUP_RECORD).write_text(json.dumps(record, indent=2) + "\n")

    write_file(output_dir, produce)
    return output_dir



def spec_from(checkpoint: Path, spec: ModelSpec) -> ModelSpec:
    """The first checkpoint's spec for the soup, its base model named absolute: a relative one (a Kaggle bundle's
    `../base_model`) is read from the checkpoint holding it, and the soup lies elsewhere."""
    if spec.merged or Path(spec.base_model_path).is_absolute():
        return spec
    return dataclasses.replace(spec, base_model_path=str((checkpoint / spec.base_model_path).resolve()))


def run_soup(config: SoupConfig) -> Path:
    setup_logging()
    checkpoints = [Path(path) for path in config.checkpoints]
    output_dir = make_soup(checkpoints, config.weights, Path(config.output_dir), config.overwrite)
    for path, weight in zip(checkpoints, normalised_weights(config.weights, len(checkpoints)), strict=True):
        log.info("soup ingredient %s weight %.4f", path, weight)
    log.info("wrote the soup of %d checkpoint(s) to %s", len(checkpoints), output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> Path:
    return run_command(SoupConfig, __doc__, run_soup, argv)


if __name__ == "__main__":
    main()
