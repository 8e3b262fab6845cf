"""Encoding a split once, before training: both orientations of every pair in every input format, as compact
int32 arrays."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lmsys.data.batching import Example
from lmsys.data.formatting import PairEncoder
from lmsys.data.schema import Pair, swap_pair

CHUNK = 512  # pairs tokenized per call: bounds the memory of untruncated token lists


@dataclass
class EncodedSplit:
    pairs: list[Pair]
    forward_by_format: list[list[Example]]  # [format][pair]: the (A, B) orientation
    swapped_by_format: list[list[Example]]  # [format][pair]: the (B, A) orientation with the swapped target
    prompt_tokens: list[int]  # untruncated prompt length of each pair, for per-subset metrics

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def n_formats(self) -> int:
        return len(self.forward_by_format)

    @property
    def forward(self) -> list[Example]:
        """The first (primary) format's (A, B) examples."""
        return self.forward_by_format[0]

    @property
    def swapped(self) -> list[Example]:
        """The first (primary) format's (B, A) examples."""
        return self.swapped_by_format[0]

    def example(self, pair_index: int, swapped: bool, format_index: int = 0) -> Example:
        return (self.swapped_by_format if swapped else self.forward_by_format)[format_index][pair_index]


def encode_split(pairs: list[Pair], encoders: Sequence[PairEncoder]) -> EncodedSplit:
    """Every pair in every encoder's format (lmsys.builders.build_encoders: one per input format)."""
    if not encoders:
        raise ValueError("encode_split needs at least one encoder")
    forward: list[list[Example]] = [[] for _ in encoders]
    swapped: list[list[Example]] = [[] for _ in encoders]
    prompt_tokens = []
    for start in range(0, len(pairs), CHUNK):
        chunk = pairs[start : start + CHUNK]
        # tokenizing does not depend on the format (only the markers encode() adds do): once per chunk
        for offset, (pair, tokens) in enumerate(zip(chunk, encoders[0].tokenize(chunk), strict=True)):
            index = start + offset
            for k, encoder in enumerate(encoders):
                forward[k].append(_example(index, encoder.sequences(tokens, swapped=False), False, pair, k))
                swapped[k].append(_example(index, encoder.sequences(tokens, swapped=True), True, swap_pair(pair), k))
            prompt_tokens.append(sum(len(turn) for turn in tokens.prompts))
    return EncodedSplit(pairs, forward, swapped, prompt_tokens)


def _example(index: int, sequences: list[list[int]], swapped: bool, oriented: Pair, format_index: int) -> Example:
    """One sequence (a cross-encoder's pair) or two (a bi-encoder's, end to end, the second's start recorded)."""
    ids = np.asarray([i for sequence in sequences for i in sequence], dtype=np.int32)
    second_start = len(sequences[0]) if len(sequences) == 2 else None
    return Example(index, ids, swapped, oriented.target, oriented.teacher_logits, format_index, second_start)
