"""The one attention entry point: ``sparse_attention(q, k, v, pattern, scale=..., backend=...)``.

Inputs are validated here, once, for every backend (:func:`check_inputs`); a backend checks only what is its own
(the triton backend: head widths, dtypes, device). q and k are ``[batch, heads, n, d_qk]``, v is
``[batch, heads, n, d_v]``: the query/key width and the value width may differ.
"""

from __future__ import annotations

import math

import torch

from .patterns import Dense, Interleaved, Pattern, head_masks

BACKENDS = ("auto", "reference", "torch", "triton", "sdpa")


def check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float | None = None
) -> float:
    """Validate what every backend needs; return the scale (default ``1/sqrt(d_qk)``). Raises ``ValueError``."""
    if isinstance(pattern, Interleaved):
        raise ValueError(
            "Interleaved assigns one pattern per residual block, not one attention; pass interleaved.layer(r) "
            "for block r."
        )
    if not isinstance(pattern, Pattern):
        raise ValueError(f"pattern must be a lightning_sparse.kernels Pattern (e.g. Strided(128)), got {pattern!r}.")
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            "q and k must be [batch, heads, n, d_qk] with the same shape and v [batch, heads, n, d_v] with the same "
            f"batch, heads and n (d_v may differ from d_qk); got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}."
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}.")
    if not isinstance(q.shape[2], torch.SymInt):  # a symbolic length (torch.compile, dynamic shapes) is a size
        pattern.check_length(q.shape[2])
    if q.shape[1] % pattern.head_groups:
        raise ValueError(
            f"{pattern!r} has {pattern.head_groups} distinct per-head masks, so the number of heads must be a "
            f"multiple of {pattern.head_groups}; got {q.shape[1]} heads."
        )
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}; the default is 1/sqrt(d_qk).")
    return float(scale)


def split_qkv(qkv: torch.Tensor, heads: int, d_qk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views q, k ``[b, heads, n, d_qk]`` and v ``[b, heads, n, d_v]`` of a packed projection ``qkv`` ``[b, n,
    heads·(2·d_qk + d_v)]`` whose last axis holds all query heads, then all key heads, then all value heads."""
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be [batch, n, heads·(2·d_qk + d_v)], got shape {tuple(qkv.shape)}.")
    b, n, width = qkv.shape
    values = width - 2 * heads * d_qk  # all value heads (// and %: a traced width is a SymInt, no divmod)
    d_v, rest = (values // heads, values % heads) if heads > 0 else (0, 1)
    if heads <= 0 or d_qk <= 0 or d_v <= 0 or rest:
        raise ValueError(
            f"qkv's last axis ({width}) must be heads·(2·d_qk + d_v) with heads={heads}, d_qk={d_qk} and a positive "
            "whole value width d_v; pass the number of heads and the per-head query/key width of the projection."
        )
    q, k, v = qkv.split([heads * d_qk, heads * d_qk, heads * d_v], dim=-1)
    return tuple(t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float | None = None
) -> torch.Tensor:
    """Masked dense attention from ``pattern.mask(n)``: the O(n²) ground truth (softmax in float32)."""
    n = q.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = head_masks(pattern, n, q.shape[1], q.device)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    # A row that sees no key (e.g. a standalone summary part in block 0) attends to nothing: output 0, no NaN.
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).masked_fill(~mask, 0.0)
    return torch.matmul(probs, v.float()).to(q.dtype)


def resolve_backend(backend: str, pattern: Pattern, device: torch.device) -> str:
    """The backend ``"auto"`` stands for: sdpa for ``Dense()`` on CUDA, triton for other patterns on CUDA, else torch."""
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "torch"
    return "sdpa" if isinstance(pattern, Dense) else "triton"


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention restricted to ``pattern``: q, k ``[batch, heads, n, d_qk]``, v ``[batch, heads, n, d_v]``.

    Returns ``[batch, heads, n, d_v]``. ``scale`` defaults to ``1/sqrt(d_qk)``. ``backend``: ``"reference"``
    (masked dense, O(n²), the ground truth), ``"torch"`` (portable, O(n√n) time and memory, any device),
    ``"triton"`` (fused kernels as ``torch.ops.lightning_sparse`` custom operators, CUDA), ``"sdpa"``
    (``Dense()`` only: ``F.scaled_dot_product_attention(is_causal=True)``, FlashAttention on CUDA) or ``"auto"``
    (sdpa for ``Dense()`` and triton for every other pattern on CUDA, torch elsewhere).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    scale = check_inputs(q, k, v, pattern, scale)
    return _run(q, k, v, pattern, scale, resolve_backend(backend, pattern, q.device))


def sparse_attention_qkv(
    qkv: torch.Tensor,
    heads: int,
    d_qk: int,
    pattern: Pattern,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`sparse_attention` of a packed projection ``qkv`` ``[batch, n, heads·(2·d_qk + d_v)]`` (query heads,
    key heads, value heads; ``d_qk`` per head), returning the heads merged: ``[batch, n, heads·d_v]``.

    What a transformer layer calls: on the triton backend one custom op takes ``qkv`` as it comes out of the
    projection and its backward writes one packed gradient, so no split, transpose or concatenation is copied
    around attention; other backends split ``qkv`` into views and merge the heads of the result.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    q, k, v = split_qkv(qkv, heads, d_qk)
    scale = check_inputs(q, k, v, pattern, scale)
    backend = resolve_backend(backend, pattern, q.device)
    if backend == "triton":
        from .triton_backend import triton_attention_qkv

        return triton_attention_qkv(qkv, heads, d_qk, pattern, scale)
    y = _run(q, k, v, pattern, scale, backend)
    return y.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], -1)


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float, backend: str):
    """Dispatch validated inputs to a resolved backend."""
    if backend == "reference":
        return reference_attention(q, k, v, pattern, scale)
    if backend == "torch":
        from .torch_backend import torch_attention

        return torch_attention(q, k, v, pattern, scale)
    if backend == "sdpa":
        from .sdpa_backend import sdpa_attention

        return sdpa_attention(q, k, v, pattern, scale)
    from .triton_backend import triton_attention

    return triton_attention(q, k, v, pattern, scale)
