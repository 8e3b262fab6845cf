"""Token-budget allocation: water-filling between parts and turns, head + tail truncation of one text."""

from __future__ import annotations

import numpy as np


def water_fill(demands: list[int], weights: list[float], budget: int) -> list[int]:
    """Split `budget` tokens so that part i gets min(demand_i, level * weight_i), all of it used if needed.

    Parts that need less than their weighted share give the rest to the others; the result never exceeds a
    demand, sums to min(budget, sum(demands)), and is deterministic (leftover tokens go to the largest remainders,
    ties to the latest parts).
    """
    if sum(demands) <= budget:
        return list(demands)
    alloc = [0] * len(demands)
    active = [i for i, d in enumerate(demands) if d > 0]
    remaining = budget
    while active and remaining > 0:
        total_weight = sum(weights[i] for i in active)
        shares = {i: remaining * weights[i] / total_weight for i in active}
        satisfied = [i for i in active if demands[i] - alloc[i] <= shares[i]]
        if not satisfied:
            floors = {i: int(np.floor(shares[i])) for i in active}
            for i in active:
                alloc[i] += floors[i]
            leftover = remaining - sum(floors.values())
            # the largest remainders get the leftover tokens, ties to the later part: response B keeps a token before
            # A (B is never cut away while every part can have one) and a part's last turn before its earlier ones
            for i in sorted(active, key=lambda i: (shares[i] - floors[i], i), reverse=True)[:leftover]:
                alloc[i] += 1
            return alloc
        for i in satisfied:
            remaining -= demands[i] - alloc[i]
            alloc[i] = demands[i]
        active = [i for i in active if i not in satisfied]
    return alloc


def head_tail(tokens: list[int], budget: int, text_head_share: float, ellipsis: list[int]) -> list[int]:
    """Keep `budget` tokens of `tokens`: its start and end joined by `ellipsis` when something is cut."""
    if len(tokens) <= budget:
        return tokens
    if budget <= len(ellipsis):
        return tokens[:budget]
    keep = budget - len(ellipsis)
    n_head = round(keep * text_head_share)
    n_tail = keep - n_head
    return tokens[:n_head] + ellipsis + (tokens[len(tokens) - n_tail :] if n_tail else [])
