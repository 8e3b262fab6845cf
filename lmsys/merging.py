"""The work of `python -m lmsys.export` (lmsys/export.py, which imports this module only once its arguments are
checked): merge a checkpoint's LoRA adapter into an unquantized copy of its base model, optionally quantize the
merged weights, and save the result as a checkpoint."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import bitsandbytes as bnb
import torch

from lmsys.builders import build_model, build_tokenizer
from lmsys.config import ComputeDtype, Quantization
from lmsys.logs import setup_logging
from lmsys.modeling.backbone import DTYPES, load_backbone
from lmsys.modeling.checkpoint import SPEC_FILE, CheckpointError, ModelSpec, read_spec, save_checkpoint, with_base_model
from lmsys.modeling.model import PreferenceModel
from lmsys.output_paths import check_output_paths
from lmsys.prediction_config import BaseWeights, ExportConfig
from lmsys.runs import RunDirError, write_file

log = logging.getLogger("lmsys")


def merge_adapter(checkpoint: Path, spec: ModelSpec, dtype: ComputeDtype, base_weights: BaseWeights
                  ) -> tuple[PreferenceModel, ModelSpec]:
    """The model on an unquantized base in `dtype` (on CPU) with the adapter folded into its weights, and its spec.
    With `as_trained` the base's projections are first rounded as the checkpoint's 4-bit base was."""
    unquantized = dataclasses.replace(spec, quantization=Quantization.none, compute_dtype=dtype)
    model = build_model(unquantized, None, None, torch.device("cpu"), adapter_dir=checkpoint)
    if base_weights == BaseWeights.as_trained:
        rounded = round_base_weights(model.backbone, spec.quantization, spec.double_quant)
        log.info("rounded %d base projections through %s, as the checkpoint's base computed", len(rounded),
                 spec.quantization.value)
    model.backbone = model.backbone.merge_and_unload()
    return model, dataclasses.replace(unquantized, merged=True)


def round_base_weights(backbone: torch.nn.Module, quantization: Quantization, double_quant: bool) -> list[str]:
    """Replace every base projection weight (each nn.Linear but LoRA's) by its `quantization` (nf4 or fp4) round
    trip, quantized as transformers quantizes a model it loads in 4 bits (bitsandbytes' quantize_4bit, blocks of
    64, from the weights in their load dtype). Returns the names of the projections rounded."""
    rounded = []
    with torch.no_grad():
        for name, module in backbone.named_modules():
            if isinstance(module, torch.nn.Linear) and "lora_" not in name:
                packed, state = bnb.functional.quantize_4bit(module.weight.data, blocksize=64,
                                                             quant_type=quantization.value,
                                                             compress_statistics=double_quant)
                module.weight.data.copy_(bnb.functional.dequantize_4bit(packed, state))
                rounded.append(name.removesuffix(".base_layer"))
    return rounded


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
    quantization: Quantization = Quantization.none, base_weights: BaseWeights = BaseWeights.original,
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
    if base_weights == BaseWeights.as_trained and spec.quantization not in (Quantization.nf4, Quantization.fp4):
        raise CheckpointError(f"{checkpoint}: base_weights=as_trained rounds a 4-bit (nf4/fp4) base, and this "
                              f"checkpoint's base is {spec.quantization.value} (int8's outlier decomposition is "
                              f"no weight rounding)")
    model, spec = merge_adapter(checkpoint, spec, dtype, base_weights)
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
        config.base_model_path, config.quantization, config.base_weights,
    )
    log.info("merged %s into %s (%s, quantization %s, %s base weights)", config.checkpoint, output_dir,
             config.dtype.value, config.quantization.value, config.base_weights.value)
    return output_dir
