"""Pack everything a Kaggle notebook without internet needs to predict into one folder (one Kaggle dataset).

    python -m lmsys.kaggle bundle checkpoint=CKPT output_dir=DIR [python_version=3.11]
        [platform=manylinux_2_35_x86_64] [skip_packages=[torch,numpy,...]] [extra_pins=[name==version,...]]
        [predict_args=[quantization=int8,compute_dtype=float16]] [wheelhouse=DIR] [overwrite=true]
        [base_model_path=DIR]

DIR/
  checkpoint/      the checkpoint (adapter + head + tokenizer + spec, or a merged / pre-quantized export); an
                   adapter checkpoint's spec points at ../base_model, wherever Kaggle mounts the dataset
  base_model/      the base model directory of an adapter checkpoint (Kaggle has no hub)
  wheels/          the lmsys wheel (`pip wheel --no-deps`) and, for python_version and platform, the wheels of the
                   requirements.txt pins that inference imports and of their dependencies, less skip_packages
                   (already in Kaggle's image)
  inference.py     installs wheels/ with `pip install --no-index --find-links`, then runs `python -m lmsys.predict`
  inference.ipynb  a one-cell notebook that runs inference.py
  bundle.json      what was packed: pins, sizes, predict_args

Wheels are downloaded with `pip download --only-binary=:all: --no-deps` one at a time (a package that publishes
only a source distribution is built here, kept when pure Python), so a pin without a wheel for the platform fails
naming that package; then, transitively, the dependencies each wheel declares (at the
version installed here when it fits, else the newest that does), less skip_packages and what only they need:
torch is skipped with its dependencies (its CUDA wheels are the image's). A manylinux platform stands for every
older glibc too (PEP 600: manylinux_2_35 accepts manylinux_2_34 ... manylinux_2_17 = manylinux2014, manylinux2010,
manylinux1); the default is Kaggle's image (Ubuntu 22.04, glibc 2.35; bitsandbytes ships manylinux_2_24 wheels
only, which platform=manylinux2014_x86_64 alone would refuse). `wheelhouse=DIR` downloads from DIR only (no index:
offline). inference.py installs the wheels with pip resolving against the image and the bundle only;
`extra_pins=[name==version]` adds a package by hand.
"""

from __future__ import annotations

import dataclasses
import email.parser
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING
from packaging.markers import default_environment
from packaging.requirements import Requirement

from lmsys.cli import CommandError, key_value, one_line, parse_config, run_command
from lmsys.config import ConfigError
from lmsys.modeling.checkpoint import SPEC_FILE, read_spec, with_base_model
from lmsys.output_paths import base_model_inputs, check_output_paths
from lmsys.prediction_config import PredictConfig
from lmsys.runs import write_file

REPO_ROOT = Path(__file__).resolve().parents[2]
# Distributions (requirements.txt names) that `python -m lmsys.predict` imports; the rest are training tools.
INFERENCE_PACKAGES = [
    "torch", "transformers", "tokenizers", "safetensors", "sentencepiece", "peft", "accelerate", "bitsandbytes",
    "hydra-core", "omegaconf", "numpy", "pandas", "pyarrow", "scikit-learn", "matplotlib", "psutil", "tqdm",
]
# In Kaggle's GPU image already. Its CUDA torch must stay (a CUDA torch wheel is ~0.9 GB, plus ~3 GB of nvidia-*
# wheels); the others are long-stable APIs. The Hugging Face stack, bitsandbytes and hydra/omegaconf travel pinned.
KAGGLE_IMAGE_PACKAGES = ["torch", "numpy", "pandas", "pyarrow", "scikit-learn", "matplotlib", "psutil", "tqdm",
                         "sentencepiece"]
BASE_MODEL_SKIP = ("*.gguf", "*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", ".git*", "original")  # safetensors only
BUNDLE_BASE = "base_model"
MANIFEST = "bundle.json"


class BundleError(CommandError):
    """Something the bundle cannot be made of: the message names the file, directory or package."""


@dataclass
class BundleConfig:
    checkpoint: str = MISSING  # an adapter checkpoint, a merged export or a pre-quantized export
    output_dir: str = MISSING  # the folder to create and upload as one Kaggle dataset
    base_model_path: str | None = None  # an adapter checkpoint's base where it is now (trained where it was elsewhere)
    python_version: str = "3.11"  # of the Kaggle image
    platform: str = "manylinux_2_35_x86_64"  # Kaggle's image; older manylinux tags are accepted with it
    requirements: str = str(REPO_ROOT / "requirements.txt")  # the pins
    inference_packages: list[str] = field(default_factory=lambda: list(INFERENCE_PACKAGES))
    skip_packages: list[str] = field(default_factory=lambda: list(KAGGLE_IMAGE_PACKAGES))
    extra_pins: list[str] = field(default_factory=list)  # name==version of dependencies the image lacks
    predict_args: list[str] = field(default_factory=list)  # key=value for lmsys.predict, checked now
    wheelhouse: str | None = None  # download from this folder only (pip --no-index --find-links)
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_predict_args(self.predict_args)


def check_predict_args(args: list[str]) -> None:
    """Bundle-time check of the arguments inference.py will pass to lmsys.predict: a typo fails here, not on Kaggle."""
    fixed = ["checkpoint=c", "data.test_path=t.csv", "output=o.csv"]
    taken = [arg for arg in args if arg.split("=", 1)[0] in ("checkpoint", "data.test_path", "output")]
    if taken:
        raise ConfigError(f"predict_args: {taken[0]} is set by inference.py")
    try:
        parse_config(PredictConfig, [*fixed, *args])
    except Exception as err:  # any of the config errors: say which argument list it came from
        raise ConfigError(f"predict_args: {one_line(err)}") from err


def read_pins(requirements: Path, wanted: list[str], skipped: list[str]) -> list[str]:
    """The `name==version` lines of the wanted, not skipped distributions; every wanted one must be pinned."""
    if not requirements.is_file():
        raise BundleError(f"{requirements}: no such requirements file")
    pins = {}
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            if not sep:
                raise BundleError(f"{requirements}: {line!r} is not pinned (name==version)")
            pins[canonical(name)] = f"{name.strip()}=={version.strip()}"
    needed = [canonical(name) for name in wanted if canonical(name) not in {canonical(s) for s in skipped}]
    missing = [name for name in needed if name not in pins]
    if missing:
        raise BundleError(f"{requirements}: no pin for inference package(s) {missing}")
    return [pins[name] for name in needed]


def canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


LEGACY_MANYLINUX = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}  # their glibc minor (PEP 600)
MANYLINUX = re.compile(r"^manylinux_2_(\d+)_(\w+)$")


def compatible_platforms(platform: str) -> list[str]:
    """The platform and every older manylinux tag a system of that glibc runs (pip 23 expands only the legacy
    aliases itself); other platforms (macosx, win, linux) as given."""
    legacy = platform.split("_", 1)
    if legacy[0] in LEGACY_MANYLINUX and len(legacy) == 2:
        platform = f"manylinux_2_{LEGACY_MANYLINUX[legacy[0]]}_{legacy[1]}"
    match = MANYLINUX.match(platform)
    if not match:
        return [platform]
    glibc, arch = int(match.group(1)), match.group(2)
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc, 4, -1)]
    return tags + [f"{alias}_{arch}" for alias, minor in LEGACY_MANYLINUX.items() if minor <= glibc]


def download_wheels(pins: list[str], wheel_dir: Path, config: BundleConfig) -> list[str]:
    """The pins' wheels and, transitively, their dependencies' (the Requires-Dist of each downloaded wheel, for
    python_version on Linux), less skip_packages and what only they need: what `pip install --no-index` needs
    beside Kaggle's image. Returns every pin downloaded, the given ones first."""
    skipped = {canonical(name) for name in config.skip_packages}
    queue, done = list(pins), {}
    while queue:
        pin = queue.pop(0)
        name = canonical(Requirement(pin).name)
        if name in done or name in skipped:
            continue
        done[name] = pin
        wheel = download_wheel(pin, wheel_dir, config)
        queue += [dependency_pin(req) for req in wheel_requirements(wheel, config.python_version)
                  if canonical(req.name) not in done and canonical(req.name) not in skipped]
    return list(done.values())


def wheel_requirements(wheel: Path, python_version: str) -> list[Requirement]:
    """The wheel's unconditional requirements (no extras) whose markers hold for Linux and `python_version`."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        message = email.parser.Parser().parsestr(archive.read(metadata).decode("utf-8"))
    environment = {**default_environment(), "python_version": python_version,
                   "python_full_version": f"{python_version}.0", "sys_platform": "linux", "platform_system": "Linux",
                   "extra": ""}
    requirements = [Requirement(line) for line in message.get_all("Requires-Dist") or []]
    return [req for req in requirements if req.marker is None or req.marker.evaluate(environment)]


def dependency_pin(requirement: Requirement) -> str:
    """The version installed here (the one lmsys runs and is tested with) when it satisfies the requirement, else
    the requirement itself (pip then takes the newest wheel that does)."""
    try:
        installed = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is not None and requirement.specifier.contains(installed, prereleases=True):
        return f"{requirement.name}=={installed}"
    return f"{requirement.name}{requirement.specifier}"


def download_wheel(pin: str, wheel_dir: Path, config: BundleConfig) -> Path:
    """One wheel, `--no-deps` (download_wheels follows the dependencies); returns its path."""
    platforms = [arg for tag in compatible_platforms(config.platform) for arg in ("--platform", tag)]
    with tempfile.TemporaryDirectory(dir=wheel_dir) as fresh:
        command = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps",
                   "--disable-pip-version-check", "--python-version", config.python_version, *platforms, "-d", fresh,
                   pin]
        if config.wheelhouse:
            command += ["--no-index", "--find-links", config.wheelhouse]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0 and not build_pure_wheel(pin, Path(fresh), config):
            errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")] or ["(no message)"]
            raise BundleError(f"{pin}: no wheel for python {config.python_version} on {config.platform}"
                              f"{' in ' + config.wheelhouse if config.wheelhouse else ''} ({errors[-1]}); pick a "
                              f"version that has one, or skip_packages=[..., {Requirement(pin).name}] if the image "
                              f"has it")
        (wheel,) = Path(fresh).glob("*.whl")
        return Path(shutil.move(wheel, wheel_dir / wheel.name))


def build_pure_wheel(pin: str, directory: Path, config: BundleConfig) -> bool:
    """A wheel built here from the source distribution of a package that publishes no wheel (hydra's
    antlr4-python3-runtime 4.9.3), kept only when it is pure Python (`-none-any`: it runs on any platform)."""
    with tempfile.TemporaryDirectory() as build_dir:
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                   "--disable-pip-version-check", "-w", build_dir, pin]
        if config.wheelhouse:
            command += ["--no-index", "--find-links", config.wheelhouse]
        if subprocess.run(command, capture_output=True, text=True, check=False).returncode != 0:
            return False
        pure = [wheel for wheel in Path(build_dir).glob("*.whl") if wheel.name.endswith("-none-any.whl")]
        for wheel in pure:
            shutil.move(wheel, directory / wheel.name)
        return bool(pure)


def build_lmsys_wheel(wheel_dir: Path) -> Path:
    """`pip wheel --no-deps` from a copy of the sources (the build writes build/ and egg-info next to them), without
    build isolation: setuptools comes from this environment, not from an index."""
    if not (REPO_ROOT / "pyproject.toml").is_file():
        raise BundleError(f"{REPO_ROOT}: no pyproject.toml; bundle from an lmsys source checkout")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "lmsys-src"
        source.mkdir()
        for name in ("pyproject.toml", "requirements.txt", "README.md"):
            if (REPO_ROOT / name).is_file():
                shutil.copy2(REPO_ROOT / name, source / name)
        shutil.copytree(REPO_ROOT / "lmsys", source / "lmsys", ignore=shutil.ignore_patterns("__pycache__"))
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                   "--disable-pip-version-check", "-w", str(wheel_dir), str(source)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BundleError(f"building the lmsys wheel failed: {result.stderr.strip().splitlines()[-1:]}")
    return next(wheel_dir.glob("lmsys-*.whl"))


def copy_checkpoint(checkpoint: Path, target: Path, base_model_path: str | None) -> dict[str, str]:
    """The checkpoint into `target/checkpoint` and an adapter checkpoint's base (the spec's, or `base_model_path`)
    into `target/base_model`, the copied spec re-pointed at it. Returns where each came from (for bundle.json)."""
    spec = with_base_model(read_spec(checkpoint), checkpoint, base_model_path)  # names a missing file or base
    shutil.copytree(checkpoint, target / "checkpoint", ignore=shutil.ignore_patterns(".*"))
    origin = {"checkpoint": str(checkpoint.resolve())}
    if not spec.merged:
        base = Path(spec.base_model_path)
        copy_base_model(base, target / BUNDLE_BASE)
        if not list((target / BUNDLE_BASE).glob("*.safetensors")):
            raise BundleError(f"{base}: no safetensors weights in the base model directory")
        relocated = dataclasses.replace(spec, base_model_path=f"../{BUNDLE_BASE}")
        (target / "checkpoint" / SPEC_FILE).write_text(relocated.to_json())
        origin["base_model"] = str(base)
    return origin


def copy_base_model(base: Path, target: Path) -> None:
    """The model directory's own files (config, tokenizer, safetensors weights), not its subfolders: a
    Transformers model reads none, and one may hold anything (another export, onnx/, original/)."""
    skipped = set(shutil.ignore_patterns(*BASE_MODEL_SKIP)(str(base), [p.name for p in base.iterdir()]))
    target.mkdir()
    for path in sorted(base.iterdir()):
        if path.is_file() and path.name not in skipped:
            shutil.copy2(path, target / path.name)


def notebook() -> dict:
    """One code cell: run the bundle's inference.py (found under /kaggle/input) with this kernel's Python."""
    source = ["import glob, subprocess, sys\n",
              "scripts = glob.glob('/kaggle/input/*/inference.py')\n",
              "assert len(scripts) == 1, f'expected one bundle with inference.py under /kaggle/input, got {scripts}'\n",
              "subprocess.run([sys.executable, scripts[0]], check=True)\n"]
    return {"cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                       "source": source}],
            "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
            "nbformat": 4, "nbformat_minor": 5}


def write_bundle(config: BundleConfig) -> Path:
    checkpoint, output_dir = Path(config.checkpoint), Path(config.output_dir)
    check_bundle_output(config, checkpoint, output_dir)
    check_prediction_settings(checkpoint, config.base_model_path, config.predict_args)  # before any download
    pins = read_pins(Path(config.requirements), config.inference_packages, config.skip_packages) + config.extra_pins

    def produce(tmp: Path) -> None:
        tmp.mkdir()
        origin = copy_checkpoint(checkpoint, tmp, config.base_model_path)
        wheel_dir = tmp / "wheels"
        wheel_dir.mkdir()
        downloaded = download_wheels(pins, wheel_dir, config)
        build_lmsys_wheel(wheel_dir)
        shutil.copy2(Path(__file__).with_name("inference.py"), tmp / "inference.py")
        (tmp / "inference.ipynb").write_text(json.dumps(notebook(), indent=1) + "\n")
        (tmp / MANIFEST).write_text(json.dumps(manifest(tmp, config, downloaded, origin), indent=2) + "\n")

    write_file(output_dir, produce)
    return output_dir


def check_prediction_settings(checkpoint: Path, base_model_path: str | None, args: list[str]) -> None:
    """The checkpoint read as inference.py's lmsys.predict will read it, with predict_args: a max_length past the
    model's positions or too short for the input layout fails here, not on Kaggle. The base model is the one the
    bundle will carry (a base_model_path in predict_args names a Kaggle path, not checked here)."""
    from lmsys.builders import build_encoders, build_prediction_spec, build_tokenizer

    local = [arg for arg in args if not arg.startswith("base_model_path=")]
    here = [key_value("base_model_path", base_model_path)] if base_model_path else []
    settings = parse_config(PredictConfig, [key_value("checkpoint", checkpoint), "data.test_path=t.csv",
                                            "output=o.csv", *local, *here])
    try:
        spec = build_prediction_spec(str(checkpoint), settings)
        build_encoders(spec, build_tokenizer(checkpoint, spec.trust_remote_code))
    except ConfigError as err:
        raise ConfigError(f"predict_args: {one_line(err)}") from err


def check_bundle_output(config: BundleConfig, checkpoint: Path, output_dir: Path) -> None:
    """output_dir is not, does not hold and does not lie inside what the bundle is made of (the checkpoint, its base
    model, the requirements, the wheelhouse); an existing one is replaced only with overwrite=true, and only when it
    is a bundle (never another directory: the run dir around a checkpoint, a user's folder)."""
    inputs = {"checkpoint": checkpoint, **base_model_inputs({"checkpoint": checkpoint}, config.base_model_path),
              "requirements": config.requirements, "wheelhouse": config.wheelhouse}
    check_output_paths(inputs, {"output_dir": output_dir}, directory_outputs=frozenset({"output_dir"}))
    if output_dir.exists() and not config.overwrite:
        raise FileExistsError(f"{output_dir} exists; choose another output_dir or pass overwrite=true")
    if output_dir.exists() and not (output_dir / MANIFEST).is_file():
        raise BundleError(f"output_dir={output_dir} is not a bundle (no {MANIFEST}); overwrite=true replaces only a "
                          f"bundle, never another directory")


def manifest(bundle: Path, config: BundleConfig, pins: list[str], origin: dict[str, str]) -> dict:
    sizes = {part.name: directory_bytes(part) for part in sorted(bundle.iterdir())}
    return {"python_version": config.python_version, "platform": config.platform, "pins": pins,
            "skipped": config.skip_packages, "wheels": sorted(p.name for p in (bundle / "wheels").glob("*.whl")),
            "predict_args": config.predict_args, "origin": origin, "bytes": sizes}


def directory_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


USAGE = __doc__.split("\n\n")[1]


def main(argv: list[str] | None = None) -> Path:
    return run_command(BundleConfig, USAGE, run_bundle, argv)


def run_bundle(config: BundleConfig) -> Path:
    output_dir = write_bundle(config)
    sizes = json.loads((output_dir / MANIFEST).read_text())["bytes"]
    parts = ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in sizes.items())
    print(f"wrote {output_dir} ({sum(sizes.values()) / 2**20:.1f} MiB: {parts}); upload it as one Kaggle dataset")
    return output_dir


if __name__ == "__main__":
    main()
