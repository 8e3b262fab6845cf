"""scripts/lora_bench.py runs against today's LoRA kernel and prints what it says: the tables it prints for a tiny
token count (the numbers' speed is not asserted; their arithmetic column is)."""

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "lora_bench.py"


def load_script():
    spec = importlib.util.spec_from_file_location("lora_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tables_name_every_projection_with_its_added_arithmetic(capsys):
    bench = load_script()
    bench.projection_table(tokens=16, rank=16, repeats=1, dtype=torch.float32)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in capsys.readouterr().out.splitlines()[2:]}
    assert list(rows) == list(bench.PROJECTIONS)
    # 1.5 (R / N + r / in): q, k, v 1.5 (48 / 960 + 16 / 576); gate, up 1.5 (32 / 3072 + 16 / 576)
    assert rows["q, k, v"].endswith("| +11.7% |") and rows["gate, up"].endswith("| +5.7% |")
    bench.product_table("gate, up", tokens=16, rank=16, repeats=1, dtype=torch.float32)
    products = [line.split(" | ")[0].lstrip("| ") for line in capsys.readouterr().out.strip().splitlines()[2:]]
    assert products == list(bench.rank_products("gate, up", 16, 16, torch.float32))
