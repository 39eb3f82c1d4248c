"""The Triton kernels as PyTorch custom operators: ``torch.ops.lightning_sparse.attention_forward`` / ``_backward``.

Registered with ``torch.library.custom_op``, so ``torch.compile`` treats each as one opaque node (Inductor fuses
everything around it and never re-compiles the Triton code), fake-tensor shape propagation works through
``register_fake``, and ``register_autograd`` ties the backward op to the forward one. Selective activation
checkpointing sees the forward op by name (:data:`ATTENTION_OPS`), so a policy can save its output instead of
recomputing it.

The pattern travels through the op schema as a string key, its ``repr`` (e.g. ``"Strided(stride=128)"``):
:func:`pattern_key` records the pattern under its key when ``triton_attention`` is called, and
:func:`pattern_from_key` looks it up, or parses a key it has not seen (a graph traced in another process) back into
one of this package's pattern classes with a literal-only parser — never ``eval``.
"""

from __future__ import annotations

import ast
from functools import cache

import torch

from . import patterns as _patterns
from . import triton_backend
from .patterns import Pattern

__all__ = ["ATTENTION_OPS", "attention_backward", "attention_forward", "pattern_from_key", "pattern_key"]

_SEEN: dict[str, Pattern] = {}
_CLASSES = {
    name: cls
    for name, cls in vars(_patterns).items()
    if isinstance(cls, type) and issubclass(cls, Pattern) and cls is not Pattern
}


def pattern_key(pattern: Pattern) -> str:
    """The op-schema key of ``pattern`` (its repr), remembered so :func:`pattern_from_key` returns this object."""
    key = pattern.op_key
    _SEEN.setdefault(key, pattern)
    return key


@cache
def pattern_from_key(key: str) -> Pattern:
    """The pattern a key names: one seen by :func:`pattern_key`, else parsed from literals of known classes."""
    if key in _SEEN:
        return _SEEN[key]
    try:
        return _build(ast.parse(key, mode="eval").body)
    except (SyntaxError, ValueError, TypeError) as err:
        raise ValueError(
            f"pattern key {key!r} names no lightning_sparse.kernels pattern ({err}); keys are reprs such as "
            "'Strided(stride=128)', made by pattern_key()."
        ) from err


def _build(node: ast.AST):
    """A pattern class call, a tuple or a constant from its syntax tree; anything else is refused."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, bool)):
        return node.value
    if isinstance(node, ast.Tuple):
        return tuple(_build(e) for e in node.elts)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CLASSES:
        args = [_build(a) for a in node.args]
        kwargs = {kw.arg: _build(kw.value) for kw in node.keywords if kw.arg is not None}
        return _CLASSES[node.func.id](*args, **kwargs)
    raise ValueError(f"unexpected syntax {ast.dump(node)[:80]}")


@torch.library.custom_op("lightning_sparse::attention_forward", mutates_args=())
def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused sparse attention forward: ``(out [b, h, n, d_v] in q's dtype, lse [b, h, n] float32)``, contiguous."""
    plan = triton_backend.launch_plan(pattern_from_key(pattern), q.shape[1])
    return _contiguous_and_distinct(triton_backend._forward(q, k, v, plan, scale))


@attention_forward.register_fake
def _(q, k, v, pattern, scale):
    b, h, n, _ = q.shape
    return q.new_empty((b, h, n, v.shape[-1])), q.new_empty((b, h, n), dtype=torch.float32)


@torch.library.custom_op("lightning_sparse::attention_backward", mutates_args=())
def attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    pattern: str,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused sparse attention backward: ``(dq, dk, dv)`` shaped like ``(q, k, v)``, contiguous."""
    plan = triton_backend.launch_plan(pattern_from_key(pattern), q.shape[1])
    return _contiguous_and_distinct(triton_backend._backward(q, k, v, out, lse, grad_out, plan, scale))


def _contiguous_and_distinct(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The results as the fake implementations promise them: contiguous, none sharing storage with another.

    A no-op for kernels that allocate each result on its own; one sharing a buffer with an earlier result is copied
    (a custom op's outputs must not alias each other).
    """
    seen: set[int] = set()
    out = []
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        out.append(t.clone(memory_format=torch.contiguous_format) if ptr in seen else t.contiguous())
        seen.add(ptr)
    return tuple(out)


@attention_backward.register_fake
def _(q, k, v, out, lse, grad_out, pattern, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, whatever q, k, v are


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, pattern, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.pattern, ctx.scale = pattern, scale
    ctx.mark_non_differentiable(lse)  # the log-sum-exp is saved for the backward, not a differentiable result


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_backward(q, k, v, out, lse, grad_out, ctx.pattern, ctx.scale)
    return dq, dk, dv, None, None


attention_forward.register_autograd(_backward, setup_context=_setup_context)

# The overloads a selective-activation-checkpointing policy names to keep attention outputs (see the README).
ATTENTION_OPS = (torch.ops.lightning_sparse.attention_forward.default,)
