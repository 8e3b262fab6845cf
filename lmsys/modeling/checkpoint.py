"""A checkpoint holds everything needed to predict without the training config: the LoRA adapter, our head,
the tokenizer and `lmsys_checkpoint.json` (base model, quantization, head, input layout and truncation).
A merged checkpoint (`python -m lmsys.export`) holds the full backbone weights instead of the adapter."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lmsys.config import (
    Architecture,
    Attention,
    ComputeDtype,
    Family,
    HeadType,
    InputFormat,
    PaddingSide,
    Quantization,
    Template,
    TtaMode,
)
from lmsys.modeling.families import FAMILIES
from lmsys.modeling.model_facts import SHARD_INDEX, WEIGHTS_FILE, ModelFacts, read_model_facts, require_weights
from lmsys.output_paths import SPEC_FILE

# 2: the base model's facts (ModelFacts) replace model_type and hidden_size; 3: input_formats (a tuple, the formats
# the run trained on) replaces input_format; 4: architecture (a version-3 spec reads as a cross-encoder's)
FORMAT_VERSION = 4
READABLE_VERSIONS = (3, FORMAT_VERSION)
HEAD_FILE = "head.safetensors"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MERGED_FILES = ("config.json", WEIGHTS_FILE)  # a sharded save has SHARD_INDEX instead
COMMON_FILES = (SPEC_FILE, HEAD_FILE, "tokenizer_config.json")
REQUIRED_FILES = {False: (*COMMON_FILES, *ADAPTER_FILES), True: (*COMMON_FILES, *MERGED_FILES)}  # by `merged`
# Weight files whose safetensors header is parsed at read time: a truncated copy fails here, naming the file.
WEIGHT_FILES = (HEAD_FILE, "adapter_model.safetensors", "model.safetensors")
FAST_TOKENIZER_FILE = "tokenizer.json"
# Without tokenizer.json, transformers can rebuild a tokenizer only from the slow tokenizer's own vocabulary files.
SLOW_TOKENIZER_FILES = (("tokenizer.model",), ("vocab.json", "merges.txt"), ("vocab.txt",))


class CheckpointError(ValueError):
    """A checkpoint directory that is incomplete or from an incompatible version."""


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild the model and its inputs; the only configuration a checkpoint carries."""

    base_model_path: str
    facts: ModelFacts  # of the base model's config.json, read once when the run started
    family: Family
    template: Template
    max_length: int
    quantization: Quantization
    double_quant: bool
    compute_dtype: ComputeDtype
    attn_implementation: Attention
    head: HeadType
    input_formats: tuple[InputFormat, ...]  # the first is the primary one (logits_output's plain columns)
    prompt_share: float
    keep_first_turns: int
    keep_last_turns: int
    text_head_share: float
    padding_side: PaddingSide
    trust_remote_code: bool = False
    num_classes: int = 3  # the head's outputs: (A, B, tie) or (A, B)
    # The LoRA adapter is merged into the backbone saved in the checkpoint itself (base_model_path is provenance).
    merged: bool = False
    architecture: Architecture = Architecture.cross_encoder  # bi_encoder: (prompt, A) and (prompt, B) apart
    tta_mode: TtaMode = TtaMode.prob  # how its validation combined the two orientations: predict's default
    format_version: int = FORMAT_VERSION

    @property
    def first_token_pooling(self) -> bool:
        """Encoders pool their first token ([CLS]); decoders the last (the family decides, lmsys/modeling/families.py)."""
        return FAMILIES[self.family].encoder

    def model_dir(self, checkpoint: str | Path) -> str:
        """The directory whose config.json and weights the backbone loads from: a merged checkpoint itself, else
        the base model."""
        return str(checkpoint) if self.merged else self.base_model_path

    @property
    def model_type(self) -> str:
        return self.facts.model_type

    @property
    def hidden_size(self) -> int:
        return self.facts.hidden_size

    @property
    def attention_width(self) -> float | None:
        """The packed-row width at which a row's attention costs as much as its projections, per token.

        sdpa and eager compute the full square of a packed row (4 * T * heads * head_dim flops a token and layer,
        against 2 * the layer's projection parameters), so packing short pairs into wide rows can cost more than
        the padding it saves. None for kernels that skip the masked blocks (flash attention varlen, flex
        attention): there a row's width costs nothing.
        """
        if self.attn_implementation in (Attention.flash_attention_2, Attention.flex_attention):
            return None
        facts = self.facts
        return 2 * facts.projection_params_per_layer / (4 * facts.num_attention_heads * facts.head_dim)

    def to_json(self) -> str:
        payload = {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(self).items()}
        payload["input_formats"] = [fmt.value for fmt in self.input_formats]
        return json.dumps(payload, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> ModelSpec:
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{where}: {SPEC_FILE} is not valid JSON: {err}") from err
        version = payload.get("format_version")
        if version not in READABLE_VERSIONS:
            raise CheckpointError(f"{where}: checkpoint format version {version}, this lmsys reads "
                                  f"{', '.join(map(str, READABLE_VERSIONS))}")
        payload["format_version"] = FORMAT_VERSION  # read as the current version (the fields added since default)
        enums = {"family": Family, "template": Template, "quantization": Quantization, "compute_dtype": ComputeDtype,
                 "attn_implementation": Attention, "head": HeadType, "padding_side": PaddingSide,
                 "architecture": Architecture, "tta_mode": TtaMode}
        try:
            fields = {k: enums[k](v) if k in enums else v for k, v in payload.items()}
            fields["input_formats"] = tuple(InputFormat(v) for v in fields["input_formats"])
            return cls(**{**fields, "facts": ModelFacts(**fields["facts"])})
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{where}: unreadable checkpoint spec: {err}") from err


def save_checkpoint(directory: Path, model, tokenizer, spec: ModelSpec,
                    trainable: dict[str, torch.Tensor] | None = None) -> None:
    """Write adapter, head, tokenizer and spec into `directory` (a fresh directory).

    `trainable`: the model's trainable parameters in full by name (lmsys.training.distributed.full_trainable_state),
    required when the model is sharded (FSDP), whose own state_dict holds only this rank's shards. A fully
    fine-tuned backbone (no adapter) is saved whole, as a merged checkpoint.
    """
    directory.mkdir(parents=True, exist_ok=True)
    backbone_state, head_state = _split_trainable(model, trainable)
    model.backbone.save_pretrained(str(directory), state_dict=backbone_state)
    if not _has_adapter(model):
        spec = replace(spec, merged=True)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in head_state.items()}, str(directory / HEAD_FILE))
    tokenizer.save_pretrained(str(directory))
    (directory / SPEC_FILE).write_text(spec.to_json())


def _split_trainable(model, trainable: dict[str, torch.Tensor] | None) -> tuple[dict | None, dict]:
    """(backbone state or None for its own state_dict, head state), named as within each module."""
    if trainable is None:
        return None, model.head.state_dict()
    backbone = {k.removeprefix("backbone."): v for k, v in trainable.items() if k.startswith("backbone.")}
    head = {k.removeprefix("head."): v for k, v in trainable.items() if k.startswith("head.")}
    if not _has_adapter(model):  # full fine-tuning: frozen buffers are not parameters
        backbone = {**{k: v for k, v in model.backbone.state_dict().items() if k not in backbone}, **backbone}
    return backbone, head


def read_spec(directory: str | Path) -> ModelSpec:
    """Check that the checkpoint is complete before anything is loaded; name what is missing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not (directory / SPEC_FILE).is_file():
        missing = [name for name in REQUIRED_FILES[False] if not (directory / name).is_file()]
        raise CheckpointError(f"{directory}: incomplete checkpoint, missing {missing}")
    spec = ModelSpec.from_json((directory / SPEC_FILE).read_text(), str(directory))
    missing = [name for name in REQUIRED_FILES[spec.merged] if not _present(directory, name)]
    if not _has_tokenizer(directory):
        missing.append(FAST_TOKENIZER_FILE)
    if missing:
        kind = "merged checkpoint" if spec.merged else "checkpoint"
        raise CheckpointError(f"{directory}: incomplete {kind}, missing {missing}")
    for name in WEIGHT_FILES:
        _check_safetensors(directory / name)
    return spec


def _has_tokenizer(directory: Path) -> bool:
    if (directory / FAST_TOKENIZER_FILE).is_file():
        return True
    return any(all((directory / name).is_file() for name in files) for files in SLOW_TOKENIZER_FILES)


def _check_safetensors(path: Path) -> None:
    """Parse the header of a weight file (no tensor is read): it fails on an empty or truncated file."""
    if not path.is_file():
        return  # which files must exist is checked above; a sharded model.safetensors has an index instead
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as err:
        raise CheckpointError(f"{path}: unreadable weights ({path.stat().st_size} bytes): {err}") from err


def with_base_model(spec: ModelSpec, checkpoint: str | Path, base_model_path: str | None) -> ModelSpec:
    """The spec with its base model moved to `base_model_path` when given; an adapter checkpoint's base must exist
    (checked here, before anything loads) and be the model type the adapter was trained on."""
    if base_model_path is not None:
        spec = dataclasses.replace(spec, base_model_path=str(Path(base_model_path).resolve()))
    elif not Path(spec.base_model_path).is_absolute():  # a Kaggle bundle's `../base_model`, wherever it is mounted
        spec = dataclasses.replace(spec, base_model_path=str((Path(checkpoint) / spec.base_model_path).resolve()))
    if spec.merged:
        return spec  # the backbone is in the checkpoint itself; base_model_path is provenance only
    given = "base_model_path=" if base_model_path is not None else f"the base model named in {SPEC_FILE}"
    if not (Path(spec.base_model_path) / "config.json").is_file():
        raise CheckpointError(
            f"{checkpoint}: {given} {spec.base_model_path} is not a model directory (no config.json); "
            f"pass base_model_path=DIR where the base model is now"
        )
    require_weights(spec.base_model_path, f"{checkpoint}: {given} {spec.base_model_path}")
    model_type = read_model_facts(spec.base_model_path).model_type
    if model_type != spec.model_type:
        raise CheckpointError(f"{checkpoint}: {given} {spec.base_model_path} is a {model_type} model, but the "
                              f"checkpoint was trained on a {spec.model_type}")
    return spec


def _present(directory: Path, name: str) -> bool:
    return (directory / name).is_file() or (name == WEIGHTS_FILE and (directory / SHARD_INDEX).is_file())


def load_head_state(directory: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / HEAD_FILE))


def _has_adapter(model) -> bool:
    return hasattr(model.backbone, "peft_config")


FINGERPRINT_BYTES = 1 << 20


def weights_fingerprint(directory: str) -> str:
    """Each safetensors file's name and size, with a digest of its first and last MiB (the header with every
    tensor's name and shape, and weights): another model, or other weights of the same shape, differ; reading a 9B
    model's shards costs a few MiB."""
    digest, files = hashlib.blake2b(digest_size=12), sorted(Path(directory).glob("*.safetensors"))
    for path in files:
        size = path.stat().st_size
        with path.open("rb") as handle:
            digest.update(f"{path.name}\x00{size}\x00".encode() + handle.read(FINGERPRINT_BYTES))
            handle.seek(max(0, size - FINGERPRINT_BYTES))
            digest.update(handle.read(FINGERPRINT_BYTES))
    return f"{len(files)} weight file(s), digest {digest.hexdigest()}"
