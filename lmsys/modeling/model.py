"""The preference model: backbone (+ LoRA) -> last-token pooling -> our full-precision head."""

from __future__ import annotations

import torch
from torch import nn

from lmsys.modeling.heads import PreferenceHead


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Column of the last real token of each row (R, T) -> (R,), for left or right padding.

    Read from the mask, never from token ids, so it stays right when the pad token is the eos token.
    """
    n_cols = attention_mask.shape[1]
    flipped_first_one = attention_mask.flip(1).long().argmax(1)
    return n_cols - 1 - flipped_first_one


class PreferenceModel(nn.Module):
    def __init__(self, backbone: nn.Module, head: PreferenceHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(
        self,
        input_ids: torch.Tensor,  # (R, T)
        pool_rows: torch.Tensor,  # (N,) row of each pair's last token
        pool_cols: torch.Tensor,  # (N,) column of each pair's last token
        attention_mask: torch.Tensor | None = None,  # (R, T); None for packed rows
        position_ids: torch.Tensor | None = None,  # (R, T); restart at 0 for each packed pair
    ) -> torch.Tensor:
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (R, T, H)
        # With the backbone split over devices (device_map) the last hidden state lives on the last one.
        pooled = hidden[pool_rows.to(hidden.device), pool_cols.to(hidden.device)]  # (N, H)
        head_weight = next(self.head.parameters(), None)  # None: a parameter-free head (tests)
        return self.head(pooled if head_weight is None else pooled.to(head_weight.device))  # (N, 3)
