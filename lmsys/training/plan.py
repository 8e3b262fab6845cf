"""Which examples each process runs in each micro-batch of each optimizer update.

Every process computes the same global plan from the seed, so all ranks agree without communication: pairs are
shuffled (in length-grouped buckets by default), swapped as the augmentation mode says (each orientation in every one of
the split's formats), split into updates, and each update's examples are dealt to the ranks (every rank gets at least one) and cut into micro-batches by
`lmsys.data.batching.micro_batches` (token budget when packed, count when padded; the builder sizes `batch_size`
for the examples one pair contributes).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from lmsys.config import SwapMode
from lmsys.data.batching import Example, micro_batches
from lmsys.data.dataset import EncodedSplit
from lmsys.training.settings import LoopSettings

BUCKET_UPDATES = 16  # updates per length-sorted bucket: long enough to group lengths, short enough to stay random


@dataclass(frozen=True)
class Update:
    micro_batches: list[list[Example]]  # this rank's
    n_examples: int  # over all ranks: every example's loss is weighted 1 / n_examples


def epoch_plan(split: EncodedSplit, epoch: int, settings: LoopSettings, rank: int, world_size: int) -> list[Update]:
    rng = np.random.default_rng([settings.seed, epoch])
    per_update = settings.pairs_per_update
    lengths = np.array([len(ex.ids) for ex in split.forward])
    order = _length_grouped_order(lengths, per_update, rng) if settings.group_by_length else rng.permutation(len(split))
    flips = rng.random(len(split)) < 0.5  # drawn every epoch so that the stream of randomness is mode-independent
    updates = []
    for start in range(0, len(order), per_update):
        per_rank = _deal(list(order[start : start + per_update]), world_size)
        n_total = sum(len(_orient(split, i, settings.swap, flips)) for ranked in per_rank for i in ranked)
        mine = [ex for i in per_rank[rank] for ex in _orient(split, i, settings.swap, flips)]
        updates.append(Update(micro_batches(mine, settings.batching), n_total))
    return updates


def iterate_updates(
    split: EncodedSplit, settings: LoopSettings, rank: int, world_size: int, start: int = 0
) -> Iterator[Update]:
    """Updates `start`..`total_updates` across epochs, each epoch with its own shuffle (so a resumed run sees the
    same data in the same order as an uninterrupted one)."""
    produced, epoch = 0, 0
    while produced < settings.total_updates:
        for update in epoch_plan(split, epoch, settings, rank, world_size)[: settings.total_updates - produced]:
            if produced >= start:
                yield update
            produced += 1
        epoch += 1


def _length_grouped_order(lengths: np.ndarray, pairs_per_update: int, rng: np.random.Generator) -> np.ndarray:
    """Shuffle, sort by length inside buckets of BUCKET_UPDATES updates, then shuffle the updates."""
    order = rng.permutation(len(lengths))
    bucket = pairs_per_update * BUCKET_UPDATES
    for start in range(0, len(order), bucket):
        part = order[start : start + bucket]
        order[start : start + bucket] = part[np.argsort(-lengths[part], kind="stable")]
    updates = [order[s : s + pairs_per_update] for s in range(0, len(order), pairs_per_update)]
    last = updates.pop() if len(updates) > 1 and len(updates[-1]) < pairs_per_update else None
    updates = [updates[i] for i in rng.permutation(len(updates))] + ([last] if last is not None else [])
    return np.concatenate(updates) if updates else order


def _deal(indices: list[int], world_size: int) -> list[list[int]]:
    """Round-robin over ranks; a short last update repeats its first pairs so that no rank is left without work."""
    while len(indices) < world_size:
        indices = indices + indices[: world_size - len(indices)]
    return [indices[rank::world_size] for rank in range(world_size)]


def _orient(split: EncodedSplit, index: int, swap: SwapMode, flips: np.ndarray) -> list[Example]:
    """The pair's examples in this update: each selected orientation in every format of the split (format
    augmentation), all on the same rank and in the same update; a random flip is shared by the formats."""
    if swap == SwapMode.full:
        orientations = [False, True]
    else:
        orientations = [swap == SwapMode.random and bool(flips[index])]
    return [split.example(index, swapped, k) for k in range(split.n_formats) for swapped in orientations]
