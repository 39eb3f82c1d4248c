"""The one attention entry point: ``sparse_attention(q, k, v, pattern, scale=..., backend=...)``."""

from __future__ import annotations

import math

import torch

from .patterns import Interleaved, Pattern, head_masks

BACKENDS = ("auto", "reference", "torch", "triton")


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern) -> None:
    """Validate shapes shared by every backend; raise ``ValueError`` naming the fix."""
    if isinstance(pattern, Interleaved):
        raise ValueError(
            "Interleaved assigns one pattern per residual block, not one attention; pass interleaved.layer(r) "
            "for block r."
        )
    if not isinstance(pattern, Pattern):
        raise ValueError(f"pattern must be a lightning_sparse.kernels Pattern (e.g. Strided(128)), got {pattern!r}.")
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q and k must be [batch, heads, n, d_qk] with the same shape and v [batch, heads, n, d_v] with the same "
            f"batch, heads and n; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}."
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")
    pattern.check_length(q.shape[2])
    if q.shape[1] % pattern.head_groups:
        raise ValueError(
            f"{pattern!r} has {pattern.head_groups} distinct per-head masks, so the number of heads must be a "
            f"multiple of {pattern.head_groups}; got {q.shape[1]} heads."
        )


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float | None = None
) -> torch.Tensor:
    """Masked dense attention from ``pattern.mask(n)``: the O(n²) ground truth (softmax in float32)."""
    n, d = q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    mask = head_masks(pattern, n, q.shape[1], q.device)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    # A row that sees no key (e.g. a standalone summary part in block 0) attends to nothing: output 0, no NaN.
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).masked_fill(~mask, 0.0)
    return torch.matmul(probs, v.float()).to(q.dtype)


def split_head_groups(attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale):
    """Run ``attend`` once per head group of a per-head pattern, on uniform sub-patterns, and re-interleave.

    Head ``h`` belongs to group ``h % G``; ``attend(q, k, v, uniform_pattern, scale)`` sees only that group's heads.
    """
    groups = pattern.head_groups
    if groups == 1:
        return attend(q, k, v, pattern, scale)
    outs = [attend(q[:, g::groups], k[:, g::groups], v[:, g::groups], pattern.head_group(g), scale) for g in range(groups)]
    b, h, n, d = q.shape
    return torch.stack(outs, dim=2).reshape(b, h, n, d)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention restricted to ``pattern``; q, k, v and the result are ``[batch, heads, n, head_dim]``.

    ``scale`` defaults to ``1/sqrt(head_dim)``. ``backend``: ``"reference"`` (masked dense, O(n²), the
    ground truth), ``"torch"`` (portable, O(n√n) time and memory, any device), ``"triton"`` (fused
    kernels, CUDA) or ``"auto"`` (triton on CUDA, torch elsewhere).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    check_inputs(q, k, v, pattern)
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    if backend == "reference":
        return reference_attention(q, k, v, pattern, scale)
    if backend == "torch":
        from .torch_backend import torch_attention

        return split_head_groups(torch_attention, q, k, v, pattern, scale)
    from .triton_backend import triton_attention

    return triton_attention(q, k, v, pattern, scale)
