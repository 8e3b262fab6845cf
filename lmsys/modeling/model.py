"""The preference model: backbone (+ LoRA) -> last-token pooling (decoders) or first-token pooling (encoders,
[CLS]) -> our full-precision head: one pooled state per pair (a cross-encoder) or two, of (prompt, A) and
(prompt, B), for a bi-encoder's head."""

from __future__ import annotations

import torch
from torch import nn

from lmsys.modeling.attention import CPU_SDPA, rows_last_tokens, sequence_bounds
from lmsys.modeling.heads import BiEncoderHead, PreferenceHead
from lmsys.modeling.pooled_tail import PooledTail


class PreferenceModel(nn.Module):
    def __init__(self, backbone: nn.Module, head: PreferenceHead | BiEncoderHead,
                 first_token_pooling: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        # Encoders pool their first real token ([CLS]) in place of the batch's last-token columns; they take
        # padded batches only, so the attention mask locates it.
        self.first_token_pooling = first_token_pooling
        # CPU_SDPA attends each packed sequence on its own, given their bounds (lmsys/modeling/attention.py)
        config = getattr(backbone, "config", None)
        self.passes_sequence_bounds = getattr(config, "_attn_implementation", None) == CPU_SDPA
        self.sliding_window = getattr(config, "sliding_window", None)  # pad tails join no segment beyond it
        # the last layer's o_proj and MLP at the pooled tokens only (lmsys/modeling/pooled_tail.py)
        self.pooled_tail = None if first_token_pooling else PooledTail.attach(backbone)

    @property
    def _no_split_modules(self) -> list[str]:
        """FSDP's wrap units (accelerate's TRANSFORMER_BASED_WRAP reads this when the config names none): the
        backbone's decoder layers, and the head on its own (fp32, while the backbone's weights are bf16)."""
        base = getattr(self.backbone, "get_base_model", lambda: self.backbone)()
        return [*(getattr(base, "_no_split_modules", None) or []), type(self.head).__name__]

    def shares_prefixes(self, longest: int) -> bool:
        """Whether this model attends swap trees (lmsys.data.batching.swap_tree) exactly, given the longest
        sequence a tree stands for: CPU_SDPA's per-sequence attention, one pooled sequence per pair, decoder
        pooling, and no soft cap or sliding window that would send a layer to the masked path."""
        config = getattr(self.backbone, "config", None)
        return (self.passes_sequence_bounds and not self.first_token_pooling
                and getattr(self.head, "sequences_per_pair", 1) == 1
                and getattr(config, "attn_logit_softcapping", None) is None
                and (not self.sliding_window or longest <= self.sliding_window))

    def _packed_bounds(self, position_ids: torch.Tensor, tails: torch.Tensor | None,
                       shared_prefixes: torch.Tensor | None) -> dict:
        """For CPU_SDPA (lmsys/modeling/attention.py), which attends each packed sequence on its own: the packed
        sequences' cumulative lengths over the flattened rows, as flash attention's varlen kwargs name them, each
        row's pad tail joined to its last sequence where rows keep them (`tails`: the pooled tokens' flattened
        indices, the sequences' last; None: no tails); with swap trees a tree's second sequence is a segment of
        its own, passed with its shared prefix (`shared_prefixes`)."""
        bounds = sequence_bounds(position_ids, tails, self.sliding_window)
        if shared_prefixes is None:
            return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds}
        bounds = torch.cat([bounds, shared_prefixes[:, 0].to(bounds)]).unique(sorted=True)  # (S + K + 1,)
        return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "shared_prefixes": shared_prefixes}

    @property
    def drops_pad_tails(self) -> bool:
        """Whether packed rows become one row of their real tokens before the backbone (unpad_rows): on CPU_SDPA
        without a sliding window. With one, the rows stay: a sequence longer than the window takes the masked path,
        whose mask keeps to its row."""
        return self.passes_sequence_bounds and not self.first_token_pooling and not self.sliding_window

    def _attends_sequences(self, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                           shared_prefixes: torch.Tensor | None) -> bool:
        """Whether the backbone attends these packed rows sequence by sequence (CPU_SDPA, given the bounds)."""
        if attention_mask is None and position_ids is not None and self.passes_sequence_bounds:
            return True
        if shared_prefixes is not None:
            raise ValueError("swap trees (shared_prefixes) need packed rows on the lmsys CPU sdpa kernel")
        return False

    def forward(
        self,
        input_ids: torch.Tensor,  # (R, T)
        pool_rows: torch.Tensor,  # (N * S,) row of each sequence's last token, S = head.sequences_per_pair
        pool_cols: torch.Tensor,  # (N * S,) its column; a bi-encoder's pair k is sequences 2k (A) and 2k + 1 (B)
        attention_mask: torch.Tensor | None = None,  # (R, T); None for packed rows
        position_ids: torch.Tensor | None = None,  # (R, T); restart at 0 for each packed sequence
        shared_prefixes: torch.Tensor | None = None,  # (K, 3) swap trees' (lmsys.data.batching.Batch)
    ) -> torch.Tensor:
        if self.first_token_pooling:
            # an encoder has no cache (and its forward no use_cache); pool the first real token of each row
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (R, T, H)
            pool_cols = attention_mask.int().argmax(dim=1)[pool_rows]  # (N,) first 1 of each row, either padding side
        elif self._attends_sequences(attention_mask, position_ids, shared_prefixes):
            width = input_ids.shape[1]
            last_tokens = pool_rows * width + pool_cols  # (N * S,) flattened index of each sequence's last token
            tails = last_tokens  # the rows' pad tails, each joined to its row's last sequence
            if self.drops_pad_tails:
                input_ids, position_ids, last_tokens, shared_prefixes = unpad_rows(
                    input_ids, position_ids, last_tokens, shared_prefixes)
                pool_rows, pool_cols, tails = torch.zeros_like(last_tokens), last_tokens, None
            hidden = self._decoder_states(input_ids, position_ids, last_tokens,
                                          **self._packed_bounds(position_ids, tails, shared_prefixes))
        else:
            width = input_ids.shape[1]
            hidden = self._decoder_states(input_ids, position_ids, pool_rows * width + pool_cols,
                                          attention_mask=attention_mask)
        # With the backbone split over devices (device_map) the last hidden state lives on the last one.
        pooled = hidden[pool_rows.to(hidden.device), pool_cols.to(hidden.device)]  # (N * S, H)
        head_weight = next(self.head.parameters(), None)  # None: a parameter-free head (tests)
        pooled = pooled if head_weight is None else pooled.to(head_weight.device)
        if getattr(self.head, "sequences_per_pair", 1) == 2:
            return self.head(pooled[0::2], pooled[1::2])  # (N, H) of (prompt, A) and of (prompt, B) -> (N, C)
        return self.head(pooled)  # (N, C)

    def _decoder_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, last_tokens: torch.Tensor,
                        **kwargs) -> torch.Tensor:
        """The backbone's last hidden state (R, T, H) of a decoder; `last_tokens` (N * S,) the flattened indices of
        the pooled tokens, which the pooled tail computes alone."""
        if self.pooled_tail is not None:
            self.pooled_tail.select(last_tokens, tuple(input_ids.shape))
        return self.backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                             **kwargs).last_hidden_state


def unpad_rows(input_ids: torch.Tensor, position_ids: torch.Tensor, last_tokens: torch.Tensor,
               shared_prefixes: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Packed rows (R, T) as one row (1, M) of their real tokens, in order: each row's pad tail (after its last
    pooled token) dropped, so that no projection, norm or MLP computes it; the attention, sequence by sequence,
    pads a call's sequences to its longest where it batches them (attention.attend_segments).
    Returns input_ids and position_ids (1, M), the pooled tokens' flattened indices (N * S,) and the swap trees'
    `shared_prefixes` (K, 3) with their two token indices, in the new row."""
    rows, width = input_ids.shape
    row_end = rows_last_tokens(last_tokens, rows, width) - torch.arange(rows, device=input_ids.device) * width
    real = (torch.arange(width, device=input_ids.device) <= row_end[:, None]).view(-1)  # (R * T,): up to row_end
    new_index = real.cumsum(0) - 1  # (R * T,) each real token's index in the new row
    if shared_prefixes is not None:
        shared_prefixes = torch.stack([new_index[shared_prefixes[:, 0]], new_index[shared_prefixes[:, 1]],
                                       shared_prefixes[:, 2]], dim=1)
    return (input_ids.reshape(-1)[real][None], position_ids.reshape(-1)[real][None], new_index[last_tokens],
            shared_prefixes)
