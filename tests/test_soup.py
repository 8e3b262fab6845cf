"""LoRA soups (`python -m lmsys.soup`): the soup of copies of one checkpoint predicts exactly as it, the soup of two
checkpoints is the (weighted) average of their adapter and head tensors and predicts unlike either, mismatched
checkpoints fail naming the checkpoint and the field, and the output never replaces an input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from accelerate import Accelerator
from entry_runs import entry_env
from safetensors.torch import load_file
from test_predict import make_checkpoint
from tiny import arena_frame

from lmsys.builders import build_prediction_spec
from lmsys.config import ComputeDtype, ConfigError, Quantization
from lmsys.data.io import read_pairs
from lmsys.merging import export_merged
from lmsys.modeling.checkpoint import HEAD_FILE, SPEC_FILE, CheckpointError, read_spec
from lmsys.prediction import predict_checkpoint
from lmsys.prediction_config import PredictConfig
from lmsys.soup import ADAPTER_WEIGHTS, SOUP_RECORD, SoupConfig, main, make_soup


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_models) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("soup")
    return {"a": make_checkpoint(root / "a", tiny_models["llama"], seed=0),
            "b": make_checkpoint(root / "b", tiny_models["llama"], seed=1)}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> list:
    path = tmp_path_factory.mktemp("soup_pairs") / "test.csv"
    arena_frame(10, seed=4, labelled=False).to_csv(path, index=False)
    return read_pairs(path, require_labels=False)


def logits(checkpoint: Path, pairs: list) -> np.ndarray:
    """(N, 6): both orientations' logits of the checkpoint, as `python -m lmsys.predict` computes them."""
    config = PredictConfig(checkpoint=str(checkpoint), output="unused.csv", show_progress=False)
    predictions = predict_checkpoint(config.checkpoint, build_prediction_spec(config.checkpoint, config), pairs, config,
                                     Accelerator())
    return np.concatenate([predictions.logits_ab, predictions.logits_ba], axis=1)


def tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(checkpoint / ADAPTER_WEIGHTS)), **{f"head.{k}": v for k, v in
                                                              load_file(str(checkpoint / HEAD_FILE)).items()}}


def copy_of(checkpoint: Path, target: Path, **spec_changes: object) -> Path:
    shutil.copytree(checkpoint, target)
    if spec_changes:
        spec = json.loads((target / SPEC_FILE).read_text())
        for key, value in spec_changes.items():
            section, _, leaf = key.rpartition("__")
            (spec[section] if section else spec)[leaf] = value
        (target / SPEC_FILE).write_text(json.dumps(spec))
    return target


def test_soup_of_copies_predicts_exactly_as_the_checkpoint(checkpoints, pairs, tmp_path):
    a = checkpoints["a"]
    copies = [a, copy_of(a, tmp_path / "copy1"), copy_of(a, tmp_path / "copy2")]
    soup = make_soup(copies, [1.0, 2.0, 3.0], tmp_path / "soup", overwrite=False)
    original, souped = tensors(a), tensors(soup)
    assert original.keys() == souped.keys() and any("lora_B" in key for key in souped)
    for key, value in original.items():
        assert torch.equal(souped[key], value), key
    np.testing.assert_array_equal(logits(soup, pairs), logits(a, pairs))
    record = json.loads((soup / SOUP_RECORD).read_text())
    assert record["weights"] == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert record["checkpoints"] == [str(path.resolve()) for path in copies]


def test_soup_of_two_checkpoints_is_their_average(checkpoints, pairs, tmp_path):
    a, b = checkpoints["a"], checkpoints["b"]
    soup = make_soup([a, b], None, tmp_path / "soup", overwrite=False)
    ta, tb, ts = tensors(a), tensors(b), tensors(soup)
    lora_b = next(key for key in ts if "lora_B" in key)
    assert (ta[lora_b] - tb[lora_b]).abs().max() > 1e-2  # the two inputs differ, so the average means something
    for key in ts:
        torch.testing.assert_close(ts[key], (ta[key].double() + tb[key].double()).div(2).float(), rtol=0, atol=0)
    la, lb, ls = logits(a, pairs), logits(b, pairs), logits(soup, pairs)
    assert np.abs(ls - la).max() > 1e-3 and np.abs(ls - lb).max() > 1e-3
    weighted = make_soup([a, b], [1.0, 3.0], tmp_path / "weighted", overwrite=False)
    tw = tensors(weighted)
    torch.testing.assert_close(tw[lora_b], 0.25 * ta[lora_b] + 0.75 * tb[lora_b], rtol=0, atol=1e-7)


def test_the_soup_is_a_checkpoint_that_export_reads(checkpoints, tmp_path):
    soup = make_soup([checkpoints["a"], checkpoints["b"]], None, tmp_path / "soup", overwrite=False)
    assert read_spec(soup) == read_spec(checkpoints["a"])
    merged = export_merged(soup, tmp_path / "merged", ComputeDtype.float32, overwrite=False)
    assert read_spec(merged).merged


@pytest.fixture(scope="module")
def merged(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """The two adapter checkpoints exported merged and unquantized: what full fine-tuning runs save."""
    root = tmp_path_factory.mktemp("soup_merged")
    return {name: export_merged(path, root / name, ComputeDtype.float32, overwrite=False)
            for name, path in checkpoints.items()}


def merged_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {f"{path.name}/{key}": value for path in sorted(checkpoint.glob("*.safetensors"))
            for key, value in load_file(str(path)).items()}


def test_soup_of_merged_checkpoints_averages_the_whole_backbone(merged, pairs, tmp_path):
    """Full fine-tuning's checkpoints: every backbone and head tensor is the weighted average, the soup predicts
    unlike either input, and a soup of copies predicts exactly as the checkpoint."""
    a, b = merged["a"], merged["b"]
    soup = make_soup([a, b], [1.0, 3.0], tmp_path / "soup", overwrite=False)
    ta, tb, ts = merged_tensors(a), merged_tensors(b), merged_tensors(soup)
    assert ts.keys() == ta.keys() and len(ts) > 20 and read_spec(soup).merged
    changed = [key for key in ts if not torch.equal(ta[key], tb[key])]
    assert any("q_proj" in key for key in changed) and any(key.startswith(HEAD_FILE) for key in changed)
    for key in ts:
        expected = (0.25 * ta[key].double() + 0.75 * tb[key].double()).to(ta[key].dtype)
        torch.testing.assert_close(ts[key], expected, rtol=0, atol=0, msg=key)
    la, lb, ls = logits(a, pairs), logits(b, pairs), logits(soup, pairs)
    assert np.abs(ls - la).max() > 1e-3 and np.abs(ls - lb).max() > 1e-3
    copies = make_soup([a, copy_of(a, tmp_path / "copy")], None, tmp_path / "copies", overwrite=False)
    np.testing.assert_array_equal(logits(copies, pairs), la)


def test_merged_and_adapter_or_quantized_checkpoints_are_refused(checkpoints, merged, tmp_path):
    with pytest.raises(CheckpointError, match=rf"^{merged['b']}: lmsys_checkpoint.json field merged is True"):
        make_soup([checkpoints["a"], merged["b"]], None, tmp_path / "soup", overwrite=False)
    quantized = export_merged(checkpoints["b"], tmp_path / "nf4", ComputeDtype.float32, overwrite=False,
                              quantization=Quantization.nf4)
    with pytest.raises(CheckpointError, match=rf"^{quantized}: its weights are stored quantized \(nf4\)"):
        make_soup([merged["a"], quantized], None, tmp_path / "soup", overwrite=False)
    resharded = copy_of(merged["b"], tmp_path / "resharded")  # as save_pretrained writes a sharded backbone
    shard = (resharded / "model.safetensors").rename(resharded / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": dict.fromkeys(load_file(str(shard)), shard.name)}
    (resharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"^{resharded}: weight files \['head.safetensors', 'model-00001"):
        make_soup([merged["a"], resharded], None, tmp_path / "soup", overwrite=False)
    assert not (tmp_path / "soup").exists()


@pytest.mark.parametrize(("changes", "message"), [
    ({"max_length": 64}, "field max_length is 64, but"),
    ({"head": "mlp"}, "field head is 'mlp', but"),
    ({"input_formats": ["papb"]}, r"field input_formats is \(<InputFormat.papb: 'papb'>,\)"),
    ({"text_head_share": 0.25}, "field text_head_share is 0.25"),
    ({"facts__hidden_size": 32}, "field facts.hidden_size is 32"),
])
def test_spec_mismatch_fails_naming_the_checkpoint_and_field(checkpoints, tmp_path, changes, message):
    other = copy_of(checkpoints["b"], tmp_path / "other", **changes)
    with pytest.raises(CheckpointError, match=rf"^{other}: lmsys_checkpoint.json {message}"):
        make_soup([checkpoints["a"], other], None, tmp_path / "soup", overwrite=False)
    assert not (tmp_path / "soup").exists()


def test_a_different_base_model_fails_and_the_same_files_elsewhere_pass(checkpoints, tiny_models, tmp_path):
    """Bases are compared by their weight files: fold runs trained where the model sits at another path soup."""
    base = tiny.save_tiny_model("llama", tmp_path / "other_base", seed=5)  # same architecture, other weights
    other = make_checkpoint(tmp_path / "other", base, seed=1)
    with pytest.raises(CheckpointError, match=rf"^{other}: lmsys_checkpoint.json field base_model_path is '{base}'"):
        make_soup([checkpoints["a"], other], None, tmp_path / "soup", overwrite=False)
    moved = make_checkpoint(tmp_path / "moved", shutil.copytree(tiny_models["llama"], tmp_path / "copy"), seed=1)
    soup = make_soup([checkpoints["a"], moved], None, tmp_path / "soup", overwrite=False)
    assert read_spec(soup).base_model_path == read_spec(checkpoints["a"]).base_model_path  # the first's


def test_a_base_model_named_relative_to_its_checkpoint_is_named_absolute_in_the_soup(checkpoints, tmp_path):
    """A Kaggle bundle's checkpoint names its base as `../base_model`, read from the checkpoint; the soup lies
    elsewhere, so the relative name would point nowhere (or at another model) from there."""
    shutil.copytree(read_spec(checkpoints["a"]).base_model_path, tmp_path / "bundle" / "base_model")
    bundled = copy_of(checkpoints["a"], tmp_path / "bundle" / "checkpoint", base_model_path="../base_model")
    soup = make_soup([bundled, bundled], None, tmp_path / "soups" / "soup", overwrite=False)
    assert read_spec(soup).base_model_path == str((tmp_path / "bundle" / "base_model").resolve())
    assert read_spec(soup).to_json().replace(read_spec(soup).base_model_path, "B") == \
        read_spec(bundled).to_json().replace("../base_model", "B")  # nothing else of the spec changed


def test_a_different_lora_rank_fails(checkpoints, tiny_models, tmp_path):
    other = make_checkpoint(tmp_path / "r4", tiny_models["llama"], seed=1, r=4)
    with pytest.raises(CheckpointError, match=rf"^{other}: adapter_config.json r is 4, but {checkpoints['a']} has 8"):
        make_soup([checkpoints["a"], other], None, tmp_path / "soup", overwrite=False)
    assert not (tmp_path / "soup").exists()


def test_different_target_modules_fail(checkpoints, tmp_path):
    other = copy_of(checkpoints["b"], tmp_path / "other")
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj", "v_proj"]}))
    with pytest.raises(CheckpointError, match="adapter_config.json target_modules is"):
        make_soup([checkpoints["a"], other], None, tmp_path / "soup", overwrite=False)


def test_how_a_checkpoint_runs_may_differ(checkpoints, tmp_path):
    other = copy_of(checkpoints["b"], tmp_path / "other", quantization="none", compute_dtype="float32")
    soup = make_soup([checkpoints["a"], other], None, tmp_path / "soup", overwrite=False)
    assert read_spec(soup).quantization == read_spec(checkpoints["a"]).quantization  # the first's


def test_output_dir_rules(checkpoints, tmp_path):
    a, b = checkpoints["a"], checkpoints["b"]
    soup = make_soup([a, b], None, tmp_path / "soup", overwrite=False)
    with pytest.raises(FileExistsError, match="pass overwrite=true"):
        make_soup([a, b], None, soup, overwrite=False)
    assert make_soup([a, a], None, soup, overwrite=True) == soup
    assert torch.equal(tensors(soup)[next(iter(tensors(a)))], tensors(a)[next(iter(tensors(a)))])
    for target in (a, a.parent, a / "inside"):
        with pytest.raises(ConfigError, match="overlaps the input checkpoint"):
            make_soup([a, b], None, target, overwrite=True)
    plain = tmp_path / "notes"
    plain.mkdir()
    with pytest.raises(FileExistsError, match="not a checkpoint"):
        make_soup([a, b], None, plain, overwrite=True)
    assert read_spec(a) and (a / ADAPTER_WEIGHTS).is_file()


def test_weights_are_checked_by_the_schema():
    for weights, message in (([1.0], "1 values for 2 checkpoints"), ([1.0, -0.5], "non-negative"),
                             ([0.0, 0.0], "not all be zero"), ([1.0, float("inf")], "finite and non-negative"),
                             ([1e308, 1e308], "overflow when summed")):
        with pytest.raises(ConfigError, match=message):
            SoupConfig(checkpoints=["a", "b"], output_dir="out", weights=weights)


def test_command_line(checkpoints, tmp_path, capsys):
    out = tmp_path / "soup"
    main([f"checkpoints=[{checkpoints['a']},{checkpoints['b']}]", f"output_dir={out}", "weights=[2,2]"])
    assert read_spec(out) and json.loads((out / SOUP_RECORD).read_text())["weights"] == [0.5, 0.5]
    assert "wrote the soup of 2 checkpoint(s)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([f"checkpoints=[{checkpoints['a']},{checkpoints['b']}]", f"output_dir={out}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {out} exists")
    done = subprocess.run([sys.executable, "-m", "lmsys.soup", "checkpoints=[x,y]", "output_dir=o", "weight=[1,1]"],
                          capture_output=True, text=True, env=entry_env(), timeout=120, check=False)
    assert done.returncode == 2 and done.stderr.startswith("error:") and "weight" in done.stderr
    shown = subprocess.run([sys.executable, "-m", "lmsys.soup", "--help"], capture_output=True, text=True,
                           env=entry_env(), timeout=120, check=False)
    assert shown.returncode == 0 and "checkpoints: list[str] = ???" in shown.stdout
