"""Tile configurations of the ``triton`` backend: named per kernel kind, defaults per launch layout and head widths.

A launch's tiles depend on its *layout* (``"local"``: a natural-order launch of a ``Local`` band alone;
``"natural"``: any other natural-order launch, e.g. the fixed pattern; ``"strided"``: a strided-order launch),
on the query/key width ``d_qk`` and value width ``d_v``, and on the dtype (float32 inputs take small tiles).
:func:`tile_override` replaces them for a ``with`` block (tests, tuning sweeps) without touching module state
outside it. Pure Python: no triton import.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace

import torch

LAYOUTS = ("local", "natural", "strided")


def _check_pow2(owner: object, **sizes: int) -> None:
    for name, value in sizes.items():
        if value < 16 or value & (value - 1):
            raise ValueError(f"{type(owner).__name__}.{name} must be a power of two >= 16, got {value}.")


@dataclass(frozen=True)
class FwdTiles:
    """Forward tiles: ``bm`` query rows per program, keys in steps of ``bn``; ``maxnreg`` caps the registers per
    thread (0: the compiler's choice) so more programs share a multiprocessor; ``one_loop`` runs a band's key tiles
    in one masked loop (one software pipeline; better for short bands) instead of masked edges around an unmasked
    middle."""

    bm: int
    bn: int
    warps: int = 4
    stages: int = 2
    maxnreg: int = 0
    one_loop: bool = False

    def __post_init__(self) -> None:
        _check_pow2(self, bm=self.bm, bn=self.bn)

    def capped(self, n_eff: int) -> FwdTiles:
        """The same tiles, no larger than the launch's sequence (rounded up to a power of two)."""
        return replace(self, bm=_pow2_at_most(n_eff, self.bm), bn=_pow2_at_most(n_eff, self.bn))


@dataclass(frozen=True)
class BwdTiles:
    """Backward tiles: key-stationary dK/dV programs own ``bn1`` key rows and step over queries by ``bm1``;
    query-stationary dQ programs own ``bm2`` query rows and step over keys by ``bn2``. ``fused``: band-only launches
    run one program per tile of ``bn1`` rows that computes its dQ and its dK/dV and the diagonal block once for both
    (its steps are capped at ``bn1``). ``ordered_dq``: launches with a summary part add the summary part's dQ from
    the key-stationary programs in a fixed order (5 matrix products per block instead of 7; an experiment, off by
    default: with 1,024-row segments 2.1× the default's forward+backward time at the Enwik8 shape, H100, README);
    ``segment`` (with it; a multiple of ``bm1``, 0: none) splits each summary key tile's queries into programs of
    that many rows, whose dK/dV are added in a fixed order too, so that the key tile that every later query sees is
    not one long program. ``ordered_kv`` (the other 5-product design, off by default: 1.8× the default's time
    there): launches with a summary part whose query tiles hold whole blocks (``bm2`` a multiple of the stride) run
    one program per query tile that computes every gradient of its pairs, the summary key tiles' dK/dV added across
    tiles in a fixed order, ``bn2`` keys a step. ``warps``, ``stages``, ``maxnreg``, ``one_loop`` as in
    :class:`FwdTiles`."""

    bm1: int
    bn1: int
    bm2: int
    bn2: int
    warps: int = 4
    stages: int = 2
    maxnreg: int = 0
    fused: bool = False
    one_loop: bool = False
    ordered_dq: bool = False
    segment: int = 0
    ordered_kv: bool = False

    def __post_init__(self) -> None:
        _check_pow2(self, bm1=self.bm1, bn1=self.bn1, bm2=self.bm2, bn2=self.bn2)
        if self.segment < 0 or self.segment % self.bm1:
            raise ValueError(f"BwdTiles.segment must be 0 or a positive multiple of bm1={self.bm1} (query rows of a "
                             f"summary key program), got {self.segment}.")
        if self.ordered_kv and self.ordered_dq:
            raise ValueError("BwdTiles: ordered_kv and ordered_dq are two designs of the same backward; set one.")
        if self.segment and not self.ordered_dq:
            raise ValueError(f"BwdTiles.segment={self.segment} needs ordered_dq=True (the segments' dK/dV are added in "
                             "order); set ordered_dq=True or segment=0.")

    def capped(self, n_eff: int) -> BwdTiles:
        """The same tiles, no larger than the launch's sequence (rounded up to a power of two)."""
        cap = lambda t: _pow2_at_most(n_eff, t)  # noqa: E731
        return replace(self, bm1=cap(self.bm1), bn1=cap(self.bn1), bm2=cap(self.bm2), bn2=cap(self.bn2))


def _pow2_at_most(x: int, cap: int, floor: int = 16) -> int:
    return max(floor, min(cap, 1 << max(0, (x - 1).bit_length())))


# 16-bit defaults per (kind, layout, d_qk, d_v), from H200 sweeps (benchmarks/results/KERNEL_NOTES.md). A local band
# wastes (BM + width) / width of its work, so it takes 64-row query tiles; strided-layout sequences are short
# (n / stride rows), so their few key tiles run in one pipelined loop. A register cap of 168 (128 at 8 warps) fits 3
# (2) programs per multiprocessor without spills; the fused band backward shares each diagonal block between dQ and
# dK/dV. Widths without an entry use the entry of the wider of the two (tiles that fit the wider operand).
_W64 = {
    ("fwd", "local"): FwdTiles(64, 32, warps=4, stages=3),
    ("fwd", "strided"): FwdTiles(64, 32, warps=4, stages=3, one_loop=True),
    ("fwd", "natural"): FwdTiles(128, 64, warps=8, stages=3, maxnreg=128),
    ("bwd", "local"): BwdTiles(32, 64, 64, 32, warps=4, stages=2, maxnreg=168, fused=True),
    ("bwd", "strided"): BwdTiles(32, 64, 64, 32, warps=4, stages=2, maxnreg=168, fused=True),
    ("bwd", "natural"): BwdTiles(32, 128, 128, 64, warps=8, stages=3, maxnreg=128),
}
_W128 = {
    ("fwd", "local"): FwdTiles(64, 64, warps=4, stages=3),
    ("fwd", "strided"): FwdTiles(64, 64, warps=4, stages=3),
    ("fwd", "natural"): FwdTiles(64, 64, warps=4, stages=3),
    ("bwd", "local"): BwdTiles(32, 64, 64, 32, warps=4, stages=2),
    ("bwd", "strided"): BwdTiles(32, 64, 64, 32, warps=4, stages=2),
    ("bwd", "natural"): BwdTiles(32, 64, 64, 32, warps=4, stages=2),
}
# Head width 32: NOT YET SWEPT ON THE GPU. Guesses from the width-64 entries: the same tiles (every operand is half
# as wide, so they fit in fewer registers; the caps then cost nothing), 128-key steps for the fixed pattern's dQ.
_W32 = {
    **_W64,
    ("bwd", "natural"): BwdTiles(32, 128, 128, 128, warps=8, stages=3, maxnreg=128),
}
DEFAULTS: dict[tuple[str, str, int, int], FwdTiles | BwdTiles] = {
    (kind, layout, w, w): tiles
    for w, table in ((32, _W32), (64, _W64), (128, _W128))
    for (kind, layout), tiles in table.items()
}
FLOAT32_TILES = {"fwd": FwdTiles(64, 32, warps=4, stages=2), "bwd": BwdTiles(32, 32, 32, 32, warps=4, stages=2)}


@dataclass(frozen=True)
class _Override:
    fwd: FwdTiles | None
    bwd: BwdTiles | None
    layout: str | None
    widths: tuple[int, int] | None

    def applies(self, kind: str, layout: str, d_qk: int, d_v: int) -> FwdTiles | BwdTiles | None:
        if self.layout not in (None, layout) or self.widths not in (None, (d_qk, d_v)):
            return None
        return self.fwd if kind == "fwd" else self.bwd


# Process-wide, not a ContextVar: autograd runs a CUDA backward on its own device thread, which must see the override
# its forward ran under (a ContextVar set on the caller's thread is invisible there).
_OVERRIDES: list[_Override] = []
_OVERRIDES_LOCK = threading.Lock()


@contextmanager
def tile_override(
    fwd: FwdTiles | None = None,
    bwd: BwdTiles | None = None,
    *,
    layout: str | None = None,
    widths: tuple[int, int] | None = None,
) -> Iterator[None]:
    """Use these tiles (for every dtype) inside the ``with`` block, for launches of ``layout`` (None: all) and
    head widths ``widths = (d_qk, d_v)`` (None: all). Nested overrides: the innermost that matches wins. The override
    holds for every thread of the process while the block runs (backward passes run on autograd's threads)."""
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} or None, got {layout!r}.")
    if not isinstance(fwd, (FwdTiles, type(None))) or not isinstance(bwd, (BwdTiles, type(None))):
        raise ValueError(f"tile_override takes fwd=FwdTiles(...) and bwd=BwdTiles(...), got {fwd!r}, {bwd!r}.")
    entry = _Override(fwd, bwd, layout, None if widths is None else tuple(widths))
    with _OVERRIDES_LOCK:
        _OVERRIDES.append(entry)
    try:
        yield
    finally:
        with _OVERRIDES_LOCK:  # this entry, by identity (an equal one may be nested inside or around it)
            del _OVERRIDES[max(i for i, o in enumerate(_OVERRIDES) if o is entry)]


def select_tiles(kind: str, layout: str, d_qk: int, d_v: int, dtype: torch.dtype) -> FwdTiles | BwdTiles:
    """The tiles of a ``kind`` ("fwd" or "bwd") launch: the innermost matching override, else the defaults."""
    with _OVERRIDES_LOCK:
        overrides = tuple(_OVERRIDES)
    for override in reversed(overrides):
        tiles = override.applies(kind, layout, d_qk, d_v)
        if tiles is not None:
            return tiles
    if dtype == torch.float32:
        return FLOAT32_TILES[kind]
    wide = max(d_qk, d_v)
    return DEFAULTS.get((kind, layout, d_qk, d_v)) or DEFAULTS[(kind, layout, wide, wide)]


@contextmanager
def ordered_tiles(design: str, segment: int = 0, **changes: int) -> Iterator[None]:
    """Inside the ``with`` block, natural-layout backward launches (the fixed pattern's) at every head width use their
    default 16-bit tiles with one of the 5-product designs: ``design="dq"`` (``ordered_dq``, with ``segment``) or
    ``"kv"`` (``ordered_kv``; ``segment`` ignored); ``changes`` replace other fields (e.g. ``maxnreg=0``). The benchmarks' A/B switch."""
    if design not in ("dq", "kv"):
        raise ValueError(f"ordered_tiles: design must be 'dq' or 'kv', got {design!r}.")
    widths = sorted({w for (_, _, w, _) in DEFAULTS})
    with ExitStack() as stack:
        for d_qk in widths:
            for d_v in widths:
                tiles = replace(select_tiles("bwd", "natural", d_qk, d_v, torch.bfloat16), ordered_dq=design == "dq",
                                ordered_kv=design == "kv", segment=segment if design == "dq" else 0, **changes)
                stack.enter_context(tile_override(bwd=tiles, layout="natural", widths=(d_qk, d_v)))
        yield
