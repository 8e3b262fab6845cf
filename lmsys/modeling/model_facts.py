"""The one reader of a model directory's config.json: the facts every other module needs, without loading weights.

Multimodal checkpoints (Gemma-3 4B+) nest the language model's settings under `text_config`; then every fact
comes from there, the model type included (falling back to the outer one when the inner lacks it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

WEIGHTS_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"  # a sharded save's, in place of WEIGHTS_FILE


class ModelLoadError(ValueError):
    """A model directory that is missing or cannot be used."""


def require_weights(path: str | Path, named: str) -> None:
    """The safetensors weights a model directory loads from (every load here passes use_safetensors=True): found
    missing before a run dir is claimed or any model loads, not in from_pretrained's traceback. `named`: the
    directory as the error names it (model.path=DIR)."""
    directory = Path(path)
    if (directory / WEIGHTS_FILE).is_file():
        return
    index = directory / SHARD_INDEX
    if not index.is_file():
        other = next((f.name for f in sorted(directory.glob("*.bin"))), None)
        raise ModelLoadError(f"{named}: no {WEIGHTS_FILE} (nor {SHARD_INDEX}): the weights are missing"
                             + (f"; {other} is not read here, save the model as safetensors" if other else ""))
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelLoadError(f"{index}: not a safetensors index (no weight_map: {err!r})") from err
    missing = sorted(name for name in shards if not (directory / name).is_file())
    if missing:
        raise ModelLoadError(f"{named}: {SHARD_INDEX} names {len(missing)} shard(s) that are missing, "
                             f"e.g. {missing[0]}")


@dataclass(frozen=True)
class ModelFacts:
    model_type: str
    hidden_size: int
    num_attention_heads: int
    head_dim: int
    num_key_value_heads: int
    intermediate_size: int
    num_hidden_layers: int = 0  # 0: not in config.json

    @property
    def projection_params_per_layer(self) -> int:
        """q, k, v, o and the three MLP projections of one decoder layer."""
        attention = self.hidden_size * self.head_dim * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        return attention + 3 * self.hidden_size * self.intermediate_size

    def to_dict(self) -> dict:
        return asdict(self)


def model_skeleton(path: str | Path, trust_remote_code: bool = False):
    """The model (AutoModel: no LM head) built from its config.json on the meta device: its modules and their
    shapes, no weights read or allocated."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    with init_empty_weights():
        return AutoModel.from_config(config, trust_remote_code=trust_remote_code)


def read_config(path: str | Path) -> dict:
    """A model directory's config.json as written (the outer config of a multimodal checkpoint)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path}: not a model directory (no config.json); run ./setup.sh or set model.path")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{config_file}: not valid JSON ({err.msg} at char {err.pos})") from err


def read_model_facts(path: str | Path) -> ModelFacts:
    outer = read_config(path)
    config = outer.get("text_config", outer)
    try:
        heads = config["num_attention_heads"]
        return ModelFacts(
            model_type=config.get("model_type", outer.get("model_type")),
            hidden_size=config["hidden_size"],
            num_attention_heads=heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config.get("num_hidden_layers", 0),
        )
    except KeyError as err:
        raise ModelLoadError(f"{Path(path) / 'config.json'}: no {err.args[0]!r}; is this a decoder model "
                             f"directory?") from err


def position_limit(path: str | Path) -> int | None:
    """The longest sequence the model's positions cover (`max_position_embeddings`, with any rope scaling already
    in it); None where there is no absolute limit: DeBERTa-v3 (`position_biased_input: false`, relative positions
    only) or a config that names none."""
    outer = read_config(path)
    config = outer.get("text_config", outer)
    if config.get("position_biased_input", True) is False:
        return None
    limit = config.get("max_position_embeddings")
    return int(limit) if isinstance(limit, int) and limit > 0 else None
