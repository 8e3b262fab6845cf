"""Shared fixtures: tiny random models built once per session, the Hydra ConfigStore, no network."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
for _path in (str(TESTS_DIR), str(REPO_ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

# Nothing in the suite may reach the network: every model and tokenizer is built in-process.
# One intra-op thread (subprocesses inherit it): on a shared 2-core machine two spinning threads per process are
# up to 20x slower for these tiny models; set OMP_NUM_THREADS to change it.
# compute_dtype=auto on CPU pinned to float32 (no probe, no cache written): the suite's tolerances are float32 ones
# whatever this machine's faster dtype; tests/modeling/test_compute_dtype.py lifts the pin.
for _variable, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                          ("WANDB_MODE", "disabled"), ("TOKENIZERS_PARALLELISM", "false"), ("OMP_NUM_THREADS", "1"),
                          ("LMSYS_AUTO_CPU_DTYPE", "float32")):
    os.environ.setdefault(_variable, _value)

import torch  # after the thread and offline variables above are set

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from lmsys.config import register_configs  # likewise

register_configs()

import background  # likewise
import tiny


def pytest_configure(config) -> None:
    background.create_root(config)


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: only the jobs of tests that will run are started
def pytest_collection_modifyitems(session, config, items) -> None:
    """The tests of background jobs (tests/background.py) last, and their jobs started now: a minute or more of one
    busy core each, run beside the rest of the suite."""
    waiting = [item for item in items if item.path.name in background.JOBS]
    items[:] = [item for item in items if item not in waiting] + waiting
    if not config.option.collectonly:
        for test_file in dict.fromkeys(item.path.name for item in waiting):
            background.start(test_file)


def pytest_sessionfinish(session, exitstatus) -> None:
    background.stop(session.config)


@pytest.fixture(autouse=True)
def lmsys_logger_propagates(monkeypatch):
    """Commands run in-process call setup_logging, which stops the "lmsys" logger propagating (its own handlers
    print): every test starts with it propagating again, so that caplog sees its records whatever ran before."""
    monkeypatch.setattr(logging.getLogger("lmsys"), "propagate", True)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """kind -> directory of a tiny random model (config.json, model.safetensors, tokenizer) for every family."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {kind: tiny.save_tiny_model(kind, root / kind) for kind in tiny.BUILDERS}


@pytest.fixture(scope="session")
def arena_files(tmp_path_factory) -> dict[str, Path]:
    """Kaggle-schema train and valid CSV files with disjoint ids."""
    root = tmp_path_factory.mktemp("arena")
    train, valid = root / "train.csv", root / "valid.csv"
    tiny.arena_frame(12, seed=0).to_csv(train, index=False)
    tiny.arena_frame(6, seed=1, start_id=1000).to_csv(valid, index=False)
    return {"train": train, "valid": valid}
