"""The internal data contract: one `Pair` per arena battle, and the single swap operation."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

TARGET_COLUMNS = ("winner_model_a", "winner_model_b", "winner_tie")
SOFT_TARGET_COLUMNS = ("target_a", "target_b", "target_tie")  # an oof table's targets when they are not one-hot


def class_columns(columns) -> tuple[str, ...]:
    """The probability columns of a table with these columns: all of TARGET_COLUMNS, or (A, B) for a two-class
    (WSDM) model's table, which has no `winner_tie`."""
    return TARGET_COLUMNS if TARGET_COLUMNS[2] in columns else TARGET_COLUMNS[:2]


@dataclass(frozen=True)
class Pair:
    """One battle: the conversation turns and, when labelled, the (A, B, tie) target probabilities ((A, B) in a
    two-class run); a teacher's logits in the same class order when the data carries them."""

    id: str
    prompts: tuple[str, ...]
    responses_a: tuple[str, ...]
    responses_b: tuple[str, ...]
    target: tuple[float, ...] | None = None
    meta: dict = field(default_factory=dict, compare=False)
    teacher_logits: tuple[float, ...] | None = None

    @property
    def n_turns(self) -> int:
        return max(len(self.prompts), len(self.responses_a), len(self.responses_b))

    @property
    def label(self) -> int | None:
        return None if self.target is None else int(np.argmax(self.target))


def swap_abt(values: np.ndarray) -> np.ndarray:
    """Map (A, B, tie) ordered values on the last axis to (B, A, tie), or (A, B) to (B, A): targets,
    probabilities or logits. Swapping A and B exchanges the first two classes; the tie stays."""
    values = np.asarray(values)
    return values[..., [1, 0, *range(2, values.shape[-1])]]


def swap_pair(pair: Pair) -> Pair:
    """The same battle with A and B exchanged; the target and the teacher's logits follow the responses."""
    return replace(pair, responses_a=pair.responses_b, responses_b=pair.responses_a, target=_swapped(pair.target),
                   teacher_logits=_swapped(pair.teacher_logits))


def _swapped(values: tuple[float, ...] | None) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in swap_abt(np.array(values)))
