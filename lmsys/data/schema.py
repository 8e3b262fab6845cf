"""The internal data contract: one `Pair` per arena battle, and the single swap operation."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

TARGET_COLUMNS = ("winner_model_a", "winner_model_b", "winner_tie")
# Swapping A and B exchanges the first two classes; the tie stays.
SWAP_PERMUTATION = (1, 0, 2)


@dataclass(frozen=True)
class Pair:
    """One battle: the conversation turns and, when labelled, the (A, B, tie) target probabilities."""

    id: str
    prompts: tuple[str, ...]
    responses_a: tuple[str, ...]
    responses_b: tuple[str, ...]
    target: tuple[float, float, float] | None = None
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def n_turns(self) -> int:
        return max(len(self.prompts), len(self.responses_a), len(self.responses_b))

    @property
    def label(self) -> int | None:
        return None if self.target is None else int(np.argmax(self.target))


def swap_abt(values: np.ndarray) -> np.ndarray:
    """Map (A, B, tie) ordered values on the last axis to (B, A, tie): targets, probabilities or logits."""
    return np.asarray(values)[..., list(SWAP_PERMUTATION)]


def swap_pair(pair: Pair) -> Pair:
    """The same battle with A and B exchanged; the target follows the responses."""
    target = None if pair.target is None else tuple(float(v) for v in swap_abt(np.array(pair.target)))
    return replace(pair, responses_a=pair.responses_b, responses_b=pair.responses_a, target=target)
