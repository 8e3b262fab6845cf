"""Our score heads, (A, B, tie) or, for WSDM-style data without ties, (A, B): always full precision, never
quantized, saved and restored with the adapter. `PreferenceHead` reads one pooled state per pair (a cross-encoder),
`BiEncoderHead` two, of (prompt, A) and (prompt, B) (`sequences_per_pair` tells the model which)."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmsys.config import HeadInit, HeadType


class PreferenceHead(nn.Module):
    """Maps a pooled hidden state (N, H) to (A, B, tie) logits (N, 3), or (A, B) logits (N, 2)."""

    sequences_per_pair = 1

    def __init__(self, hidden_size: int, kind: HeadType, dropout: float, init: HeadInit, init_std: float,
                 num_classes: int = 3) -> None:
        super().__init__()
        if kind == HeadType.linear:
            self.layers = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_size, num_classes))
        else:
            inner = hidden_size // 2
            self.layers = nn.Sequential(
                nn.Dropout(dropout), nn.Linear(hidden_size, inner), nn.Dropout(dropout), nn.GELU(),
                nn.Linear(inner, num_classes),
            )
        self._initialise(init, init_std)

    def _initialise(self, init: HeadInit, std: float) -> None:
        initialise([m for m in self.layers if isinstance(m, nn.Linear)], init, std)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.layers(pooled.float())


def initialise(linears: list[nn.Linear], init: HeadInit, std: float) -> None:
    """A fresh small head starts nearer the uniform prediction (loss ln 3) than a stock head; how near depends on the
    backbone's hidden norm (logit std ~ std * |h|: ~1.0 for SmolLM2, ~1.6 for gemma-3-270m at std 0.02). `zeros`
    starts at ln 3 exactly."""
    for layer in linears:
        if init == HeadInit.torch_default:
            continue
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)
    if init == HeadInit.zeros:
        nn.init.zeros_(linears[-1].weight)


class BiEncoderHead(nn.Module):
    """Maps the pooled states of (prompt, A) and (prompt, B), (N, H) each, to (A, B, tie) logits (N, 3), or (A, B)
    logits (N, 2), swap-equivariant by construction: exchanging h_A and h_B exchanges the A and B logits exactly
    and leaves the tie logit as it is.

    logit_A = win([h_A, h_B, h_A - h_B, u_A * u_B]) and logit_B = win([h_B, h_A, h_B - h_A, u_B * u_A]) with the
    same `win` scorer, so a swapped pair feeds each call the other's input to the bit; the tie scorer reads only
    features symmetric in A and B ([|h_A - h_B|, u_A * u_B, h_A + h_B]), equal to the bit either way.
    The product is of the unit-length states u = h / |h| (its sum is their cosine): a decoder's last hidden state
    has outlier dimensions that the raw product squares (SmolLM2-135M: |h| = 56, one dimension 43, |h_A * h_B| =
    1,870), which would swamp the other features and start the head far from the uniform prediction.
    """

    sequences_per_pair = 2

    def __init__(self, hidden_size: int, kind: HeadType, dropout: float, init: HeadInit, init_std: float,
                 num_classes: int = 3) -> None:
        super().__init__()
        self.win = _scorer(4 * hidden_size, hidden_size, kind, dropout)
        self.tie = _scorer(3 * hidden_size, hidden_size, kind, dropout) if num_classes == 3 else None
        # a scorer reads 4 (or 3) hidden-size blocks: std / sqrt(blocks) keeps its first logits as small as the
        # cross-encoder head's on one block
        for scorer, blocks in ((self.win, 4), (self.tie, 3)):
            if scorer is not None:
                initialise([m for m in scorer if isinstance(m, nn.Linear)], init, init_std / math.sqrt(blocks))

    def forward(self, pooled_a: torch.Tensor, pooled_b: torch.Tensor) -> torch.Tensor:
        h_a, h_b = pooled_a.float(), pooled_b.float()  # (N, H) each
        product = nn.functional.normalize(h_a, dim=-1) * nn.functional.normalize(h_b, dim=-1)  # (N, H), |.| <= 1
        # two calls of the same shape (not one stacked call): a swapped pair meets each input at the same place
        logit_a = self.win(torch.cat([h_a, h_b, h_a - h_b, product], dim=-1))  # (N, 1)
        logit_b = self.win(torch.cat([h_b, h_a, h_b - h_a, product], dim=-1))  # (N, 1)
        if self.tie is None:
            return torch.cat([logit_a, logit_b], dim=-1)  # (N, 2)
        logit_tie = self.tie(torch.cat([(h_a - h_b).abs(), product, h_a + h_b], dim=-1))  # (N, 1)
        return torch.cat([logit_a, logit_b, logit_tie], dim=-1)  # (N, 3)


def _scorer(in_features: int, hidden_size: int, kind: HeadType, dropout: float) -> nn.Sequential:
    """One score per row: linear, or the MLP of PreferenceHead (hidden_size / 2 inner units) ending in 1 output."""
    if kind == HeadType.linear:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, 1))
    inner = hidden_size // 2
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, inner), nn.Dropout(dropout), nn.GELU(),
                         nn.Linear(inner, 1))
