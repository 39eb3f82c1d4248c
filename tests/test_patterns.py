"""Pattern masks against brute-force loops written from the paper's definitions as the authors' code resolves them.

Definitions (Child et al. 2019 §4.2–4.3; openai/sparse_attention), all causal ``j <= i``:
Local(w) = the last ``w`` positions incl. ``i``; StridedColumns(l) = ``(i - j) % l == 0``;
Strided(l) = Local(l) ∪ StridedColumns(l); FixedBlock(l) = own block of ``l``; FixedSummary(l, c, p) = the ``c``
cells of every block starting at ``l - (p + 1)·c`` (summary sub-blocks counted back from the block end);
Fixed = FixedBlock ∪ FixedSummary; per-head patterns give head ``h`` group ``h % G``.
"""

from __future__ import annotations

import pytest
import torch

from lightning_sparse.kernels import (
    Dense,
    Fixed,
    FixedBlock,
    FixedSummary,
    HeadSplit,
    Interleaved,
    Local,
    Pattern,
    Strided,
    StridedColumns,
    head_masks,
    sparse_attention,
)

PRIMITIVES = (Dense, Local, StridedColumns, FixedBlock, FixedSummary)


def allowed(p: Pattern, i: int, j: int, head: int = 0) -> bool:
    """Brute-force ground truth: may query ``i`` of head ``head`` attend key ``j`` under ``p``?"""
    d = i - j
    if isinstance(p, Dense):
        return d >= 0
    if isinstance(p, Local):
        return 0 <= d < p.width
    if isinstance(p, StridedColumns):
        return d >= (0 if p.include_self else 1) and d % p.stride == 0
    if isinstance(p, FixedBlock):
        return d >= 0 and j // p.stride == i // p.stride
    if isinstance(p, FixedSummary):
        pos = p.summary_positions[head % len(p.summary_positions)]
        first = p.stride - (pos + 1) * p.summary
        earlier = j // p.stride < i // p.stride
        return d >= 0 and first <= j % p.stride < first + p.summary and (earlier or not p.previous_blocks_only)
    if isinstance(p, Strided):
        return allowed(Local(p.stride), i, j) or allowed(StridedColumns(p.stride), i, j)
    if isinstance(p, Fixed):
        summary = FixedSummary(p.stride, p.summary, p.summary_positions)
        return allowed(FixedBlock(p.stride), i, j) or allowed(summary, i, j, head)
    if isinstance(p, HeadSplit):
        k = len(p.patterns)
        return allowed(p.patterns[head % k], i, j, head // k)  # the (head // k)-th head given to that pattern
    raise TypeError(p)


def brute_masks(p: Pattern, n: int, heads: int) -> torch.Tensor:
    """``[heads, n, n]`` boolean masks from :func:`allowed`, by plain loops."""
    return torch.tensor(
        [[[allowed(p, i, j, h) for j in range(n)] for i in range(n)] for h in range(heads)], dtype=torch.bool
    )


PATTERNS = {
    "dense": Dense(),
    "local1": Local(1),
    "local5": Local(5),
    "columns4": StridedColumns(4),
    "columns4-noself": StridedColumns(4, include_self=False),
    "block4": FixedBlock(4),
    "summary": FixedSummary(8, 2),
    "summary-positions": FixedSummary(8, 2, (0, 3, 1)),
    "summary-previous": FixedSummary(8, 3, (1,), previous_blocks_only=True),
    "summary-whole-block": FixedSummary(4, 4),
    "strided1": Strided(1),
    "strided4": Strided(4),
    "strided5": Strided(5),
    "fixed": Fixed(8, 2),
    "fixed-c1": Fixed(5, 1),
    "fixed-positions": Fixed(8, 2, (0, 1, 2, 3)),
    "split-strided": HeadSplit(Strided(5).components),
    "split-fixed": HeadSplit(Fixed(6, 2, (0, 2)).components),
    "split-nested": HeadSplit((Local(3), HeadSplit((Dense(), FixedSummary(4, 1, (0, 1, 2)))))),
    "split-single": HeadSplit((Strided(3),)),
}


@pytest.mark.parametrize("n", [1, 3, 17, 26])
@pytest.mark.parametrize("name", PATTERNS)
def test_mask_matches_brute_force(name: str, n: int) -> None:
    p = PATTERNS[name]
    heads = 2 * p.head_groups
    expected = brute_masks(p, n, heads)
    assert torch.equal(head_masks(p, n, heads), expected)
    mask = p.mask(n)
    assert mask.dtype == torch.bool
    if p.head_groups == 1:
        assert torch.equal(mask, expected[0])
    else:
        assert torch.equal(mask, expected[: p.head_groups])


def keys(p: Pattern, n: int, i: int, group: int = 0) -> list[int]:
    mask = p.mask(n)
    row = mask[i] if p.head_groups == 1 else mask[group, i]
    return row.nonzero().flatten().tolist()


def test_worked_examples_follow_the_authors_code() -> None:
    # Local keeps `width` positions including i (the code's q - k <= width - 1), not width + 1.
    assert keys(Local(3), 10, 5) == [3, 4, 5]
    # Strided(4): the last 4 positions plus every 4th earlier one.
    assert keys(Strided(4), 10, 9) == [1, 5, 6, 7, 8, 9]
    assert keys(StridedColumns(4, include_self=False), 10, 9) == [1, 5]
    # The paper's fixed example, l = 128, c = 8: a query past 256 sees cells 120-127 and 248-255 and its own block.
    assert keys(Fixed(128, 8), 301, 300) == [*range(120, 128), *range(248, 256), *range(256, 301)]
    # A query in block 0 before the summary cells sees only its own block.
    assert keys(Fixed(128, 8), 301, 100) == list(range(101))
    # Distinct summary sub-blocks per head, counted back from the block end: group g uses [8 - 2(g+1), 8 - 2g).
    for g, cells in enumerate([[6, 7], [4, 5], [2, 3], [0, 1]]):
        assert keys(FixedSummary(8, 2, (0, 1, 2, 3)), 16, 15, g) == [*cells, *(c + 8 for c in cells)]
        assert FixedSummary(8, 2, (0, 1, 2, 3)).summary_start(g) == cells[0]


@pytest.mark.parametrize("n", [1, 7, 29])
@pytest.mark.parametrize("name", PATTERNS)
def test_parts_are_disjoint_primitives_that_cover_the_mask(name: str, n: int) -> None:
    p = PATTERNS[name]
    for g in range(p.head_groups):
        group = p.head_group(g)
        assert group.head_groups == 1
        parts = group.parts()
        assert all(isinstance(part, PRIMITIVES) and part.head_groups == 1 for part in parts), parts
        masks = [part.mask(n) for part in parts]
        for a in range(len(masks)):
            for b in range(a + 1, len(masks)):
                assert not (masks[a] & masks[b]).any(), (parts[a], parts[b])
        union = torch.stack(masks).any(0)
        assert torch.equal(union, group.mask(n))
        assert torch.equal(union, head_masks(p, n, p.head_groups)[g])


@pytest.mark.parametrize("p", [Strided(1), Strided(4), Fixed(8, 2), Fixed(5, 1), Fixed(8, 2, (0, 1, 3))], ids=repr)
def test_components_unite_to_the_merged_pattern(p: Pattern) -> None:
    n, heads = 27, p.head_groups
    union = torch.stack([head_masks(c, n, heads) for c in p.components]).any(0)
    assert torch.equal(union, head_masks(p, n, heads))


def test_head_split_gives_head_h_the_group_h_mod_g() -> None:
    inner = Fixed(6, 2, (0, 1))
    p = HeadSplit((Local(3), StridedColumns(4), inner))
    assert p.head_groups == 6  # 3 patterns × lcm(1, 1, 2)
    n, heads = 13, 12
    masks = head_masks(p, n, heads)
    for h in range(heads):
        assert torch.equal(masks[h], p.head_group(h % 6).mask(n))
        sub = p.patterns[h % 3]
        expected = inner.head_group((h // 3) % 2).mask(n) if sub is inner else sub.mask(n)
        assert torch.equal(masks[h], expected), h


def test_head_masks_give_head_h_the_summary_position_h_mod_g() -> None:
    p = Fixed(8, 2, (0, 2, 1))
    masks = head_masks(p, 20, 9)
    for h in range(9):
        assert torch.equal(masks[h], Fixed(8, 2, (p.summary_positions[h % 3],)).mask(20))
    assert torch.equal(head_masks(Strided(3), 10, 4), Strided(3).mask(10).expand(4, 10, 10))


def test_interleaved_picks_the_pattern_of_block_r() -> None:
    schedule = Interleaved((Local(96), Local(96), StridedColumns(96)))
    assert [schedule.layer(r) for r in range(5)] == [Local(96), Local(96), StridedColumns(96), Local(96), Local(96)]
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match=r"interleaved.layer\(r\)"):
        sparse_attention(q, q, q, schedule)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Local(0), r"Local: width must be a positive integer, got 0"),
        (lambda: Local(-3), r"width must be a positive integer, got -3"),
        (lambda: Local(2.5), r"width must be a positive integer, got 2.5"),
        (lambda: Local(True), r"width must be a positive integer, got True"),
        (lambda: StridedColumns(0), r"StridedColumns: stride must be a positive integer"),
        (lambda: FixedBlock(-1), r"FixedBlock: stride must be a positive integer"),
        (lambda: Strided(0), r"Strided: stride must be a positive integer"),
        (lambda: Fixed(0, 1), r"Fixed: stride must be a positive integer"),
        (lambda: Fixed(8, 0), r"Fixed: summary must be a positive integer"),
        (lambda: Fixed(8, 9), r"summary=9 is larger than stride=8.*choose summary <= stride"),
        (lambda: FixedSummary(8, 9), r"FixedSummary: summary=9 is larger than stride=8"),
        (lambda: Fixed(8, 2, (0, 4)), r"needs 10 cells but a block has only stride=8.*at most 4"),
        (lambda: FixedSummary(8, 3, (2,)), r"needs 9 cells but a block has only stride=8.*at most 2"),
        (lambda: Fixed(8, 2, ()), r"must name at least one sub-block"),
        (lambda: Fixed(8, 2, (-1,)), r"must be non-negative integers, got \(-1,\)"),
        (lambda: HeadSplit(()), r"HeadSplit: patterns must hold at least one pattern"),
        (lambda: HeadSplit((Local(2), "local")), r"every entry must be a Pattern, got 'local'"),
        (lambda: Interleaved(()), r"Interleaved: patterns must be a non-empty list of Patterns"),
        (lambda: Interleaved((Local(2), 3)), r"Interleaved: patterns must be a non-empty list of Patterns"),
    ],
)
def test_invalid_parameters_raise_helpful_errors(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("n", [0, -4, 2.0, True])
def test_bad_length_raises(n) -> None:
    with pytest.raises(ValueError, match=r"sequence length must be a positive integer, got"):
        Strided(4).mask(n)
    with pytest.raises(ValueError, match=r"sequence length must be a positive integer"):
        head_masks(Fixed(4, 1, (0, 1)), n, 2)


def test_heads_must_be_a_multiple_of_head_groups() -> None:
    p = Fixed(8, 2, (0, 1, 2))
    q = torch.zeros(1, 4, 10, 8)
    with pytest.raises(ValueError, match=r"3 distinct per-head masks.*multiple of 3; got 4 heads"):
        sparse_attention(q, q, q, p, backend="reference")
    with pytest.raises(ValueError, match=r"multiple of 3; got 4 heads"):
        head_masks(p, 10, 4)
    with pytest.raises(ValueError, match=r"multiple of 4; got 6 heads"):
        sparse_attention(
            torch.zeros(1, 6, 10, 8), *[torch.zeros(1, 6, 10, 8)] * 2, HeadSplit(Fixed(8, 2, (0, 1)).components)
        )
