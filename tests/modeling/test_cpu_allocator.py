"""keep_freed_memory: set once per process on glibc, never over the user's own malloc variables, and set by
build_model for a CPU model. Each case in a fresh interpreter (mallopt holds for the whole process). Its effect
(page faults and tokens/s of a real training step) is measured in docs/measurements.md, not timed here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROGRAM = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from lmsys.modeling.cpu_allocator import keep_freed_memory
print(keep_freed_memory(), keep_freed_memory())
"""


def run(**env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    return subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, check=True,
                          env={**environment, **env})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_set_once_per_process_and_logged():
    done = run()
    assert done.stdout.split() == ["True", "False"]
    assert "malloc keeps freed blocks up to 32 MB in the heap" in done.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
@pytest.mark.parametrize("variable", [{"MALLOC_MMAP_THRESHOLD_": "131072"},
                                      {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}])
def test_the_users_malloc_settings_win(variable):
    done = run(**variable)
    assert done.stdout.split() == ["False", "False"] and "malloc keeps" not in done.stderr


def test_build_model_sets_it_for_a_cpu_model(tiny_models, monkeypatch):
    import tiny

    from lmsys import builders

    calls = []
    monkeypatch.setattr(builders, "keep_freed_memory", lambda: calls.append(True))
    tiny.build_preference_model(tiny_models["llama"], "llama", "none")
    assert calls == [True]
