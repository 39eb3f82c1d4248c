"""Decode attention: one new query per sequence attends to its pattern's keys in a KV cache.

Every pattern of this library is *periodic*: shifting query and key by its period ``P`` (the lcm of its integer
parameters: strides, widths, summary sizes) keeps the mask, ``allowed(i, j) = allowed(i + P, j + P)``. So the keys
of query ``t`` are ``t − δ`` for the offsets ``δ ∈ D(t mod P)`` with ``δ <= t``: one small table of offsets per
residue, derived once from the pattern's own rule (``_allowed``) and checked against it. Offsets are sorted
ascending, so the keys that exist at step ``t`` are a prefix of the row; the rest are padding (``δ = n``).

Table rows have ``l + ⌈n/l⌉`` entries for ``Strided(l)``, ``l + c·⌈n/l⌉`` for ``Fixed(l, c)`` and ``n`` for
``Dense``: the per-step work is the pattern's, O(n/l + l) for strided, not O(n).

``decode_attention`` is the PyTorch version (any device), ``decode_step`` the same after writing the step's own key
and value into the cache (the reference of the Triton decode kernel in ``decode_triton``); ``decode_table`` builds
the tables. Knows nothing of the model or of Lightning.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import reduce

import torch

from .patterns import Pattern

__all__ = ["DecodeTable", "decode_attention", "decode_step", "decode_table", "pattern_period"]

_ROWS_PER_CHUNK = 1 << 24  # elements of the [residues, n] boolean evaluated at once while building a table


def pattern_period(pattern: Pattern) -> int:
    """A shift period of a uniform pattern: the lcm of its integer parameters (1 for ``Dense``)."""
    ints = [
        getattr(pattern, f.name)
        for f in dataclasses.fields(pattern)
        if isinstance(getattr(pattern, f.name), int) and not isinstance(getattr(pattern, f.name), bool)
    ] if dataclasses.is_dataclass(pattern) else []
    return reduce(math.lcm, (v for v in ints if v > 0), 1)


@dataclass(frozen=True)
class DecodeTable:
    """Key offsets of every head and residue: ``offsets[h, r, :]`` are the ``δ`` of queries ``t ≡ r (mod period)``.

    ``offsets`` is int32 ``[heads, min(period, n), width]``, each row ascending and padded with ``n`` (never
    ``<= t``).
    """

    offsets: torch.Tensor
    period: int
    n: int

    @property
    def width(self) -> int:
        """Entries per row: the most keys any query of this pattern attends to."""
        return self.offsets.shape[-1]

    def keys(self, head: int, t: int) -> torch.Tensor:
        """The key positions of query ``t`` in head ``head`` (ascending), for tests and inspection."""
        delta = self.offsets[head, t % self.period].long()
        return torch.sort(t - delta[delta <= t]).values


def _group_offsets(pattern: Pattern, n: int, period: int, device: torch.device) -> list[torch.Tensor]:
    """Per residue ``r``, the ascending offsets ``δ < n`` that query ``i* ≡ r`` (with ``i* >= n − 1``) allows."""
    base = period * math.ceil((n - 1) / period)  # i* = base + r >= n - 1: every δ <= n - 1 has its key j >= 0
    delta = torch.arange(n, device=device)
    rows: list[torch.Tensor] = []
    residues = min(period, n)  # queries exist only below n, so residues >= n never occur
    chunk = max(1, _ROWS_PER_CHUNK // n)
    for r0 in range(0, residues, chunk):
        i = base + torch.arange(r0, min(residues, r0 + chunk), device=device)[:, None]
        allowed = pattern._allowed(i, i - delta[None, :])
        rows.extend(delta[a] for a in allowed)
    return rows


def _check_periodic(pattern: Pattern, n: int, period: int, rows: list[torch.Tensor], device: torch.device) -> None:
    """The table must reproduce the rule on the first and last ``period`` queries (catches a non-periodic pattern)."""
    queries = sorted({*range(min(n, period)), *range(max(0, n - period), n)})
    i = torch.tensor(queries, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    truth = pattern._allowed(i, j) & (j <= i)
    for q, row in zip(queries, truth, strict=True):
        delta = rows[q % period]
        if not torch.equal(torch.sort(q - delta[delta <= q]).values, j[0][row]):
            raise ValueError(
                f"{pattern!r} is not periodic with period {period} (the lcm of its integer parameters) at query "
                f"{q}: cached decoding needs allowed(i, j) == allowed(i + P, j + P); sample with cache=False."
            )


def decode_table(pattern: Pattern, n: int, heads: int, device: torch.device | str | None = None) -> DecodeTable:
    """The decode table of ``pattern`` for contexts up to ``n`` and ``heads`` heads (head ``h``: group ``h % G``)."""
    pattern.check_length(n)
    groups = pattern.head_groups
    if heads % groups:
        raise ValueError(
            f"{pattern!r} has {groups} distinct per-head masks, so the number of heads must be a multiple of "
            f"{groups}; got {heads} heads."
        )
    device = torch.device("cpu") if device is None else torch.device(device)
    uniform = [pattern.head_group(g) for g in range(groups)]
    period = reduce(math.lcm, (pattern_period(p) for p in uniform), 1)
    per_group = []
    for p in uniform:
        rows = _group_offsets(p, n, period, device)
        _check_periodic(p, n, period, rows, device)
        per_group.append(rows)
    width = max(1, max(len(row) for rows in per_group for row in rows))
    table = torch.full((groups, len(per_group[0]), width), n, dtype=torch.int32, device=device)
    for g, rows in enumerate(per_group):
        for r, row in enumerate(rows):
            table[g, r, : len(row)] = row.to(torch.int32)
    head_table = table[torch.arange(heads, device=device) % groups].contiguous()
    return DecodeTable(head_table, period, n)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: DecodeTable,
    position: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of the query at ``position`` to its pattern's keys in the cache (PyTorch; softmax in float32).

    ``q`` ``[B, H, 1, d_qk]``; ``k_cache`` ``[B, H, N, d_qk]`` and ``v_cache`` ``[B, H, N, d_v]`` hold every
    position ``<= position`` (``N >= table.n``); ``position`` is a 1-element int64 tensor on the cache's device
    (so a CUDA graph can replay this at any step). Returns ``[B, H, 1, d_v]`` in ``q``'s dtype; a query that sees
    no key gets zeros, as in ``sparse_attention``.
    """
    b, h, _, d_qk = q.shape
    d_v = v_cache.shape[-1]
    delta = table.offsets.index_select(1, position % table.period)[:, 0].long()  # [H, K]
    valid = delta <= position  # [H, K]
    keys = (position - delta).clamp_(min=0)
    k = k_cache.gather(2, keys[None, :, :, None].expand(b, h, -1, d_qk))  # [B, H, K, d_qk]
    v = v_cache.gather(2, keys[None, :, :, None].expand(b, h, -1, d_v))
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, H, 1, K]
    scores = scores.masked_fill(~valid[None, :, None, :], float("-inf"))
    top = scores.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(scores - top)
    out = torch.matmul(weights, v.float()) / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return out.to(q.dtype)


def decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: DecodeTable,
    position: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Write the new key ``k`` ``[B, H, 1, d_qk]`` and value ``v`` ``[B, H, 1, d_v]`` into the caches at
    ``position``, then :func:`decode_attention` of ``q`` there (in place: the caches keep the new entries)."""
    k_cache.index_copy_(2, position, k)
    v_cache.index_copy_(2, position, v)
    return decode_attention(q, k_cache, v_cache, table, position, scale)
