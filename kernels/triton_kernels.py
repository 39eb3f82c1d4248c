"""Triton kernels of the ``triton`` backend: flash-style forward and backward for the Sparse Transformer parts.

One kernel family serves every pattern. A launch works on *groups* of rows: group ``g`` holds the rows
``g, g + G, g + 2G, …`` of the sequence (``G = 1``: the natural layout; ``G = stride``: the strided layout of
kernels.md §0, where every residue class mod the stride is one contiguous causal sequence). Inside a group the
local index ``i`` of a row is its position divided by ``G``, and rows are reached by address arithmetic (row
stride ``G · stride_n``); nothing is copied. Each launch computes up to two disjoint parts in one online softmax:

* a *band*: query ``i`` sees keys ``L(i) <= j <= i - OFF`` (``BAND``: 1 causal, 2 local window, 3 own fixed
  block); the strided part is the causal band of the strided layout (``OFF = 1`` drops ``j = i``);
* a *summary* (natural layout only): the ``sc`` cells starting at ``ss`` of every block of ``sl`` positions,
  gathered into dense key tiles by address arithmetic (key index ``t`` sits at ``(t // sc)·sl + ss + t % sc``);
  ``SUMMARY``: 1 cells at or before the query, 2 cells of earlier blocks only.

Key tiles are split into those that need an element mask (band edges, the diagonal, the last summary tile) and
full ones that run unmasked. A merged pattern whose parts live in different layouts (Strided = local band in the
natural layout + strided band in the strided layout) runs one launch per layout; the later one starts its online
softmax from the earlier one's output and log-sum-exp (``MERGE``), which is the log-sum-exp merge of the parts.
Scores use ``exp2`` with ``scale·log2(e)`` folded in; the saved LSE is in base 2.

Backward: ``_delta_kernel`` computes ``delta = rowsum(dO·O)``, then one launch of ``_bwd_kernel`` per launch of
the forward. With a summary part its programs split by id into band dK/dV (key-stationary), summary dK/dV
(key-stationary over gathered key tiles) and dQ (query-stationary) programs. Band-only launches can instead run
``FUSED``: one program per tile of rows computes the tile's dQ (earlier key tiles) and dK/dV (later query tiles) and
the diagonal block once for both (``_bwd_tile``). Every output row is written by exactly one program:
deterministic, no atomics. With ``MERGE`` the results are added to the gradients the previous launch wrote.
"""

from __future__ import annotations

import triton
import triton.language as tl

BAND_NONE, BAND_CAUSAL, BAND_LOCAL, BAND_FIXED = 0, 1, 2, 3
SUM_NONE, SUM_UPTO, SUM_PREV = 0, 1, 2


@triton.jit
def _dot(a, b, acc, F32: tl.constexpr):
    # F32: exact float32 products (fp32 inputs, and bf16 under the CPU interpreter whose bf16 dot is wrong).
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _cast(x, dtype: tl.constexpr, F32: tl.constexpr):
    """Round float32 ``x`` to ``dtype`` to nearest-even (done by hand for bf16 under the CPU interpreter,
    whose float32 -> bf16 conversion truncates; F32 with a bf16 target happens only there)."""
    if F32 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _band_first(i, width, BAND: tl.constexpr):
    """L(i): the first key of query i's band."""
    if BAND == 2:
        return tl.maximum(i - width + 1, 0)
    elif BAND == 3:
        return (i // width) * width
    else:
        return i * 0


@triton.jit
def _band_last_query(j, width, n_eff, BAND: tl.constexpr):
    """U(j): the last query whose band holds key j (inclusive)."""
    if BAND == 2:
        return tl.minimum(j + width - 1, n_eff - 1)
    elif BAND == 3:
        return tl.minimum((j // width + 1) * width - 1, n_eff - 1)
    else:
        return n_eff - 1


@triton.jit
def _band_allowed(i, j, width, BAND: tl.constexpr, OFF: tl.constexpr):
    ok = j <= i - OFF
    if BAND == 2:
        ok = ok & (j > i - width)
    if BAND == 3:
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
    if SUMMARY == 1:
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
    """[queries, keys] mask of the allowed pairs of a masked tile (summary keys: the first ones in gathered order)."""
    if GATHER:
        ok = offs_n[None, :] < _sum_count(offs_m, sl, sc, ss, SUMMARY)[:, None]
    else:
        ok = _band_allowed(offs_m[:, None], offs_n[None, :], width, BAND, OFF)
    return ok & kin[None, :]


@triton.jit
def _fwd_loop(acc, m_i, l_i, q, Kb, Vb, skn, skd, svn, svd, offs_m, offs_d, start, end, n_eff, t_total,
              qk_scale, width, sl, sc, ss,
              BAND: tl.constexpr, OFF: tl.constexpr, SUMMARY: tl.constexpr, GATHER: tl.constexpr,
              MASKED: tl.constexpr, BN: tl.constexpr, F32: tl.constexpr):
    for s in range(start, end, BN):
        offs_n = s + tl.arange(0, BN)
        pos, kin = _key_rows(offs_n, n_eff, t_total, sl, sc, ss, GATHER)
        k = tl.load(Kb + pos[None, :] * skn + offs_d[:, None] * skd, mask=kin[None, :], other=0.0)
        v = tl.load(Vb + pos[:, None] * svn + offs_d[None, :] * svd, mask=kin[:, None], other=0.0)
        qk = _dot(q, k, tl.zeros([q.shape[0], BN], dtype=tl.float32), F32) * qk_scale
        if MASKED:
            ok = _pairs_allowed(offs_m, offs_n, kin, width, sl, sc, ss, BAND, OFF, SUMMARY, GATHER)
            qk = tl.where(ok, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_sub = m_new
        p = tl.exp2(qk - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot(_cast(p, v.dtype, F32), v, acc * alpha[:, None], F32)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, Out, LSE, HEADS, STARTS,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                n, H, HL, groups, qk_scale, width, sl, sc,
                BAND: tl.constexpr, OFF: tl.constexpr, SUMMARY: tl.constexpr, MERGE: tl.constexpr,
                D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, ONE_LOOP: tl.constexpr, F32: tl.constexpr):
    # ONE_LOOP: the band's key tiles run in one masked loop (one software pipeline, better for short bands and
    # chains) instead of a masked head, an unmasked middle and a masked tail.
    pid0 = tl.program_id(0)
    pid_bh = tl.program_id(1)
    grp = pid0 % groups
    n_eff = (n - grp + groups - 1) // groups
    n_tiles = tl.cdiv(tl.cdiv(n, groups), BM)
    tile = n_tiles - 1 - pid0 // groups  # later query tiles see more keys: start them first
    i0 = tile * BM
    if i0 < n_eff:
        b = pid_bh // HL
        hl = pid_bh % HL
        h = tl.load(HEADS + hl)
        ss = tl.load(STARTS + hl)
        # rows of group grp: position = grp + i * groups
        Qb = Q + b * sqb + h * sqh + grp * sqn
        Kb = K + b * skb + h * skh + grp * skn
        Vb = V + b * svb + h * svh + grp * svn
        Ob = Out + b * sob + h * soh + grp * son
        LSEb = LSE + (b * H + h) * n + grp
        qn = sqn * groups
        kn = skn * groups
        vn = svn * groups
        on = son * groups
        offs_m = i0 + tl.arange(0, BM)
        offs_d = tl.arange(0, D)
        qin = offs_m < n_eff
        q = tl.load(Qb + offs_m[:, None] * qn + offs_d[None, :] * sqd, mask=qin[:, None], other=0.0)
        if MERGE:
            # the previous launch's part acts as one virtual key: score = its LSE, value = its output
            prev = tl.load(LSEb + offs_m * groups, mask=qin, other=float("-inf"))
            m_i = prev
            l_i = tl.where(prev == float("-inf"), 0.0, 1.0)
            acc = tl.load(Ob + offs_m[:, None] * on + offs_d[None, :] * sod, mask=qin[:, None], other=0.0)
            acc = acc.to(tl.float32)
        else:
            m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BM], dtype=tl.float32)
            acc = tl.zeros([BM, D], dtype=tl.float32)
        i_last = tl.minimum(i0 + BM, n_eff) - 1
        if BAND != 0:
            k_begin, full_lo, full_hi, k_end = _band_key_tiles(i0, i_last, width, BAND, OFF, BN)
            if ONE_LOOP:
                full_lo = k_end
                full_hi = k_end
            acc, m_i, l_i = _fwd_loop(acc, m_i, l_i, q, Kb, Vb, kn, skd, vn, svd, offs_m, offs_d, k_begin, full_lo,
                                      n_eff, 0, qk_scale, width, sl, sc, ss, BAND, OFF, SUMMARY, False, True, BN, F32)
            acc, m_i, l_i = _fwd_loop(acc, m_i, l_i, q, Kb, Vb, kn, skd, vn, svd, offs_m, offs_d, full_lo, full_hi,
                                      n_eff, 0, qk_scale, width, sl, sc, ss, BAND, OFF, SUMMARY, False, False, BN, F32)
            acc, m_i, l_i = _fwd_loop(acc, m_i, l_i, q, Kb, Vb, kn, skd, vn, svd, offs_m, offs_d, full_hi, k_end,
                                      n_eff, 0, qk_scale, width, sl, sc, ss, BAND, OFF, SUMMARY, False, True, BN, F32)
        if SUMMARY != 0:
            t_full = (_sum_count(i0, sl, sc, ss, SUMMARY) // BN) * BN
            t_hi = _sum_count(i_last, sl, sc, ss, SUMMARY)
            acc, m_i, l_i = _fwd_loop(acc, m_i, l_i, q, Kb, Vb, kn, skd, vn, svd, offs_m, offs_d, 0, t_full,
                                      n_eff, t_hi, qk_scale, width, sl, sc, ss, BAND, OFF, SUMMARY, True, False, BN, F32)
            acc, m_i, l_i = _fwd_loop(acc, m_i, l_i, q, Kb, Vb, kn, skd, vn, svd, offs_m, offs_d, t_full, t_hi,
                                      n_eff, t_hi, qk_scale, width, sl, sc, ss, BAND, OFF, SUMMARY, True, True, BN, F32)
        empty = l_i == 0.0  # rows that see no key: output 0, LSE -inf
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(Ob + offs_m[:, None] * on + offs_d[None, :] * sod, _cast(out, Out.dtype.element_ty, F32), mask=qin[:, None])
        tl.store(LSEb + offs_m * groups, lse, mask=qin)


@triton.jit
def _delta_kernel(Out, DO, DELTA, sob, soh, son, sod, sdb, sdh, sdn, sdd, n, H,
                  D: tl.constexpr, BM: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    rin = offs_m < n
    o = tl.load(Out + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, mask=rin[:, None], other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :] * sdd, mask=rin[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * n + offs_m, delta, mask=rin)


@triton.jit
def _dq_loop(dq, q, do, lse, delta, Kb, Vb, skn, skd, svn, svd, offs_m, offs_d, start, end, n_eff, t_total,
             qk_scale, width, sl, sc, ss,
             BAND: tl.constexpr, OFF: tl.constexpr, SUMMARY: tl.constexpr, GATHER: tl.constexpr,
             MASKED: tl.constexpr, BN: tl.constexpr, F32: tl.constexpr):
    for s in range(start, end, BN):
        offs_n = s + tl.arange(0, BN)
        pos, kin = _key_rows(offs_n, n_eff, t_total, sl, sc, ss, GATHER)
        kT = tl.load(Kb + pos[None, :] * skn + offs_d[:, None] * skd, mask=kin[None, :], other=0.0)
        vT = tl.load(Vb + pos[None, :] * svn + offs_d[:, None] * svd, mask=kin[None, :], other=0.0)
        qk = _dot(q, kT, tl.zeros([q.shape[0], BN], dtype=tl.float32), F32)
        p = tl.exp2(qk * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(_pairs_allowed(offs_m, offs_n, kin, width, sl, sc, ss, BAND, OFF, SUMMARY, GATHER), p, 0.0)
        dp = _dot(do, vT, tl.zeros([q.shape[0], BN], dtype=tl.float32), F32)
        ds = p * (dp - delta[:, None])
        dq = _dot(_cast(ds, kT.dtype, F32), tl.trans(kT), dq, F32)
    return dq


@triton.jit
def _dkdv_loop(dk, dv, k, v, Qb, DOb, LSEb, DELb, qn, sqd, don, sdod, lsen, offs_n, pos, offs_d, start, end,
               n_eff, qk_scale, width, sl, sc, ss,
               BAND: tl.constexpr, OFF: tl.constexpr, SUMMARY: tl.constexpr, MASKED: tl.constexpr,
               BM: tl.constexpr, F32: tl.constexpr):
    # offs_n: key index in the key tile's own order (gathered index t for summary tiles); pos: its row
    for s in range(start, end, BM):
        offs_m = s + tl.arange(0, BM)
        qin = offs_m < n_eff
        qT = tl.load(Qb + offs_m[None, :] * qn + offs_d[:, None] * sqd, mask=qin[None, :], other=0.0)
        do = tl.load(DOb + offs_m[:, None] * don + offs_d[None, :] * sdod, mask=qin[:, None], other=0.0)
        lse = tl.load(LSEb + offs_m * lsen, mask=qin, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        delta = tl.load(DELb + offs_m * lsen, mask=qin, other=0.0)
        qkT = _dot(k, qT, tl.zeros([k.shape[0], BM], dtype=tl.float32), F32)
        pT = tl.exp2(qkT * qk_scale - lse[None, :])
        if MASKED:
            if SUMMARY != 0:
                ok = offs_n[:, None] < _sum_count(offs_m, sl, sc, ss, SUMMARY)[None, :]
                if BAND != 0:
                    ok = ok | _band_allowed(offs_m[None, :], pos[:, None], width, BAND, OFF)
            else:
                ok = _band_allowed(offs_m[None, :], pos[:, None], width, BAND, OFF)
            pT = tl.where(ok, pT, 0.0)
        dv = _dot(_cast(pT, do.dtype, F32), do, dv, F32)
        dpT = _dot(v, tl.trans(do), tl.zeros([k.shape[0], BM], dtype=tl.float32), F32)
        dsT = pT * (dpT - delta[None, :])
        dk = _dot(_cast(dsT, qT.dtype, F32), tl.trans(qT), dk, F32)
    return dk, dv


@triton.jit
def _bwd_tile(Qb, Kb, Vb, DOb, DQ, DK, DV, gbase, LSEb, DELb, qn, sqd, kn, skd, vn, svd, don, sdod, gn, sgd,
              groups, i0, n_eff, qk_scale, scale, width,
              BAND: tl.constexpr, OFF: tl.constexpr, MERGE: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
              BM1: tl.constexpr, BN2: tl.constexpr, ONE_LOOP: tl.constexpr, F32: tl.constexpr):
    """dQ of the BT queries and dK, dV of the BT keys of one tile of a band: the diagonal block is computed once
    for both; dQ adds the band's earlier key tiles, dK/dV its later query tiles (BM1 and BN2 divide BT). ONE_LOOP:
    each side is one masked loop."""
    offs_m = i0 + tl.arange(0, BT)
    offs_d = tl.arange(0, D)
    rin = offs_m < n_eff
    i_last = tl.minimum(i0 + BT, n_eff) - 1
    q = tl.load(Qb + offs_m[:, None] * qn + offs_d[None, :] * sqd, mask=rin[:, None], other=0.0)
    do = tl.load(DOb + offs_m[:, None] * don + offs_d[None, :] * sdod, mask=rin[:, None], other=0.0)
    lse = tl.load(LSEb + offs_m * groups, mask=rin, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows that see no key: p = 0
    delta = tl.load(DELb + offs_m * groups, mask=rin, other=0.0)
    # keys before the tile: a masked head where the band starts, then full tiles up to the tile
    k_begin = (_band_first(i0, width, BAND) // BN2) * BN2
    full_lo = tl.cdiv(_band_first(i_last, width, BAND), BN2) * BN2
    full_lo = tl.minimum(tl.maximum(full_lo, k_begin), i0)
    if ONE_LOOP:
        full_lo = i0
    dq = tl.zeros([BT, D], dtype=tl.float32)
    dq = _dq_loop(dq, q, do, lse, delta, Kb, Vb, kn, skd, vn, svd, offs_m, offs_d, k_begin, full_lo,
                  n_eff, 0, qk_scale, width, 1, 1, 0, BAND, OFF, 0, False, True, BN2, F32)
    dq = _dq_loop(dq, q, do, lse, delta, Kb, Vb, kn, skd, vn, svd, offs_m, offs_d, full_lo, i0,
                  n_eff, 0, qk_scale, width, 1, 1, 0, BAND, OFF, 0, False, False, BN2, F32)
    # the diagonal block (keys of the tile x queries of the tile), transposed like the dK/dV loop
    k = tl.load(Kb + offs_m[:, None] * kn + offs_d[None, :] * skd, mask=rin[:, None], other=0.0)
    v = tl.load(Vb + offs_m[:, None] * vn + offs_d[None, :] * svd, mask=rin[:, None], other=0.0)
    qkT = _dot(k, tl.trans(q), tl.zeros([BT, BT], dtype=tl.float32), F32)
    pT = tl.exp2(qkT * qk_scale - lse[None, :])
    pT = tl.where(_band_allowed(offs_m[None, :], offs_m[:, None], width, BAND, OFF), pT, 0.0)
    dpT = _dot(v, tl.trans(do), tl.zeros([BT, BT], dtype=tl.float32), F32)
    dsT = _cast(pT * (dpT - delta[None, :]), q.dtype, F32)
    dv = _dot(_cast(pT, do.dtype, F32), do, tl.zeros([BT, D], dtype=tl.float32), F32)
    dk = _dot(dsT, q, tl.zeros([BT, D], dtype=tl.float32), F32)
    dq = _dot(tl.trans(dsT), k, dq, F32) * scale
    gptr = gbase + offs_m[:, None] * gn + offs_d[None, :] * sgd
    if MERGE:
        dq += tl.load(DQ + gptr, mask=rin[:, None], other=0.0).to(tl.float32)
    tl.store(DQ + gptr, _cast(dq, DQ.dtype.element_ty, F32), mask=rin[:, None])
    # queries after the tile: full tiles, then a masked tail where the band ends
    q_begin = i0 + BT
    q_end = tl.maximum(tl.cdiv(_band_last_query(i_last, width, n_eff, BAND) + 1, BM1) * BM1, q_begin)
    full_hi = ((_band_last_query(i0, width, n_eff, BAND) + 1) // BM1) * BM1
    if BAND == 1:
        full_hi = q_end  # rows past n contribute zero (their LSE loads as +inf)
    full_hi = tl.minimum(tl.maximum(full_hi, q_begin), q_end)
    if ONE_LOOP:
        full_hi = q_begin
    dk, dv = _dkdv_loop(dk, dv, k, v, Qb, DOb, LSEb, DELb, qn, sqd, don, sdod, groups, offs_m, offs_m, offs_d,
                        q_begin, full_hi, n_eff, qk_scale, width, 1, 1, 0, BAND, OFF, 0, False, BM1, F32)
    dk, dv = _dkdv_loop(dk, dv, k, v, Qb, DOb, LSEb, DELb, qn, sqd, don, sdod, groups, offs_m, offs_m, offs_d,
                        full_hi, q_end, n_eff, qk_scale, width, 1, 1, 0, BAND, OFF, 0, True, BM1, F32)
    dk = dk * scale
    if MERGE:
        dk += tl.load(DK + gptr, mask=rin[:, None], other=0.0).to(tl.float32)
        dv += tl.load(DV + gptr, mask=rin[:, None], other=0.0).to(tl.float32)
    tl.store(DK + gptr, _cast(dk, DK.dtype.element_ty, F32), mask=rin[:, None])
    tl.store(DV + gptr, _cast(dv, DV.dtype.element_ty, F32), mask=rin[:, None])


@triton.jit
def _bwd_kernel(Q, K, V, DO, DQ, DK, DV, LSE, DELTA, HEADS, STARTS,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
                sgb, sgh, sgn, sgd,
                n, H, HL, groups, qk_scale, scale, width, sl, sc, nks,
                BAND: tl.constexpr, OFF: tl.constexpr, SUMMARY: tl.constexpr, MERGE: tl.constexpr,
                D: tl.constexpr, BM1: tl.constexpr, BN1: tl.constexpr, BM2: tl.constexpr, BN2: tl.constexpr,
                FUSED: tl.constexpr, ONE_LOOP: tl.constexpr, F32: tl.constexpr):
    # DQ, DK, DV share one layout (strides sg*): they are allocated together by the caller.
    pid0 = tl.program_id(0)
    pid_bh = tl.program_id(1)
    grp = pid0 % groups
    role = pid0 // groups
    n_eff = (n - grp + groups - 1) // groups
    n_max = tl.cdiv(n, groups)
    b = pid_bh // HL
    hl = pid_bh % HL
    h = tl.load(HEADS + hl)
    ss = tl.load(STARTS + hl)
    Qb = Q + b * sqb + h * sqh + grp * sqn
    Kb = K + b * skb + h * skh + grp * skn
    Vb = V + b * svb + h * svh + grp * svn
    DOb = DO + b * sdob + h * sdoh + grp * sdon
    gbase = b * sgb + h * sgh + grp * sgn
    LSEb = LSE + (b * H + h) * n + grp
    DELb = DELTA + (b * H + h) * n + grp
    qn = sqn * groups
    kn = skn * groups
    vn = svn * groups
    don = sdon * groups
    gn = sgn * groups
    offs_d = tl.arange(0, D)
    nkb = tl.cdiv(n_max, BN1)
    # nks: summary key tiles of the head with the most summary cells (the host's count, so roles line up)
    if SUMMARY != 0:
        t_total = (n // sl) * sc + tl.minimum(tl.maximum(n % sl - ss, 0), sc)
    else:
        t_total = 0
    if FUSED:
        # band launches (no summary): one program per tile of BN1 rows does its dQ and its dK/dV
        i0 = role * BN1
        if i0 < n_eff:
            _bwd_tile(Qb, Kb, Vb, DOb, DQ, DK, DV, gbase, LSEb, DELb, qn, sqd, kn, skd, vn, svd, don, sdod, gn, sgd,
                      groups, i0, n_eff, qk_scale, scale, width, BAND, OFF, MERGE, D, BN1, BM1, BN2, ONE_LOOP, F32)
    elif role < nkb + nks:
        # key-stationary: dK, dV of one key tile
        if role < nkb:
            j0 = role * BN1
            offs_n = j0 + tl.arange(0, BN1)
            pos = offs_n
            kin = offs_n < n_eff
            store = kin
            if SUMMARY != 0:
                store = store & ((offs_n % sl - ss < 0) | (offs_n % sl - ss >= sc))  # summary rows: other programs
        else:
            j0 = (role - nkb) * BN1
            offs_n = j0 + tl.arange(0, BN1)
            pos = _sum_pos(offs_n, sl, sc, ss)
            kin = offs_n < t_total
            store = kin
        k = tl.load(Kb + pos[:, None] * kn + offs_d[None, :] * skd, mask=kin[:, None], other=0.0)
        v = tl.load(Vb + pos[:, None] * vn + offs_d[None, :] * svd, mask=kin[:, None], other=0.0)
        dk = tl.zeros([BN1, D], dtype=tl.float32)
        dv = tl.zeros([BN1, D], dtype=tl.float32)
        q_all = tl.cdiv(n_eff, BM1) * BM1
        if role < nkb:
            if BAND != 0:
                j_last = tl.minimum(j0 + BN1, n_eff) - 1
                q_begin = ((j0 + OFF) // BM1) * BM1
                q_end = tl.cdiv(_band_last_query(j_last, width, n_eff, BAND) + 1, BM1) * BM1
                full_lo = tl.cdiv(j_last + OFF, BM1) * BM1
                full_hi = ((_band_last_query(j0, width, n_eff, BAND) + 1) // BM1) * BM1
                if BAND == 1:
                    full_hi = q_all  # rows past n contribute zero (their LSE loads as +inf)
                full_lo = tl.minimum(tl.maximum(full_lo, q_begin), q_end)
                full_hi = tl.minimum(tl.maximum(full_hi, full_lo), q_end)
                dk, dv = _dkdv_loop(dk, dv, k, v, Qb, DOb, LSEb, DELb, qn, sqd, don, sdod, groups, offs_n, pos,
                                    offs_d, q_begin, full_lo, n_eff, qk_scale, width, sl, sc, ss,
                                    BAND, OFF, 0, True, BM1, F32)
                dk, dv = _dkdv_loop(dk, dv, k, v, Qb, DOb, LSEb, DELb, qn, sqd, don, sdod, groups, offs_n, pos,
                                    offs_d, full_lo, full_hi, n_eff, qk_scale, width, sl, sc, ss,
                                    BAND, OFF, 0, False, BM1, F32)
                dk, dv = _dkdv_loop(dk, dv, k, v, Qb, DOb, LSEb, DELb, qn, sqd, don, sdod, groups, offs_n, pos,
                                    offs_d, full_hi, q_end, n_eff, qk_scale, width, sl, sc, ss,
                                    BAND, OFF, 0, True, BM1, F32)
        else:
            t_last = tl.maximum(tl.minimum(j0 + BN1, t_total) - 1, 0)
            q_begin = (_sum_pos(j0, sl, sc, ss) // BM1) * BM1
            if j0 >= t_total:  # this head has fewer summary cells than the grid's widest head
                q_begin = q_all
            q_begin = tl.minimum(q_begin, q_all)
            full_lo = tl.cdiv((_sum_pos(t_last, sl, sc, ss) // sl + 1) * sl, BM1) * BM1
            full_lo = tl.minimum(tl.maximum(full_lo, q_begin), q_all)
            dk, dv = _dkdv_loop(dk, dv, k, v, Qb, DOb, LSEb, DELb, qn, sqd, don, sdod, groups, offs_n, pos,
                                offs_d, q_begin, full_lo, n_eff, qk_scale, width, sl, sc, ss,
                                BAND, OFF, SUMMARY, True, BM1, F32)
            dk, dv = _dkdv_loop(dk, dv, k, v, Qb, DOb, LSEb, DELb, qn, sqd, don, sdod, groups, offs_n, pos,
                                offs_d, full_lo, q_all, n_eff, qk_scale, width, sl, sc, ss,
                                BAND, OFF, SUMMARY, False, BM1, F32)
        dk = dk * scale
        gptr = gbase + pos[:, None] * gn + offs_d[None, :] * sgd
        if MERGE:
            dk += tl.load(DK + gptr, mask=store[:, None], other=0.0).to(tl.float32)
            dv += tl.load(DV + gptr, mask=store[:, None], other=0.0).to(tl.float32)
        tl.store(DK + gptr, _cast(dk, DK.dtype.element_ty, F32), mask=store[:, None])
        tl.store(DV + gptr, _cast(dv, DV.dtype.element_ty, F32), mask=store[:, None])
    else:
        # query-stationary: dQ of one query tile, later tiles (more keys) first
        tile = tl.cdiv(n_max, BM2) - 1 - (role - nkb - nks)
        i0 = tile * BM2
        if i0 < n_eff:
            offs_m = i0 + tl.arange(0, BM2)
            qin = offs_m < n_eff
            q = tl.load(Qb + offs_m[:, None] * qn + offs_d[None, :] * sqd, mask=qin[:, None], other=0.0)
            do = tl.load(DOb + offs_m[:, None] * don + offs_d[None, :] * sdod, mask=qin[:, None], other=0.0)
            lse = tl.load(LSEb + offs_m * groups, mask=qin, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
            delta = tl.load(DELb + offs_m * groups, mask=qin, other=0.0)
            dq = tl.zeros([BM2, D], dtype=tl.float32)
            i_last = tl.minimum(i0 + BM2, n_eff) - 1
            if BAND != 0:
                k_begin, full_lo, full_hi, k_end = _band_key_tiles(i0, i_last, width, BAND, OFF, BN2)
                dq = _dq_loop(dq, q, do, lse, delta, Kb, Vb, kn, skd, vn, svd, offs_m, offs_d, k_begin, full_lo,
                              n_eff, 0, qk_scale, width, sl, sc, ss, BAND, OFF, SUMMARY, False, True, BN2, F32)
                dq = _dq_loop(dq, q, do, lse, delta, Kb, Vb, kn, skd, vn, svd, offs_m, offs_d, full_lo, full_hi,
                              n_eff, 0, qk_scale, width, sl, sc, ss, BAND, OFF, SUMMARY, False, False, BN2, F32)
                dq = _dq_loop(dq, q, do, lse, delta, Kb, Vb, kn, skd, vn, svd, offs_m, offs_d, full_hi, k_end,
                              n_eff, 0, qk_scale, width, sl, sc, ss, BAND, OFF, SUMMARY, False, True, BN2, F32)
            if SUMMARY != 0:
                t_full = (_sum_count(i0, sl, sc, ss, SUMMARY) // BN2) * BN2
                t_hi = _sum_count(i_last, sl, sc, ss, SUMMARY)
                dq = _dq_loop(dq, q, do, lse, delta, Kb, Vb, kn, skd, vn, svd, offs_m, offs_d, 0, t_full,
                              n_eff, t_hi, qk_scale, width, sl, sc, ss, BAND, OFF, SUMMARY, True, False, BN2, F32)
                dq = _dq_loop(dq, q, do, lse, delta, Kb, Vb, kn, skd, vn, svd, offs_m, offs_d, t_full, t_hi,
                              n_eff, t_hi, qk_scale, width, sl, sc, ss, BAND, OFF, SUMMARY, True, True, BN2, F32)
            dq = dq * scale
            gptr = gbase + offs_m[:, None] * gn + offs_d[None, :] * sgd
            if MERGE:
                dq += tl.load(DQ + gptr, mask=qin[:, None], other=0.0).to(tl.float32)
            tl.store(DQ + gptr, _cast(dq, DQ.dtype.element_ty, F32), mask=qin[:, None])
