"""The work of `python -m lmsys.export` (lmsys/export.py, which imports this module only once its arguments are
checked): merge a checkpoint's LoRA adapter into an unquantized copy of its base model, optionally quantize the
merged weights, and save the result as a checkpoint."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import torch

from lmsys.builders import build_model, build_tokenizer
from lmsys.config import ComputeDtype, Quantization
from lmsys.logs import setup_logging
from lmsys.modeling.backbone import DTYPES, load_backbone
from lmsys.modeling.checkpoint import SPEC_FILE, CheckpointError, ModelSpec, read_spec, save_checkpoint, with_base_model
from lmsys.modeling.model import PreferenceModel
from lmsys.output_paths import check_output_paths
from lmsys.prediction_config import ExportConfig
from lmsys.runs import RunDirError, write_file

log = logging.getLogger("lmsys")


def merge_adapter(checkpoint: Path, spec: ModelSpec, dtype: ComputeDtype) -> tuple[PreferenceModel, ModelSpec]:
    """The model on an unquantized base in `dtype` (on CPU) with the adapter folded into its weights, and its spec."""
    unquantized = dataclasses.replace(spec, quantization=Quantization.none, compute_dtype=dtype)
    model = build_model(unquantized, None, None, torch.device("cpu"), adapter_dir=checkpoint)
    model.backbone = model.backbone.merge_and_unload()
    return model, dataclasses.replace(unquantized, merged=True)


def save_quantized(directory: Path, spec: ModelSpec, quantization: Quantization) -> ModelSpec:
    """Replace the merged weights saved in `directory` by their bitsandbytes quantization; the spec that says so."""
    quantized_spec = dataclasses.replace(spec, quantization=quantization)
    unquantized = directory.with_name(directory.name + ".unquantized")
    for name in ("config.json", "model.safetensors", "model.safetensors.index.json"):
        if (directory / name).exists():
            unquantized.mkdir(exist_ok=True)
            (directory / name).rename(unquantized / name)
    for shard in directory.glob("model-*.safetensors"):
        shard.rename(unquantized / shard.name)
    backbone = load_backbone(unquantized, quantization, spec.double_quant, DTYPES[spec.compute_dtype],
                             spec.attn_implementation.value, torch.device("cpu"), spec.trust_remote_code)
    backbone.save_pretrained(str(directory))
    del backbone
    shutil.rmtree(unquantized)
    (directory / SPEC_FILE).write_text(quantized_spec.to_json())
    return quantized_spec


def export_merged(
    checkpoint: Path, output_dir: Path, dtype: ComputeDtype, overwrite: bool, base_model_path: str | None = None,
    quantization: Quantization = Quantization.none,
) -> Path:
    check_output_paths({"checkpoint": checkpoint, "base_model_path": base_model_path}, {"output_dir": output_dir},
                       directory_outputs=frozenset({"output_dir"}))
    spec = with_base_model(read_spec(checkpoint), checkpoint, base_model_path)
    if spec.merged:
        raise CheckpointError(f"{checkpoint}: already a merged checkpoint")
    if output_dir.exists() and not overwrite:
        raise RunDirError(f"{output_dir} exists; choose another output_dir or pass overwrite=true")
    if output_dir.exists() and any(output_dir.iterdir()) and not (output_dir / SPEC_FILE).is_file():
        raise RunDirError(f"{output_dir} is not a checkpoint (no {SPEC_FILE}); overwrite=true replaces only a "
                          f"checkpoint, so choose another output_dir")
    model, spec = merge_adapter(checkpoint, spec, dtype)
    tokenizer = build_tokenizer(checkpoint, spec.trust_remote_code)

    def produce(tmp: Path) -> None:
        save_checkpoint(tmp, model, tokenizer, spec)
        if quantization != Quantization.none:
            save_quantized(tmp, spec, quantization)

    write_file(output_dir, produce)
    return output_dir


def run_export(config: ExportConfig) -> Path:
    setup_logging()
    output_dir = export_merged(
        Path(config.checkpoint), Path(config.output_dir), ComputeDtype(config.dtype.value), config.overwrite,
        config.base_model_path, config.quantization,
    )
    log.info("merged %s into %s (%s, quantization %s)", config.checkpoint, output_dir, config.dtype.value,
             config.quantization.value)
    return output_dir
