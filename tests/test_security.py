"""Loading is safe: weights only from safetensors, trust_remote_code off unless a config turns it on, and every
torch.load restricted to weights_only=True."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmsys.config import ModelConfig, Quantization
from lmsys.modeling import backbone
from lmsys.modeling.checkpoint import ModelSpec

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO / "lmsys").rglob("*.py"))


def unsafe_torch_loads(source: str) -> list[int]:
    """Lines that load with pickle: torch.load without a literal weights_only=True, or `from torch import load`."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            lines += [node.lineno for alias in node.names if alias.name == "load"]
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "torch.serialization.load"):
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            lines += [] if safe else [node.lineno]
    return lines


def remote_code_enabled(source: str) -> list[int]:
    """Lines that turn trust_remote_code on by themselves: a keyword or a default set to the literal True."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        named = (isinstance(node, ast.keyword) and node.arg == "trust_remote_code") or (
            isinstance(node, ast.AnnAssign) and ast.unparse(node.target) == "trust_remote_code")
        if named and isinstance(node.value, ast.Constant) and node.value.value is True:
            lines.append(node.value.lineno)
    return lines


@pytest.mark.parametrize(("source", "expected"), [
    ("import torch\ntorch.load(path)\n", [2]),
    ("import torch\ntorch.load(path, weights_only=False)\n", [2]),
    ("import torch\ntorch.load(path, map_location='cpu', weights_only=True)\n", []),
    ("from torch import load\n", [1]),
])
def test_torch_load_checker(source, expected):
    assert unsafe_torch_loads(source) == expected


@pytest.mark.parametrize(("source", "expected"), [
    ("AutoModel.from_pretrained(p, trust_remote_code=True)\n", [1]),
    ("AutoModel.from_pretrained(p, trust_remote_code=flag)\n", []),
    ("class C:\n    trust_remote_code: bool = True\n", [2]),
    ("class C:\n    trust_remote_code: bool = False\n", []),
])
def test_remote_code_checker(source, expected):
    assert remote_code_enabled(source) == expected


def test_every_torch_load_is_weights_only():
    assert len(SOURCES) > 20
    found = {str(p.relative_to(REPO)): unsafe_torch_loads(p.read_text()) for p in SOURCES}
    assert {path: lines for path, lines in found.items() if lines} == {}


def test_trust_remote_code_is_off_unless_configured():
    found = {str(p.relative_to(REPO)): remote_code_enabled(p.read_text()) for p in SOURCES}
    assert {path: lines for path, lines in found.items() if lines} == {}
    assert ModelConfig().trust_remote_code is False
    assert ModelSpec.__dataclass_fields__["trust_remote_code"].default is False
    turned_on = re.compile(r"trust_remote_code:\s*true", re.IGNORECASE)
    assert [p for p in (REPO / "conf").rglob("*.yaml") if turned_on.search(p.read_text())] == []


def test_backbone_is_loaded_from_safetensors_only(monkeypatch):
    captured = {}

    def from_pretrained(path, **kwargs):
        captured.update(kwargs, path=path)
        return torch.nn.Linear(2, 2)

    monkeypatch.setattr(backbone.AutoModel, "from_pretrained", from_pretrained)
    loaded = backbone.load_backbone("some/dir", Quantization.none, False, torch.float32, "sdpa", torch.device("cpu"),
                                    ModelConfig().trust_remote_code)
    assert isinstance(loaded, torch.nn.Linear)
    assert captured["use_safetensors"] is True
    assert captured["trust_remote_code"] is False


def test_a_pickled_checkpoint_is_refused(tiny_models, tmp_path):
    """The same weights load from model.safetensors, and are refused as pytorch_model.bin (a pickle) that
    transformers itself would load."""
    pickled = shutil.copytree(tiny_models["llama"], tmp_path / "pickled")
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    args = (Quantization.none, False, torch.float32, "sdpa", torch.device("cpu"), False)
    assert backbone.load_backbone(tiny_models["llama"], *args).config.hidden_size == 64
    assert backbone.AutoModel.from_pretrained(str(pickled)).config.hidden_size == 64  # a valid pickle: loadable
    with pytest.raises(OSError, match="safetensors"):
        backbone.load_backbone(pickled, *args)
