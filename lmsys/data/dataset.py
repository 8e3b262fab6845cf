"""Encoding a split once, before training: both orientations of every pair, as compact int32 arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmsys.data.batching import Example
from lmsys.data.formatting import PairEncoder
from lmsys.data.schema import Pair, swap_pair

CHUNK = 512  # pairs tokenized per call: bounds the memory of untruncated token lists


@dataclass
class EncodedSplit:
    pairs: list[Pair]
    forward: list[Example]  # (A, B) orientation, one per pair
    swapped: list[Example]  # (B, A) orientation with the swapped target, one per pair
    prompt_tokens: list[int]  # untruncated prompt length of each pair, for per-subset metrics

    def __len__(self) -> int:
        return len(self.pairs)

    def example(self, pair_index: int, swapped: bool) -> Example:
        return (self.swapped if swapped else self.forward)[pair_index]


def encode_split(pairs: list[Pair], encoder: PairEncoder) -> EncodedSplit:
    forward, swapped, prompt_tokens = [], [], []
    for start in range(0, len(pairs), CHUNK):
        chunk = pairs[start : start + CHUNK]
        for offset, (pair, tokens) in enumerate(zip(chunk, encoder.tokenize(chunk), strict=True)):
            index = start + offset
            forward.append(_example(index, encoder.encode(tokens, swapped=False), False, pair))
            swapped.append(_example(index, encoder.encode(tokens, swapped=True), True, swap_pair(pair)))
            prompt_tokens.append(sum(len(turn) for turn in tokens.prompts))
    return EncodedSplit(pairs, forward, swapped, prompt_tokens)


def _example(index: int, ids: list[int], swapped: bool, oriented: Pair) -> Example:
    return Example(index, np.asarray(ids, dtype=np.int32), swapped, oriented.target, oriented.teacher_logits)
