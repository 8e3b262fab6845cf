"""Micro-batches from encoded pairs: padded or packed (padding-free) collation, token-budget grouping, and the
per-update plan for training (length-grouped shuffle, swap augmentation, sharding over processes)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmsys.config import PaddingSide
from lmsys.modeling.model import last_token_index


@dataclass(frozen=True)
class Example:
    """One encoded orientation of one pair; `pair_index` points into the split's pair list."""

    pair_index: int
    ids: np.ndarray  # (T,) int32
    swapped: bool
    target: tuple[float, float, float] | None


@dataclass
class Batch:
    input_ids: torch.Tensor  # (R, T)
    attention_mask: torch.Tensor | None  # (R, T) padded; None packed
    position_ids: torch.Tensor | None  # (R, T) packed: restart at 0 per pair; None padded
    pool_rows: torch.Tensor  # (N,)
    pool_cols: torch.Tensor  # (N,)
    targets: torch.Tensor | None  # (N, 3)
    pair_index: list[int]  # (N,)
    swapped: list[bool]  # (N,)

    @property
    def n_real_tokens(self) -> int:
        return int(self.input_ids.numel() if self.attention_mask is None else self.attention_mask.sum())

    def model_inputs(self, device: torch.device) -> dict[str, torch.Tensor | None]:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return {
            "input_ids": move(self.input_ids), "attention_mask": move(self.attention_mask),
            "position_ids": move(self.position_ids), "pool_rows": move(self.pool_rows),
            "pool_cols": move(self.pool_cols),
        }


def collate(examples: list[Example], packed: bool, pad_id: int, padding_side: PaddingSide) -> Batch:
    return collate_packed(examples) if packed else collate_padded(examples, pad_id, padding_side)


def collate_packed(examples: list[Example]) -> Batch:
    """All examples in one row (1, sum of lengths); positions restart at 0 per pair, no attention mask."""
    ids = np.concatenate([np.asarray(ex.ids, dtype=np.int64) for ex in examples])
    positions = np.concatenate([np.arange(len(ex.ids), dtype=np.int64) for ex in examples])
    ends = np.cumsum([len(ex.ids) for ex in examples]) - 1
    return Batch(
        input_ids=torch.from_numpy(ids)[None],
        attention_mask=None,
        position_ids=torch.from_numpy(positions)[None],
        pool_rows=torch.zeros(len(examples), dtype=torch.long),
        pool_cols=torch.from_numpy(ends),
        targets=_targets(examples),
        pair_index=[ex.pair_index for ex in examples],
        swapped=[ex.swapped for ex in examples],
    )


def collate_padded(examples: list[Example], pad_id: int, padding_side: PaddingSide) -> Batch:
    """One row per example, padded to the longest; the mask marks real tokens."""
    width = max(len(ex.ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        start = width - len(ex.ids) if padding_side == PaddingSide.left else 0
        ids[row, start : start + len(ex.ids)] = torch.from_numpy(ex.ids.astype(np.int64))
        mask[row, start : start + len(ex.ids)] = 1
    return Batch(
        input_ids=ids,
        attention_mask=mask,
        position_ids=None,
        pool_rows=torch.arange(len(examples)),
        pool_cols=last_token_index(mask),
        targets=_targets(examples),
        pair_index=[ex.pair_index for ex in examples],
        swapped=[ex.swapped for ex in examples],
    )


def _targets(examples: list[Example]) -> torch.Tensor | None:
    if any(ex.target is None for ex in examples):
        return None
    return torch.tensor([ex.target for ex in examples], dtype=torch.float32)


def fill_by_tokens(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive groups (in the given order) whose lengths sum to at most `max_tokens`."""
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, length in enumerate(lengths):
        if current and used + length > max_tokens:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += length
    if current:
        groups.append(current)
    return groups


def fill_by_count(n: int, size: int) -> list[list[int]]:
    return [list(range(start, min(start + size, n))) for start in range(0, n, size)]
