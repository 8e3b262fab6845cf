"""The rotary position embedding of an attention module compiled without gradients, with its attention
(`model.attention_kernel=compiled`: attention.compile_attention; the predict command's `kernels`).

Eager, the families' `apply_rotary_pos_emb` is ten passes over q and k (two products with cos and sin, the
rotation's two slices, negation and concatenation, a sum); compiled (one shape-generic graph, dynamic=True, per
family function, shared by every layer and model of the process), one loop for q and one for k. Used where no
gradient is recorded (evaluation, prediction): the float32 arithmetic inside is eager's, and in bfloat16 the result
differs from eager's by at most a rounding (eager rounds each product to bf16 before the sum, the loop does not).
Measured on an AMD EPYC with AVX-512 BF16 (2 threads, SmolLM2's 9 query and 3 key/value heads of 64, median of 15):
without gradients 1.77 against 4.58 ms at 4 x 512 tokens, 0.31 against 0.65 at 8 x 223; with gradients, forward +
backward, no faster (4 x 512: 4.0-4.1 against 4.4-4.9 ms; 6 x 340: 3.4-3.5 against 3.1-4.6; 8 x 223 and 1 x 160
the same), so training runs the eager function and compiles nothing for it.

The families' attention forwards (Llama, Mistral, Qwen2, Gemma 2 and 3) call the module-level function by its name,
so a module gets a subclass of its class whose forward is the family's own code with that one name bound to the
compiled function: parameters, names and checkpoints are unchanged, and a forward that does not call the function
by that name keeps its class.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn

ROTARY_FUNCTION = "apply_rotary_pos_emb"


class CompiledRotary:
    """Marks an attention class whose forward calls the compiled rotary embedding (made by compile_rotary)."""


@functools.cache
def _compiled(function: types.FunctionType):
    """`function` compiled where no gradient is recorded, the function itself where one is."""
    compiled = torch.compile(function, dynamic=True)

    @functools.wraps(function)
    def rotary(*args, **kwargs):
        return (function if torch.is_grad_enabled() else compiled)(*args, **kwargs)

    return rotary


@functools.cache
def _rotary_class(cls: type) -> type | None:
    forward = getattr(cls, "forward", None)
    if not isinstance(forward, types.FunctionType) or ROTARY_FUNCTION not in forward.__code__.co_names:
        return None
    function = forward.__globals__.get(ROTARY_FUNCTION)
    if not isinstance(function, types.FunctionType):
        return None
    names = {**forward.__globals__, ROTARY_FUNCTION: _compiled(function)}
    compiled_forward = types.FunctionType(forward.__code__, names, forward.__name__, forward.__defaults__,
                                          forward.__closure__)
    compiled_forward.__kwdefaults__, compiled_forward.__qualname__ = forward.__kwdefaults__, forward.__qualname__
    return type(f"RotaryCompiled{cls.__name__}", (CompiledRotary, cls), {"forward": compiled_forward})


def compile_rotary(module: nn.Module) -> bool:
    """Give `module` (an attention module) the compiled rotary embedding; whether it has it."""
    if isinstance(module, CompiledRotary):
        return True
    cls = _rotary_class(type(module))
    if cls is not None:
        module.__class__ = cls
    return cls is not None
