"""The `key=value` commands check their arguments before their work is imported: --help and a typo answer without
torch, transformers, peft, bitsandbytes or TRL loaded (together ~10 s to import on the 2-core CI machine)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmsys.cli import key_value, parse_config
from lmsys.config import ConfigError
from lmsys.prediction_config import PredictConfig

COMMANDS = {"lmsys.predict": "PredictConfig", "lmsys.pseudo_label": "PseudoLabelConfig",
            "lmsys.export": "ExportConfig", "lmsys.generate": "GenerateConfig", "lmsys.warmup": "WarmupConfig"}
HEAVY = ["bitsandbytes", "peft", "torch", "transformers", "trl"]


def test_the_command_modules_load_none_of_the_heavy_packages():
    code = ("import importlib, sys\n"
            f"for name in {sorted(COMMANDS)!r}: importlib.import_module(name)\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("command", ["lmsys.export", "lmsys.pseudo_label"])
def test_help_shows_the_usage(command):  # predict's, generate's and warmup's: in their own tests
    shown = subprocess.run([sys.executable, "-m", command, "--help"], capture_output=True, text=True, check=False)
    assert shown.returncode == 0 and f"python -m {command}" in shown.stdout


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - {"lmsys.predict"}))  # predict's: test_predict_parallel
def test_a_typo_is_one_line_naming_the_schema(command):
    typo = subprocess.run([sys.executable, "-m", command, "tyop=1"], capture_output=True, text=True, check=False)
    assert typo.returncode == 2
    assert typo.stderr.strip().splitlines()[-1] == f"error: Key 'tyop' not in '{COMMANDS[command]}'"


@pytest.mark.parametrize(("argument", "hint"), [("formats=[pab", False), ("predict_args=[formats=[papb]]", True)])
def test_a_value_that_is_no_yaml_is_one_line_naming_the_argument(argument, hint):
    """OmegaConf's command-line reader raised yaml's ParserError through every command (a 30-line traceback, exit
    1); a list of settings that holds a list is the natural way to write bundle's predict_args."""
    done = subprocess.run([sys.executable, "-m", "lmsys.kaggle", "bundle", "checkpoint=x", "output_dir=y", argument],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith(f"error: '{argument}' is not key=value with a YAML value (expected ',' or ']'")
    assert ("predict_args=['formats=[pab,papb]']" in done.stderr) == hint


def test_a_path_that_yaml_would_cut_or_map_is_refused_with_its_quoting():
    """`data.test_path=/d/v #2/test.csv` arrived as /d/v (a comment), `/d/run: 2/t.csv` as a mapping: the errors
    named a path the user never gave. The quoting the error shows keeps the path whole, backslashes included (YAML's
    double quotes would read `\n` as a newline)."""
    for value in ("/d/v #2/test.csv", "/d/run: 2/test.csv", "#2.csv", "/d/run:", r"C:\new: x\o.csv", "it's #1"):
        with pytest.raises(ConfigError, match=r"YAML would read '#' as a comment or ': ' as a mapping; quote the value "
                                              r"\(single quotes keep it as written\): ") as refused:
            parse_config(PredictConfig, ["checkpoint=c", f"data.test_path={value}", "output=o.csv"])
        shown = str(refused.value).split("as written): ", 1)[1].strip('"')
        assert shown == key_value("data.test_path", value)
        assert parse_config(PredictConfig, ["checkpoint=c", shown, "output=o.csv"]).data.test_path == value
    quoted = parse_config(PredictConfig, ["checkpoint=c", 'data.test_path="/d/v #2/t.csv"', 'output="/d/run: 2.csv"'])
    assert (quoted.data.test_path, quoted.output) == ("/d/v #2/t.csv", "/d/run: 2.csv")
    assert parse_config(PredictConfig, ["checkpoint=c", "data.test_path=/d/v#2:x.csv", "output=o.csv"]).data.test_path \
        == "/d/v#2:x.csv"  # no space before '#', none after ':': YAML reads them as written


@pytest.mark.parametrize(("command", "argument", "shown"), [
    (["lmsys.kaggle", "bundle", "checkpoint=x", "output_dir=y"], "predict_args=[tta: false]", "{'tta': False}"),
    (["lmsys.kaggle", "bundle", "checkpoint=x", "output_dir=y"], "predict_args=[[formats=papb]]", "['formats=papb']"),
    (["lmsys.prepare", "output_dir=y"], "inputs=[x: 1]", "{'x': 1}"),
    (["lmsys.soup", "output_dir=y"], "checkpoints=[a: b, c]", "{'a': 'b'}"),
])
def test_a_mapping_or_a_list_inside_a_list_of_values_is_one_line(command, argument, shown):
    """OmegaConf lets them into a list of strings: each command then failed with its own traceback (exit 1)."""
    done = subprocess.run([sys.executable, "-m", *command, argument], capture_output=True, text=True, check=False)
    key = argument.partition("=")[0]
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"error: {key}: a list of plain values, got {shown} in it (a setting is written "
                                  f"key=value, not key: value")


def test_the_training_config_refuses_them_too():
    from test_config import compose_config

    from lmsys.config import ConfigError, validated_config

    with pytest.raises(ConfigError, match=r"^data.formats: a list of plain values, got \['pab'\] in it"):
        validated_config(compose_config("conf_r_llama_smol", ("data.formats=[[pab]]",)))


def test_no_docstring_loses_a_line_to_a_backslash():
    """A usage line ending in a single backslash inside a docstring joins the next line in the help a command prints
    (its module docstring): each docstring has as many lines as its source."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    joined = []
    for path in sorted([*root.glob("lmsys/**/*.py"), *root.glob("scripts/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
                doc = body[0].value
                text = doc.value if isinstance(doc, ast.Constant) else None
                if isinstance(text, str) and text.count("\n") != doc.end_lineno - doc.lineno:
                    joined.append(f"{path.relative_to(root)}:{doc.lineno}")
    assert joined == []
