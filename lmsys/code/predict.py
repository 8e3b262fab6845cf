"""Predict with a checkpoint: `accelerate launch lmsys/code/predict.py checkpoint=RUN_DIR/checkpoint
data.test_path=test.csv output=submission.csv [tta=false] ...`, the same as `python -m lmsys.predict`;
`--help` lists every option."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `import lmsys` without `pip install -e .`

from lmsys.predict import main

if __name__ == "__main__":
    main()
