"""The schema of `python -m lmsys.prepare`: every `key=value` argument is checked against it (lmsys/cli.py), so a
misspelled or unknown option fails at once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING

from lmsys.config import require


@dataclass
class PrepareConfig:
    inputs: list[str] = MISSING  # CSV or parquet files, in any accepted source format
    output_dir: str = MISSING
    sources: list[str] | None = None  # one source name per input; default: each file's stem
    k_folds: int = 5
    seed: int = 0  # fixes the A/B order of chosen/rejected rows and the fold split
    strict: bool = True  # false (lenient): skip bad rows, listing each with its reason in rejects.csv
    tokenizer_path: str | None = None  # local model dir for the length report; without it, words are counted
    max_length: int = 1600  # the training max_length whose truncation share the report gives
    # an earlier train.parquet (of this command) whose folds are kept: a pair whose prompt is there keeps that
    # prompt's fold, only new prompts are assigned, so out-of-fold files of runs on both versions stay comparable
    folds_from: str | None = None

    def __post_init__(self) -> None:
        require(len(self.inputs) > 0, "inputs must name at least one file")
        require(self.k_folds >= 2, "k_folds must be at least 2")
        require(self.max_length > 0, "max_length must be positive")
        require(
            self.sources is None or len(self.sources) == len(self.inputs),
            f"sources needs one name per input: {len(self.inputs)} inputs, "
            f"{0 if self.sources is None else len(self.sources)} sources",
        )
        require(
            self.sources is None or all(name.strip() for name in self.sources), "sources must not hold empty names"
        )
        require(self.tokenizer_path is None or Path(self.tokenizer_path).is_dir(),
                f"tokenizer_path={self.tokenizer_path} is not a local directory (a model dir with its tokenizer; "
                f"nothing is downloaded)")
