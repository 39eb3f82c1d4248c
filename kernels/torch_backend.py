"""Portable pure-PyTorch sparse attention: O(n√n) time and memory for the strided and fixed patterns, any device.

Each primitive part of ``pattern.parts()`` is computed where it is cheap and returns ``(out, lse)``: its
normalized output and the log-sum-exp of its scores per query (``-inf`` where the query sees no key in that
part). The parts are disjoint, so the softmax over their union is the log-sum-exp merge of the parts
(:func:`merge_parts`). No tensor of ``n × n`` entries is ever built for the sparse patterns:

* :class:`Local` — queries in blocks of ``width`` attend their own and the previous key block: ``[nb, w, 2w]`` scores.
* :class:`StridedColumns` — reorder positions ``[n/l, l] → [l, n/l]`` so every residue class mod ``l`` is one
  contiguous causal chain of length ``n/l`` (kernels.md §0): ``[l, n/l, n/l]`` scores.
* :class:`FixedBlock` — causal attention inside each block of ``stride`` positions: ``[nb, l, l]`` scores.
* :class:`FixedSummary` — the summary keys of all blocks, gathered once (``n/l · c`` keys); queries in chunks.
* :class:`Dense` — every key, queries in chunks (O(n²) time, bounded memory).

q and k are ``[b, h, n, d_qk]``, v ``[b, h, n, d_v]``; the widths may differ.

Softmax statistics are computed in float32 (float64 for float64 inputs); the result has ``q.dtype``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .patterns import Dense, FixedBlock, FixedSummary, Local, Pattern, StridedColumns

__all__ = ["torch_attention", "merge_parts"]

# Upper bound on the score entries of one query chunk of the chunked parts (Dense, FixedSummary): 32 MiB in float32.
CHUNK_SCORES = 1 << 23

Part = tuple[torch.Tensor, torch.Tensor]  # (out [b, h, n, d], lse [b, h, n]) in the compute dtype


def torch_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float | None = None
) -> torch.Tensor:
    """Causal attention restricted to ``pattern``: q, k ``[batch, heads, n, d_qk]``, v ``[batch, heads, n, d_v]``.

    ``scale`` defaults to ``1/sqrt(d_qk)``. Rows that see no key return 0. A per-head pattern runs once per head
    group (head ``h`` is in group ``h % G``) on that group's uniform pattern. Inputs are validated by
    ``sparse_attention``, the usual way to call this.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    groups = pattern.head_groups
    if groups == 1:
        return _uniform_attention(q, k, v, pattern, scale)
    outs = [
        _uniform_attention(q[:, g::groups], k[:, g::groups], v[:, g::groups], pattern.head_group(g), scale)
        for g in range(groups)
    ]
    b, h, n, d_v = v.shape
    return torch.stack(outs, dim=2).reshape(b, h, n, d_v)  # [b, h/G, G, n, d_v]: head i·G + g


def _uniform_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float):
    """One head group: every part of ``pattern.parts()`` computed where it is cheap, merged by log-sum-exp."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32  # softmax statistics never in half
    qc, kc, vc = q.to(compute) * scale, k.to(compute), v.to(compute)
    parts = [attend_part(qc, kc, vc, part) for part in pattern.parts()]
    out, _ = merge_parts(parts)
    return out.to(q.dtype)


def attend_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, part: Pattern) -> Part:
    """Attention restricted to one primitive part; ``q`` is already scaled."""
    if isinstance(part, Dense):
        return dense_part(q, k, v)
    if isinstance(part, Local):
        return local_part(q, k, v, part.width)
    if isinstance(part, StridedColumns):
        return strided_columns_part(q, k, v, part.stride, part.include_self)
    if isinstance(part, FixedBlock):
        return fixed_block_part(q, k, v, part.stride)
    if isinstance(part, FixedSummary):
        return fixed_summary_part(q, k, v, part.stride, part.summary, part.summary_start(0), part.previous_blocks_only)
    raise ValueError(f"The torch backend has no kernel for the pattern part {part!r}; its parts() must be primitives.")


def merge_parts(parts: list[Part]) -> Part:
    """Softmax over the union of disjoint parts: ``out = Σ_c exp(lse_c − lse)·out_c``, ``lse = logsumexp_c lse_c``.

    Rows that see no key in any part get ``out = 0`` and ``lse = -inf``, with finite gradients.
    """
    weight, total, lse = _exp_sum_lse(torch.stack([p[1] for p in parts]), dim=0)  # over [parts, b, h, n]
    out = sum(w[..., None] * o for w, (o, _) in zip(weight, parts, strict=True))
    return out / total[..., None], lse


# --- the primitives -------------------------------------------------------------------------------------------


def local_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, width: int) -> Part:
    """Local(width): query block ``t`` (``width`` queries) sees key blocks ``t-1`` and ``t`` through the band mask."""
    n, w = q.shape[2], width
    qb, kb, vb = (_blocks(_pad(x, w), w) for x in (q, k, v))  # [b, h, nb, w, d]
    kb, vb = (torch.cat([F.pad(x, (0, 0, 0, 0, 1, -1)), x], dim=3) for x in (kb, vb))  # [prev | own]: [.., nb, 2w, d]
    x = torch.arange(w, device=q.device)[:, None]  # query offset in its block
    y = torch.arange(2 * w, device=q.device)[None, :]  # key offset in [prev | own]
    band = (x + w - y >= 0) & (x + w - y < w)  # i - j = x + w - y
    first = torch.arange(qb.shape[2], device=q.device)[:, None, None] == 0
    mask = band & ~(first & (y < w))  # block 0 has no previous block
    out, lse = attend_blocks(qb, kb, vb, mask)
    return _unblocks(out, n), _unblocks(lse[..., None], n)[..., 0]


def strided_columns_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stride: int, include_self: bool) -> Part:
    """StridedColumns: in the order ``[n/l, l] → [l, n/l]`` each residue class mod ``l`` is a causal chain."""
    n = q.shape[2]
    qs, ks, vs = (_blocks(_pad(x, stride), stride).transpose(2, 3) for x in (q, k, v))  # [b, h, l, n/l, d]
    m = qs.shape[3]
    a = torch.arange(m, device=q.device)
    mask = a[:, None] >= a[None, :] + (0 if include_self else 1)  # chain index a' <= a (< a without self)
    out, lse = attend_blocks(qs, ks, vs, mask)
    return _unblocks(out.transpose(2, 3), n), _unblocks(lse.transpose(2, 3)[..., None], n)[..., 0]


def fixed_block_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stride: int) -> Part:
    """FixedBlock: block-diagonal causal attention within blocks of ``stride`` positions."""
    n = q.shape[2]
    qb, kb, vb = (_blocks(_pad(x, stride), stride) for x in (q, k, v))  # [b, h, nb, l, d]
    a = torch.arange(stride, device=q.device)
    out, lse = attend_blocks(qb, kb, vb, a[:, None] >= a[None, :])
    return _unblocks(out, n), _unblocks(lse[..., None], n)[..., 0]


def fixed_summary_part(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    stride: int,
    summary: int,
    start: int,
    previous_blocks_only: bool,
) -> Part:
    """FixedSummary: gather the ``summary`` cells at in-block offset ``start`` of every block, then attend them.

    Query ``i`` sees summary key ``j`` when ``j <= i`` (``j`` in an earlier block when ``previous_blocks_only``).
    """
    n = q.shape[2]
    kp, vp = _pad(k, stride), _pad(v, stride)  # padded keys lie after every query, so the limits below mask them
    blocks = kp.shape[2] // stride
    key_pos = (torch.arange(blocks)[:, None] * stride + start + torch.arange(summary)[None, :]).flatten()
    i = torch.arange(n)
    limit = (i // stride) * stride - 1 if previous_blocks_only else i  # earlier blocks: j < own block's start
    idx = key_pos.to(q.device)
    return prefix_part(q, kp.index_select(2, idx), vp.index_select(2, idx), key_pos, limit)


def dense_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Part:
    """Dense: full causal attention (O(n²) time; memory bounded by the query chunks)."""
    pos = torch.arange(q.shape[2])
    return prefix_part(q, k, v, pos, pos)


# --- shared machinery ---------------------------------------------------------------------------------------


def prefix_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_pos: torch.Tensor, limit: torch.Tensor) -> Part:
    """Query ``i`` sees the gathered keys whose position ``key_pos <= limit[i]``; queries processed in chunks.

    ``key_pos`` (sorted) and ``limit`` (non-decreasing) are CPU tensors. A chunk only reads the key prefix its
    last query may see. Under autograd each chunk is checkpointed: the backward recomputes the chunk's
    probabilities instead of storing them, so memory stays ``O(chunk · keys)`` rather than ``O(n · keys)``
    (for Fixed that is ``c`` times the other parts' ``O(n·l)``). We chose checkpointing over a hand-written
    flash-style ``autograd.Function``: the same recomputation and memory bound, and the gradient is autograd's.
    """
    b, h, n, _ = q.shape
    rows = max(1, CHUNK_SCORES // max(1, b * h * key_pos.numel()))
    starts = list(range(0, n, rows))
    ends = [min(s + rows, n) for s in starts]
    counts = torch.searchsorted(key_pos, limit[torch.tensor(ends) - 1], right=True).clamp_min(1).tolist()
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    outs, lses = [], []
    for s, e, c in zip(starts, ends, counts, strict=True):
        mask = key_pos[None, :c].to(q.device) <= limit[s:e, None].to(q.device)
        args = (q[:, :, s:e], k[:, :, :c], v[:, :, :c], mask)
        if grad:
            out, lse = checkpoint(attend_blocks, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            out, lse = attend_blocks(*args)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def attend_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> Part:
    """Softmax attention ``q @ kᵀ`` over the last two dims with a boolean ``mask`` (broadcast); safe on empty rows."""
    scores = torch.matmul(q, k.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    p, total, lse = _exp_sum_lse(scores, dim=-1)
    return torch.matmul(p, v) / total[..., None], lse


def _exp_sum_lse(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``exp(x − m)``, its sum over ``dim`` and ``logsumexp(x)``, safe where every entry is ``-inf``.

    ``m`` is the finite row max, detached (softmax does not depend on it). Rows that see nothing get a sum of 1
    (so dividing by it gives 0) and ``lse = -inf``, and their gradients stay finite.
    """
    m = x.detach().amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(x - m)
    total = e.sum(dim=dim)
    seen = total > 0
    total = torch.where(seen, total, torch.ones_like(total))
    lse = (torch.log(total) + m.squeeze(dim)).masked_fill(~seen, float("-inf"))
    return e, total, lse


def _pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the sequence dim (2) of ``[b, h, n, d]`` up to a multiple of ``multiple``."""
    return F.pad(x, (0, 0, 0, -x.shape[2] % multiple))


def _blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    """``[b, h, nb·size, d] → [b, h, nb, size, d]``."""
    b, h, n, d = x.shape
    return x.reshape(b, h, n // size, size, d)


def _unblocks(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[b, h, nb, size, d] → [b, h, n, d]``, dropping the padding."""
    b, h, nb, size, d = x.shape
    return x.reshape(b, h, nb * size, d)[:, :, :n]
