"""The Triton kernels as PyTorch custom operators: ``torch.ops.lightning_sparse.attention_forward`` / ``_backward``
for separate q, k, v, and ``attention_qkv_forward`` / ``_backward`` for the model's packed projection (one input,
heads merged in the output, one packed gradient: no split, transpose or concatenation copies around attention).

Registered with ``torch.library.custom_op``, so ``torch.compile`` treats each as one opaque node (Inductor fuses
everything around it and never re-compiles the Triton code), fake-tensor shape propagation works through
``register_fake``, and ``register_autograd`` ties the backward op to the forward one. Selective activation
checkpointing sees the forward ops by name (:data:`ATTENTION_OPS`), so a policy can save its output instead of
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
from .attention import split_qkv
from .patterns import Pattern

__all__ = [
    "ATTENTION_OPS",
    "attention_backward",
    "attention_forward",
    "attention_qkv_backward",
    "attention_qkv_forward",
    "pattern_from_key",
    "pattern_key",
]

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
    """Fused sparse attention forward: ``(out [b, h, n, d_v] in q's dtype, lse [b, h, n] float32)``; out is stored
    as ``[b, n, h, d_v]`` (:func:`.triton_backend.empty_out`)."""
    plan = triton_backend.launch_plan(pattern_from_key(pattern), q.shape[1])
    return triton_backend._forward(q, k, v, plan, scale)


@attention_forward.register_fake
def _(q, k, v, pattern, scale):
    b, h, n, _ = q.shape
    return triton_backend.empty_out(q, v.shape[-1]), q.new_empty((b, h, n), dtype=torch.float32)


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
    return triton_backend._backward(q, k, v, out, lse, grad_out, plan, scale)


@attention_backward.register_fake
def _(q, k, v, out, lse, grad_out, pattern, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, whatever q, k, v are


# The packed form: one projection output in, heads merged out, one packed gradient back (what the model calls).


def _merged_out(out: torch.Tensor) -> torch.Tensor:
    """``[b, h, n, d_v]`` → ``[b, n, h·d_v]``: a view of :func:`.triton_backend.empty_out`'s storage."""
    b, h, n, d_v = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d_v)


@torch.library.custom_op("lightning_sparse::attention_qkv_forward", mutates_args=())
def attention_qkv_forward(
    qkv: torch.Tensor, heads: int, d_qk: int, pattern: str, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused sparse attention of a packed projection ``qkv [b, n, heads·(2·d_qk + d_v)]`` (query heads, key heads,
    value heads; :func:`.attention.split_qkv`): ``(out [b, n, heads·d_v], lse [b, heads, n] float32)``."""
    q, k, v = split_qkv(qkv, heads, d_qk)
    out, lse = triton_backend._forward(q, k, v, triton_backend.launch_plan(pattern_from_key(pattern), heads), scale)
    return _merged_out(out), lse


@attention_qkv_forward.register_fake
def _(qkv, heads, d_qk, pattern, scale):
    q, _, v = split_qkv(qkv, heads, d_qk)
    b, h, n, _ = q.shape
    return _merged_out(triton_backend.empty_out(q, v.shape[-1])), qkv.new_empty((b, h, n), dtype=torch.float32)


@torch.library.custom_op("lightning_sparse::attention_qkv_backward", mutates_args=())
def attention_qkv_backward(
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    heads: int,
    d_qk: int,
    pattern: str,
    scale: float,
) -> torch.Tensor:
    """The gradient of ``qkv`` (contiguous, ``qkv``'s shape), its three parts written in place by the kernels."""
    q, k, v = split_qkv(qkv, heads, d_qk)
    grad = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    b, n, _ = qkv.shape
    d_v = v.shape[-1]
    heads_view = (b, n, heads, d_v)
    o, do = (t.reshape(heads_view).transpose(1, 2) for t in (out, grad_out))
    plan = triton_backend.launch_plan(pattern_from_key(pattern), heads)
    triton_backend._backward(q, k, v, o, lse, do, plan, scale, grads=split_qkv(grad, heads, d_qk))
    return grad


@attention_qkv_backward.register_fake
def _(qkv, out, lse, grad_out, heads, d_qk, pattern, scale):
    return qkv.new_empty(qkv.shape)


def _setup_context(ctx, inputs, output) -> None:
    *tensors, pattern, scale = inputs
    out, lse = output
    ctx.save_for_backward(*tensors, out, lse)
    ctx.pattern, ctx.scale = pattern, scale
    ctx.mark_non_differentiable(lse)  # the log-sum-exp is saved for the backward, not a differentiable result


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_backward(q, k, v, out, lse, grad_out, ctx.pattern, ctx.scale)
    return dq, dk, dv, None, None


def _setup_qkv_context(ctx, inputs, output) -> None:
    qkv, heads, d_qk, pattern, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.heads, ctx.d_qk, ctx.pattern, ctx.scale = heads, d_qk, pattern, scale
    ctx.mark_non_differentiable(lse)


def _qkv_backward(ctx, grad_out, _grad_lse):
    qkv, out, lse = ctx.saved_tensors
    grad = attention_qkv_backward(qkv, out, lse, grad_out, ctx.heads, ctx.d_qk, ctx.pattern, ctx.scale)
    return grad, None, None, None, None


attention_forward.register_autograd(_backward, setup_context=_setup_context)
attention_qkv_forward.register_autograd(_qkv_backward, setup_context=_setup_qkv_context)

# The overloads a selective-activation-checkpointing policy names to keep attention outputs (see the README).
ATTENTION_OPS = (
    torch.ops.lightning_sparse.attention_forward.default,
    torch.ops.lightning_sparse.attention_qkv_forward.default,
)
