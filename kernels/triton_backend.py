"""The ``triton`` backend: fused flash-style forward and backward kernels for every Sparse Transformer pattern.

``triton_attention(q, k, v, pattern, scale)`` checks what is this backend's own (head widths, dtypes, device,
32-bit offsets; ``sparse_attention`` validated the rest), raising ``ValueError`` before any launch, and calls the
``torch.ops.lightning_sparse.attention_forward`` custom operator (:mod:`.ops`), whose implementation looks up the
cached launch plan of the pattern (:mod:`.launch_plan`), picks each launch's tiles (:mod:`.tiles`) and runs the
kernels of :mod:`.triton_kernels` through :func:`_forward` / :func:`_backward`. Triton is imported only when a
kernel is about to run, so
``import lightning_sparse`` works without it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from .launch_plan import BAND_LOCAL, SUM_NONE, Launch, head_tables, launch_plan
from .patterns import Pattern
from .tiles import BwdTiles, FwdTiles, select_tiles

HEAD_DIMS = (32, 64, 128)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
LOG2E = 1.4426950408889634  # the kernels use exp2
# Heads whose programs a causal or summary launch schedules together, longest first (triton_kernels._program):
# enough work to hide its longest program, few enough heads' keys to stay in L2. Launches of a local band or in the
# strided order (programs of near-equal work) keep each head's programs together: 1.
HEAD_GROUP = 16

_KERNELS: Any = None


def _kernels() -> Any:
    """Import the Triton kernels once; say what to install when Triton is missing."""
    global _KERNELS
    if _KERNELS is None:
        try:
            from . import triton_kernels
        except ImportError as err:  # triton absent or broken
            raise ImportError(
                "backend='triton' needs the Triton compiler: `pip install triton` (Linux, CUDA GPU), or use "
                f"backend='torch'. Importing it failed with: {err}"
            ) from err
        _KERNELS = triton_kernels
    return _KERNELS


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """This backend's own input rules (shapes, dtypes agreeing, devices and scale were checked by sparse_attention)."""
    d_qk, d_v = q.shape[-1], v.shape[-1]
    for name, d in (("query/key", d_qk), ("value", d_v)):
        if d not in HEAD_DIMS:
            raise ValueError(
                f"backend='triton' supports head widths in {HEAD_DIMS}, got {name} head_dim={d}; pad the head "
                f"dimension to one of them or use backend='torch'."
            )
    if q.dtype not in DTYPES:
        raise ValueError(
            f"backend='triton' supports dtypes bfloat16, float16 and float32, got {q.dtype}; cast the inputs "
            f"(e.g. q.to(torch.bfloat16)) or use backend='torch'."
        )
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"backend='triton' runs on CUDA tensors, got tensors on {q.device}; move them with .cuda(), use "
            f"backend='torch', or set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU."
        )
    if q.numel() == 0 or v.numel() == 0:
        raise ValueError(f"q, k, v must not be empty, got shapes {tuple(q.shape)}, {tuple(v.shape)}.")
    for name, t in (("q", q), ("k", k), ("v", v)):
        reach = (t.shape[2] - 1) * abs(t.stride(2)) + (t.shape[3] - 1) * abs(t.stride(3))
        if reach >= 2**31:
            raise ValueError(
                f"{name} spans {reach} elements within one (batch, head): more than the kernels' 32-bit row "
                f"offsets allow (2^31); make it contiguous as [batch, heads, n, head_dim] or shorten the sequence."
            )


def _layout(launch: Launch) -> str:
    """The tile table a launch uses: "strided" (strided order), "local" (a Local band alone), else "natural"."""
    if launch.stride > 1:
        return "strided"
    return "local" if launch.band == BAND_LOCAL and launch.summary == SUM_NONE else "natural"


def _config(kind: str, launch: Launch, d_qk: int, d_v: int, dtype: torch.dtype, n_eff: int) -> FwdTiles | BwdTiles:
    """The tiles of one ``kind`` ("fwd" or "bwd") launch at head widths (d_qk, d_v): a :func:`.tiles.tile_override`
    in force, else the defaults; capped at the launch's sequence length ``n_eff``. A fused backward runs only for
    band-only launches, its steps capped at its tile."""
    tiles = select_tiles(kind, _layout(launch), d_qk, d_v, dtype).capped(n_eff)
    if kind == "bwd":
        fused = tiles.fused and launch.summary == SUM_NONE
        if fused:  # one program per tile of bn1 rows; its loops step by tiles that divide bn1
            tiles = replace(tiles, bm1=min(tiles.bm1, tiles.bn1), bm2=tiles.bn1, bn2=min(tiles.bn2, tiles.bn1))
        summary_first = launch.summary != SUM_NONE and not launch.merge  # where the 5-product designs apply
        ordered = tiles.ordered_dq and summary_first
        if ordered:  # a query tile holds whole chunks of bm1 rows
            tiles = replace(tiles, bm2=max(tiles.bm2, tiles.bm1))
        segment = tiles.segment if ordered and tiles.segment < _rounded(n_eff, tiles.bm1) else 0
        # ordered dK/dV: query tiles must hold whole blocks (a band key is then seen by its own tile only)
        kv = tiles.ordered_kv and summary_first and tiles.bm2 % launch.summary_stride == 0
        tiles = replace(tiles, fused=fused, ordered_dq=ordered, segment=segment, ordered_kv=kv)
    return tiles


def _rounded(n: int, step: int) -> int:
    return -(-n // step) * step


def _head_group(launch: Launch) -> int:
    """Heads scheduled together (see HEAD_GROUP): only natural-order launches whose programs' work varies."""
    return HEAD_GROUP if launch.stride == 1 and launch.band != BAND_LOCAL else 1


def _f32_dots(dtype: torch.dtype) -> bool:
    # float32 inputs get exact float32 products; the CPU interpreter's bf16 dot is wrong, so it upcasts too
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _interpreting())


def _launch_options(tiles: FwdTiles | BwdTiles) -> dict[str, int]:
    # a register cap lets more programs share a multiprocessor (Triton's `maxnreg` launch option)
    options = {"num_warps": tiles.warps, "num_stages": tiles.stages}
    if tiles.maxnreg:
        options["maxnreg"] = tiles.maxnreg
    return options


def _summary_tiles(launch: Launch, n: int, bn: int) -> int:
    if launch.summary == SUM_NONE:
        return 0
    sl, sc = launch.summary_stride, launch.summary_size
    most = max((n // sl) * sc + min(max(n % sl - s, 0), sc) for s in launch.starts)
    return -(-most // bn)


def _parts(launch: Launch) -> dict[str, Any]:
    """The launch's part codes as the kernels' constexpr keywords."""
    return {"BAND": launch.band, "OFF": launch.offset, "SUMMARY": launch.summary, "MERGE": launch.merge}


def empty_out(q: torch.Tensor, d_v: int) -> torch.Tensor:
    """The forward's output ``[b, h, n, d_v]``, stored as ``[b, n, h, d_v]`` (as FlashAttention does), so that the
    model's merge of the heads, ``out.transpose(1, 2).reshape(b, n, h·d_v)``, is a view and not a copy; contiguous
    ``[b, h, n, d_v]`` where a row of the merged layout would pass the kernels' 32-bit offsets. Shared by the
    custom op's fake, so that traced and real strides agree."""
    b, h, n, _ = q.shape
    if (n - 1) * h * d_v + h * d_v >= 2**31:
        return q.new_empty((b, h, n, d_v))
    return q.new_empty((b, n, h, d_v)).transpose(1, 2)


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: tuple[Launch, ...], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the plan's forward launches: out ``[b, h, n, d_v]`` (:func:`empty_out`) in the inputs' dtype and the
    base-2 LSE ``[b, h, n]`` in float32 (-inf for rows that see no key)."""
    kern = _kernels()
    b, h, n, d_qk = q.shape
    d_v = v.shape[-1]
    out = empty_out(q, d_v)
    lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    f32 = _f32_dots(q.dtype)
    for launch in plan:
        heads, starts = head_tables(launch, q.device)
        groups = min(launch.stride, n)  # residue classes past n are empty; each class below n has one row then
        n_eff = -(-n // groups)
        t = _config("fwd", launch, d_qk, d_v, q.dtype, n_eff)
        bh = b * len(launch.heads)
        kern._fwd_kernel[(-(-n_eff // t.bm) * groups * bh,)](
            q, k, v, out, lse, heads, starts,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            n, h, len(launch.heads), bh, groups, scale * LOG2E, launch.width, launch.summary_stride,
            launch.summary_size, **_parts(launch), DQK=d_qk, DV=d_v, BM=t.bm, BN=t.bn, ONE_LOOP=t.one_loop,
            HEAD_GROUP=_head_group(launch), F32=f32,
            **_launch_options(t),
        )  # fmt: skip
    return out, lse


def _backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    plan: tuple[Launch, ...],
    scale: float,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the plan's backward launches (after one delta = rowsum(dO·O) pass): dq, dk ``[b, h, n, d_qk]`` and
    dv ``[b, h, n, d_v]`` in the inputs' dtype, written into ``grads`` when given (dq and dk with equal strides,
    e.g. views of one packed gradient), else into fresh contiguous tensors."""
    kern = _kernels()
    b, h, n, d_qk = q.shape
    d_v = v.shape[-1]
    delta = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    kern._delta_kernel[(-(-n // 64), b * h)](
        out, do, delta, *out.stride(), *do.stride(), n, h, DV=d_v, BM=64, num_warps=4
    )
    if grads is None:
        grads = (torch.empty_like(q, memory_format=torch.contiguous_format),
                 torch.empty_like(k, memory_format=torch.contiguous_format),
                 torch.empty_like(v, memory_format=torch.contiguous_format))  # fmt: skip
    dq, dk, dv = grads
    if dq.stride() != dk.stride():
        raise ValueError(f"the dq and dk buffers must share strides (one layout in the kernels), got {dq.stride()} "
                         f"and {dk.stride()}.")  # fmt: skip
    f32 = _f32_dots(q.dtype)
    for launch in plan:
        heads, starts = head_tables(launch, q.device)
        groups = min(launch.stride, n)
        n_eff = -(-n // groups)
        t = _config("bwd", launch, d_qk, d_v, q.dtype, n_eff)
        nks = _summary_tiles(launch, n, t.bn1)
        # segments of a summary key tile's queries (one program each); one segment of all rows without
        seg_rows = t.segment or _rounded(n_eff, t.bm1)
        nseg = -(-_rounded(n_eff, t.bm1) // seg_rows)
        nkb, nqb = -(-n_eff // t.bn1), -(-n_eff // t.bm2)
        if t.ordered_kv:
            programs = nqb
        elif t.fused:
            programs = nkb
        else:
            programs = nkb + nks * nseg + nqb
        bh = b * len(launch.heads)
        # the ordered reductions' float32 partial sums and, per (batch, head), a ticket and the turn counters: one per
        # bm1 query rows and one per summary key tile (ordered dQ), or one per bn2 summary keys (ordered dK/dV)
        acc = kv_acc = dq  # not read unless ordered
        turns, turn_stride, kv_rows = heads, 0, 0
        if t.ordered_dq:
            acc = torch.empty((b, h, n, d_qk), dtype=torch.float32, device=q.device)
            turn_stride, kv_rows = 1 + -(-n // t.bm1) + nks, nks * t.bn1 * (nseg > 1)
        if t.ordered_kv:
            kv_rows = _summary_tiles(launch, n, t.bn2) * t.bn2
            turn_stride = 1 + kv_rows // t.bn2
        if turn_stride:
            turns = torch.zeros(bh * turn_stride, dtype=torch.int32, device=q.device)
        if kv_rows:
            kv_acc = torch.empty((bh, kv_rows, d_qk + d_v), dtype=torch.float32, device=q.device)
        kern._bwd_kernel[(programs * groups * bh,)](
            q, k, v, do, dq, dk, dv, lse, delta, heads, starts, acc, kv_acc, turns,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *dv.stride(),
            n, h, len(launch.heads), bh, groups, scale * LOG2E, scale, launch.width, launch.summary_stride,
            launch.summary_size, nks, nseg, seg_rows, kv_rows, turn_stride,
            **_parts(launch), DQK=d_qk, DV=d_v, BM1=t.bm1, BN1=t.bn1, BM2=t.bm2, BN2=t.bn2, FUSED=t.fused,
            ONE_LOOP=t.one_loop, ORDERED_DQ=t.ordered_dq, SEGMENTS=nseg > 1, ORDERED_KV=t.ordered_kv,
            HEAD_GROUP=_head_group(launch), F32=f32, **_launch_options(t),
        )  # fmt: skip
    return dq, dk, dv


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float) -> torch.Tensor:
    """Sparse causal attention of ``pattern`` with the fused Triton kernels; differentiable in q, k, v.

    q, k ``[batch, heads, n, d_qk]``, v ``[batch, heads, n, d_v]`` (any strides), head widths 32, 64 or 128,
    dtype bfloat16, float16 or float32, on CUDA (or on the CPU under ``TRITON_INTERPRET=1``); ``scale`` is the
    resolved score scale. Called by ``sparse_attention``, which validated the rest. Runs the
    ``torch.ops.lightning_sparse.attention_forward`` custom operator (opaque to ``torch.compile``). Rows that see
    no key (possible only for standalone parts such as ``FixedSummary``) give zeros.
    """
    from .ops import attention_forward

    out, _ = attention_forward(q, k, v, _prepare(q, k, v, pattern), scale)
    return out


def triton_attention_qkv(qkv: torch.Tensor, heads: int, d_qk: int, pattern: Pattern, scale: float) -> torch.Tensor:
    """:func:`triton_attention` of the packed projection ``qkv`` (see :func:`.attention.split_qkv`), returning the
    heads merged, ``[batch, n, heads·d_v]``. Runs ``torch.ops.lightning_sparse.attention_qkv_forward``, whose
    backward writes one packed gradient of ``qkv``: no split, transpose or concatenation copies around it."""
    from .attention import split_qkv
    from .ops import attention_qkv_forward

    q, k, v = split_qkv(qkv, heads, d_qk)
    out, _ = attention_qkv_forward(qkv, heads, d_qk, _prepare(q, k, v, pattern), scale)
    return out


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern) -> str:
    """Check this backend's rules and return the pattern's op key."""
    _validate(q, k, v)
    if torch.compiler.is_compiling():  # compiled code reads the key as a constant attribute (torch 2.11 cannot
        return pattern.op_key  # pass a frozen dataclass to a helper); checked when the op is first traced
    launch_plan(pattern, q.shape[1])  # eager: a pattern without kernels raises here, before any launch
    _kernels()
    from .ops import pattern_key

    return pattern_key(pattern)
