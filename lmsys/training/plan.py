"""Which examples each process runs in each micro-batch of each optimizer update.

Every process computes the same global plan from the seed, so all ranks agree without communication: pairs are
shuffled (in length-grouped buckets by default), swapped as the augmentation mode says, split into updates, and each update's
examples are dealt to the ranks (every rank gets at least one) and cut into micro-batches by token budget
(packed) or by count (padded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lmsys.config import SwapMode
from lmsys.data.batching import Example, fill_by_count, fill_packed
from lmsys.data.dataset import EncodedSplit

BUCKET_UPDATES = 16  # updates per length-sorted bucket: long enough to group lengths, short enough to stay random


@dataclass(frozen=True)
class Batching:
    packed: bool
    max_tokens: int  # packed: tokens per micro-batch
    row_tokens: int  # packed: tokens per row of a micro-batch
    batch_size: int  # padded: pairs per micro-batch
    group_by_length: bool = True  # False: a plain random order
    attention_width: float | None = None  # packed: see lmsys.modeling.families.attention_width


@dataclass(frozen=True)
class Update:
    micro_batches: list[list[Example]]  # this rank's
    n_examples: int  # over all ranks: every example's loss is weighted 1 / n_examples


def updates_per_epoch(n_pairs: int, pairs_per_update: int) -> int:
    return math.ceil(n_pairs / pairs_per_update)


def epoch_plan(
    split: EncodedSplit,
    epoch: int,
    seed: int,
    pairs_per_update: int,  # over all ranks
    swap: SwapMode,
    batching: Batching,
    rank: int,
    world_size: int,
) -> list[Update]:
    rng = np.random.default_rng([seed, epoch])
    lengths = np.array([len(ex.ids) for ex in split.forward])
    order = _length_grouped_order(lengths, pairs_per_update, rng) if batching.group_by_length else rng.permutation(len(split))
    flips = rng.random(len(split)) < 0.5  # drawn every epoch so that the stream of randomness is mode-independent
    updates = []
    for start in range(0, len(order), pairs_per_update):
        chunk = order[start : start + pairs_per_update]
        per_rank = _deal(list(chunk), world_size)
        examples = [_orient(split, idx, swap, flips) for idx in per_rank[rank]]
        n_total = sum(len(_orient(split, i, swap, flips)) for ranked in per_rank for i in ranked)
        flat = [ex for group in examples for ex in group]
        updates.append(Update(_micro_batches(flat, batching, swap), n_total))
    return updates


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
    if swap == SwapMode.full:
        return [split.example(index, False), split.example(index, True)]
    flip = swap == SwapMode.random and bool(flips[index])
    return [split.example(index, flip)]


def _micro_batches(examples: list[Example], batching: Batching, swap: SwapMode) -> list[list[Example]]:
    if batching.packed:
        groups = fill_packed([len(ex.ids) for ex in examples], batching.max_tokens, batching.row_tokens,
                             batching.attention_width)
    else:
        per_batch = batching.batch_size * (2 if swap == SwapMode.full else 1)
        groups = fill_by_count(len(examples), per_batch)
    return [[examples[i] for i in group] for group in groups]
