"""Prediction micro-batches do not depend on the number of processes: each pair meets the batch it would meet in one
process, so a batch-dependent rounding (bf16, the CPU 4-bit GEMM) gives the same logits under DDP."""

from __future__ import annotations

import numpy as np
import pytest

from lmsys.data.batching import Batching, Example
from lmsys.evaluation.predict_loop import process_batches


def examples_of_lengths(lengths: list[int]) -> list[Example]:
    return [Example(pair_index=i, ids=np.arange(n, dtype=np.int32), swapped=False, target=None)
            for i, n in enumerate(lengths)]


def compositions(batches: list[list[Example]]) -> set[tuple[int, ...]]:
    return {tuple(sorted(ex.pair_index for ex in batch)) for batch in batches}


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("num_processes", [2, 3])
def test_every_process_count_runs_the_single_process_batches(packed, num_processes):
    lengths = np.random.default_rng(0).integers(5, 200, size=41).tolist()
    examples = examples_of_lengths(lengths)
    batching = Batching(packed=packed, max_tokens=400, row_tokens=200, batch_size=3, pad_id=0, padding_side="right")
    single = process_batches(examples, batching, 0, 1)
    shares = [process_batches(examples, batching, rank, num_processes) for rank in range(num_processes)]
    assert len(single) > 2 * num_processes  # enough batches for the ranks to differ
    assert compositions([b for share in shares for b in share]) == compositions(single)
    assert sum(len(share) for share in shares) == len(single)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # balanced in batch count
    assert max(lengths) in [len(ex.ids) for ex in single[0]]  # longest first: an out-of-memory error shows at once
