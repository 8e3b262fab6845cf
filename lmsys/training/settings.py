"""What the training recipe needs to know, as plain typed values (built from the config by
`lmsys.builders.build_loop_settings`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmsys.config import SwapMode
from lmsys.data.batching import Batching
from lmsys.modeling.losses import LossWeights


@dataclass(frozen=True)
class LoopSettings:
    total_updates: int
    pairs_per_update: int  # over all processes
    swap: SwapMode
    group_by_length: bool  # shuffle in length-sorted buckets (False: a plain random order)
    batching: Batching
    max_grad_norm: float
    eval_frequency: int  # 0: evaluate only at the end
    patience: int | None
    log_frequency: int
    state_frequency: int  # updates between saves of the full training state; 0: never
    loss: LossWeights
    seed: int


def updates_per_epoch(n_pairs: int, pairs_per_update: int) -> int:
    return math.ceil(n_pairs / pairs_per_update)


def total_updates(n_pairs: int, pairs_per_update: int, epochs: float, max_steps: int | None) -> int:
    planned = math.ceil(epochs * updates_per_epoch(n_pairs, pairs_per_update))
    return planned if max_steps is None else min(planned, max_steps)
