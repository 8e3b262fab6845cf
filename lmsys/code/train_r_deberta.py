"""Train a DeBERTa-v2/v3 (or mDeBERTa) cross-encoder: `accelerate launch lmsys/code/train_r_deberta.py --config-name NAME`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `import lmsys` without `pip install -e .`

from lmsys.config import Family
from lmsys.entry import train_entry

if __name__ == "__main__":
    train_entry(Family.deberta, Path(__file__).name)
