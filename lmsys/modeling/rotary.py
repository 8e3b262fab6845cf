"""The rotary position embedding of an attention module compiled, with its attention (`model.attention_kernel=
compiled`: attention.compile_attention; the predict command's `kernels`).

Eager, the families' `apply_rotary_pos_emb` is ten passes over q and k (two products with cos and sin, the
rotation's two slices, negation and concatenation, a sum) and as many again in its backward; compiled (one
shape-generic graph, dynamic=True, per family function, shared by every layer and model of the process), one loop for
q and one for k. The float32 arithmetic inside is eager's, and in bfloat16 the result differs from eager's by at most
a rounding (eager rounds each product to bf16 before the sum, the loop does not). Measured on an AMD EPYC with
AVX-512 BF16 (2 threads, SmolLM2's 9 query and 3 key/value heads of 64, median of 15): without gradients 1.77
against 4.58 ms at 4 x 512 tokens, 0.31 against 0.65 at 8 x 223.

Where gradients are recorded (training), the backward is the same graph by the opposite angle (`Rotation`): the
embedding rotates each pair of dimensions (i, i + D/2) by its position's angle, q cos + rotate_half(q) sin with cos
and sin equal on both halves (the families' `cat(freqs, freqs)`), so its transpose is the rotation by minus the
angle, the same function of the gradient with -sin (any RoPE rotates each pair by one angle). Gradients equal to eager
autograd's in float32 for the five families (tests/modeling/test_attention.py). On the same CPU, bf16: one layer's
forward + backward 0.56-0.87 of eager's time at 1,771-2,048 tokens, equal at 900; the bench's training epochs 0.96
and 0.97 of the time in two runs, taking turns in one process (docs/measurements.md). torch.compile of the function
with its own autograd backward had measured no faster than eager (4 x 512: 4.0-4.1 against 4.4-4.9 ms).

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
    """`function` (query, key, cos, sin, ...) -> (query, key) rotated, compiled; with gradients through `Rotation`.
    Called otherwise (other arguments, cos or sin with gradients), the function itself."""
    compiled = torch.compile(function, dynamic=True)

    @functools.wraps(function)
    def rotary(*args, **kwargs):
        if not torch.is_grad_enabled():
            return compiled(*args, **kwargs)
        if len(args) != 4 or kwargs or args[2].requires_grad or args[3].requires_grad:
            return function(*args, **kwargs)
        return Rotation.apply(compiled, *args)

    return rotary


class Rotation(torch.autograd.Function):
    """q (B, H, T, D), k (B, H_kv, T, D) rotated by `rotate` (a family's apply_rotary_pos_emb, compiled) at cos and
    sin (B, T, D); the gradients rotated back: the same function at cos and -sin (see the module's docstring)."""

    @staticmethod
    def forward(ctx, rotate, query, key, cos, sin):
        ctx.rotate = rotate
        ctx.save_for_backward(cos, sin)
        return rotate(query.detach(), key.detach(), cos, sin)  # detached: the graph prediction uses, not one more

    @staticmethod
    def backward(ctx, grad_query, grad_key):
        cos, sin = ctx.saved_tensors
        return None, *ctx.rotate(grad_query, grad_key, cos, -sin), None, None


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
