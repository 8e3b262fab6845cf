"""Our score head, (A, B, tie) or, for WSDM-style data without ties, (A, B): always full precision, never
quantized, saved and restored with the adapter."""

from __future__ import annotations

import torch
from torch import nn

from lmsys.config import HeadInit, HeadType

class PreferenceHead(nn.Module):
    """Maps a pooled hidden state (N, H) to (A, B, tie) logits (N, 3), or (A, B) logits (N, 2)."""

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
        # A fresh small head starts nearer the uniform prediction (loss ln 3) than a stock head; how near depends on
        # the backbone's hidden norm (logit std ~ std * |h|: ~1.0 for SmolLM2, ~1.6 for gemma-3-270m at 0.02).
        # `zeros` starts at ln 3 exactly.
        linears = [m for m in self.layers if isinstance(m, nn.Linear)]
        for layer in linears:
            if init == HeadInit.torch_default:
                continue
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)
        if init == HeadInit.zeros:
            nn.init.zeros_(linears[-1].weight)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.layers(pooled.float())
