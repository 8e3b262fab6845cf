"""Directory bookkeeping of lmsys.assets (the conversion itself needs the weight packages: not run here)."""

import pytest

from lmsys import assets


def _fake_builder(calls):
    def build(spec, out_dir, verify=True):
        calls.append(spec.name)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"x")
        (out_dir / "tokenizer.json").write_text("{}")
        (out_dir / "tokenizer_config.json").write_text("{}")
        return {"name": spec.name}

    return build


def test_is_complete(tmp_path):
    assert not assets.is_complete(tmp_path / "missing")
    d = tmp_path / "m"
    d.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (d / name).write_text("{}")
        assert not assets.is_complete(d)
    (d / "tokenizer.json").write_text("{}")
    assert assets.is_complete(d)


def test_ensure_model_builds_once_and_force_rebuilds(tmp_path):
    calls = []
    name = "SmolLM2-135M-Instruct"
    out = assets.ensure_model(name, tmp_path, builder=_fake_builder(calls))
    assert out == tmp_path / name and assets.is_complete(out)
    assert (out / assets.ASSET_INFO_FILE).is_file()
    assets.ensure_model(name, tmp_path, builder=_fake_builder(calls))
    assert calls == [name]
    assets.ensure_model(name, tmp_path, force=True, builder=_fake_builder(calls))
    assert calls == [name, name] and assets.is_complete(out)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary directories left


def test_failed_build_leaves_nothing_that_looks_complete(tmp_path):
    name = "gemma-3-270m"
    (tmp_path / f".{name}.tmp-12345").mkdir(parents=True)  # leftover of an interrupted run

    def broken(spec, out_dir, verify=True):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        assets.ensure_model(name, tmp_path, builder=broken)
    assert list(tmp_path.iterdir()) == []


def test_incomplete_destination_is_replaced(tmp_path):
    name = "gemma-3-270m"
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text("{}")
    calls = []
    assets.ensure_model(name, tmp_path, builder=_fake_builder(calls))
    assert calls == [name] and assets.is_complete(tmp_path / name)


def test_specs():
    assert set(assets.MODELS) == {"SmolLM2-135M-Instruct", "gemma-3-270m"}
    assert assets.MODELS["SmolLM2-135M-Instruct"].model_types == ("llama",)
    assert "gemma3_text" in assets.MODELS["gemma-3-270m"].model_types
    with pytest.raises(ModuleNotFoundError):
        assets._package_dir("surely_not_an_installed_package_xyz")
