"""Triton kernels of the ``triton`` backend: flash-style forward and backward for the Sparse Transformer parts.

One kernel family serves every pattern. A launch works on *groups* of rows: group ``g`` holds the rows
``g, g + G, g + 2G, …`` of the sequence (``G = 1``: the natural layout; ``G = stride``: the strided layout of
kernels.md §0, where every residue class mod the stride is one contiguous causal sequence). Rows are reached by
address arithmetic (row stride ``G · stride_n``); nothing is copied. Each launch computes up to two disjoint parts
in one online softmax: a *band* (query ``i`` sees keys ``L(i) <= j <= i - OFF``) and, in the natural layout only, a
*summary* (the ``sc`` cells starting at ``ss`` of every block of ``sl`` positions, gathered into dense key tiles by
address arithmetic). Key tiles that need an element mask (band edges, the diagonal, the last summary tile) run
masked, the others unmasked. A merged pattern whose parts live in different layouts (Strided = local band in the
natural layout + causal band in the strided layout) runs one launch per layout; the later one starts its online
softmax from the earlier one's output and log-sum-exp (``MERGE``): the exact log-sum-exp merge of the parts.

Backward: ``_delta_kernel`` computes ``delta = rowsum(dO·O)``, then one ``_bwd_kernel`` launch per forward launch.
Its programs take one of four roles (one @triton.jit function each): ``_bwd_band_tile`` (``FUSED`` band-only
launches: dQ and dK/dV of one tile of rows, the diagonal block computed once for both), or, by the program's slot,
``_bwd_band_keys`` (dK/dV of a band key tile), ``_bwd_summary_keys`` (dK/dV of a gathered summary key tile, both of
its parts) and ``_bwd_queries`` (dQ of a query tile). Every gradient row has exactly one writer: deterministic, no
atomics. With ``MERGE`` the results are added to the gradients the previous launch wrote. ``ORDERED_DQ`` (a switch
for summary launches, off by default): the summary key tiles also produce the summary part's dQ, added into a
float32 buffer in a fixed order under per-chunk turn counters (FA3's deterministic mode), so no block of the summary
part computes S and dP twice (5 matrix products per block instead of 7); still deterministic. ``SEGMENTS`` (with
it): each summary key tile runs as one program per segment of its queries, the segments' dK/dV added in turn too,
so that the key tile every later query sees is not one program as long as the launch. ``ORDERED_KV`` (the other
5-product design, also off by default): a summary launch whose query tiles hold whole blocks runs one program per
query tile (``_bwd_kv_tile``) that computes every gradient of its pairs; the band keys are its own, the summary key
tiles' dK/dV are added across tiles in a fixed order (later tiles first) under one turn counter per key tile.

Schedule: the grid is one-dimensional; ``_program`` maps a program to its (batch·head, slot), slots numbered longest
work first, heads in groups of ``HEAD_GROUP`` so that the longest programs of all of a group's heads start first.

Notation
--------
``G``/``groups``  row groups of the launch; ``grp`` a program's group; ``i``, ``j`` query/key index inside it
                  (sequence position ``grp + i·G``); ``n_eff`` the group's row count.
``BAND``          ``BAND_CAUSAL``: ``j <= i - OFF``; ``BAND_LOCAL``: also ``j > i - width``; ``BAND_FIXED``: also
                  ``j // width == i // width``. ``L(i)`` the first key of query i's band, ``U(j)`` the last query
                  whose band holds key j.
``SUMMARY``       ``SUM_UPTO``: the summary cells at or before the query; ``SUM_PREV``: those of earlier blocks.
                  ``t`` a gathered summary key index (position ``(t // sc)·sl + ss + t % sc``), ``t_total`` their
                  count; a query sees the first ``_sum_count(i)`` of them.
``DQK``, ``DV``   widths of the q/k rows and of the v/output rows.
``BM``, ``BN``    forward: query rows per program, keys per step.
``BN1``, ``BM1``  key-stationary programs: key rows per program, queries per step (``BT = BN1`` rows when fused).
``BM2``, ``BN2``  query-stationary programs: query rows per program, keys per step.
``qk_scale``      ``scale·log2(e)``: scores use ``exp2``; the saved LSE is in base 2.
``F32``           exact float32 dots (float32 inputs, and bf16 under the CPU interpreter, whose bf16 dot is wrong).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import launch_plan as _plan

# The part codes, defined once in the launch planner, as constexpr globals the jit code can read.
BAND_NONE = tl.constexpr(_plan.BAND_NONE)
BAND_CAUSAL = tl.constexpr(_plan.BAND_CAUSAL)
BAND_LOCAL = tl.constexpr(_plan.BAND_LOCAL)
BAND_FIXED = tl.constexpr(_plan.BAND_FIXED)
SUM_NONE = tl.constexpr(_plan.SUM_NONE)
SUM_UPTO = tl.constexpr(_plan.SUM_UPTO)
SUM_PREV = tl.constexpr(_plan.SUM_PREV)


# ---------------------------------------------------------------- numerics


@triton.jit
def _dot(a, b, acc, F32: tl.constexpr):
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _cast(x, dtype: tl.constexpr, F32: tl.constexpr):
    """Round float32 ``x`` to ``dtype`` to nearest-even (done by hand for bf16 under the CPU interpreter, whose
    float32 -> bf16 conversion truncates; F32 with a bf16 target happens only there)."""
    if F32 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


# ---------------------------------------------------------------- schedule


@triton.jit
def _program(BH, slots, HEAD_GROUP: tl.constexpr):
    """(batch·head, slot) of this program in a 1-D grid of ``BH · slots`` programs. Slots are numbered longest work
    first, and the heads go in groups of HEAD_GROUP, slot-major inside a group: the longest programs of all the
    group's heads start first (no long program starts last and runs alone: a causal or summary launch of few
    heads otherwise ends in a tail), while the programs in flight read the keys of at most HEAD_GROUP heads (L2)."""
    pid = tl.program_id(0)
    first = (pid // (HEAD_GROUP * slots)) * HEAD_GROUP
    inside = pid - first * slots
    heads = tl.minimum(BH - first, HEAD_GROUP)
    return first + inside % heads, inside // heads


# ---------------------------------------------------------------- rows in memory


@triton.jit
def _load_rows(base, rows, row_stride, col_stride, ok, W: tl.constexpr):
    """[len(rows), W] tile of a row-major matrix; zeros where ``ok`` is false."""
    cols = tl.arange(0, W)
    return tl.load(base + rows[:, None] * row_stride + cols[None, :] * col_stride, mask=ok[:, None], other=0.0)


@triton.jit
def _load_rows_t(base, rows, row_stride, col_stride, ok, W: tl.constexpr):
    """The same tile transposed: [W, len(rows)]."""
    cols = tl.arange(0, W)
    return tl.load(base + rows[None, :] * row_stride + cols[:, None] * col_stride, mask=ok[None, :], other=0.0)


@triton.jit
def _store_rows(base, rows, row_stride, col_stride, ok, x, W: tl.constexpr, MERGE: tl.constexpr, F32: tl.constexpr):
    """Store float32 ``x`` ([len(rows), W]) in the tensor's dtype, added to what is there when MERGE."""
    cols = tl.arange(0, W)
    ptr = base + rows[:, None] * row_stride + cols[None, :] * col_stride
    if MERGE:
        x += tl.load(ptr, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(ptr, _cast(x, base.dtype.element_ty, F32), mask=ok[:, None])


@triton.jit
def _load_stats(LSEb, DELb, rows, stride, ok):
    """LSE and delta of query rows; rows that see no key (LSE -inf) and rows past the end get LSE +inf, so p = 0."""
    lse = tl.load(LSEb + rows * stride, mask=ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELb + rows * stride, mask=ok, other=0.0)
    return lse, delta


# ---------------------------------------------------------------- the parts in closed form


@triton.jit
def _band_first(i, width, BAND: tl.constexpr):
    """L(i): the first key of query i's band."""
    if BAND == BAND_LOCAL:
        return tl.maximum(i - width + 1, 0)
    elif BAND == BAND_FIXED:
        return (i // width) * width
    else:
        return i * 0


@triton.jit
def _band_last_query(j, width, n_eff, BAND: tl.constexpr):
    """U(j): the last query whose band holds key j (inclusive)."""
    if BAND == BAND_LOCAL:
        return tl.minimum(j + width - 1, n_eff - 1)
    elif BAND == BAND_FIXED:
        return tl.minimum((j // width + 1) * width - 1, n_eff - 1)
    else:
        return n_eff - 1


@triton.jit
def _band_allowed(i, j, width, BAND: tl.constexpr, OFF: tl.constexpr):
    ok = j <= i - OFF
    if BAND == BAND_LOCAL:
        ok = ok & (j > i - width)
    if BAND == BAND_FIXED:
        ok = ok & ((j // width) == (i // width))
    return ok


@triton.jit
def _band_key_tiles(i0, i_last, width, BAND: tl.constexpr, OFF: tl.constexpr, BN: tl.constexpr):
    """Key tiles of the band of queries i0..i_last, in steps of BN: masked [k_begin, full_lo), unmasked
    [full_lo, full_hi), masked [full_hi, k_end)."""
    k_begin = (_band_first(i0, width, BAND) // BN) * BN
    k_end = tl.cdiv(i_last - OFF + 1, BN) * BN
    full_lo = tl.cdiv(_band_first(i_last, width, BAND), BN) * BN
    full_hi = ((i0 - OFF + 1) // BN) * BN
    full_lo = tl.minimum(tl.maximum(full_lo, k_begin), k_end)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), k_end)
    return k_begin, full_lo, full_hi, k_end


@triton.jit
def _sum_count(i, sl, sc, ss, SUMMARY: tl.constexpr):
    """How many summary keys query i sees (they are the first ones in gathered order)."""
    c = (i // sl) * sc
    if SUMMARY == SUM_UPTO:
        c += tl.minimum(tl.maximum(i % sl - ss + 1, 0), sc)
    return c


@triton.jit
def _sum_pos(t, sl, sc, ss):
    """Sequence position of gathered summary key t."""
    return (t // sc) * sl + ss + t % sc


@triton.jit
def _key_rows(offs_n, n_eff, t_total, sl, sc, ss, GATHER: tl.constexpr):
    """Rows of the key tile with indices offs_n (gathered summary order when GATHER) and which of them exist."""
    if GATHER:
        pos = _sum_pos(offs_n, sl, sc, ss)
        kin = offs_n < t_total
    else:
        pos = offs_n
        kin = offs_n < n_eff
    return pos, kin


@triton.jit
def _pairs_allowed(offs_m, offs_n, kin, width, sl, sc, ss,
                   BAND: tl.constexpr, OFF: tl.constexpr, SUMMARY: tl.constexpr, GATHER: tl.constexpr):
    """[queries, keys] mask of the allowed pairs of a masked tile of one part (GATHER: the summary part)."""
    if GATHER:
        ok = offs_n[None, :] < _sum_count(offs_m, sl, sc, ss, SUMMARY)[:, None]
    else:
        ok = _band_allowed(offs_m[:, None], offs_n[None, :], width, BAND, OFF)
    return ok & kin[None, :]


# ---------------------------------------------------------------- forward


@triton.jit
def _fwd_loop(acc, m_i, l_i, q, Kb, Vb, kn, skd, vn, svd, offs_m, start, end, n_eff, t_total,
              qk_scale, width, sl, sc, ss,
              BAND: tl.constexpr, OFF: tl.constexpr, SUMMARY: tl.constexpr, GATHER: tl.constexpr,
              MASKED: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr, F32: tl.constexpr):
    """Online softmax of the query tile over key tiles [start, end) of one part, BN keys a step."""
    for s in range(start, end, BN):
        offs_n = s + tl.arange(0, BN)
        pos, kin = _key_rows(offs_n, n_eff, t_total, sl, sc, ss, GATHER=GATHER)
        kT = _load_rows_t(Kb, pos, kn, skd, kin, W=DQK)
        v = _load_rows(Vb, pos, vn, svd, kin, W=DV)
        qk = _dot(q, kT, tl.zeros([q.shape[0], BN], dtype=tl.float32), F32=F32) * qk_scale
        if MASKED:
            ok = _pairs_allowed(offs_m, offs_n, kin, width, sl, sc, ss,
                                BAND=BAND, OFF=OFF, SUMMARY=SUMMARY, GATHER=GATHER)
            qk = tl.where(ok, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_sub = m_new
        p = tl.exp2(qk - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot(_cast(p, v.dtype, F32=F32), v, acc * alpha[:, None], F32=F32)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_band(acc, m_i, l_i, q, Kb, Vb, kn, skd, vn, svd, offs_m, i0, i_last, n_eff, qk_scale, width,
              BAND: tl.constexpr, OFF: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr,
              ONE_LOOP: tl.constexpr, F32: tl.constexpr):
    """The band part: masked head, unmasked middle, masked tail (ONE_LOOP: all of it in the first, masked loop)."""
    k_begin, full_lo, full_hi, k_end = _band_key_tiles(i0, i_last, width, BAND=BAND, OFF=OFF, BN=BN)
    if ONE_LOOP:
        full_lo = k_end
        full_hi = k_end
    acc, m_i, l_i = _fwd_loop(acc, m_i, l_i, q, Kb, Vb, kn, skd, vn, svd, offs_m, k_begin, full_lo, n_eff, 0,
                              qk_scale, width, 1, 1, 0, BAND=BAND, OFF=OFF, SUMMARY=SUM_NONE, GATHER=False,
                              MASKED=True, DQK=DQK, DV=DV, BN=BN, F32=F32)
    acc, m_i, l_i = _fwd_loop(acc, m_i, l_i, q, Kb, Vb, kn, skd, vn, svd, offs_m, full_lo, full_hi, n_eff, 0,
                              qk_scale, width, 1, 1, 0, BAND=BAND, OFF=OFF, SUMMARY=SUM_NONE, GATHER=False,
                              MASKED=False, DQK=DQK, DV=DV, BN=BN, F32=F32)
    acc, m_i, l_i = _fwd_loop(acc, m_i, l_i, q, Kb, Vb, kn, skd, vn, svd, offs_m, full_hi, k_end, n_eff, 0,
                              qk_scale, width, 1, 1, 0, BAND=BAND, OFF=OFF, SUMMARY=SUM_NONE, GATHER=False,
                              MASKED=True, DQK=DQK, DV=DV, BN=BN, F32=F32)
    return acc, m_i, l_i


@triton.jit
def _fwd_summary(acc, m_i, l_i, q, Kb, Vb, kn, skd, vn, svd, offs_m, i0, i_last, n_eff, qk_scale, sl, sc, ss,
                 SUMMARY: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr, F32: tl.constexpr):
    """The summary part: gathered key tiles every query of the tile sees in full, then a masked last stretch."""
    t_full = (_sum_count(i0, sl, sc, ss, SUMMARY=SUMMARY) // BN) * BN
    t_hi = _sum_count(i_last, sl, sc, ss, SUMMARY=SUMMARY)
    acc, m_i, l_i = _fwd_loop(acc, m_i, l_i, q, Kb, Vb, kn, skd, vn, svd, offs_m, 0, t_full, n_eff, t_hi,
                              qk_scale, 1, sl, sc, ss, BAND=BAND_NONE, OFF=0, SUMMARY=SUMMARY, GATHER=True,
                              MASKED=False, DQK=DQK, DV=DV, BN=BN, F32=F32)
    acc, m_i, l_i = _fwd_loop(acc, m_i, l_i, q, Kb, Vb, kn, skd, vn, svd, offs_m, t_full, t_hi, n_eff, t_hi,
                              qk_scale, 1, sl, sc, ss, BAND=BAND_NONE, OFF=0, SUMMARY=SUMMARY, GATHER=True,
                              MASKED=True, DQK=DQK, DV=DV, BN=BN, F32=F32)
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, Out, LSE, HEADS, STARTS,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                n, H, HL, BH, groups, qk_scale, width, sl, sc,
                BAND: tl.constexpr, OFF: tl.constexpr, SUMMARY: tl.constexpr, MERGE: tl.constexpr,
                DQK: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                ONE_LOOP: tl.constexpr, HEAD_GROUP: tl.constexpr, F32: tl.constexpr):
    """Out and LSE of one tile of BM query rows of one (batch, head) for the launch's parts."""
    tl.static_assert(BAND != BAND_NONE or SUMMARY != SUM_NONE, "a launch computes at least one part")
    tl.static_assert(DQK >= 16 and DV >= 16 and BN >= 16, "tl.dot needs inner sizes of at least 16")
    n_tiles = tl.cdiv(tl.cdiv(n, groups), BM)
    pid_bh, slot = _program(BH, n_tiles * groups, HEAD_GROUP=HEAD_GROUP)
    grp = slot % groups
    n_eff = (n - grp + groups - 1) // groups
    tile = n_tiles - 1 - slot // groups  # later query tiles see more keys: start them first
    i0 = tile * BM
    if i0 < n_eff:
        b = pid_bh // HL
        hl = pid_bh % HL
        h = tl.load(HEADS + hl)
        ss = tl.load(STARTS + hl)
        Qb = Q + b * sqb + h * sqh + grp * sqn
        Kb = K + b * skb + h * skh + grp * skn
        Vb = V + b * svb + h * svh + grp * svn
        Ob = Out + b * sob + h * soh + grp * son
        LSEb = LSE + (b * H + h) * n + grp
        offs_m = i0 + tl.arange(0, BM)
        qin = offs_m < n_eff
        q = _load_rows(Qb, offs_m, sqn * groups, sqd, qin, W=DQK)
        if MERGE:
            # the previous launch's part acts as one virtual key: score = its LSE, value = its output
            m_i = tl.load(LSEb + offs_m * groups, mask=qin, other=float("-inf"))
            l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)
            acc = _load_rows(Ob, offs_m, son * groups, sod, qin, W=DV).to(tl.float32)
        else:
            m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BM], dtype=tl.float32)
            acc = tl.zeros([BM, DV], dtype=tl.float32)
        i_last = tl.minimum(i0 + BM, n_eff) - 1
        if BAND != BAND_NONE:
            acc, m_i, l_i = _fwd_band(acc, m_i, l_i, q, Kb, Vb, skn * groups, skd, svn * groups, svd, offs_m, i0,
                                      i_last, n_eff, qk_scale, width,
                                      BAND=BAND, OFF=OFF, DQK=DQK, DV=DV, BN=BN, ONE_LOOP=ONE_LOOP, F32=F32)
        if SUMMARY != SUM_NONE:
            acc, m_i, l_i = _fwd_summary(acc, m_i, l_i, q, Kb, Vb, skn * groups, skd, svn * groups, svd, offs_m, i0,
                                         i_last, n_eff, qk_scale, sl, sc, ss,
                                         SUMMARY=SUMMARY, DQK=DQK, DV=DV, BN=BN, F32=F32)
        empty = l_i == 0.0  # rows that see no key: output 0, LSE -inf
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        _store_rows(Ob, offs_m, son * groups, sod, qin, out, W=DV, MERGE=False, F32=F32)
        tl.store(LSEb + offs_m * groups, lse, mask=qin)


# ---------------------------------------------------------------- backward


@triton.jit
def _delta_kernel(Out, DO, DELTA, sob, soh, son, sod, sdb, sdh, sdn, sdd, n, H,
                  DV: tl.constexpr, BM: tl.constexpr):
    """delta = rowsum(dO · O) of BM rows of one (batch, head)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid * BM + tl.arange(0, BM)
    rin = offs_m < n
    o = _load_rows(Out + b * sob + h * soh, offs_m, son, sod, rin, W=DV)
    do = _load_rows(DO + b * sdb + h * sdh, offs_m, sdn, sdd, rin, W=DV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * n + offs_m, delta, mask=rin)


@triton.jit
def _dq_loop(dq, q, do, lse, delta, Kb, Vb, kn, skd, vn, svd, offs_m, start, end, n_eff, t_total,
             qk_scale, width, sl, sc, ss,
             BAND: tl.constexpr, OFF: tl.constexpr, SUMMARY: tl.constexpr, GATHER: tl.constexpr,
             MASKED: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr, F32: tl.constexpr):
    """dQ of the query tile (unscaled) from key tiles [start, end) of one part, BN keys a step."""
    for s in range(start, end, BN):
        offs_n = s + tl.arange(0, BN)
        pos, kin = _key_rows(offs_n, n_eff, t_total, sl, sc, ss, GATHER=GATHER)
        kT = _load_rows_t(Kb, pos, kn, skd, kin, W=DQK)
        vT = _load_rows_t(Vb, pos, vn, svd, kin, W=DV)
        qk = _dot(q, kT, tl.zeros([q.shape[0], BN], dtype=tl.float32), F32=F32)
        p = tl.exp2(qk * qk_scale - lse[:, None])
        if MASKED:
            ok = _pairs_allowed(offs_m, offs_n, kin, width, sl, sc, ss,
                                BAND=BAND, OFF=OFF, SUMMARY=SUMMARY, GATHER=GATHER)
            p = tl.where(ok, p, 0.0)
        dp = _dot(do, vT, tl.zeros([q.shape[0], BN], dtype=tl.float32), F32=F32)
        ds = p * (dp - delta[:, None])
        dq = _dot(_cast(ds, kT.dtype, F32=F32), tl.trans(kT), dq, F32=F32)
    return dq


@triton.jit
def _chunk_sum_count(offs_m, n_eff, sl, sc, ss, SUMMARY: tl.constexpr, BM1: tl.constexpr):
    """Summary keys seen by the last row of each row's chunk of BM1 query rows (ORDERED_DQ: the chunk's dQ has
    cdiv(that, BN1) summary contributors)."""
    return _sum_count(tl.minimum((offs_m // BM1) * BM1 + BM1, n_eff) - 1, sl, sc, ss, SUMMARY=SUMMARY)


@triton.jit
def _wait_turn(TURN, rank):
    """Spin until the turn counter at TURN reads ``rank`` (acquire: the previous holders' stores are visible)."""
    turn = tl.atomic_cas(TURN, rank, rank, sem="acquire")
    while turn != rank:
        turn = tl.atomic_cas(TURN, rank, rank, sem="acquire")


@triton.jit
def _pass_turn(TURN, rank):
    """Hand the turn at TURN on to ``rank + 1`` once every thread's stores are done (release)."""
    tl.debug_barrier()
    tl.atomic_xchg(TURN, rank + 1, sem="release")


@triton.jit
def _add_dq_in_turn(DQb, ACCb, TURNb, offs_m, ok, gqn, sgqd, chunk, rank, last, part, scale,
                    DQK: tl.constexpr, F32: tl.constexpr):
    """ORDERED_DQ: deterministic dQ reduction across programs (FA3's deterministic mode). Wait until query chunk
    ``chunk`` has taken ``rank`` contributions, add ``part`` to its float32 partial sum in ACC (the last contributor
    writes the scaled dQ instead), pass the turn on. Ranks follow the programs' tickets, so a program only waits for
    programs that started before it (no deadlock on the GPU, none under the interpreter's sequential programs)."""
    _wait_turn(TURNb + chunk, rank)
    cols = tl.arange(0, DQK)
    acc_ptr = ACCb + offs_m[:, None] * DQK + cols[None, :]
    acc = tl.load(acc_ptr, mask=ok[:, None], other=0.0, cache_modifier=".cg") + part
    if last:
        _store_rows(DQb, offs_m, gqn, sgqd, ok, acc * scale, W=DQK, MERGE=False, F32=F32)
    else:
        tl.store(acc_ptr, acc, mask=ok[:, None])
    _pass_turn(TURNb + chunk, rank)


@triton.jit
def _add_kv_in_turn(DKb, DVb, KVACCb, TURN, rows, pos, kin, gqn, sgqd, gvn, sgvd, rank, last, dk, dv, scale,
                    DQK: tl.constexpr, DV: tl.constexpr, F32: tl.constexpr):
    """Deterministic dK/dV reduction across programs: wait for turn ``rank`` at TURN, add ``dk``, ``dv`` (float32
    parts of the key rows ``rows`` of KVACC, sequence rows ``pos``) to the partial sums the earlier ranks left there
    (rank 0 finds none), and pass the turn on; the last contributor writes dK (scaled) and dV instead."""
    _wait_turn(TURN, rank)
    k_ptr = KVACCb + rows[:, None] * (DQK + DV) + tl.arange(0, DQK)[None, :]  # a KVACC row: dK's DQK columns, dV's DV
    v_ptr = KVACCb + rows[:, None] * (DQK + DV) + DQK + tl.arange(0, DV)[None, :]
    if rank > 0:
        dk += tl.load(k_ptr, mask=kin[:, None], other=0.0, cache_modifier=".cg")
        dv += tl.load(v_ptr, mask=kin[:, None], other=0.0, cache_modifier=".cg")
    if last:
        _store_rows(DKb, pos, gqn, sgqd, kin, dk * scale, W=DQK, MERGE=False, F32=F32)
        _store_rows(DVb, pos, gvn, sgvd, kin, dv, W=DV, MERGE=False, F32=F32)
    else:
        tl.store(k_ptr, dk, mask=kin[:, None])
        tl.store(v_ptr, dv, mask=kin[:, None])
        _pass_turn(TURN, rank)


@triton.jit
def _dkdv_loop(dk, dv, k, v, Qb, DOb, LSEb, DELb, qn, sqd, don, sdod, lsen, offs_n, pos, start, end,
               n_eff, qk_scale, width, sl, sc, ss, DQb, ACCb, TURNb, gqn, sgqd, rank, scale,
               BAND: tl.constexpr, OFF: tl.constexpr, SUMMARY: tl.constexpr, MASKED: tl.constexpr,
               DQK: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, ORDERED_DQ: tl.constexpr, F32: tl.constexpr):
    """dK (unscaled), dV of the key tile from query tiles [start, end), BM queries a step. ``offs_n``: the keys'
    indices in the tile's own order (gathered index t for summary tiles); ``pos``: their rows. A masked step of a
    summary tile (SUMMARY) allows the summary pairs and, with a band, the band pairs of the same keys. ORDERED_DQ
    (summary tiles; the ``rank``-th summary tile, counted from 1): also the query chunk's dQ from the tile's summary
    pairs, added in turn (``_add_dq_in_turn``) — S and dP of the block are then computed once."""
    for s in range(start, end, BM):
        offs_m = s + tl.arange(0, BM)
        qin = offs_m < n_eff
        qT = _load_rows_t(Qb, offs_m, qn, sqd, qin, W=DQK)
        do = _load_rows(DOb, offs_m, don, sdod, qin, W=DV)
        lse, delta = _load_stats(LSEb, DELb, offs_m, lsen, qin)
        qkT = _dot(k, qT, tl.zeros([k.shape[0], BM], dtype=tl.float32), F32=F32)
        pT = tl.exp2(qkT * qk_scale - lse[None, :])
        if MASKED:
            if SUMMARY != SUM_NONE:
                ok = offs_n[:, None] < _sum_count(offs_m, sl, sc, ss, SUMMARY=SUMMARY)[None, :]
                if BAND != BAND_NONE:
                    ok = ok | _band_allowed(offs_m[None, :], pos[:, None], width, BAND=BAND, OFF=OFF)
            else:
                ok = _band_allowed(offs_m[None, :], pos[:, None], width, BAND=BAND, OFF=OFF)
            pT = tl.where(ok, pT, 0.0)
        dv = _dot(_cast(pT, do.dtype, F32=F32), do, dv, F32=F32)
        dpT = _dot(v, tl.trans(do), tl.zeros([k.shape[0], BM], dtype=tl.float32), F32=F32)
        dsT = pT * (dpT - delta[None, :])
        dk = _dot(_cast(dsT, qT.dtype, F32=F32), tl.trans(qT), dk, F32=F32)
        if ORDERED_DQ:
            t_chunk = _sum_count(tl.minimum(s + BM, n_eff) - 1, sl, sc, ss, SUMMARY=SUMMARY)
            if tl.min(offs_n, 0) < t_chunk:  # some query of the chunk sees this tile's first key
                ds = dsT
                if MASKED and BAND != BAND_NONE:  # the band pairs' dQ is the query programs' part
                    ds = tl.where(offs_n[:, None] < _sum_count(offs_m, sl, sc, ss, SUMMARY=SUMMARY)[None, :], ds, 0.0)
                part = _dot(tl.trans(_cast(ds, k.dtype, F32=F32)), k, tl.zeros([BM, DQK], dtype=tl.float32), F32=F32)
                last = rank == tl.cdiv(t_chunk, k.shape[0])
                _add_dq_in_turn(DQb, ACCb, TURNb, offs_m, qin, gqn, sgqd, s // BM, rank, last, part, scale,
                                DQK=DQK, F32=F32)
    return dk, dv


@triton.jit
def _bwd_band_tile(Qb, Kb, Vb, DOb, DQb, DKb, DVb, LSEb, DELb, qn, sqd, kn, skd, vn, svd, don, sdod,
                   gqn, sgqd, gvn, sgvd, groups, i0, n_eff, qk_scale, scale, width,
                   BAND: tl.constexpr, OFF: tl.constexpr, MERGE: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
                   BT: tl.constexpr, BM1: tl.constexpr, BN2: tl.constexpr, ONE_LOOP: tl.constexpr,
                   F32: tl.constexpr):
    """Fused role: dQ of the BT queries and dK, dV of the BT keys of one tile of a band. The diagonal block is
    computed once for both; dQ adds the band's earlier key tiles (BN2 a step), dK/dV its later query tiles (BM1 a
    step). ONE_LOOP: each side is one masked loop."""
    tl.static_assert(BT % BM1 == 0 and BT % BN2 == 0, "the fused tile's steps divide it")
    offs_m = i0 + tl.arange(0, BT)
    rin = offs_m < n_eff
    i_last = tl.minimum(i0 + BT, n_eff) - 1
    q = _load_rows(Qb, offs_m, qn, sqd, rin, W=DQK)
    do = _load_rows(DOb, offs_m, don, sdod, rin, W=DV)
    lse, delta = _load_stats(LSEb, DELb, offs_m, groups, rin)
    # keys before the tile: a masked head where the band starts, then full tiles up to the tile
    k_begin = (_band_first(i0, width, BAND=BAND) // BN2) * BN2
    full_lo = tl.cdiv(_band_first(i_last, width, BAND=BAND), BN2) * BN2
    full_lo = tl.minimum(tl.maximum(full_lo, k_begin), i0)
    if ONE_LOOP:
        full_lo = i0
    dq = tl.zeros([BT, DQK], dtype=tl.float32)
    dq = _dq_loop(dq, q, do, lse, delta, Kb, Vb, kn, skd, vn, svd, offs_m, k_begin, full_lo, n_eff, 0,
                  qk_scale, width, 1, 1, 0, BAND=BAND, OFF=OFF, SUMMARY=SUM_NONE, GATHER=False,
                  MASKED=True, DQK=DQK, DV=DV, BN=BN2, F32=F32)
    dq = _dq_loop(dq, q, do, lse, delta, Kb, Vb, kn, skd, vn, svd, offs_m, full_lo, i0, n_eff, 0,
                  qk_scale, width, 1, 1, 0, BAND=BAND, OFF=OFF, SUMMARY=SUM_NONE, GATHER=False,
                  MASKED=False, DQK=DQK, DV=DV, BN=BN2, F32=F32)
    # the diagonal block (keys of the tile x queries of the tile), transposed like the dK/dV loop
    k = _load_rows(Kb, offs_m, kn, skd, rin, W=DQK)
    v = _load_rows(Vb, offs_m, vn, svd, rin, W=DV)
    qkT = _dot(k, tl.trans(q), tl.zeros([BT, BT], dtype=tl.float32), F32=F32)
    pT = tl.exp2(qkT * qk_scale - lse[None, :])
    pT = tl.where(_band_allowed(offs_m[None, :], offs_m[:, None], width, BAND=BAND, OFF=OFF), pT, 0.0)
    dpT = _dot(v, tl.trans(do), tl.zeros([BT, BT], dtype=tl.float32), F32=F32)
    dsT = _cast(pT * (dpT - delta[None, :]), q.dtype, F32=F32)
    dv = _dot(_cast(pT, do.dtype, F32=F32), do, tl.zeros([BT, DV], dtype=tl.float32), F32=F32)
    dk = _dot(dsT, q, tl.zeros([BT, DQK], dtype=tl.float32), F32=F32)
    dq = _dot(tl.trans(dsT), k, dq, F32=F32) * scale
    _store_rows(DQb, offs_m, gqn, sgqd, rin, dq, W=DQK, MERGE=MERGE, F32=F32)
    # queries after the tile: full tiles, then a masked tail where the band ends
    q_begin = i0 + BT
    q_end = tl.maximum(tl.cdiv(_band_last_query(i_last, width, n_eff, BAND=BAND) + 1, BM1) * BM1, q_begin)
    full_hi = ((_band_last_query(i0, width, n_eff, BAND=BAND) + 1) // BM1) * BM1
    if BAND == BAND_CAUSAL:
        full_hi = q_end  # rows past n contribute zero (their LSE loads as +inf)
    full_hi = tl.minimum(tl.maximum(full_hi, q_begin), q_end)
    if ONE_LOOP:
        full_hi = q_begin
    dk, dv = _dkdv_loop(dk, dv, k, v, Qb, DOb, LSEb, DELb, qn, sqd, don, sdod, groups, offs_m, offs_m,
                        q_begin, full_hi, n_eff, qk_scale, width, 1, 1, 0, DQb, DQb, DQb, gqn, sgqd, 0, scale,
                        BAND=BAND, OFF=OFF, SUMMARY=SUM_NONE, MASKED=False, DQK=DQK, DV=DV, BM=BM1,
                        ORDERED_DQ=False, F32=F32)
    dk, dv = _dkdv_loop(dk, dv, k, v, Qb, DOb, LSEb, DELb, qn, sqd, don, sdod, groups, offs_m, offs_m,
                        full_hi, q_end, n_eff, qk_scale, width, 1, 1, 0, DQb, DQb, DQb, gqn, sgqd, 0, scale,
                        BAND=BAND, OFF=OFF, SUMMARY=SUM_NONE, MASKED=True, DQK=DQK, DV=DV, BM=BM1,
                        ORDERED_DQ=False, F32=F32)
    _store_rows(DKb, offs_m, gqn, sgqd, rin, dk * scale, W=DQK, MERGE=MERGE, F32=F32)
    _store_rows(DVb, offs_m, gvn, sgvd, rin, dv, W=DV, MERGE=MERGE, F32=F32)


@triton.jit
def _bwd_band_keys(Qb, Kb, Vb, DOb, DKb, DVb, LSEb, DELb, qn, sqd, kn, skd, vn, svd, don, sdod,
                   gqn, sgqd, gvn, sgvd, groups, j0, n_eff, qk_scale, scale, width, sl, sc, ss,
                   BAND: tl.constexpr, OFF: tl.constexpr, SUMMARY: tl.constexpr, MERGE: tl.constexpr,
                   DQK: tl.constexpr, DV: tl.constexpr, BN1: tl.constexpr, BM1: tl.constexpr, F32: tl.constexpr):
    """Key-stationary role: dK, dV of BN1 keys from j0 over the band's query tiles: masked head, unmasked middle,
    masked tail. With a summary part the summary keys' rows are left to ``_bwd_summary_keys``."""
    offs_n = j0 + tl.arange(0, BN1)
    kin = offs_n < n_eff
    store = kin
    if SUMMARY != SUM_NONE:
        store = store & ((offs_n % sl - ss < 0) | (offs_n % sl - ss >= sc))
    k = _load_rows(Kb, offs_n, kn, skd, kin, W=DQK)
    v = _load_rows(Vb, offs_n, vn, svd, kin, W=DV)
    dk = tl.zeros([BN1, DQK], dtype=tl.float32)
    dv = tl.zeros([BN1, DV], dtype=tl.float32)
    if BAND != BAND_NONE:
        j_last = tl.minimum(j0 + BN1, n_eff) - 1
        q_begin = ((j0 + OFF) // BM1) * BM1
        q_end = tl.cdiv(_band_last_query(j_last, width, n_eff, BAND=BAND) + 1, BM1) * BM1
        full_lo = tl.cdiv(j_last + OFF, BM1) * BM1
        full_hi = ((_band_last_query(j0, width, n_eff, BAND=BAND) + 1) // BM1) * BM1
        if BAND == BAND_CAUSAL:
            full_hi = tl.cdiv(n_eff, BM1) * BM1  # rows past n contribute zero (their LSE loads as +inf)
        full_lo = tl.minimum(tl.maximum(full_lo, q_begin), q_end)
        full_hi = tl.minimum(tl.maximum(full_hi, full_lo), q_end)
        dk, dv = _dkdv_loop(dk, dv, k, v, Qb, DOb, LSEb, DELb, qn, sqd, don, sdod, groups, offs_n, offs_n,
                            q_begin, full_lo, n_eff, qk_scale, width, sl, sc, ss, DKb, DKb, DKb, gqn, sgqd, 0, scale,
                            BAND=BAND, OFF=OFF, SUMMARY=SUM_NONE, MASKED=True, DQK=DQK, DV=DV, BM=BM1,
                            ORDERED_DQ=False, F32=F32)
        dk, dv = _dkdv_loop(dk, dv, k, v, Qb, DOb, LSEb, DELb, qn, sqd, don, sdod, groups, offs_n, offs_n,
                            full_lo, full_hi, n_eff, qk_scale, width, sl, sc, ss, DKb, DKb, DKb, gqn, sgqd, 0, scale,
                            BAND=BAND, OFF=OFF, SUMMARY=SUM_NONE, MASKED=False, DQK=DQK, DV=DV, BM=BM1,
                            ORDERED_DQ=False, F32=F32)
        dk, dv = _dkdv_loop(dk, dv, k, v, Qb, DOb, LSEb, DELb, qn, sqd, don, sdod, groups, offs_n, offs_n,
                            full_hi, q_end, n_eff, qk_scale, width, sl, sc, ss, DKb, DKb, DKb, gqn, sgqd, 0, scale,
                            BAND=BAND, OFF=OFF, SUMMARY=SUM_NONE, MASKED=True, DQK=DQK, DV=DV, BM=BM1,
                            ORDERED_DQ=False, F32=F32)
    _store_rows(DKb, offs_n, gqn, sgqd, store, dk * scale, W=DQK, MERGE=MERGE, F32=F32)
    _store_rows(DVb, offs_n, gvn, sgvd, store, dv, W=DV, MERGE=MERGE, F32=F32)


@triton.jit
def _bwd_summary_keys(Qb, Kb, Vb, DOb, DQb, DKb, DVb, ACCb, TURNb, KVACCb, KVTURNb, LSEb, DELb, qn, sqd, kn, skd,
                      vn, svd, don, sdod, gqn, sgqd, gvn, sgvd, groups, j0, seg, seg_rows, n, n_eff, qk_scale, scale,
                      width, sl, sc, ss,
                      BAND: tl.constexpr, OFF: tl.constexpr, SUMMARY: tl.constexpr, MERGE: tl.constexpr,
                      DQK: tl.constexpr, DV: tl.constexpr, BN1: tl.constexpr, BM1: tl.constexpr,
                      ORDERED_DQ: tl.constexpr, SEGMENTS: tl.constexpr, F32: tl.constexpr):
    """Key-stationary role: dK, dV of the gathered summary keys j0 .. j0 + BN1 - 1, from both parts: masked query
    tiles up to the end of the last key's block (where band and summary pairs mix), unmasked ones after.
    ORDERED_DQ: also the summary part's dQ of the query tiles it visits, added in turn. SEGMENTS: this program takes
    only the queries of segment ``seg`` (rows ``[seg · seg_rows, (seg + 1) · seg_rows)``), so that the key tiles
    that see the most queries do not set the launch's length; the segments' dK/dV are added in segment order
    (``KVACC``/``KVTURN``, like the chunks' dQ) and the last segment writes them."""
    tl.static_assert(SUMMARY != SUM_NONE)
    tl.static_assert(ORDERED_DQ or not SEGMENTS, "segments come with the ordered reduction")
    t_total = (n // sl) * sc + tl.minimum(tl.maximum(n % sl - ss, 0), sc)
    offs_n = j0 + tl.arange(0, BN1)
    pos = _sum_pos(offs_n, sl, sc, ss)
    kin = offs_n < t_total
    k = _load_rows(Kb, pos, kn, skd, kin, W=DQK)
    v = _load_rows(Vb, pos, vn, svd, kin, W=DV)
    dk = tl.zeros([BN1, DQK], dtype=tl.float32)
    dv = tl.zeros([BN1, DV], dtype=tl.float32)
    q_all = tl.cdiv(n_eff, BM1) * BM1
    t_last = tl.maximum(tl.minimum(j0 + BN1, t_total) - 1, 0)
    q_begin = (_sum_pos(j0, sl, sc, ss) // BM1) * BM1
    if j0 >= t_total:  # this head has fewer summary cells than the grid's widest head
        q_begin = q_all
    q_begin = tl.minimum(q_begin, q_all)
    q_end = q_all
    first = q_begin // seg_rows  # SEGMENTS: the segments that hold queries of this tile, first .. last
    last = (q_all - 1) // seg_rows
    if SEGMENTS:
        q_begin = tl.maximum(q_begin, seg * seg_rows)
        q_end = tl.maximum(tl.minimum(q_all, (seg + 1) * seg_rows), q_begin)
    full_lo = tl.cdiv((_sum_pos(t_last, sl, sc, ss) // sl + 1) * sl, BM1) * BM1
    full_lo = tl.minimum(tl.maximum(full_lo, q_begin), q_end)
    dk, dv = _dkdv_loop(dk, dv, k, v, Qb, DOb, LSEb, DELb, qn, sqd, don, sdod, groups, offs_n, pos,
                        q_begin, full_lo, n_eff, qk_scale, width, sl, sc, ss, DQb, ACCb, TURNb, gqn, sgqd,
                        j0 // BN1 + 1, scale, BAND=BAND, OFF=OFF, SUMMARY=SUMMARY, MASKED=True, DQK=DQK, DV=DV,
                        BM=BM1, ORDERED_DQ=ORDERED_DQ, F32=F32)
    dk, dv = _dkdv_loop(dk, dv, k, v, Qb, DOb, LSEb, DELb, qn, sqd, don, sdod, groups, offs_n, pos,
                        full_lo, q_end, n_eff, qk_scale, width, sl, sc, ss, DQb, ACCb, TURNb, gqn, sgqd,
                        j0 // BN1 + 1, scale, BAND=BAND, OFF=OFF, SUMMARY=SUMMARY, MASKED=False, DQK=DQK, DV=DV,
                        BM=BM1, ORDERED_DQ=ORDERED_DQ, F32=F32)
    write = True
    if SEGMENTS:  # the segments holding queries of a tile add its dK/dV in turn, the last one writes them
        active = (j0 < t_total) & (seg >= first) & (seg <= last)
        write = active & (last == first)
        if active & (last > first):
            _add_kv_in_turn(DKb, DVb, KVACCb, KVTURNb + j0 // BN1, offs_n, pos, kin, gqn, sgqd, gvn, sgvd,
                            seg - first, seg == last, dk, dv, scale, DQK=DQK, DV=DV, F32=F32)
    if write:
        _store_rows(DKb, pos, gqn, sgqd, kin, dk * scale, W=DQK, MERGE=MERGE, F32=F32)
        _store_rows(DVb, pos, gvn, sgvd, kin, dv, W=DV, MERGE=MERGE, F32=F32)


@triton.jit
def _bwd_queries(Qb, Kb, Vb, DOb, DQb, ACCb, TURNb, LSEb, DELb, qn, sqd, kn, skd, vn, svd, don, sdod, gqn, sgqd,
                 groups, i0, n_eff, qk_scale, scale, width, sl, sc, ss,
                 BAND: tl.constexpr, OFF: tl.constexpr, SUMMARY: tl.constexpr, MERGE: tl.constexpr,
                 DQK: tl.constexpr, DV: tl.constexpr, BM2: tl.constexpr, BN2: tl.constexpr, BM1: tl.constexpr,
                 ORDERED_DQ: tl.constexpr, F32: tl.constexpr):
    """Query-stationary role: dQ of BM2 queries from i0 over the band's and the summary's key tiles. ORDERED_DQ:
    the band's only; it is the first contribution of each of its chunks of BM1 rows (rows whose chunk has summary
    contributors go to ACC, then the chunks' turns pass to the summary key tiles)."""
    offs_m = i0 + tl.arange(0, BM2)
    qin = offs_m < n_eff
    q = _load_rows(Qb, offs_m, qn, sqd, qin, W=DQK)
    do = _load_rows(DOb, offs_m, don, sdod, qin, W=DV)
    lse, delta = _load_stats(LSEb, DELb, offs_m, groups, qin)
    dq = tl.zeros([BM2, DQK], dtype=tl.float32)
    i_last = tl.minimum(i0 + BM2, n_eff) - 1
    if BAND != BAND_NONE:
        k_begin, full_lo, full_hi, k_end = _band_key_tiles(i0, i_last, width, BAND=BAND, OFF=OFF, BN=BN2)
        dq = _dq_loop(dq, q, do, lse, delta, Kb, Vb, kn, skd, vn, svd, offs_m, k_begin, full_lo, n_eff, 0,
                      qk_scale, width, sl, sc, ss, BAND=BAND, OFF=OFF, SUMMARY=SUMMARY, GATHER=False,
                      MASKED=True, DQK=DQK, DV=DV, BN=BN2, F32=F32)
        dq = _dq_loop(dq, q, do, lse, delta, Kb, Vb, kn, skd, vn, svd, offs_m, full_lo, full_hi, n_eff, 0,
                      qk_scale, width, sl, sc, ss, BAND=BAND, OFF=OFF, SUMMARY=SUMMARY, GATHER=False,
                      MASKED=False, DQK=DQK, DV=DV, BN=BN2, F32=F32)
        dq = _dq_loop(dq, q, do, lse, delta, Kb, Vb, kn, skd, vn, svd, offs_m, full_hi, k_end, n_eff, 0,
                      qk_scale, width, sl, sc, ss, BAND=BAND, OFF=OFF, SUMMARY=SUMMARY, GATHER=False,
                      MASKED=True, DQK=DQK, DV=DV, BN=BN2, F32=F32)
    if SUMMARY != SUM_NONE and not ORDERED_DQ:
        t_full = (_sum_count(i0, sl, sc, ss, SUMMARY=SUMMARY) // BN2) * BN2
        t_hi = _sum_count(i_last, sl, sc, ss, SUMMARY=SUMMARY)
        dq = _dq_loop(dq, q, do, lse, delta, Kb, Vb, kn, skd, vn, svd, offs_m, 0, t_full, n_eff, t_hi,
                      qk_scale, width, sl, sc, ss, BAND=BAND, OFF=OFF, SUMMARY=SUMMARY, GATHER=True,
                      MASKED=False, DQK=DQK, DV=DV, BN=BN2, F32=F32)
        dq = _dq_loop(dq, q, do, lse, delta, Kb, Vb, kn, skd, vn, svd, offs_m, t_full, t_hi, n_eff, t_hi,
                      qk_scale, width, sl, sc, ss, BAND=BAND, OFF=OFF, SUMMARY=SUMMARY, GATHER=True,
                      MASKED=True, DQK=DQK, DV=DV, BN=BN2, F32=F32)
    if ORDERED_DQ:
        tl.static_assert(BM2 % BM1 == 0, "a query tile holds whole chunks")
        later = _chunk_sum_count(offs_m, n_eff, sl, sc, ss, SUMMARY=SUMMARY, BM1=BM1) > 0
        _store_rows(DQb, offs_m, gqn, sgqd, qin & ~later, dq * scale, W=DQK, MERGE=False, F32=F32)
        tl.store(ACCb + offs_m[:, None] * DQK + tl.arange(0, DQK)[None, :], dq, mask=(qin & later)[:, None])
        tl.debug_barrier()  # every thread's stores before the turns pass
        for c in range(i0 // BM1, tl.cdiv(tl.minimum(i0 + BM2, n_eff), BM1)):
            tl.atomic_xchg(TURNb + c, 1, sem="release")
    else:
        _store_rows(DQb, offs_m, gqn, sgqd, qin, dq * scale, W=DQK, MERGE=MERGE, F32=F32)


@triton.jit
def _kv_tile_band(dq, q, do, lse, delta, Kb, Vb, DKb, DVb, kn, skd, vn, svd, gqn, sgqd, gvn, sgvd, offs_m, i0,
                  n_eff, qk_scale, scale, width, sl, sc, ss,
                  BAND: tl.constexpr, OFF: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, F32: tl.constexpr):
    """ORDERED_KV, the band part of a query tile that holds whole blocks: its keys are the tile's own rows and no
    other tile sees them through the band, so their dK/dV are complete here and written (zeros without a band).
    Summary cells are left out: their band pairs go with the summary part, whose dK/dV are added across tiles."""
    for s in range(i0, i0 + BM, BN):
        offs_n = s + tl.arange(0, BN)
        own = (offs_n < n_eff) & ((offs_n % sl - ss < 0) | (offs_n % sl - ss >= sc))
        dk = tl.zeros([BN, DQK], dtype=tl.float32)
        dv = tl.zeros([BN, DV], dtype=tl.float32)
        if BAND != BAND_NONE:
            kT = _load_rows_t(Kb, offs_n, kn, skd, own, W=DQK)
            vT = _load_rows_t(Vb, offs_n, vn, svd, own, W=DV)
            qk = _dot(q, kT, tl.zeros([BM, BN], dtype=tl.float32), F32=F32)
            ok = _band_allowed(offs_m[:, None], offs_n[None, :], width, BAND=BAND, OFF=OFF) & own[None, :]
            p = tl.where(ok, tl.exp2(qk * qk_scale - lse[:, None]), 0.0)
            dp = _dot(do, vT, tl.zeros([BM, BN], dtype=tl.float32), F32=F32)
            ds = _cast(p * (dp - delta[:, None]), kT.dtype, F32=F32)
            dq = _dot(ds, tl.trans(kT), dq, F32=F32)
            dk = _dot(tl.trans(ds), q, dk, F32=F32)
            dv = _dot(tl.trans(_cast(p, do.dtype, F32=F32)), do, dv, F32=F32)
        _store_rows(DKb, offs_n, gqn, sgqd, own, dk * scale, W=DQK, MERGE=False, F32=F32)
        _store_rows(DVb, offs_n, gvn, sgvd, own, dv, W=DV, MERGE=False, F32=F32)
    return dq


@triton.jit
def _kv_tile_summary(dq, q, do, lse, delta, Kb, Vb, DKb, DVb, KVACCb, TURNb, kn, skd, vn, svd, gqn, sgqd, gvn, sgvd,
                     offs_m, start, end, tile, rank, n_eff, t_total, qk_scale, scale, width, sl, sc, ss,
                     BAND: tl.constexpr, OFF: tl.constexpr, SUMMARY: tl.constexpr, MASKED: tl.constexpr,
                     DQK: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, F32: tl.constexpr):
    """ORDERED_KV, the summary part of a query tile over gathered key tiles [start, end), BN keys a step (a masked
    step also takes the band pairs of summary cells in the tile's own blocks): dQ, and each key tile's dK/dV parts
    added in turn (``_add_kv_in_turn``, rank: this tile's ticket, later tiles first); the tile holding the key
    tile's first key adds last and writes. S and dP of every block are computed once: 5 products."""
    for s in range(start, end, BN):
        offs_n = s + tl.arange(0, BN)
        pos, kin = _key_rows(offs_n, n_eff, t_total, sl, sc, ss, GATHER=True)
        kT = _load_rows_t(Kb, pos, kn, skd, kin, W=DQK)
        vT = _load_rows_t(Vb, pos, vn, svd, kin, W=DV)
        qk = _dot(q, kT, tl.zeros([BM, BN], dtype=tl.float32), F32=F32)
        p = tl.exp2(qk * qk_scale - lse[:, None])
        if MASKED:
            ok = offs_n[None, :] < _sum_count(offs_m, sl, sc, ss, SUMMARY=SUMMARY)[:, None]
            if BAND != BAND_NONE:
                ok = ok | _band_allowed(offs_m[:, None], pos[None, :], width, BAND=BAND, OFF=OFF)
            p = tl.where(ok & kin[None, :], p, 0.0)
        dp = _dot(do, vT, tl.zeros([BM, BN], dtype=tl.float32), F32=F32)
        ds = _cast(p * (dp - delta[:, None]), kT.dtype, F32=F32)
        dq = _dot(ds, tl.trans(kT), dq, F32=F32)
        dk = _dot(tl.trans(ds), q, tl.zeros([BN, DQK], dtype=tl.float32), F32=F32)
        dv = _dot(tl.trans(_cast(p, do.dtype, F32=F32)), do, tl.zeros([BN, DV], dtype=tl.float32), F32=F32)
        last = tile == _sum_pos(s, sl, sc, ss) // BM
        _add_kv_in_turn(DKb, DVb, KVACCb, TURNb + s // BN, offs_n, pos, kin, gqn, sgqd, gvn, sgvd, rank, last,
                        dk, dv, scale, DQK=DQK, DV=DV, F32=F32)
    return dq


@triton.jit
def _bwd_kv_tile(Qb, Kb, Vb, DOb, DQb, DKb, DVb, KVACCb, TURNb, LSEb, DELb, qn, sqd, kn, skd, vn, svd, don, sdod,
                 gqn, sgqd, gvn, sgvd, tile, rank, n, n_eff, qk_scale, scale, width, sl, sc, ss,
                 BAND: tl.constexpr, OFF: tl.constexpr, SUMMARY: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
                 BM2: tl.constexpr, BN2: tl.constexpr, F32: tl.constexpr):
    """ORDERED_KV role (summary launches whose query tiles hold whole blocks): every gradient of one query tile's
    pairs, each block's S and dP computed once. dQ and the band keys' dK/dV are this program's alone; the summary
    key tiles' dK/dV are added across the tiles that see them, in a fixed order (later tiles first)."""
    i0 = tile * BM2
    offs_m = i0 + tl.arange(0, BM2)
    qin = offs_m < n_eff
    q = _load_rows(Qb, offs_m, qn, sqd, qin, W=DQK)
    do = _load_rows(DOb, offs_m, don, sdod, qin, W=DV)
    lse, delta = _load_stats(LSEb, DELb, offs_m, 1, qin)
    dq = tl.zeros([BM2, DQK], dtype=tl.float32)
    dq = _kv_tile_band(dq, q, do, lse, delta, Kb, Vb, DKb, DVb, kn, skd, vn, svd, gqn, sgqd, gvn, sgvd, offs_m, i0,
                       n_eff, qk_scale, scale, width, sl, sc, ss,
                       BAND=BAND, OFF=OFF, DQK=DQK, DV=DV, BM=BM2, BN=BN2, F32=F32)
    t_total = (n // sl) * sc + tl.minimum(tl.maximum(n % sl - ss, 0), sc)
    t_full = (_sum_count(i0, sl, sc, ss, SUMMARY=SUMMARY) // BN2) * BN2  # seen by every query of the tile
    t_hi = _sum_count(tl.minimum(i0 + BM2, n_eff) - 1, sl, sc, ss, SUMMARY=SUM_UPTO)  # cells up to the last row
    dq = _kv_tile_summary(dq, q, do, lse, delta, Kb, Vb, DKb, DVb, KVACCb, TURNb, kn, skd, vn, svd, gqn, sgqd, gvn,
                          sgvd, offs_m, 0, t_full, tile, rank, n_eff, t_total, qk_scale, scale, width, sl, sc, ss,
                          BAND=BAND, OFF=OFF, SUMMARY=SUMMARY, MASKED=False, DQK=DQK, DV=DV, BM=BM2, BN=BN2, F32=F32)
    dq = _kv_tile_summary(dq, q, do, lse, delta, Kb, Vb, DKb, DVb, KVACCb, TURNb, kn, skd, vn, svd, gqn, sgqd, gvn,
                          sgvd, offs_m, t_full, t_hi, tile, rank, n_eff, t_total, qk_scale, scale, width, sl, sc, ss,
                          BAND=BAND, OFF=OFF, SUMMARY=SUMMARY, MASKED=True, DQK=DQK, DV=DV, BM=BM2, BN=BN2, F32=F32)
    _store_rows(DQb, offs_m, gqn, sgqd, qin, dq * scale, W=DQK, MERGE=False, F32=F32)


@triton.jit
def _bwd_role(slot, nkb, nks, nqb, BAND: tl.constexpr):
    """The role number (band key tiles ``[0, nkb)``, summary key tiles ``[nkb, nkb + nks)``, query tiles after)
    of a split launch's slot, longest work first: summary key tiles (the first sees every later query), then the
    band key tiles of a causal or local band before the query tiles (later ones first), or after them for a
    fixed block band (whose key tiles see one block of queries)."""
    s = slot - nks
    if BAND == BAND_FIXED or BAND == BAND_NONE:
        rest = tl.where(s < nqb, nkb + nks + s, s - nqb)
    else:
        rest = tl.where(s < nkb, s, nks + s)
    return tl.where(slot < nks, nkb + slot, rest)


@triton.jit
def _bwd_kernel(Q, K, V, DO, GRAD_Q, GRAD_K, GRAD_V, LSE, DELTA, HEADS, STARTS, ACC, KVACC, TURNS,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
                sgqb, sgqh, sgqn, sgqd, sgvb, sgvh, sgvn, sgvd,
                n, H, HL, BH, groups, qk_scale, scale, width, sl, sc, nks, nseg, seg_rows, kv_rows, turn_stride,
                BAND: tl.constexpr, OFF: tl.constexpr, SUMMARY: tl.constexpr, MERGE: tl.constexpr,
                DQK: tl.constexpr, DV: tl.constexpr, BM1: tl.constexpr, BN1: tl.constexpr, BM2: tl.constexpr,
                BN2: tl.constexpr, FUSED: tl.constexpr, ONE_LOOP: tl.constexpr, ORDERED_DQ: tl.constexpr,
                SEGMENTS: tl.constexpr, ORDERED_KV: tl.constexpr, HEAD_GROUP: tl.constexpr, F32: tl.constexpr):
    """dQ, dK, dV of one launch's parts; the program's slot picks the role (``_bwd_role``, longest work first).
    GRAD_Q and GRAD_K share one layout (strides sgq*), GRAD_V has its own (sgv*). ``nks``: summary key tiles of the
    head with the most summary cells (the host's count, so the roles line up across heads). ORDERED_DQ (summary
    launches): the summary part's dQ comes from the summary key tiles, added in turn to ACC ([b, H, n, DQK] float32)
    under per-chunk turn counters in TURNS (per (batch, head of the launch): a ticket counter, then one counter per
    BM1 query rows, then one counter per summary key tile; zeroed by the host); programs take their role from a
    ticket: query tiles first, then summary key tiles in order, then band key tiles. SEGMENTS (with ORDERED_DQ):
    each summary key tile runs as ``nseg`` programs, one per segment of ``seg_rows`` query rows, whose dK/dV are
    added in turn in KVACC (``[BH, kv_rows, DQK + DV]`` float32). ORDERED_KV: one program per query tile
    (``_bwd_kv_tile``), taking its tile by ticket (later tiles first); its summary key tiles' dK/dV go through KVACC
    under one turn per BN2 summary keys. ``turn_stride``: the turn counters per (batch, head of the launch)."""
    tl.static_assert(not (FUSED and SUMMARY != SUM_NONE), "the fused role computes band-only launches")
    tl.static_assert(not ORDERED_DQ or (SUMMARY != SUM_NONE and not MERGE and not FUSED),
                     "ordered dQ is for summary launches in the natural layout")
    tl.static_assert(BAND != BAND_NONE or SUMMARY != SUM_NONE, "a launch computes at least one part")
    tl.static_assert(ORDERED_DQ or not SEGMENTS, "segments come with the ordered reduction")
    tl.static_assert(not ORDERED_KV or (SUMMARY != SUM_NONE and not MERGE and not FUSED and not ORDERED_DQ),
                     "ordered dK/dV is for summary launches in the natural layout")
    nkb = tl.cdiv(tl.cdiv(n, groups), BN1)
    nqb = tl.cdiv(tl.cdiv(n, groups), BM2)
    slots = nkb if FUSED else nkb + nks * nseg + nqb
    if ORDERED_KV:
        slots = nqb
    pid_bh, slot = _program(BH, slots * groups, HEAD_GROUP=HEAD_GROUP)
    grp = slot % groups
    role = slot // groups
    seg = 0
    if not FUSED:
        role = _bwd_role(role, nkb, nks, nqb, BAND=BAND)
    n_eff = (n - grp + groups - 1) // groups
    TURNb = TURNS + pid_bh * turn_stride + 1
    if ORDERED_DQ:  # role by ticket: query tiles, then summary key tiles (segment by segment), then band key tiles
        ticket = tl.atomic_add(TURNb - 1, 1)
        p = ticket - nqb
        summary = (p >= 0) & (p < nks * nseg)
        role = tl.where(p < 0, nkb + nks + ticket, tl.where(summary, nkb + p // nseg, p - nks * nseg))
        seg = tl.where(summary, p % nseg, 0)
    b = pid_bh // HL
    hl = pid_bh % HL
    h = tl.load(HEADS + hl)
    ss = tl.load(STARTS + hl)
    Qb = Q + b * sqb + h * sqh + grp * sqn
    Kb = K + b * skb + h * skh + grp * skn
    Vb = V + b * svb + h * svh + grp * svn
    DOb = DO + b * sdob + h * sdoh + grp * sdon
    DQb = GRAD_Q + b * sgqb + h * sgqh + grp * sgqn
    DKb = GRAD_K + b * sgqb + h * sgqh + grp * sgqn
    DVb = GRAD_V + b * sgvb + h * sgvh + grp * sgvn
    LSEb = LSE + (b * H + h) * n + grp
    DELb = DELTA + (b * H + h) * n + grp
    qn = sqn * groups
    kn = skn * groups
    vn = svn * groups
    don = sdon * groups
    gqn = sgqn * groups
    gvn = sgvn * groups
    ACCb = ACC + (b * H + h).to(tl.int64) * n * DQK  # the float32 buffer can pass 2^31 elements
    KVACCb = KVACC + pid_bh.to(tl.int64) * kv_rows * (DQK + DV)
    if ORDERED_KV:  # role by ticket: query tiles, later ones first; the ticket is the tile's rank in every chain
        ticket = tl.atomic_add(TURNb - 1, 1)
        _bwd_kv_tile(Qb, Kb, Vb, DOb, DQb, DKb, DVb, KVACCb, TURNb, LSEb, DELb, qn, sqd, kn, skd, vn, svd, don, sdod,
                     gqn, sgqd, gvn, sgvd, nqb - 1 - ticket, ticket, n, n_eff, qk_scale, scale, width, sl, sc, ss,
                     BAND=BAND, OFF=OFF, SUMMARY=SUMMARY, DQK=DQK, DV=DV, BM2=BM2, BN2=BN2, F32=F32)
    elif FUSED:
        i0 = role * BN1
        if i0 < n_eff:
            _bwd_band_tile(Qb, Kb, Vb, DOb, DQb, DKb, DVb, LSEb, DELb, qn, sqd, kn, skd, vn, svd, don, sdod,
                           gqn, sgqd, gvn, sgvd, groups, i0, n_eff, qk_scale, scale, width,
                           BAND=BAND, OFF=OFF, MERGE=MERGE, DQK=DQK, DV=DV, BT=BN1, BM1=BM1, BN2=BN2,
                           ONE_LOOP=ONE_LOOP, F32=F32)
    elif role < nkb:
        _bwd_band_keys(Qb, Kb, Vb, DOb, DKb, DVb, LSEb, DELb, qn, sqd, kn, skd, vn, svd, don, sdod,
                       gqn, sgqd, gvn, sgvd, groups, role * BN1, n_eff, qk_scale, scale, width, sl, sc, ss,
                       BAND=BAND, OFF=OFF, SUMMARY=SUMMARY, MERGE=MERGE, DQK=DQK, DV=DV, BN1=BN1, BM1=BM1, F32=F32)
    elif role < nkb + nks:
        if SUMMARY != SUM_NONE:
            _bwd_summary_keys(Qb, Kb, Vb, DOb, DQb, DKb, DVb, ACCb, TURNb, KVACCb, TURNb + tl.cdiv(n, BM1), LSEb,
                              DELb, qn, sqd, kn, skd, vn, svd, don, sdod, gqn, sgqd, gvn, sgvd, groups,
                              (role - nkb) * BN1, seg, seg_rows, n, n_eff, qk_scale, scale, width, sl, sc, ss,
                              BAND=BAND, OFF=OFF, SUMMARY=SUMMARY, MERGE=MERGE, DQK=DQK, DV=DV, BN1=BN1, BM1=BM1,
                              ORDERED_DQ=ORDERED_DQ, SEGMENTS=SEGMENTS, F32=F32)
    else:
        # later query tiles (more keys) first
        i0 = (tl.cdiv(tl.cdiv(n, groups), BM2) - 1 - (role - nkb - nks)) * BM2
        if i0 < n_eff:
            _bwd_queries(Qb, Kb, Vb, DOb, DQb, ACCb, TURNb, LSEb, DELb, qn, sqd, kn, skd, vn, svd, don, sdod, gqn,
                         sgqd, groups, i0, n_eff, qk_scale, scale, width, sl, sc, ss,
                         BAND=BAND, OFF=OFF, SUMMARY=SUMMARY, MERGE=MERGE, DQK=DQK, DV=DV, BM2=BM2, BN2=BN2,
                         BM1=BM1, ORDERED_DQ=ORDERED_DQ, F32=F32)
