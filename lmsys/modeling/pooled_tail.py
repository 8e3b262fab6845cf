"""A decoder's last layer computed at the pooled tokens only, where it can be.

The head reads the last hidden state at the pooled tokens (each sequence's last) and nowhere else, so the last
layer's attention output projection and its MLP, which act on each token alone, need only those rows: on
SmolLM2-135M that is o_proj's 0.33M and the MLP's 2.65M of the layer's 3.54M projection parameters, ~2.8% of the
whole backbone's products forward and backward, and the MLP's elementwise work with them. Forward hooks gather
the pooled rows before `self_attn.o_proj` and before `mlp` and scatter the results back into zeros. The other
rows of the last hidden state are then the residual stream alone, wrong but read by nothing: the final norm is per
token, and only the pooled rows reach the head (their values are the full layer's, to the rounding of a product of
fewer rows: tests/modeling/test_pooled_tail.py). q, k and v stay whole (every token's key and value enter the
pooled tokens' attention; q is one product with them), and so does the attention.

Not used where the last layer is compiled (`model.torch_compile=true`: the hooks' data-dependent rows would be traced
into its graph) or for encoders (first-token pooling). A layer without `self_attn.o_proj` or `mlp` keeps what it
lacks whole; a merged backbone (merge_and_unload replaces the LoRA o_proj) keeps the MLP's hooks.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


class PooledTail:
    """The hooks on one backbone's last decoder layer and the rows they keep (set by each forward)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.rows: torch.Tensor | None = None  # (N * S,) flattened indices of the pooled tokens
        self.grid: tuple[int, int] | None = None  # (R, T) of the forward they belong to
        self._gathered: set[int] = set()  # id() of the modules whose current call's input was gathered
        self._handles = [handle for module in modules for handle in (
            module.register_forward_pre_hook(self._gather), module.register_forward_hook(self._scatter))]

    @classmethod
    def attach(cls, backbone: nn.Module) -> PooledTail | None:
        """Hooks on the last decoder layer's o_proj and MLP, or None where the backbone has neither."""
        layers = [module for module in backbone.modules() if isinstance(module, GradientCheckpointingLayer)]
        if not layers:
            return None
        last = layers[-1]
        attention = getattr(last, "self_attn", None)
        modules = [m for m in (getattr(attention, "o_proj", None), getattr(last, "mlp", None)) if m is not None]
        return cls(modules) if modules else None

    def select(self, rows: torch.Tensor, grid: tuple[int, int]) -> None:
        """The pooled tokens of the coming forward over (R, T) tokens. Kept after it: a checkpointed layer's
        recomputation in the backward must gather the same rows."""
        self.rows, self.grid = rows, grid

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.rows, self.grid = [], None, None

    def _gather(self, module: nn.Module, args: tuple) -> tuple | None:
        x = args[0]  # (R, T, F)
        if self.rows is None or x.dim() != 3 or tuple(x.shape[:2]) != self.grid:
            self._gathered.discard(id(module))
            return None  # another caller's forward: whole
        self._gathered.add(id(module))
        return (x.reshape(-1, x.shape[-1]).index_select(0, self.rows.to(x.device)), *args[1:])  # (N * S, F)

    def _scatter(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if id(module) not in self._gathered:
            return None
        self._gathered.discard(id(module))
        whole = output.new_zeros(self.grid[0] * self.grid[1], output.shape[-1])  # (R * T, F')
        return whole.index_copy(0, self.rows.to(output.device), output).view(*self.grid, output.shape[-1])  # (R, T, F')
