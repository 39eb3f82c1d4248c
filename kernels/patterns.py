"""Attention patterns of the Sparse Transformer (Child et al. 2019, §4.2–4.3 and §5.1).

A pattern is a small frozen dataclass that says which keys ``j`` a query ``i`` may attend to. Every
pattern answers :meth:`Pattern.mask` with its exact boolean mask (the O(n²) ground truth used by the
``reference`` backend and by tests) and :meth:`Pattern.parts` with a *disjoint* decomposition into
primitive parts, which the fast backends compute separately and merge through their log-sum-exps.

Primitives (each causal, ``j <= i``):

* :class:`Dense` — full causal attention.
* :class:`Local` — the last ``width`` positions, ``i - width < j <= i``.
* :class:`StridedColumns` — every ``stride``-th earlier position, ``(i - j) % stride == 0``.
* :class:`FixedBlock` — the query's own block of ``stride`` positions, ``j // stride == i // stride``.
* :class:`FixedSummary` — the summary cells of every block: ``summary`` positions near each block's end.

The paper's two factorized patterns are merged unions of two primitives (one head sees both):

* :class:`Strided` = ``Local(stride) ∪ StridedColumns(stride)``.
* :class:`Fixed` = ``FixedBlock(stride) ∪ FixedSummary(stride, summary)``.

The other two combination modes of §5.1 are :class:`HeadSplit` (head ``h`` uses
``patterns[h % len(patterns)]``) and :class:`Interleaved` (residual block ``r`` uses
``patterns[r % len(patterns)]``; a per-layer schedule, not an attention pattern itself).

Per-head patterns: a pattern whose heads differ has ``head_groups = G > 1``; its mask is
``[G, n, n]`` and head ``h`` uses group ``h % G`` (so the number of heads must be a multiple of G).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import torch

__all__ = [
    "Pattern",
    "Dense",
    "Local",
    "StridedColumns",
    "FixedBlock",
    "FixedSummary",
    "Strided",
    "Fixed",
    "HeadSplit",
    "Interleaved",
    "head_masks",
]


def _positive_int(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}; pass e.g. {name}=128.")


def _check_summary(owner: str, stride: int, summary: int, positions: tuple[int, ...]) -> None:
    _positive_int(owner, "stride", stride)
    _positive_int(owner, "summary", summary)
    if summary > stride:
        raise ValueError(
            f"{owner}: summary={summary} is larger than stride={stride}; the summary cells are a sub-block of "
            f"each block of `stride` positions, so choose summary <= stride (the paper uses c in {{8, 16, 32}} "
            f"with stride in {{128, 256}})."
        )
    if not positions:
        raise ValueError(f"{owner}: summary_positions must name at least one sub-block, e.g. (0,).")
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise ValueError(f"{owner}: summary_positions must be non-negative integers, got {positions!r}.")
    if (max(positions) + 1) * summary > stride:
        raise ValueError(
            f"{owner}: summary_positions={positions} with summary={summary} needs "
            f"{(max(positions) + 1) * summary} cells but a block has only stride={stride}; use fewer distinct "
            f"summary positions (at most {stride // summary}) or a smaller summary."
        )


def _positions(n: int, device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.arange(n, device=device)
    return idx[:, None], idx[None, :]


class Pattern:
    """Base of all attention patterns: which keys ``j`` each query ``i`` may attend to.

    ``op_key`` is the pattern's repr, set once it is built: the string under which the custom operators of
    :mod:`.ops` know it, stored as a plain attribute so compiled code reads it as a constant.
    """

    op_key: str

    def __post_init__(self) -> None:
        # Patterns built inside traced code (the torch backend's parts) never reach an op, and dynamo cannot trace repr
        if not torch.compiler.is_compiling():
            object.__setattr__(self, "op_key", repr(self))

    @property
    def head_groups(self) -> int:
        """Number of distinct per-head masks (1 when every head uses the same mask)."""
        return 1

    def head_group(self, group: int) -> Pattern:
        """The uniform pattern used by heads ``h`` with ``h % head_groups == group``."""
        if group != 0:
            raise ValueError(f"{type(self).__name__} has a single head group; got group={group}.")
        return self

    def check_length(self, n: int) -> None:
        """Raise ``ValueError`` if this pattern cannot serve a sequence of length ``n``."""
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"{self!r}: sequence length must be a positive integer, got {n!r}.")

    def mask(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Exact boolean mask, ``[n, n]`` (or ``[head_groups, n, n]``); ``mask[i, j]`` = query i sees key j."""
        self.check_length(n)
        if self.head_groups == 1:
            i, j = _positions(n, device)
            return self.head_group(0)._allowed(i, j)
        return torch.stack([self.head_group(g).mask(n, device) for g in range(self.head_groups)])

    def parts(self) -> tuple[Pattern, ...]:
        """Disjoint primitive parts whose union is this pattern (backends merge them by log-sum-exp).

        Defined per head group: a backend splits a per-head pattern with :meth:`head_group` first.
        """
        return (self,)

    def _allowed(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Dense(Pattern):
    """Full causal attention: query ``i`` sees every ``j <= i``."""

    def _allowed(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return j <= i


@dataclass(frozen=True)
class Local(Pattern):
    """A causal band: query ``i`` sees the last ``width`` positions ``i - width < j <= i``.

    This is the paper's first strided head A^(1) as the authors' code builds it ('local' mask,
    ``q - k <= width - 1``): ``width`` positions including ``i`` itself. The paper's formula
    ``t = max(0, i - l)`` would list ``l + 1`` positions; we follow the code.
    """

    width: int

    def __post_init__(self) -> None:
        _positive_int("Local", "width", self.width)
        super().__post_init__()

    def _allowed(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return (j <= i) & (i - j < self.width)


@dataclass(frozen=True)
class StridedColumns(Pattern):
    """Every ``stride``-th earlier position: ``j <= i`` and ``(i - j) % stride == 0`` (paper A^(2) of strided).

    ``include_self=False`` drops ``j = i``; that is the part of :class:`Strided` disjoint from
    ``Local(stride)``.
    """

    stride: int
    include_self: bool = True

    def __post_init__(self) -> None:
        _positive_int("StridedColumns", "stride", self.stride)
        super().__post_init__()

    def _allowed(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        lo = 0 if self.include_self else 1
        return (i - j >= lo) & ((i - j) % self.stride == 0)


@dataclass(frozen=True)
class FixedBlock(Pattern):
    """The query's own block: ``j // stride == i // stride`` and ``j <= i`` (paper A^(1) of fixed)."""

    stride: int

    def __post_init__(self) -> None:
        _positive_int("FixedBlock", "stride", self.stride)
        super().__post_init__()

    def _allowed(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return (j <= i) & (j // self.stride == i // self.stride)


@dataclass(frozen=True)
class FixedSummary(Pattern):
    """Summary cells of every block (paper A^(2) of fixed): ``j <= i`` and ``j % stride`` in a summary set.

    The summary set is a sub-block of ``summary`` cells counted back from each block's end, as the
    authors' code does it: position ``p`` means cells ``[stride - (p + 1)·summary, stride - p·summary)``,
    so the default ``p = 0`` is the last ``summary`` cells ``{stride - summary, …, stride - 1}`` (the
    paper's set ``{t, …, l}`` with ``t = l - c`` never contains ``l`` itself since ``j mod l < l``).
    With several ``summary_positions`` head ``h`` uses ``summary_positions[h % len(...)]`` (paper §4.3:
    distinct summary sub-blocks per head). ``previous_blocks_only=True`` keeps only cells of earlier
    blocks: the part of :class:`Fixed` disjoint from :class:`FixedBlock`.
    """

    stride: int
    summary: int
    summary_positions: tuple[int, ...] = (0,)
    previous_blocks_only: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "summary_positions", tuple(self.summary_positions))
        _check_summary("FixedSummary", self.stride, self.summary, self.summary_positions)
        super().__post_init__()

    @property
    def head_groups(self) -> int:
        return len(self.summary_positions)

    def head_group(self, group: int) -> FixedSummary:
        return FixedSummary(self.stride, self.summary, (self.summary_positions[group],), self.previous_blocks_only)

    def summary_start(self, group: int = 0) -> int:
        """First in-block offset of the summary cells used by head group ``group``."""
        return self.stride - (self.summary_positions[group] + 1) * self.summary

    def _allowed(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        start = self.summary_start(0)
        r = j % self.stride
        keep = (j <= i) & (r >= start) & (r < start + self.summary)
        if self.previous_blocks_only:
            keep &= j // self.stride < i // self.stride
        return keep


@dataclass(frozen=True)
class Strided(Pattern):
    """The paper's strided pattern, merged: ``Local(stride) ∪ StridedColumns(stride)`` in one head.

    Use :attr:`components` to interleave the two across layers (:class:`Interleaved`) or split them
    across heads (:class:`HeadSplit`). The paper picks ``stride ≈ √n``.
    """

    stride: int

    def __post_init__(self) -> None:
        _positive_int("Strided", "stride", self.stride)
        super().__post_init__()

    @property
    def components(self) -> tuple[Local, StridedColumns]:
        """The paper's two strided heads A^(1), A^(2) as standalone patterns."""
        return Local(self.stride), StridedColumns(self.stride)

    def parts(self) -> tuple[Pattern, ...]:
        return Local(self.stride), StridedColumns(self.stride, include_self=False)

    def _allowed(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        d = i - j
        return (d >= 0) & ((d < self.stride) | (d % self.stride == 0))


@dataclass(frozen=True)
class Fixed(Pattern):
    """The paper's fixed pattern, merged: ``FixedBlock(stride) ∪ FixedSummary(stride, summary)`` in one head.

    Enwik8 in the paper uses ``Fixed(128, 32)``. ``summary_positions`` gives heads distinct summary
    sub-blocks (see :class:`FixedSummary`), e.g. ``Fixed(128, 32, (0, 1, 2, 3))``.
    """

    stride: int
    summary: int
    summary_positions: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "summary_positions", tuple(self.summary_positions))
        _check_summary("Fixed", self.stride, self.summary, self.summary_positions)
        super().__post_init__()

    @property
    def head_groups(self) -> int:
        return len(self.summary_positions)

    def head_group(self, group: int) -> Fixed:
        return Fixed(self.stride, self.summary, (self.summary_positions[group],))

    @property
    def components(self) -> tuple[FixedBlock, FixedSummary]:
        """The paper's two fixed heads A^(1), A^(2) as standalone patterns."""
        return FixedBlock(self.stride), FixedSummary(self.stride, self.summary, self.summary_positions)

    def parts(self) -> tuple[Pattern, ...]:
        return FixedBlock(self.stride), FixedSummary(
            self.stride, self.summary, self.summary_positions, previous_blocks_only=True
        )

    def _allowed(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return FixedBlock(self.stride)._allowed(i, j) | FixedSummary(
            self.stride, self.summary, self.summary_positions[:1]
        )._allowed(i, j)


@dataclass(frozen=True)
class HeadSplit(Pattern):
    """Different patterns on different heads (paper §5.1, multi-head): head ``h`` uses ``patterns[h % p]``.

    ``HeadSplit((Local(128), StridedColumns(128)))`` is the paper's strided pattern with its two
    components on alternating heads.
    """

    patterns: tuple[Pattern, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "patterns", tuple(self.patterns))
        if not self.patterns:
            raise ValueError("HeadSplit: patterns must hold at least one pattern, e.g. (Local(128), StridedColumns(128)).")
        for p in self.patterns:
            if not isinstance(p, Pattern):
                raise ValueError(f"HeadSplit: every entry must be a Pattern, got {p!r}.")
        super().__post_init__()

    @property
    def head_groups(self) -> int:
        inner = reduce(math.lcm, (p.head_groups for p in self.patterns), 1)
        return len(self.patterns) * inner

    def head_group(self, group: int) -> Pattern:
        p = len(self.patterns)
        sub = self.patterns[group % p]
        return sub.head_group((group // p) % sub.head_groups)

    def parts(self) -> tuple[Pattern, ...]:
        # A HeadSplit whose heads all share one mask (e.g. of a single uniform pattern) is that pattern.
        return self.head_group(0).parts() if self.head_groups == 1 else (self,)


@dataclass(frozen=True)
class Interleaved:
    """One pattern per residual block (paper §5.1, Eq. 5): block ``r`` uses ``patterns[r % len(patterns)]``.

    A schedule for the model, not a single attention: pass ``interleaved.layer(r)`` to
    :func:`sparse_attention`. Repeat an entry to set the ratio, e.g. ``(Local(96), Local(96), StridedColumns(96))``.
    """

    patterns: tuple[Pattern, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "patterns", tuple(self.patterns))
        if not self.patterns or not all(isinstance(p, Pattern) for p in self.patterns):
            raise ValueError(f"Interleaved: patterns must be a non-empty list of Patterns, got {self.patterns!r}.")

    def layer(self, r: int) -> Pattern:
        """The pattern of residual block ``r``."""
        return self.patterns[r % len(self.patterns)]


def head_masks(pattern: Pattern, n: int, heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The mask of every head, ``[heads, n, n]``: head ``h`` uses group ``h % pattern.head_groups``."""
    groups = pattern.head_groups
    if heads % groups:
        raise ValueError(
            f"{pattern!r} has {groups} distinct per-head masks, so the number of heads must be a multiple of "
            f"{groups}; got {heads} heads."
        )
    m = pattern.mask(n, device)
    if groups == 1:
        return m.expand(heads, n, n)
    return m[torch.arange(heads, device=m.device) % groups]
