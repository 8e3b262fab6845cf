"""Write the synthetic default dataset (train.csv, valid.csv in the Kaggle schema; see lmsys/prep/synthetic.py):
`python -m lmsys.synthetic out=data/default [n_train=2000] [n_valid=400] [seed=0]`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from lmsys.cli import run_command
from lmsys.config import require
from lmsys.logs import setup_logging
from lmsys.prep.synthetic import write_splits

log = logging.getLogger("lmsys")


@dataclass
class SyntheticConfig:
    out: str = "data/default"
    n_train: int = 2000
    n_valid: int = 400
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.n_train >= 1 and self.n_valid >= 1, "n_train and n_valid must be >= 1")


def run_synthetic(config: SyntheticConfig) -> None:
    setup_logging()
    for path in write_splits(config.out, config.n_train, config.n_valid, config.seed).values():
        log.info("wrote %s", path)


def main(argv: list[str] | None = None) -> None:
    run_command(SyntheticConfig, __doc__, run_synthetic, argv)


if __name__ == "__main__":
    main()
