"""The launch planner of the ``triton`` backend: which kernel launches compute a pattern, built once and cached.

A pattern's heads are split into head groups, each group into disjoint primitive parts (:meth:`Pattern.parts`).
Parts that live in the natural layout (a band: ``Dense``, ``Local``, ``FixedBlock``; and ``FixedSummary``) run in
one launch; ``StridedColumns`` runs in the strided layout, after it, and merges through the log-sum-exp. Heads
whose parts differ only in the summary offset share a launch: the offset is read per head from a small table.
The kernels find their key and query tiles by closed-form address arithmetic (no per-row index lists), so the
only tables are these per-launch head lists, cached per (pattern, heads, device).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import torch

from .patterns import Dense, FixedBlock, FixedSummary, Local, Pattern, StridedColumns

# The one definition of the part codes: the planner writes them into each Launch, and triton_kernels.py imports them
# as tl.constexpr globals for the jit code (this module imports no triton, so the planner runs without it).
# Band parts: none, causal (Dense; the strided part in the strided layout), the last `width` positions (Local),
# the own block of `width` positions (FixedBlock). Summary parts: none, cells at or before the query
# (FixedSummary), cells of earlier blocks only (FixedSummary(previous_blocks_only=True), the summary part of Fixed).
BAND_NONE, BAND_CAUSAL, BAND_LOCAL, BAND_FIXED = 0, 1, 2, 3
SUM_NONE, SUM_UPTO, SUM_PREV = 0, 1, 2


@dataclass(frozen=True)
class Launch:
    """One kernel launch over the heads ``heads``; ``starts[i]`` is head ``heads[i]``'s summary offset.

    ``stride`` is 1 for the natural layout and the pattern's stride for the strided layout; ``merge`` says the
    launch adds to what an earlier launch wrote for the same heads.
    """

    band: int
    width: int
    offset: int
    summary: int
    summary_stride: int
    summary_size: int
    stride: int
    merge: bool
    heads: tuple[int, ...]
    starts: tuple[int, ...]


@dataclass(frozen=True)
class _Natural:
    band: int = BAND_NONE
    width: int = 1
    summary: int = SUM_NONE
    summary_stride: int = 1
    summary_size: int = 1


def _unsupported(pattern: Pattern, why: str) -> ValueError:
    return ValueError(
        f"backend='triton' cannot run {pattern!r}: {why}. Use backend='torch' for this pattern, or build it from "
        f"the library's patterns (Dense, Local, StridedColumns, FixedBlock, FixedSummary, Strided, Fixed, HeadSplit)."
    )


def _split(group_pattern: Pattern) -> tuple[_Natural | None, int, tuple[int, int] | None]:
    """(natural-layout spec or None, summary start, (stride, offset) of the strided part or None)."""
    band = None
    summary = None
    strided = None
    for part in group_pattern.parts():
        if isinstance(part, (Dense, Local, FixedBlock)):
            if band is not None:
                raise _unsupported(group_pattern, "it has two band parts")
            if isinstance(part, Dense):
                band = (BAND_CAUSAL, 1)
            elif isinstance(part, Local):
                band = (BAND_LOCAL, part.width)
            else:
                band = (BAND_FIXED, part.stride)
        elif isinstance(part, FixedSummary):
            if summary is not None:
                raise _unsupported(group_pattern, "it has two summary parts")
            kind = SUM_PREV if part.previous_blocks_only else SUM_UPTO
            summary = (kind, part.stride, part.summary, part.summary_start(0))
        elif isinstance(part, StridedColumns):
            if strided is not None:
                raise _unsupported(group_pattern, "it has two strided parts")
            strided = (part.stride, 0 if part.include_self else 1)
        else:
            raise _unsupported(group_pattern, f"its part {part!r} has no kernel")
    if summary is not None and band is not None:
        # The summary dK/dV programs assume a summary key's band queries end inside its own block and that the
        # two parts are disjoint: true for Fixed = FixedBlock ∪ FixedSummary(previous blocks only).
        if not (band == (BAND_FIXED, summary[1]) and summary[0] == SUM_PREV):
            raise _unsupported(group_pattern, "a summary part merges only with the FixedBlock of the same stride")
    if band is None and summary is None:
        return None, 0, strided
    natural = _Natural(*(band or (BAND_NONE, 1)), *(summary[:3] if summary else (SUM_NONE, 1, 1)))
    return natural, (summary[3] if summary else 0), strided


@lru_cache(maxsize=512)
def launch_plan(pattern: Pattern, heads: int) -> tuple[Launch, ...]:
    """The launches that compute ``pattern`` on ``heads`` heads: natural-layout launches first, then strided ones."""
    groups = pattern.head_groups
    natural: dict[_Natural, list[tuple[int, int]]] = {}
    strided: dict[tuple[int, int, bool], list[int]] = {}
    for g in range(groups):
        nat, start, strd = _split(pattern.head_group(g))
        for h in range(g, heads, groups):
            if nat is not None:
                natural.setdefault(nat, []).append((h, start))
            if strd is not None:
                strided.setdefault((*strd, nat is not None), []).append(h)
    plan = []
    for nat, members in natural.items():
        members.sort()
        plan.append(
            Launch(nat.band, nat.width, 0, nat.summary, nat.summary_stride, nat.summary_size, 1, False,
                   tuple(h for h, _ in members), tuple(s for _, s in members))
        )
    for (stride, offset, merge), members in strided.items():
        members.sort()
        plan.append(Launch(BAND_CAUSAL, 1, offset, SUM_NONE, 1, 1, stride, merge, tuple(members), (0,) * len(members)))
    return tuple(plan)


_DEVICE_TABLES: dict[tuple[Launch, str], tuple[torch.Tensor, torch.Tensor]] = {}


def head_tables(launch: Launch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The launch's head indices and summary offsets as int32 tensors on ``device`` (cached)."""
    key = (launch, str(device))
    tables = _DEVICE_TABLES.get(key)
    if tables is None:
        if device.type == "cuda":
            # Made by another thread, on a stream of its own: torch.compile's CUDA-graph trees route every allocation
            # of the thread that runs a compiled graph into their private pool (on any stream), where a cached
            # table would be a live tensor the graphs do not track ("tensors in the cudagraph pool not tracked").
            with ThreadPoolExecutor(1) as worker:
                tables = worker.submit(_made_on_side_stream, launch, device).result()
        else:
            tables = _tables(launch, device)
        _DEVICE_TABLES[key] = tables
    return tables


def _tables(launch: Launch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.tensor(launch.heads, dtype=torch.int32, device=device),
        torch.tensor(launch.starts, dtype=torch.int32, device=device),
    )


def _made_on_side_stream(launch: Launch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):
        tables = _tables(launch, device)
    side.synchronize()
    return tables
