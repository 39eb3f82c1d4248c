"""The ``sdpa`` backend: ``Dense()`` causal attention through ``F.scaled_dot_product_attention(is_causal=True)``.

On CUDA that is FlashAttention (or cuDNN / memory-efficient attention, as PyTorch picks): the baseline a sparse
model is compared against, and the fastest way to run a dense model. Any other pattern is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .patterns import Dense, Pattern

__all__ = ["sdpa_attention"]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float) -> torch.Tensor:
    """Dense causal attention: q, k ``[b, h, n, d_qk]``, v ``[b, h, n, d_v]`` → ``[b, h, n, d_v]``.

    On CUDA unequal widths are zero-padded to the wider one (FlashAttention takes one head width; zero columns add
    nothing to q·kᵀ, padded value columns are cut off again), so ``scale`` must be given (``sparse_attention`` does).
    """
    if not isinstance(pattern, Dense):
        raise ValueError(
            f"backend='sdpa' computes dense causal attention only (pattern Dense()), got {pattern!r}; use "
            "backend='triton' (CUDA) or backend='torch' for sparse patterns, or backend='auto' to pick."
        )
    d_qk, d_v = q.shape[-1], v.shape[-1]
    if q.is_cuda and d_qk != d_v:
        width = max(d_qk, d_v)
        q, k = F.pad(q, (0, width - d_qk)), F.pad(k, (0, width - d_qk))
        v = F.pad(v, (0, width - d_v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out[..., :d_v]
