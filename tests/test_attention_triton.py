"""The Triton kernels on the CPU under ``TRITON_INTERPRET=1``: out, dq, dk, dv of every pattern, mode and dtype.

Triton reads ``TRITON_INTERPRET`` when it is first imported, and other test files may import it earlier in the
same process, so the kernel tests run in a child pytest process that sets the variable before anything else
(``test_kernels_under_interpreter``). Input checks and the import without Triton run in the parent.

The bar for every check (FlashAttention's rule): the kernel's max error against a float64 reference is at most
twice the error of the same attention written with plain PyTorch ops in the input dtype, plus a tiny floor.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch
from interpreter_child import in_child, in_parent, parent_only, run_under_interpreter

from lightning_sparse.kernels import (
    Dense,
    Fixed,
    FixedBlock,
    FixedSummary,
    HeadSplit,
    Local,
    Pattern,
    Strided,
    StridedColumns,
    head_masks,
    sparse_attention,
)
from lightning_sparse.kernels.tiles import BwdTiles, FwdTiles, tile_override


@parent_only
def test_kernels_under_interpreter():
    """Run this file's kernel tests in a child process with TRITON_INTERPRET=1 set before triton is imported."""
    run_under_interpreter(__file__)


# ---------------------------------------------------------------- references


def _attention(q, k, v, mask, scale):
    """Masked attention in the inputs' dtype; rows that see no key give zeros (as the kernels do)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    empty = ~mask.any(-1, keepdim=True)
    s = s.masked_fill(~mask, float("-inf")).masked_fill(empty, 0.0)
    p = torch.softmax(s, dim=-1) * (~empty).to(s.dtype)
    return torch.matmul(p, v)


def _run(fn, q, k, v, do, dtype):
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    o = fn(q, k, v)
    o.backward(do.to(dtype))
    return [t.detach().double() for t in (o, q.grad, k.grad, v.grad)]


def check_against_reference(q, k, v, do, pattern: Pattern, scale: float | None = None, floor: float = 1e-6):
    """Assert the triton backend's out/dq/dk/dv error <= 2x plain PyTorch's (same dtype) error vs float64, and that
    the reference backend agrees with this file's own reference."""
    n, d = q.shape[2], q.shape[3]
    sc = d**-0.5 if scale is None else scale
    mask = head_masks(pattern, n, q.shape[1])
    ref = _run(lambda a, b, c: _attention(a, b, c, mask, sc), q, k, v, do, torch.float64)
    plain = _run(lambda a, b, c: _attention(a, b, c, mask, sc), q, k, v, do, q.dtype)
    got = _run(lambda a, b, c: sparse_attention(a, b, c, pattern, scale=scale, backend="triton"), q, k, v, do, q.dtype)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)}, expected {tuple(r.shape)}"
    for name, g, p, r in zip(("out", "dq", "dk", "dv"), got, plain, ref, strict=True):
        assert not torch.isnan(g).any(), f"{name} has NaN"
        err, err_plain = (g - r).abs().max().item(), (p - r).abs().max().item()
        bound = 2 * err_plain + floor * max(1.0, r.abs().max().item())
        assert err <= bound, f"{pattern!r} {q.dtype} {name}: error {err:.3e} > bound {bound:.3e} (plain {err_plain:.3e})"


def _inputs(b, h, n, d, dtype, seed, d_v=None):
    """q, k [b, h, n, d] and v, do [b, h, n, d_v] (d_v defaults to d)."""
    g = torch.Generator().manual_seed(seed)
    widths = (d, d, d_v or d, d_v or d)
    return [torch.randn(b, h, n, w, generator=g).to(dtype) for w in widths]


# ---------------------------------------------------------------- kernel tests (child process)

PATTERNS = [
    ("dense", Dense(), 70, 2),
    ("local", Local(24), 70, 2),
    ("fixed_block", FixedBlock(16), 75, 2),
    ("summary_upto", FixedSummary(12, 5), 75, 2),
    ("summary_prev_per_head", FixedSummary(16, 4, (0, 2), previous_blocks_only=True), 64, 2),
    ("fixed", Fixed(16, 4), 80, 2),
    ("fixed_per_head", Fixed(16, 6, (0, 1)), 90, 2),
    ("strided_columns", StridedColumns(8), 64, 2),
    ("strided_columns_no_self", StridedColumns(8, include_self=False), 64, 2),
    ("strided", Strided(8), 100, 2),
    ("strided_odd_stride", Strided(5), 93, 2),
    ("headsplit_strided", HeadSplit((Local(8), StridedColumns(8))), 64, 2),
    ("headsplit_fixed_strided", HeadSplit((Fixed(16, 4, (0, 1)), Strided(8))), 64, 4),
    # one natural-order launch for all heads and a strided-order one (merging into it) for half of them
    ("headsplit_local_strided", HeadSplit((Local(8), Strided(8))), 64, 4),
]
# small tiles so that every band edge, full tile and gathered summary tile occurs; BM != BN both ways; band
# launches alternate between the fused backward (one program per tile for dQ and dK/dV) and split programs
TILES = [
    (FwdTiles(32, 16, warps=4, stages=1), BwdTiles(16, 32, 32, 16, warps=4, stages=1, fused=True)),
    (FwdTiles(16, 32, warps=4, stages=1), BwdTiles(32, 16, 16, 32, warps=4, stages=1, fused=False)),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@pytest.fixture
def tiles(request):
    fwd, bwd = request.param
    with tile_override(fwd=fwd, bwd=bwd):
        yield request.param


@in_child
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(
    "name,pattern,n,heads,tiles",
    [(*p, TILES[i % 2]) for i, p in enumerate(PATTERNS)],
    ids=[p[0] for p in PATTERNS],
    indirect=["tiles"],
)
def test_pattern_matches_reference(name, pattern, n, heads, tiles, dtype):
    q, k, v, do = _inputs(1, heads, n, 32, DTYPES[dtype], seed=zlib.crc32(f"{name}-{dtype}".encode()))
    check_against_reference(q, k, v, do, pattern)


# separate query/key and value widths: (name, pattern, n, heads, d_qk, d_v, dtype); every width of 32/64/128 on
# each side, both backward program kinds, the three dtypes
WIDTHS = [
    ("strided", Strided(8), 64, 2, 32, 64, "bf16"),
    ("fixed_per_head", Fixed(16, 4, (0, 1)), 64, 2, 64, 128, "fp16"),
    ("headsplit_fixed_strided", HeadSplit((Fixed(16, 4, (0, 1)), Strided(8))), 48, 4, 128, 32, "fp32"),
    ("local", Local(24), 70, 2, 128, 32, "bf16"),
    ("dense", Dense(), 50, 2, 32, 64, "fp32"),
    ("fixed_per_head_wide_qk", Fixed(16, 4, (0, 1)), 48, 2, 128, 32, "bf16"),
    ("strided_wide_v", Strided(5), 61, 2, 64, 128, "fp16"),
]


@in_child
@pytest.mark.parametrize(
    "name,pattern,n,heads,d_qk,d_v,dtype,tiles",
    [(*w, TILES[i % 2]) for i, w in enumerate(WIDTHS)],
    ids=[f"{w[0]}-qk{w[4]}-v{w[5]}-{w[6]}" for w in WIDTHS],
    indirect=["tiles"],
)
def test_separate_widths_match_reference(name, pattern, n, heads, d_qk, d_v, dtype, tiles):
    """q, k of width d_qk and v of width d_v: out and dv have d_v columns, dq and dk d_qk (checked in the helper)."""
    q, k, v, do = _inputs(1, heads, n, d_qk, DTYPES[dtype], seed=zlib.crc32(f"w-{name}".encode()), d_v=d_v)
    check_against_reference(q, k, v, do, pattern)


# ordered dQ (BwdTiles.ordered_dq): summary key tiles add the summary part's dQ in turn; chunks of bm1 query rows
# smaller and larger than the key tiles, per-head summaries, a standalone summary part, a HeadSplit with a strided
# group, separate widths
ORDERED = [
    ("fixed", Fixed(16, 4), 80, 2, 1, 32, 32, "fp16"),
    ("fixed_per_head_batch2", Fixed(16, 6, (0, 1)), 90, 2, 2, 64, 32, "bf16"),
    ("summary_upto", FixedSummary(12, 5), 75, 2, 1, 32, 32, "fp32"),
    ("headsplit_fixed_strided", HeadSplit((Fixed(16, 4, (0, 1)), Strided(8))), 64, 4, 1, 32, 64, "fp32"),
]
ORDERED_TILES = [
    BwdTiles(16, 32, 32, 16, stages=1, ordered_dq=True),
    BwdTiles(32, 16, 16, 32, stages=1, ordered_dq=True),
]


# segments (BwdTiles.segment): a summary key tile's queries split into programs of `segment` rows, their dK/dV added
# in turn; segments shorter and longer than a summary block, a key tile whose first queries fall mid-segment, a head
# with fewer summary cells than the grid's widest, and a HeadSplit whose strided group has no summary launch
SEGMENTED = [
    ("fixed", Fixed(16, 4), 80, 2, 1, 32, 32, "fp16", BwdTiles(16, 16, 16, 16, stages=1, ordered_dq=True, segment=16)),
    ("fixed_per_head_batch2", Fixed(16, 6, (0, 1)), 90, 2, 2, 64, 32, "bf16",
     BwdTiles(16, 16, 32, 16, stages=1, ordered_dq=True, segment=48)),
    ("summary_upto", FixedSummary(12, 5), 75, 2, 1, 32, 32, "fp32",
     BwdTiles(16, 16, 16, 16, stages=1, ordered_dq=True, segment=32)),
    ("headsplit_fixed_strided", HeadSplit((Fixed(16, 4, (0, 1)), Strided(8))), 64, 4, 1, 32, 64, "fp32",
     BwdTiles(16, 16, 16, 16, stages=1, ordered_dq=True, segment=16)),
]


# ordered dK/dV (BwdTiles.ordered_kv): one program per query tile holding whole blocks, the summary key tiles' dK/dV
# added across tiles in turn; tiles of one and of two blocks, a last tile cut short, key steps shorter than a block
ORDERED_KV = [
    ("fixed", Fixed(16, 4), 80, 2, 1, 32, 32, "fp16", BwdTiles(16, 16, 16, 16, stages=1, ordered_kv=True)),
    ("fixed_per_head_batch2", Fixed(16, 6, (0, 1)), 90, 2, 2, 64, 32, "bf16",
     BwdTiles(16, 16, 32, 16, stages=1, ordered_kv=True)),
    ("summary_upto", FixedSummary(16, 5), 75, 2, 1, 32, 32, "fp32", BwdTiles(16, 16, 32, 16, stages=1, ordered_kv=True)),
    ("headsplit_fixed_strided", HeadSplit((Fixed(32, 4, (0, 1)), Strided(8))), 64, 4, 1, 32, 64, "fp32",
     BwdTiles(16, 16, 32, 16, stages=1, ordered_kv=True)),
]


FIVE_PRODUCT = [
    *(("ordered", *c, ORDERED_TILES[i % 2]) for i, c in enumerate(ORDERED)),
    *(("segment", *c) for c in SEGMENTED),
    *(("kv", *c) for c in ORDERED_KV),
]


@in_child
@pytest.mark.parametrize(
    "design,name,pattern,n,heads,batch,d_qk,d_v,dtype,bwd", FIVE_PRODUCT, ids=[f"{c[0]}-{c[1]}" for c in FIVE_PRODUCT]
)
def test_five_product_backwards_match_reference(design, name, pattern, n, heads, batch, d_qk, d_v, dtype, bwd):
    """The fixed pattern's 5-product backwards (ordered dQ, with segments, ordered dK/dV) against the reference."""
    seed = zlib.crc32(f"{design}-{name}".encode())
    q, k, v, do = _inputs(batch, heads, n, d_qk, DTYPES[dtype], seed=seed, d_v=d_v)
    with tile_override(fwd=FwdTiles(16, 16, stages=1), bwd=bwd):
        check_against_reference(q, k, v, do, pattern)


@in_child
@pytest.mark.parametrize(
    "tiles",
    [BwdTiles(16, 16, 16, 16, stages=1, ordered_dq=True), BwdTiles(16, 16, 16, 16, stages=1, ordered_dq=True, segment=16),
     BwdTiles(16, 16, 16, 16, stages=1, ordered_kv=True)],
    ids=["ordered_dq", "segments", "ordered_kv"],
)
def test_ordered_backwards_are_deterministic(tiles):
    q, k, v, do = _inputs(1, 2, 64, 32, torch.float16, seed=11)
    grads = []
    with tile_override(bwd=tiles):
        for _ in range(2):
            qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
            sparse_attention(qq, kk, vv, Fixed(16, 4, (0, 1)), backend="triton").backward(do)
            grads.append(torch.cat([qq.grad, kk.grad, vv.grad]))
    assert torch.equal(grads[0], grads[1])


@in_child
@pytest.mark.parametrize(
    "fwd,bwd,seed",
    [
        (FwdTiles(16, 16, stages=1), BwdTiles(16, 16, 16, 16, stages=1, fused=True), "(16, 16, 16, 16, 4, 1, 0, 1)"),
        (FwdTiles(16, 16, stages=1), BwdTiles(16, 32, 32, 16, stages=1, fused=True), "(16, 32, 32, 16, 4, 1, 0, 1)"),
        (FwdTiles(16, 16, stages=1, one_loop=True), BwdTiles(16, 32, 32, 16, stages=1, fused=True, one_loop=True),
         "(16, 32, 32, 16, 4, 1, 0, 1, 1)"),
    ],
    ids=["bt16", "bt32", "bt32_one_loop"],
)
def test_fused_backward_band_edges(fwd, bwd, seed):
    """Fused band backward with bands wider than a tile: masked heads, full tiles and masked tails on both sides
    (or, with one_loop, every band tile of a side in one masked loop). ``seed``: the inputs' seed string, kept
    from the first version of this test."""
    with tile_override(fwd=fwd, bwd=bwd):
        for i, pattern in enumerate((Local(40), FixedBlock(40), Strided(24), Dense())):
            q, k, v, do = _inputs(1, 2, 150, 32, torch.float16, seed=zlib.crc32(f"fused-{seed}-{i}".encode()))
            check_against_reference(q, k, v, do, pattern)


@in_child
@pytest.mark.parametrize("d", [64, 128])
def test_noncontiguous_inputs_scale_and_batch(d):
    """[batch, n, heads, d] storage viewed as [batch, heads, n, d], a custom scale, batch 2, default tiles."""
    g = torch.Generator().manual_seed(d)
    b, h, n = 2, 2, 48
    q, k, v, do = (torch.randn(b, n, h, d, generator=g).to(torch.bfloat16).transpose(1, 2) for _ in range(4))
    assert not q.is_contiguous()
    check_against_reference(q, k, v, do, Strided(8), scale=0.3)
    check_against_reference(q, k, v, do, Fixed(16, 4, (0, 1)), scale=0.3)


@in_child
@pytest.mark.parametrize("pattern", [Fixed(16, 4, (0, 1)), Strided(8), Dense()], ids=["fixed", "strided", "dense"])
def test_more_heads_than_a_schedule_group(pattern):
    """18 (batch, head) pairs: a full group of HEAD_GROUP heads and a partial one in the longest-first schedule,
    with split (summary, causal band) and fused backward programs."""
    from lightning_sparse.kernels.triton_backend import HEAD_GROUP

    q, k, v, do = _inputs(3, 6, 40, 32, torch.float16, seed=zlib.crc32(repr(pattern).encode()))
    assert HEAD_GROUP < 18 < 2 * HEAD_GROUP
    for bwd in (BwdTiles(16, 16, 16, 16, stages=1), BwdTiles(16, 16, 16, 16, stages=1, fused=True)):
        with tile_override(fwd=FwdTiles(16, 16, stages=1), bwd=bwd):
            check_against_reference(q, k, v, do, pattern)


# the default 16-bit tiles (kernels/tiles.py DEFAULTS) at shapes where none is capped: the fixed pattern's natural
# launch has 5 blocks of 128 (a full gathered summary tile of 128 keys and a partial one); Strided(16) at n = 1,024
# has a local band and 16 strided-order sequences of 64 rows
@in_child
@pytest.mark.parametrize("d_qk,d_v", [(64, 64), (32, 32), (64, 128)])
@pytest.mark.parametrize("pattern,n", [(Fixed(128, 32, (0, 1)), 640), (Strided(16), 1024)], ids=["fixed", "strided"])
def test_default_tiles_at_full_size(pattern, n, d_qk, d_v):
    q, k, v, do = _inputs(1, 2, n, d_qk, torch.bfloat16, seed=zlib.crc32(f"defaults-{n}-{d_qk}-{d_v}".encode()),
                          d_v=d_v)
    check_against_reference(q, k, v, do, pattern)


@in_child
def test_backward_is_deterministic():
    q, k, v, do = _inputs(1, 2, 64, 32, torch.float16, seed=7)
    grads = []
    for _ in range(2):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        sparse_attention(qq, kk, vv, Strided(8), backend="triton").backward(do)
        grads.append(torch.cat([qq.grad, kk.grad, vv.grad]))
    assert torch.equal(grads[0], grads[1])


@in_child
def test_launch_plan_shares_launches_across_summary_offsets():
    from lightning_sparse.kernels.launch_plan import launch_plan

    plan = launch_plan(Fixed(16, 4, (0, 1, 2, 3)), 8)
    assert len(plan) == 1 and plan[0].heads == tuple(range(8))
    assert plan[0].starts == (12, 8, 4, 0, 12, 8, 4, 0)
    strided = launch_plan(Strided(8), 2)
    assert [(lp.stride, lp.merge) for lp in strided] == [(1, False), (8, True)]
    assert launch_plan(Strided(8), 2) is strided  # cached


# ---------------------------------------------------------------- parent-process tests


@in_parent
@pytest.mark.parametrize(
    "shape,dtype,why",
    [
        ((1, 2, 64, 48), torch.bfloat16, "head widths"),
        ((1, 2, 64, 64), torch.float64, "dtypes"),
        ((1, 2, 64, 64), torch.bfloat16, "CUDA"),
    ],
)
def test_bad_inputs_raise_before_launch(shape, dtype, why):
    q = torch.randn(shape).to(dtype)
    with pytest.raises(ValueError, match=why):
        sparse_attention(q, q, q, Strided(8), backend="triton")


@in_parent
@pytest.mark.parametrize(
    "k_shape,v_shape,match",
    [
        ((1, 2, 64, 32), (1, 2, 64, 48), "value head_dim=48"),
        ((1, 2, 64, 64), (1, 2, 64, 32), "same shape"),
        ((1, 2, 64, 32), (1, 2, 60, 64), "same batch, heads and n"),
    ],
)
def test_bad_widths_raise_before_launch(k_shape, v_shape, match):
    q = torch.randn(1, 2, 64, 32).to(torch.bfloat16)
    k, v = torch.randn(k_shape).to(torch.bfloat16), torch.randn(v_shape).to(torch.bfloat16)
    with pytest.raises(ValueError, match=match):
        sparse_attention(q, k, v, Strided(8), backend="triton")


@in_parent
def test_reference_backend_takes_separate_widths():
    q, k = torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32)
    v = torch.randn(1, 2, 40, 64)
    out = sparse_attention(q, k, v, Strided(8), backend="reference")
    mask = head_masks(Strided(8), 40, 2)
    assert out.shape == (1, 2, 40, 64)
    torch.testing.assert_close(out, _attention(q, k, v, mask, 32**-0.5))


@in_parent
def test_tile_override_is_scoped_and_innermost_wins():
    from lightning_sparse.kernels.tiles import DEFAULTS, select_tiles

    default = select_tiles("fwd", "strided", 64, 64, torch.bfloat16)
    assert default == DEFAULTS[("fwd", "strided", 64, 64)]
    outer, inner = FwdTiles(32, 32), FwdTiles(16, 64, warps=8)
    with tile_override(fwd=outer):
        assert select_tiles("fwd", "local", 32, 64, torch.float32) == outer
        with tile_override(fwd=inner, layout="strided", widths=(64, 64)):
            assert select_tiles("fwd", "strided", 64, 64, torch.bfloat16) == inner
            assert select_tiles("fwd", "strided", 64, 128, torch.bfloat16) == outer  # other widths
            assert select_tiles("fwd", "natural", 64, 64, torch.bfloat16) == outer  # other layout
        assert select_tiles("fwd", "strided", 64, 64, torch.bfloat16) == outer
        assert select_tiles("bwd", "strided", 64, 64, torch.bfloat16) == DEFAULTS[("bwd", "strided", 64, 64)]
    assert select_tiles("fwd", "strided", 64, 64, torch.bfloat16) == default
    # unequal widths without an entry of their own take the wider width's tiles
    assert select_tiles("bwd", "natural", 64, 128, torch.float16) == DEFAULTS[("bwd", "natural", 128, 128)]
    with pytest.raises(ValueError, match="power of two"):
        FwdTiles(48, 32)
    with pytest.raises(ValueError, match="layout"):
        with tile_override(fwd=outer, layout="diagonal"):
            pass


@in_parent
def test_tile_override_reaches_autograd_threads():
    """Autograd runs a CUDA backward on its own device thread: an override entered on the caller's thread must hold
    there too (as a ContextVar it did not, and every GPU backward A/B silently timed the default tiles)."""
    import threading

    from lightning_sparse.kernels.tiles import DEFAULTS, select_tiles

    tiles = BwdTiles(32, 128, 128, 64, warps=8, stages=3, maxnreg=128, ordered_kv=True)
    seen = []

    def backward_thread():
        seen.append(select_tiles("bwd", "natural", 64, 64, torch.bfloat16))

    with tile_override(bwd=tiles, layout="natural"):
        with tile_override(bwd=tiles, layout="natural"):  # an equal override nested inside: each leaves its own
            pass
        worker = threading.Thread(target=backward_thread)
        worker.start()
        worker.join()
        assert select_tiles("bwd", "natural", 64, 64, torch.bfloat16) == tiles
    worker = threading.Thread(target=backward_thread)
    worker.start()
    worker.join()
    assert seen == [tiles, DEFAULTS[("bwd", "natural", 64, 64)]]


@in_parent
def test_ordered_dq_only_for_summary_launches():
    from lightning_sparse.kernels.launch_plan import launch_plan
    from lightning_sparse.kernels.triton_backend import _config

    on = BwdTiles(32, 64, 16, 32, ordered_dq=True)
    (fixed,) = launch_plan(Fixed(128, 32), 2)
    local, strided = launch_plan(Strided(128), 2)
    with tile_override(bwd=on):
        t = _config("bwd", fixed, 64, 64, torch.bfloat16, 4096)
        assert t.ordered_dq and t.bm2 % t.bm1 == 0  # query tiles hold whole turn chunks
        assert not _config("bwd", local, 64, 64, torch.bfloat16, 4096).ordered_dq
        assert not _config("bwd", strided, 64, 64, torch.bfloat16, 32).ordered_dq
    assert not _config("bwd", fixed, 64, 64, torch.bfloat16, 4096).ordered_dq  # off by default
    with tile_override(bwd=BwdTiles(32, 64, 64, 32, ordered_dq=True, segment=1024)):
        assert _config("bwd", fixed, 64, 64, torch.bfloat16, 4096).segment == 1024
        assert _config("bwd", fixed, 64, 64, torch.bfloat16, 1000).segment == 0  # one segment would hold every row
        assert _config("bwd", local, 64, 64, torch.bfloat16, 4096).segment == 0
    with tile_override(bwd=BwdTiles(32, 64, 128, 64, ordered_kv=True)):
        assert _config("bwd", fixed, 64, 64, torch.bfloat16, 4096).ordered_kv  # 128-row tiles hold whole blocks
        assert not _config("bwd", local, 64, 64, torch.bfloat16, 4096).ordered_kv
        (fixed96,) = launch_plan(Fixed(96, 24), 2)
        assert not _config("bwd", fixed96, 64, 64, torch.bfloat16, 4096).ordered_kv  # a tile would split blocks


@in_parent
@pytest.mark.parametrize(
    "kwargs,rule",
    [({"segment": 48}, "multiple of bm1=32"), ({"segment": -32}, "multiple of bm1=32"),
     ({"segment": 64, "ordered_dq": False}, "needs ordered_dq=True"),
     ({"ordered_kv": True}, "two designs of the same backward")],
)
def test_segment_rules(kwargs, rule):
    with pytest.raises(ValueError, match=rule):
        BwdTiles(32, 64, 64, 32, **{"ordered_dq": True, **kwargs})


class _TwoBands(Pattern):
    """A pattern with two band parts, which no launch computes."""

    def parts(self):
        return (Local(4), FixedBlock(8))


@in_parent
def test_pattern_without_kernel_raises():
    from lightning_sparse.kernels.launch_plan import launch_plan

    with pytest.raises(ValueError, match="backend='torch'"):
        launch_plan(_TwoBands(), 2)


@in_parent
def test_import_and_error_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, lightning_sparse, lightning_sparse.kernels as K\n"
        "q = torch.randn(1, 1, 16, 32)\n"
        "try:\n"
        "    K.sparse_attention(q.cuda() if torch.cuda.is_available() else q, q, q, K.Dense(), backend='triton')\n"
        "except (ImportError, ValueError) as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_INTERPRET"] = "1"  # so that CPU tensors get past the device check and reach the import
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ImportError" in res.stdout and "pip install triton" in res.stdout, res.stdout
