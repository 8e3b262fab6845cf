"""The attention kernel a backbone is loaded with: the spec's, except sdpa of a bfloat16 model on CPU, whose
training forward (and so its backward) runs in float32 on rows of up to FLOAT32_MAX_ROW tokens.

torch's CPU flash-attention backward is slow in bfloat16 on the short rows of packed pairs. Measured on an Intel
Xeon with AMX (2 threads; SmolLM2-135M's 9 query and 3 key/value heads of 64; packed causal masks; forward +
backward, median of 5, transformers' bf16 sdpa path against this one; `python scripts/attention_bench.py` prints
the same table for the machine it runs on, and rounds of it vary by ~20%: a second run gave 30.9 / 14.6,
25.7 / 20.4, 6.6 / 3.2, 25.7 / 27.5, and 44.1 / 43.3 where both run the same bf16 kernel):

| rows x tokens | 6 x 170 | 3 x 328 | 1 x 180 | 2 x 512 | 1 x 1024 |
|---|---|---|---|---|---|
| bf16 sdpa, ms | 39.0 | 31.5 | 8.9 | 35.6 | 46.1 |
| float32 here, ms | 17.9 | 24.6 | 4.2 | 31.4 | 60.8 |

So float32 on rows up to 512 tokens (the CPU configs' max_length; about even at 512), bf16 beyond. Without gradients (evaluation,
prediction) only the forward runs, and bf16's forward is the faster: those stay bf16, so an evaluation during
training and the predict command compute alike. Only q, k and v are cast up and the output back down (its
precision is bf16's, as before); the projections and the rest of the layer stay bfloat16. The kernel is registered
with transformers under SDPA_FLOAT32, with sdpa's masks (a packed row's block-diagonal causal mask from its
restarting position_ids, a sliding window).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SDPA_FLOAT32 = "lmsys_sdpa_float32"
FLOAT32_MAX_ROW = 512  # the crossover measured above


def sdpa_in_float32(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention of query (B, H, T, D) over key, value (B, H_kv, T, D) -> (B, T, H, D) in the query's dtype:
    computed in float32 when training on rows of at most FLOAT32_MAX_ROW tokens, by transformers' sdpa otherwise."""
    length = query.shape[2]
    special = kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
    if special or not torch.is_grad_enabled() or length > FLOAT32_MAX_ROW or length != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    output = torch.nn.functional.scaled_dot_product_attention(
        query.float(), key.float(), value.float(), attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=bool(causal and attention_mask is None and length > 1),
        enable_gqa=query.shape[1] != key.shape[1],  # no repeated key/value heads in float32
    )
    return output.transpose(1, 2).contiguous().to(query.dtype), None


AttentionInterface.register(SDPA_FLOAT32, sdpa_in_float32)
AttentionMaskInterface.register(SDPA_FLOAT32, sdpa_mask)


def attention_kernel(attn_implementation: str, dtype: torch.dtype, device: torch.device) -> str:
    """The name to load the backbone with: SDPA_FLOAT32 for sdpa in bfloat16 on CPU (see the module's docstring)."""
    if attn_implementation == "sdpa" and dtype == torch.bfloat16 and device.type == "cpu":
        return SDPA_FLOAT32
    return attn_implementation
