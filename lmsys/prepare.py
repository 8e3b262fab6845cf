"""Prepare training data from many sources: `python -m lmsys.prepare inputs=[FILE,...] output_dir=DIR
[sources=[NAME,...]] [k_folds=5] [seed=0] [strict=true] [tokenizer_path=DIR] [max_length=1600]
[folds_from=EARLIER/train.parquet]`.

One train.parquet (with source and prompt-grouped stratified folds), unlabeled.parquet, duplicates.csv,
rejects.csv (lenient mode) and report.md; see lmsys/prep/prepare.py for every output.
"""

from __future__ import annotations

from lmsys.cli import run_command
from lmsys.prep.config import PrepareConfig
from lmsys.prep.prepare import run_prepare


def main(argv: list[str] | None = None) -> None:
    run_command(PrepareConfig, __doc__, run_prepare, argv)


if __name__ == "__main__":
    main()
