"""Triton decode step: one query per (batch, head) against the keys its decode table names.

The step's own key and value are written into the cache by the kernel itself (split 0 of each (batch, head)) and
read from the inputs, not the cache, at offset 0, so no separate cache-update launches precede it. One program per
(batch, head, split) walks its share of the table row of ``position mod period`` in tiles of
``BLOCK_K`` offsets, gathers those keys and values from the cache (masked loads: offsets beyond the position fetch
nothing) and runs an online softmax in float32 (``exp2``, scale and log₂e folded in). With one split the program
writes the normalized output; with several (split-K, so that a small batch still fills the GPU) each writes its
(max, sum, accumulator) and a second kernel merges them by log-sum-exp. The position is read from device memory,
so the launches can be captured in a CUDA graph. Reference: ``decode.decode_step``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .decode import DecodeTable

__all__ = ["triton_decode_step"]

LOG2E = 1.4426950408889634


@triton.jit
def _decode_partial(
    Q, KN, VN, K, V, T, POS, OUT, M, L,
    stride_qb, stride_qh, stride_knb, stride_knh, stride_vnb, stride_vnh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_th, stride_tr, stride_ob, stride_oh, stride_os, stride_mb, stride_mh,
    H, WIDTH, PERIOD, KEYS_PER_SPLIT, scale_log2,
    D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_QK: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr, SINGLE: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    t = tl.load(POS)
    r = t % PERIOD
    d_qk = tl.arange(0, BLOCK_QK)
    d_v = tl.arange(0, BLOCK_V)
    q = tl.load(Q + b * stride_qb + h * stride_qh + d_qk, mask=d_qk < D_QK, other=0.0).to(tl.float32)
    q = q * scale_log2
    # this step's key and value: written to the cache once, read from here (the cache's row t may not be written yet)
    k_new = tl.load(KN + b * stride_knb + h * stride_knh + d_qk, mask=d_qk < D_QK, other=0.0)
    v_new = tl.load(VN + b * stride_vnb + h * stride_vnh + d_v, mask=d_v < D_V, other=0.0)
    if split == 0:
        tl.store(K + b * stride_kb + h * stride_kh + t * stride_kn + d_qk, k_new, mask=d_qk < D_QK)
        tl.store(V + b * stride_vb + h * stride_vh + t * stride_vn + d_v, v_new, mask=d_v < D_V)
    k_new = k_new.to(tl.float32)
    v_new = v_new.to(tl.float32)
    m_i = tl.max(tl.full([BLOCK_K], float("-inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros([BLOCK_K], tl.float32), axis=0)
    acc = tl.zeros([BLOCK_V], tl.float32)
    start = split * KEYS_PER_SPLIT
    end = tl.minimum(start + KEYS_PER_SPLIT, WIDTH)
    row = T + h * stride_th + r * stride_tr
    for k0 in range(start, end, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        delta = tl.load(row + offs, mask=offs < end, other=2147483647)
        valid = delta <= t
        is_new = delta == 0
        cached = valid & (delta != 0)
        key = tl.where(cached, t - delta, 0)
        k = tl.load(K + b * stride_kb + h * stride_kh + key[:, None] * stride_kn + d_qk[None, :],
                    mask=cached[:, None] & (d_qk[None, :] < D_QK), other=0.0).to(tl.float32)
        k = tl.where(is_new[:, None], k_new[None, :], k)
        s = tl.sum(k * q[None, :], axis=1)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: keep every weight at 0, not NaN
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe)
        v = tl.load(V + b * stride_vb + h * stride_vh + key[:, None] * stride_vn + d_v[None, :],
                    mask=cached[:, None] & (d_v[None, :] < D_V), other=0.0).to(tl.float32)
        v = tl.where(is_new[:, None], v_new[None, :], v)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    out = OUT + b * stride_ob + h * stride_oh + split * stride_os + d_v
    if SINGLE:
        acc = acc / tl.maximum(l_i, 1e-30)  # a query that sees no key gets zeros
        tl.store(out, acc.to(OUT.dtype.element_ty), mask=d_v < D_V)
    else:
        tl.store(out, acc, mask=d_v < D_V)
        tl.store(M + b * stride_mb + h * stride_mh + split, m_i)
        tl.store(L + b * stride_mb + h * stride_mh + split, l_i)


@triton.jit
def _decode_merge(
    P, M, L, OUT, stride_pb, stride_ph, stride_ps, stride_mb, stride_mh, stride_ob, stride_oh, H, SPLITS,
    D_V: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    s = tl.arange(0, BLOCK_S)
    d_v = tl.arange(0, BLOCK_V)
    m = tl.load(M + b * stride_mb + h * stride_mh + s, mask=s < SPLITS, other=float("-inf"))
    l_s = tl.load(L + b * stride_mb + h * stride_mh + s, mask=s < SPLITS, other=0.0)
    top = tl.max(m, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(m - top)
    part = tl.load(P + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d_v[None, :],
                   mask=(s[:, None] < SPLITS) & (d_v[None, :] < D_V), other=0.0)
    acc = tl.sum(part * w[:, None], axis=0)
    total = tl.sum(l_s * w, axis=0)
    acc = acc / tl.maximum(total, 1e-30)
    tl.store(OUT + b * stride_ob + h * stride_oh + d_v, acc.to(OUT.dtype.element_ty), mask=d_v < D_V)


def _default_splits(programs: int, tiles: int, device: torch.device) -> int:
    """Splits per (batch, head) so that about two programs run per SM (1 when the batch alone fills the GPU)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(tiles, math.ceil(2 * sms / programs)))


def triton_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: DecodeTable,
    position: torch.Tensor,
    scale: float,
    splits: int | None = None,
    block_k: int = 64,
) -> torch.Tensor:
    """Same contract as :func:`~lightning_sparse.kernels.decode.decode_step`, as one or two Triton launches.

    The last dimension of every input must be contiguous; ``splits`` overrides the split-K count (tests).
    """
    b, h, _, d_qk = q.shape
    d_v = v_cache.shape[-1]
    for name, x in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"triton_decode_step: {name} needs a contiguous last dimension; got {x.stride()}.")
    offsets = table.offsets
    width = table.width
    tiles = triton.cdiv(width, block_k)
    splits = _default_splits(b * h, tiles, q.device) if splits is None else max(1, min(splits, tiles))
    keys_per_split = triton.cdiv(tiles, splits) * block_k
    splits = triton.cdiv(width, keys_per_split)
    out = torch.empty(b, h, 1, d_v, device=q.device, dtype=q.dtype)
    block_qk, block_v = triton.next_power_of_2(d_qk), triton.next_power_of_2(d_v)
    common = dict(D_QK=d_qk, D_V=d_v, BLOCK_QK=block_qk, BLOCK_V=block_v, BLOCK_K=block_k)
    args = (
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), offsets.stride(0), offsets.stride(1),
    )
    if splits == 1:
        _decode_partial[(b * h, 1)](
            q, k, v, k_cache, v_cache, offsets, position, out, out, out, *args,
            out.stride(0), out.stride(1), 0, 0, 0, h, width, table.period, keys_per_split, scale * LOG2E,
            SINGLE=True, **common,
        )
        return out
    part = torch.empty(b, h, splits, d_v, device=q.device, dtype=torch.float32)
    m = torch.empty(b, h, splits, device=q.device, dtype=torch.float32)
    lse = torch.empty_like(m)
    _decode_partial[(b * h, splits)](
        q, k, v, k_cache, v_cache, offsets, position, part, m, lse, *args,
        part.stride(0), part.stride(1), part.stride(2), m.stride(0), m.stride(1),
        h, width, table.period, keys_per_split, scale * LOG2E, SINGLE=False, **common,
    )
    _decode_merge[(b * h,)](
        part, m, lse, out, part.stride(0), part.stride(1), part.stride(2), m.stride(0), m.stride(1),
        out.stride(0), out.stride(1), h, splits, D_V=d_v, BLOCK_V=block_v, BLOCK_S=triton.next_power_of_2(splits),
    )
    return out
