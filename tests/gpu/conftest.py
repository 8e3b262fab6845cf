"""tests/gpu: the CUDA paths (`pytest -m gpu`, run by scripts/gpu_check.sh); every test skips without CUDA."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items) -> None:
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
