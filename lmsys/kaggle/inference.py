"""Kaggle inference from an lmsys bundle: install the bundled wheels without the network, predict, write the
submission. Copied into every bundle by `python -m lmsys.kaggle bundle`; it imports nothing of lmsys before
installing it, and runs with the interpreter that starts it.

    python inference.py [--test PATH] [--out PATH] [--skip-install] [key=value ...]

--test defaults to the only */test.csv or */test.parquet under /kaggle/input (the competition's: LMSYS, WSDM), --out to
/kaggle/working/submission.csv; key=value arguments go to `python -m lmsys.predict` after those the bundle was
built with (bundle.json: predict_args). With two or more GPUs and no device_map, one process runs per GPU
(`accelerate launch`), each predicting its share of the rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

BUNDLE = Path(__file__).resolve().parent
KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_WORKING = Path("/kaggle/working")


def install(wheel_dir: Path) -> None:
    """The dependency wheels (their own dependencies resolved against the image and the bundle, never an index),
    then lmsys itself without dependencies: its requirement list also names training-only tools."""
    wheels = sorted(wheel_dir.glob("*.whl"))
    own = [w for w in wheels if w.name.startswith("lmsys-")]
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheel_dir),
           "--disable-pip-version-check", "--quiet"]
    if len(own) != 1:
        fail(f"{wheel_dir}: expected one lmsys wheel, found {[w.name for w in own]}")
    others = [w for w in wheels if w not in own]
    if others:
        subprocess.run([*pip, *map(str, others)], check=True)
    subprocess.run([*pip, "--no-deps", "--force-reinstall", str(own[0])], check=True)


def find_test_file(input_dir: Path) -> Path:
    """The competition's test file: LMSYS's test.csv or WSDM's test.parquet, mounted at /kaggle/input/<slug>/ or
    /kaggle/input/competitions/<slug>/."""
    found = sorted(path for pattern in ("*/test.csv", "*/test.parquet", "competitions/*/test.csv",
                                        "competitions/*/test.parquet") for path in input_dir.glob(pattern))
    if len(found) != 1:
        fail(f"expected exactly one */test.csv or */test.parquet under {input_dir}, found {[str(p) for p in found]}; "
             f"add the competition to the notebook or pass --test PATH")
    return found[0]


def fail(message: str) -> None:
    """Bad input as every lmsys command reports it: one line, exit status 2 (this script imports no lmsys)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def quoted(key: str, path: Path) -> str:
    """`key='path'`, read back by lmsys.predict as written (a local path with ' #' or ': '); lmsys.cli.key_value's
    rule, restated here: this script imports nothing of lmsys before installing it."""
    text = str(path).replace("'", "''")
    return f"{key}='{text}'"


def gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


def predict_command(bundle: Path, test: Path, out: Path, args: list[str], n_gpus: int) -> list[str]:
    """lmsys.predict with the bundle's predict_args then `args` (a key given twice: the later wins)."""
    manifest = json.loads((bundle / "bundle.json").read_text())
    predict = ["-m", "lmsys.predict", quoted("checkpoint", bundle / "checkpoint"), quoted("data.test_path", test),
               quoted("output", out), *manifest["predict_args"], *args]
    device_maps = [arg.partition("=")[2].strip() for arg in predict if arg.startswith("device_map=")]
    splits_one_model = bool(device_maps) and device_maps[-1] not in ("null", "None", "~", "")  # the later wins
    if n_gpus > 1 and not splits_one_model:
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n_gpus), *predict]
    return [sys.executable, *predict]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--test", type=Path, default=None, help="test.csv (default: the only one under /kaggle/input)")
    parser.add_argument("--out", type=Path, default=KAGGLE_WORKING / "submission.csv")
    parser.add_argument("--skip-install", action="store_true", help="the bundle's wheels are installed already")
    known, rest = parser.parse_known_args(argv)
    test = known.test or find_test_file(KAGGLE_INPUT)
    if not known.skip_install:
        install(BUNDLE / "wheels")
    command = predict_command(BUNDLE, test, known.out, rest, gpu_count())
    print("running:", " ".join(command), flush=True)
    raise SystemExit(subprocess.run(command, check=False).returncode)


if __name__ == "__main__":
    main()
