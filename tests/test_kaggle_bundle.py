"""The Kaggle bundle, offline: built for this machine's Python from a local wheelhouse, installed into a fresh
virtualenv with `pip install --no-index` and no reachable index, and its inference.py writes a valid submission.

The heavy packages (torch, transformers, ...) come from the system through `--system-site-packages` and are
skipped in the bundle, so the test downloads nothing and stays fast; the download path is exercised with a small
wheel built here (`lmsys-bundle-probe`), which must end up installed in the virtualenv."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from packaging.requirements import Requirement
from test_predict import make_checkpoint
from tiny import arena_frame

from lmsys.cli import parse_config
from lmsys.data.schema import TARGET_COLUMNS
from lmsys.kaggle.bundle import (
    INFERENCE_PACKAGES,
    REPO_ROOT,
    BundleError,
    check_prediction_settings,
    compatible_platforms,
    copy_base_model,
    dependency_pin,
    read_pins,
)
from lmsys.kaggle.bundle import main as bundle_main
from lmsys.kaggle.inference import find_test_file, predict_command
from lmsys.modeling.checkpoint import SPEC_FILE
from lmsys.prediction_config import PredictConfig

PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
PROBE = ("lmsys_bundle_probe", "0.1")
# No index can be reached: any attempt by pip to use one fails at once.
OFFLINE = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_INDEX": "1", "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def probe_wheel(directory: Path, name: str = PROBE[0], version: str = PROBE[1], requires: tuple[str, ...] = ()) -> Path:
    """A minimal pure-Python wheel (PEP 427), written by hand: a package, its requirements and the RECORD that pip
    checks."""
    metadata = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                        *(f"Requires-Dist: {requirement}\n" for requirement in requires)])
    files = {f"{name}/__init__.py": b"MARK = 'probe'\n",
             f"{name}-{version}.dist-info/METADATA": metadata.encode(),
             f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = f"{name}-{version}.dist-info/RECORD"
    lines = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
             for path, data in files.items()]
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
        archive.writestr(record, "\n".join([*lines, f"{record},,"]) + "\n")
    return wheel


def probe_sdist(directory: Path, name: str, version: str) -> Path:
    """A source distribution only (no wheel), as antlr4-python3-runtime 4.9.3 publishes: the bundle builds it."""
    files = {"pyproject.toml": (f'[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
                                f'[project]\nname = "{name}"\nversion = "{version}"\n'),
             "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{name}/__init__.py": "MARK = 'built'\n"}
    archive_path = directory / f"{name}-{version}.tar.gz"
    with tarfile.open(archive_path, "w:gz") as archive:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{name}-{version}/{path}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return archive_path


# The probe's requirements: a dependency (the newest of its two wheels fits, none is installed here), one on a
# skipped package (numpy: the image's), an extra's and another Python's (neither is followed).
PROBE_REQUIRES = ("lmsys-bundle-dep>=0.2", "numpy>=1", 'pytest; extra == "test"',
                  'lmsys-bundle-never; python_version < "3"')
SKIP = "skip_packages=[numpy]"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_models) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kaggle")
    checkpoint = make_checkpoint(root / "run" / "checkpoint", tiny_models["llama"], seed=4)
    (root / "wheelhouse").mkdir()
    probe_wheel(root / "wheelhouse", requires=PROBE_REQUIRES)
    probe_wheel(root / "wheelhouse", "lmsys_bundle_dep", "0.1")
    probe_wheel(root / "wheelhouse", "lmsys_bundle_dep", "0.2", requires=("lmsys-bundle-probe", "lmsys-bundle-sdist"))
    probe_sdist(root / "wheelhouse", "lmsys_bundle_sdist", "0.3")
    (root / "requirements.txt").write_text("lmsys-bundle-probe==0.1\nlmsys-bundle-missing==9.9\n")
    out = bundle_main([f"checkpoint={checkpoint}", f"output_dir={root / 'bundle'}", f"python_version={PYTHON_VERSION}",
                       f"requirements={root / 'requirements.txt'}", f"wheelhouse={root / 'wheelhouse'}",
                       "inference_packages=[lmsys-bundle-probe]", SKIP,
                       "predict_args=[max_tokens=512,show_progress=false]"])
    return {"root": root, "checkpoint": checkpoint, "bundle": out}


def test_bundle_layout_and_relocated_base(bundle):
    out = bundle["bundle"]
    assert sorted(p.name for p in out.iterdir()) == ["base_model", "bundle.json", "checkpoint", "inference.ipynb",
                                                     "inference.py", "wheels"]
    wheels = sorted(p.name for p in (out / "wheels").iterdir())
    assert wheels == ["lmsys-0.1.0-py3-none-any.whl", "lmsys_bundle_dep-0.2-py3-none-any.whl",
                      "lmsys_bundle_probe-0.1-py3-none-any.whl", "lmsys_bundle_sdist-0.3-py3-none-any.whl"]
    spec = json.loads((out / "checkpoint" / SPEC_FILE).read_text())
    assert spec["base_model_path"] == "../base_model" and (out / "base_model" / "model.safetensors").is_file()
    with zipfile.ZipFile(out / "wheels" / wheels[0]) as archive:  # the sources of this checkout, nothing else
        assert "lmsys/predict.py" in archive.namelist() and "lmsys/kaggle/inference.py" in archive.namelist()
    assert json.loads((out / "inference.ipynb").read_text())["nbformat"] == 4
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["pins"] == ["lmsys-bundle-probe==0.1", "lmsys-bundle-dep>=0.2", "lmsys-bundle-sdist"]
    assert manifest["bytes"]["base_model"] > 0
    assert not list(bundle["root"].glob(".bundle*"))  # the atomic write left no temporary directory


def test_bundle_installs_offline_and_writes_a_valid_submission(bundle, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"  # runs the system's pip module, installing into the virtualenv
    frame = arena_frame(9, seed=8, labelled=False, start_id=40).sample(frac=1.0, random_state=1)
    frame.to_csv(tmp_path / "test.csv", index=False)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"} | OFFLINE
    result = subprocess.run([str(python), str(bundle["bundle"] / "inference.py"), "--test", str(tmp_path / "test.csv"),
                             "--out", str(tmp_path / "out" / "submission.csv")], capture_output=True, text=True,
                            env=env, cwd=tmp_path, check=False, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    modules = ("lmsys", "lmsys_bundle_probe", "lmsys_bundle_dep", "lmsys_bundle_sdist")
    files = ", ".join(f"{module}.__file__" for module in modules)
    located = subprocess.run([str(python), "-c", f"import {', '.join(modules)}; print({files})"],
                             capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout.split()
    assert len(located) == 4 and all(path.startswith(str(venv)) for path in located)  # all from the bundle's wheels
    sub = pd.read_csv(tmp_path / "out" / "submission.csv")
    assert list(sub.columns) == ["id", *TARGET_COLUMNS] and list(sub.id) == list(frame.id)
    probs = sub[list(TARGET_COLUMNS)].to_numpy()
    assert np.isfinite(probs).all() and np.abs(probs.sum(1) - 1).max() < 1e-6 and len(set(sub.id)) == len(frame)


def test_pin_without_wheel_fails_naming_the_package(bundle, capsys):
    root = bundle["root"]
    with pytest.raises(SystemExit) as exited:
        bundle_main([f"checkpoint={bundle['checkpoint']}", f"output_dir={root / 'failed'}",
                     f"requirements={root / 'requirements.txt'}", f"wheelhouse={root / 'wheelhouse'}",
                     "inference_packages=[lmsys-bundle-probe,lmsys-bundle-missing]", SKIP])
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: lmsys-bundle-missing==9.9: no wheel for python 3.11 on manylinux_2_35_x86_64")
    assert not (root / "failed").exists() and not list(root.glob(".failed*"))


def test_missing_base_or_checkpoint_files_named(bundle, tmp_path, capsys):
    broken = tmp_path / "checkpoint"
    broken.mkdir()
    for item in bundle["checkpoint"].iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    spec = json.loads((broken / SPEC_FILE).read_text())
    (broken / SPEC_FILE).write_text(json.dumps({**spec, "base_model_path": str(tmp_path / "gone")}))
    (tmp_path / "req.txt").write_text("")
    args = [f"output_dir={tmp_path / 'b'}", f"requirements={tmp_path / 'req.txt'}", "inference_packages=[]"]
    for checkpoint, named in ((broken, (f"{tmp_path / 'gone'} is not a model directory (no config.json); pass "
                                       f"base_model_path=DIR where the base model is now")),
                              (bundle["root"] / "run", "incomplete checkpoint, missing")):
        with pytest.raises(SystemExit):
            bundle_main([f"checkpoint={checkpoint}", *args])
        assert named in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    moved = bundle_main([f"checkpoint={broken}", *args, f"base_model_path={bundle['bundle'] / 'base_model'}"])
    assert json.loads((moved / "checkpoint" / SPEC_FILE).read_text())["base_model_path"] == "../base_model"
    assert json.loads((moved / "bundle.json").read_text())["origin"]["base_model"] == str(
        (bundle["bundle"] / "base_model").resolve())


@pytest.mark.parametrize(("setting", "named"), [
    ("max_length=64", "max_length 64 cannot hold the pab layout"),
    ("max_length=4096", "max_length=4096 exceeds the 1024 positions of the model"),
])
def test_predict_args_the_checkpoint_cannot_run_fail_here_not_on_kaggle(bundle, tmp_path, capsys, setting, named):
    (tmp_path / "req.txt").write_text("")
    with pytest.raises(SystemExit) as exited:
        bundle_main([f"checkpoint={bundle['checkpoint']}", f"output_dir={tmp_path / 'b'}",
                     f"requirements={tmp_path / 'req.txt'}", "inference_packages=[]", f"predict_args=[{setting}]"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("error: predict_args: ") and named in err
    assert not (tmp_path / "b").exists()


def test_overwrite_replaces_only_a_bundle(bundle, tmp_path, capsys):
    """Not the run dir around the checkpoint (which holds it), not a user's folder; an earlier bundle, yes."""
    root = bundle["root"]
    (root / "run" / "oof.csv").write_text("mine")
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "keep.txt").write_text("mine")
    args = [f"requirements={root / 'requirements.txt'}", f"wheelhouse={root / 'wheelhouse'}",
            "inference_packages=[lmsys-bundle-probe]", SKIP, "overwrite=true"]
    for output_dir, message in ((root / "run", "contains the input checkpoint"),
                                (user_dir, "is not a bundle (no bundle.json); overwrite=true replaces only a bundle")):
        with pytest.raises(SystemExit) as exited:
            bundle_main([f"checkpoint={bundle['checkpoint']}", f"output_dir={output_dir}", *args])
        assert exited.value.code == 2 and message in capsys.readouterr().err
    assert (root / "run" / "oof.csv").read_text() == "mine" and (user_dir / "keep.txt").read_text() == "mine"
    assert (bundle["checkpoint"] / SPEC_FILE).is_file()
    earlier = tmp_path / "earlier"
    shutil.copytree(bundle["bundle"], earlier)
    (earlier / "stale.txt").write_text("from the earlier bundle")
    bundle_main([f"checkpoint={bundle['checkpoint']}", f"output_dir={earlier}", *args])
    assert (earlier / "bundle.json").is_file() and not (earlier / "stale.txt").exists()


def test_a_dependency_is_pinned_at_the_version_installed_here_when_it_fits():
    installed = importlib.metadata.version("pandas")
    assert dependency_pin(Requirement("pandas>=1")) == f"pandas=={installed}"
    assert dependency_pin(Requirement("pandas>=999")) == "pandas>=999"
    assert dependency_pin(Requirement("lmsys-not-installed<2,>=1")) == "lmsys-not-installed<2,>=1"


def test_the_base_models_subfolders_stay_behind(tmp_path):
    base = tmp_path / "base"
    (base / "merged").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "merged/model.safetensors", "x.gguf"):
        (base / name).write_text(name)
    copy_base_model(base, tmp_path / "copy")
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["config.json", "model.safetensors",
                                                                     "tokenizer.json"]


def test_inference_script_launches_one_process_per_gpu_and_finds_test_csv(bundle, tmp_path, capsys):
    out, test = tmp_path / "submission.csv", tmp_path / "test.csv"
    one = predict_command(bundle["bundle"], test, out, ["tta=false"], n_gpus=1)
    assert one[1:3] == ["-m", "lmsys.predict"] and one[-3:] == ["max_tokens=512", "show_progress=false", "tta=false"]
    two = predict_command(bundle["bundle"], test, out, [], n_gpus=2)
    assert two[1:5] == ["-m", "accelerate.commands.launch", "--num_processes", "2"] and two[5:7] == ["-m", "lmsys.predict"]
    split = predict_command(bundle["bundle"], test, out, ["device_map=balanced"], n_gpus=2)
    assert split[1:3] == ["-m", "lmsys.predict"]  # one process holding the model split over both GPUs
    unsplit = predict_command(bundle["bundle"], test, out, ["device_map=balanced", "device_map=null"], n_gpus=2)
    assert unsplit[1:5] == ["-m", "accelerate.commands.launch", "--num_processes", "2"]  # the later device_map wins
    odd = predict_command(bundle["bundle"], tmp_path / "v #2: x" / "test.csv", out, [], n_gpus=1)
    read = parse_config(PredictConfig, odd[3:])  # paths with ' #' or ': ' reach lmsys.predict as written
    assert read.data.test_path == str(tmp_path / "v #2: x" / "test.csv") and read.output == str(out)
    moved = shutil.copytree(bundle["checkpoint"], tmp_path / "run #3: a" / "checkpoint")
    check_prediction_settings(moved, None, [])  # the bundle's own check reads such a checkpoint path too
    with pytest.raises(SystemExit) as exited:
        find_test_file(tmp_path)
    assert exited.value.code == 2 and capsys.readouterr().err.startswith(  # bad input: exit 2, as every command's
        f"error: expected exactly one */test.csv or */test.parquet under {tmp_path}, found []")
    (tmp_path / "lmsys-chatbot-arena").mkdir()
    (tmp_path / "lmsys-chatbot-arena" / "test.csv").write_text("id\n")
    assert find_test_file(tmp_path) == tmp_path / "lmsys-chatbot-arena" / "test.csv"
    wsdm = tmp_path / "wsdm" / "competitions" / "wsdm-cup-multilingual-chatbot-arena"
    wsdm.mkdir(parents=True)
    (wsdm / "test.parquet").write_text("")
    assert find_test_file(tmp_path / "wsdm") == wsdm / "test.parquet"
    (tmp_path / "lmsys-chatbot-arena" / "test.parquet").write_text("")
    with pytest.raises(SystemExit):  # two candidates: --test decides
        find_test_file(tmp_path)
    assert "expected exactly one" in capsys.readouterr().err


def test_manylinux_platform_accepts_older_glibc_tags():
    assert compatible_platforms("manylinux_2_24_x86_64") == [
        *(f"manylinux_2_{minor}_x86_64" for minor in range(24, 4, -1)),
        "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    assert compatible_platforms("manylinux2014_x86_64")[0] == "manylinux_2_17_x86_64"
    assert "manylinux_2_24_x86_64" not in compatible_platforms("manylinux2014_x86_64")
    assert compatible_platforms("win_amd64") == ["win_amd64"]


def test_inference_packages_cover_what_predict_imports():
    """Every pinned distribution that `python -m lmsys.predict` loads (its command module, then the work in
    lmsys.prediction) is in INFERENCE_PACKAGES, so a bundle of the defaults lacks nothing that the image does not
    have."""
    code = ("import sys, importlib.metadata as md, lmsys.predict, lmsys.prediction; mods = {m.split('.')[0] for m in sys.modules}; "
            "dists = md.packages_distributions(); print('\\n'.join(sorted({d for m in mods for d in dists.get(m, [])})))")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    pinned = {line.split("==")[0].lower() for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    needed = {name.lower() for name in imported.stdout.split()} & pinned
    assert needed and needed <= {name.lower() for name in INFERENCE_PACKAGES}
    with pytest.raises(BundleError, match="no pin for inference package"):
        read_pins(REPO_ROOT / "requirements.txt", ["not-a-pinned-package"], [])
