"""Micro-batches from encoded pairs, for training and prediction alike: one `Batching` description, grouping of
examples into micro-batches (`micro_batches`, `prediction_batches`) and their collation (`collate`), padded or
packed (padding-free: pairs share rows, positions restart per pair). A bi-encoder's example is two sequences, which
the grouping counts together (both in one packed row) and collation lays out as two sequences, pooled apart."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmsys.config import PaddingSide


@dataclass(frozen=True)
class Example:
    """One encoded orientation of one pair; `pair_index` points into the split's pair list."""

    pair_index: int
    ids: np.ndarray  # (T,) int32
    swapped: bool
    target: tuple[float, ...] | None  # (C,) in this orientation's class order
    teacher_logits: tuple[float, ...] | None = None  # (C,) in this orientation's class order
    format_index: int = 0  # into the split's formats (ModelSpec.input_formats)
    # A bi-encoder's pair: ids[:second_start] is (prompt, first response), ids[second_start:] (prompt, second
    # response); None: one sequence (a cross-encoder's)
    second_start: int | None = None
    # A swap tree's (swap_tree): ids[second_start:] continues ids[:shared_prefix], the prefix the pair's two
    # orientations share, which is in the ids once (positions and attention as if it were repeated)
    shared_prefix: int | None = None

    @property
    def sequence_ends(self) -> tuple[int, ...]:
        """The end (exclusive) of each of the example's sequences within `ids`."""
        n = len(self.ids)
        return (n,) if self.second_start is None else (self.second_start, n)

    def sequences(self) -> list[np.ndarray]:
        return [self.ids[start:end] for start, end in zip((0, *self.sequence_ends), self.sequence_ends)]


def swap_tree(forward: Example, swapped: Example) -> Example:
    """A cross-encoder pair's two orientations as one example of two sequences sharing their common token prefix
    (the instructions, the prompt, any common start of the responses), which is then computed once: the prefix and
    one orientation's rest, then the other's rest, which continues the prefix (Example.shared_prefix). Causal
    attention makes each orientation's tokens see exactly what they see alone.

    The two rests go in a canonical order (the lexicographically smaller first), so a pair and the pair with A and
    B exchanged give the same example to the bit. `swapped` is whether the first sequence is the (B, A)
    orientation; no target (prediction only)."""
    if forward.pair_index != swapped.pair_index or forward.second_start is not None or swapped.second_start is not None:
        raise ValueError("swap_tree takes one pair's two cross-encoder orientations")
    first, second = forward.ids, swapped.ids
    shortest = min(len(first), len(second))
    differs = np.flatnonzero(first[:shortest] != second[:shortest])
    prefix = min(int(differs[0]) if len(differs) else shortest, shortest - 1)  # each orientation keeps its last token
    swapped_first = second[prefix:].tolist() < first[prefix:].tolist()
    if swapped_first:
        first, second = second, first
    return Example(forward.pair_index, np.concatenate([first, second[prefix:]]), swapped_first, None, None,
                   forward.format_index, len(first), prefix)


@dataclass(frozen=True)
class Batching:
    """How examples become micro-batches. `max_tokens` has one meaning everywhere: the size of a packed
    micro-batch's input tensor, rows x widest row (real tokens plus the padding of narrower rows), which is what
    bounds activation memory."""

    packed: bool
    max_tokens: int  # packed: rows x widest row of a micro-batch
    row_tokens: int  # packed: the widest a row may be (a longer example gets a row of its own)
    batch_size: int  # padded: examples per micro-batch
    pad_id: int
    padding_side: PaddingSide
    attention_width: float | None = None  # packed: from ModelSpec.attention_width; None counts tokens only


@dataclass
class Batch:
    input_ids: torch.Tensor  # (R, T)
    attention_mask: torch.Tensor | None  # (R, T) padded; None packed
    position_ids: torch.Tensor | None  # (R, T) packed: restart at 0 per pair (and for a row's pad tail); None padded
    pool_rows: torch.Tensor  # (N * S,) S sequences per pair (a bi-encoder's 2: A then B), each pair's together
    pool_cols: torch.Tensor  # (N * S,)
    targets: torch.Tensor | None  # (N, C)
    pair_index: list[int]  # (N,)
    swapped: list[bool]  # (N,)
    n_real_tokens: int
    teacher_logits: torch.Tensor | None = None  # (N, C)
    # swap trees' (swap_tree): (K, 3) for each continuing sequence, the flattened index of its first token, of its
    # shared prefix's first token, and the prefix's length; None: no trees
    shared_prefixes: torch.Tensor | None = None

    def model_inputs(self, device: torch.device) -> dict[str, torch.Tensor | None]:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        inputs = {
            "input_ids": move(self.input_ids), "attention_mask": move(self.attention_mask),
            "position_ids": move(self.position_ids), "pool_rows": move(self.pool_rows),
            "pool_cols": move(self.pool_cols),
        }
        if self.shared_prefixes is not None:  # read on the CPU by the attention (lmsys/modeling/attention.py)
            inputs["shared_prefixes"] = self.shared_prefixes
        return inputs


def collate(examples: list[Example], batching: Batching) -> Batch:
    if len({len(ex.sequence_ends) for ex in examples}) > 1:
        raise ValueError("a micro-batch mixes one-sequence and two-sequence (bi-encoder) examples")
    if batching.packed:
        return collate_packed(examples, batching.row_tokens, batching.pad_id, batching.attention_width)
    if any(ex.shared_prefix is not None for ex in examples):
        raise ValueError("swap trees (shared prefixes) need packed micro-batches")
    return collate_padded(examples, batching.pad_id, batching.padding_side)


def micro_batches(examples: list[Example], batching: Batching) -> list[list[Example]]:
    """The examples of one training update (or one prediction window) cut into micro-batches: packed rows grouped
    within `max_tokens`, or `batch_size` examples each."""
    if batching.packed:
        groups = fill_packed([len(ex.ids) for ex in examples], batching.max_tokens, batching.row_tokens,
                             batching.attention_width)
    else:
        groups = fill_by_count(len(examples), batching.batch_size)
    return [[examples[i] for i in group] for group in groups]


def prediction_batches(examples: list[Example], batching: Batching) -> list[list[Example]]:
    """Micro-batches of length-sorted examples: consecutive windows of at most `max_tokens` real tokens, each
    cut by `micro_batches`, so that neighbours of similar length share rows and every micro-batch keeps the
    budget. Deterministic in the lengths alone: the same lengths give the same micro-batches."""
    if not batching.packed:
        return micro_batches(examples, batching)
    windows = fill_by_tokens([len(ex.ids) for ex in examples], batching.max_tokens)
    return [batch for window in windows for batch in micro_batches([examples[i] for i in window], batching)]


def pack_rows(lengths: list[int], row_tokens: int, attention_width: float | None = None) -> list[list[int]]:
    """Example indices per row, each row at most max(`row_tokens`, longest example) tokens, packed first-fit
    decreasing into the row capacity with the lowest cost, rows x width x (1 + width / attention_width).

    sdpa and eager attention compute each row's full square, so a row of width T costs T / attention_width more
    per token than its projections (see `attention_width` in lmsys.modeling.families); None (flash attention
    varlen) counts tokens only. Examples all longer than half a row get rows as narrow as the longest of them;
    examples of similar length keep a row each where sharing rows would cost more attention than it saves padding.
    """
    if not lengths:
        return []
    longest = max(lengths)
    capacity = max(row_tokens, longest)
    best_cost, best_rows = None, []
    for width in sorted({longest + (capacity - longest) * k // 4 for k in range(5)}):  # narrowest first: ties keep it
        rows = _first_fit_decreasing(lengths, width)
        widest = max(sum(lengths[i] for i in row) for row in rows)
        cost = len(rows) * widest * (1.0 + widest / attention_width if attention_width else 1.0)
        if best_cost is None or cost < best_cost:
            best_cost, best_rows = cost, rows
    return best_rows


def _first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if slot is None:
            rows.append([i])
            free.append(capacity - lengths[i])
        else:
            rows[slot].append(i)
            free[slot] -= lengths[i]
    return rows


def fill_packed(
    lengths: list[int], max_tokens: int, row_tokens: int, attention_width: float | None = None
) -> list[list[int]]:
    """Micro-batches of whole packed rows: all examples packed into rows first (so that long and short examples of
    a training update share rows), then consecutive rows grouped while rows x widest row stays within `max_tokens`."""
    rows = pack_rows(lengths, row_tokens, attention_width)
    groups: list[list[int]] = []
    current: list[list[int]] = []
    widest = 0
    for row in rows:
        width = sum(lengths[i] for i in row)
        if current and (len(current) + 1) * max(widest, width) > max_tokens:
            groups.append([i for r in current for i in r])
            current, widest = [], 0
        current.append(row)
        widest = max(widest, width)
    if current:
        groups.append([i for r in current for i in r])
    return groups


def collate_packed(examples: list[Example], row_tokens: int, pad_id: int, attention_width: float | None = None) -> Batch:
    """Examples packed into rows of at most `row_tokens` tokens, positions restarting at 0 for each sequence (a
    bi-encoder's two sequences of a pair sit side by side in one row, apart; a swap tree's second sequence goes on
    from its shared prefix's length, the prefix recorded in `shared_prefixes`), no attention mask; a row's pad
    tail is a segment of its own (positions restart there too), so no sequence sees it."""
    rows = pack_rows([len(ex.ids) for ex in examples], row_tokens, attention_width)
    width = max(sum(len(examples[i].ids) for i in row) for row in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    placed: dict[int, list[tuple[int, int]]] = {}  # example -> (row, column of the last token) of each sequence
    shared = []  # (flat first token, flat prefix start, prefix length) of each swap tree's second sequence
    for r, row in enumerate(rows):
        col = 0
        for i in row:
            example, start = examples[i], col
            ids[r, col : col + len(example.ids)] = example.ids
            placed[i] = []
            for k, sequence in enumerate(example.sequences()):
                first_position = example.shared_prefix if k == 1 and example.shared_prefix is not None else 0
                if first_position:
                    shared.append((r * width + col, r * width + start, first_position))
                positions[r, col : col + len(sequence)] = np.arange(first_position, first_position + len(sequence))
                col += len(sequence)
                placed[i].append((r, col - 1))
        positions[r, col:] = np.arange(width - col)
    pool = [place for i in range(len(examples)) for place in placed[i]]  # (N * S,) in example order
    return Batch(
        input_ids=torch.from_numpy(ids),
        attention_mask=None,
        position_ids=torch.from_numpy(positions),
        pool_rows=torch.tensor([row for row, _ in pool], dtype=torch.long),
        pool_cols=torch.tensor([col for _, col in pool], dtype=torch.long),
        targets=_targets(examples),
        pair_index=[ex.pair_index for ex in examples],
        swapped=[ex.swapped for ex in examples],
        n_real_tokens=sum(len(ex.ids) for ex in examples),
        teacher_logits=_teacher_logits(examples),
        shared_prefixes=torch.tensor(shared, dtype=torch.long).view(-1, 3) if shared else None,
    )


def collate_padded(examples: list[Example], pad_id: int, padding_side: PaddingSide) -> Batch:
    """One row per sequence (a bi-encoder's example: two consecutive rows), padded to the longest; the mask marks
    real tokens."""
    sequences = [sequence for ex in examples for sequence in ex.sequences()]
    width = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        start = width - len(sequence) if padding_side == PaddingSide.left else 0
        ids[row, start : start + len(sequence)] = torch.from_numpy(sequence.astype(np.int64))
        mask[row, start : start + len(sequence)] = 1
    return Batch(
        input_ids=ids,
        attention_mask=mask,
        position_ids=None,
        pool_rows=torch.arange(len(sequences)),
        pool_cols=last_token_index(mask),
        targets=_targets(examples),
        pair_index=[ex.pair_index for ex in examples],
        swapped=[ex.swapped for ex in examples],
        n_real_tokens=int(mask.sum()),
        teacher_logits=_teacher_logits(examples),
    )


def _targets(examples: list[Example]) -> torch.Tensor | None:
    if any(ex.target is None for ex in examples):
        return None
    return torch.tensor([ex.target for ex in examples], dtype=torch.float32)


def _teacher_logits(examples: list[Example]) -> torch.Tensor | None:
    if any(ex.teacher_logits is None for ex in examples):
        return None
    return torch.tensor([ex.teacher_logits for ex in examples], dtype=torch.float32)


def fill_by_tokens(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive groups (in the given order) whose lengths sum to at most `max_tokens` (a longer example alone):
    the windows of `prediction_batches`."""
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


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Column of the last real token of each row (R, T) -> (R,), for left or right padding.

    Read from the mask, never from token ids, so it stays right when the pad token is the eos token.
    """
    n_cols = attention_mask.shape[1]
    flipped_first_one = attention_mask.flip(1).long().argmax(1)
    return n_cols - 1 - flipped_first_one
