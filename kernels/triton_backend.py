"""The ``triton`` backend: fused flash-style forward and backward kernels for every Sparse Transformer pattern.

``triton_attention(q, k, v, pattern, scale)`` checks what is this backend's own (head widths, dtypes, device,
32-bit offsets; ``sparse_attention`` validated the rest), raising ``ValueError`` before any launch, and calls the
``torch.ops.lightning_sparse.attention_forward`` custom operator (:mod:`.ops`), whose implementation looks up the
cached launch plan of the pattern (:mod:`.block_tables`) and runs the kernels of :mod:`.triton_kernels` through
:func:`_forward` / :func:`_backward`. Triton is imported only when a kernel is about to run, so
``import lightning_sparse`` works without it.
"""

from __future__ import annotations

from typing import Any

import torch

from .block_tables import BAND_LOCAL, Launch, head_tables, launch_plan
from .patterns import Pattern

HEAD_DIMS = (32, 64, 128)
# Whether the kernels take a value width different from the query/key width (issue 9; the `kern` branch).
SEPARATE_WIDTHS = False
DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Tile overrides for tests and tuning sweeps: keys "fwd" -> (BM, BN, warps, stages[, maxnreg[, one_loop]]) and
# "bwd" -> (BM1, BN1, BM2, BN2, warps, stages[, maxnreg[, fused[, one_loop]]]), optionally narrowed to a layout
# ("fwd:local", "bwd:strided", …: "local" is a natural-layout launch of a Local band alone) and a head dim
# ("fwd:strided:d128"). maxnreg 0 = the compiler's choice; fused 1 = band launches run one program per tile of BN1
# rows for its dQ and dK/dV (BM1, BN2 <= BN1), 0 = separate dK/dV and dQ programs; one_loop 1 = a band's key (or
# query) tiles run in one masked loop instead of masked edges around an unmasked middle.
TUNING: dict[str, tuple[int, ...]] = {}

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
    if d_qk != d_v and not SEPARATE_WIDTHS:
        raise ValueError(
            f"these triton kernels take one head width for q, k and v, got d_qk={d_qk} and d_v={d_v}; zero-pad the "
            "narrower side (zeros add nothing to q·kᵀ) or use backend='torch'."
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
    if q.numel() == 0:
        raise ValueError(f"q, k, v must not be empty, got shape {tuple(q.shape)}.")
    for name, t in (("q", q), ("k", k), ("v", v)):
        reach = (t.shape[2] - 1) * abs(t.stride(2)) + (t.shape[3] - 1) * abs(t.stride(3))
        if reach >= 2**31:
            raise ValueError(
                f"{name} spans {reach} elements within one (batch, head): more than the kernels' 32-bit row "
                f"offsets allow (2^31); make it contiguous as [batch, heads, n, head_dim] or shorten the sequence."
            )


def _pow2_at_most(x: int, cap: int, floor: int = 16) -> int:
    return max(floor, min(cap, 1 << max(0, (x - 1).bit_length())))


def _layout(launch: Launch) -> str:
    if launch.stride > 1:
        return "strided"
    return "local" if launch.band == BAND_LOCAL and launch.summary == 0 else "natural"


# 16-bit defaults per (kind, launch layout, head dim <= 64 or 128), from H200 sweeps (benchmarks/results/
# KERNEL_NOTES.md): fwd -> (BM, BN, warps, stages, maxnreg, one_loop); bwd -> (BM1, BN1, BM2, BN2, warps, stages,
# maxnreg, fused, one_loop). A local band wastes (BM + width) / width of its work, so it takes 64-row query tiles;
# strided-layout sequences are short (n / stride rows), so tiles are capped at the sequence and their few key tiles
# run in one pipelined loop. A register cap of 168 (128 at 8 warps) fits 3 (2) programs per multiprocessor without
# spills (checked with the compiler's resource report); the fused band backward shares each diagonal block between
# dQ and dK/dV.
DEFAULTS: dict[tuple[str, str, int], tuple[int, ...]] = {
    ("fwd", "local", 64): (64, 32, 4, 3, 0, 0),
    ("fwd", "strided", 64): (64, 32, 4, 3, 0, 1),
    ("fwd", "natural", 64): (128, 64, 8, 3, 128, 0),
    ("fwd", "local", 128): (64, 64, 4, 3, 0, 0),
    ("fwd", "strided", 128): (64, 64, 4, 3, 0, 0),
    ("fwd", "natural", 128): (64, 64, 4, 3, 0, 0),
    ("bwd", "local", 64): (32, 64, 64, 32, 4, 2, 168, 1, 0),
    ("bwd", "strided", 64): (32, 64, 64, 32, 4, 2, 168, 1, 0),
    ("bwd", "natural", 64): (32, 128, 128, 64, 8, 3, 128, 0, 0),
    ("bwd", "local", 128): (32, 64, 64, 32, 4, 2, 0, 0, 0),
    ("bwd", "strided", 128): (32, 64, 64, 32, 4, 2, 0, 0, 0),
    ("bwd", "natural", 128): (32, 64, 64, 32, 4, 2, 0, 0, 0),
}
_F32_CONFIG = {"fwd": (64, 32, 4, 2, 0, 0), "bwd": (32, 32, 32, 32, 4, 2, 0, 0, 0)}


def _config(kind: str, launch: Launch, d: int, dtype: torch.dtype, n_eff: int) -> tuple[int, ...]:
    """Tiles, warps, pipeline stages, register cap (0: none), for 'bwd' the fused flag, and the one-loop flag.

    Returns (BM, BN, warps, stages, maxnreg, one_loop) for 'fwd' and (BM1, BN1, BM2, BN2, warps, stages, maxnreg,
    fused, one_loop) for 'bwd': a ``TUNING`` override if one matches, else ``DEFAULTS`` (float32 inputs: one
    small-tile config). Tiles are capped at the launch's sequence length ``n_eff``.
    """
    layout = _layout(launch)
    cfg = next((TUNING[k] for k in (f"{kind}:{layout}:d{d}", f"{kind}:{layout}", kind) if k in TUNING), None)
    if cfg is None:
        cfg = _F32_CONFIG[kind] if dtype == torch.float32 else DEFAULTS[(kind, layout, 64 if d <= 64 else 128)]
    ntiles = 2 if kind == "fwd" else 4
    tiles = tuple(_pow2_at_most(n_eff, t) for t in cfg[:ntiles])
    extras = (*cfg[ntiles:], 0, 0, 0)  # maxnreg, fused and one_loop are optional in TUNING
    return (*tiles, *extras[: 4 if kind == "fwd" else 5])


def _f32_dots(dtype: torch.dtype) -> bool:
    # float32 inputs get exact float32 products; the CPU interpreter's bf16 dot is wrong, so it upcasts too
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _interpreting())


def _reg_cap(maxnreg: int) -> dict[str, int]:
    # a register cap lets more programs share a multiprocessor (Triton's `maxnreg` launch option)
    return {"maxnreg": maxnreg} if maxnreg else {}


def _summary_tiles(launch: Launch, n: int, bn: int) -> int:
    if launch.summary == 0:
        return 0
    sl, sc = launch.summary_stride, launch.summary_size
    most = max((n // sl) * sc + min(max(n % sl - s, 0), sc) for s in launch.starts)
    return -(-most // bn)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: tuple[Launch, ...], scale: float):
    kern = _kernels()
    b, h, n, d = q.shape
    out = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    qk_scale = scale * 1.4426950408889634  # log2(e): the kernels use exp2
    f32 = _f32_dots(q.dtype)
    for launch in plan:
        heads, starts = head_tables(launch, q.device)
        groups = min(launch.stride, n)  # residue classes past n are empty; each class below n has one row then
        n_eff = -(-n // groups)
        bm, bn, warps, stages, maxnreg, one_loop = _config("fwd", launch, d, q.dtype, n_eff)
        grid = (-(-n_eff // bm) * groups, b * len(launch.heads))
        kern._fwd_kernel[grid](
            q, k, v, out, lse, heads, starts,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            n, h, len(launch.heads), groups, qk_scale, launch.width, launch.summary_stride, launch.summary_size,
            BAND=launch.band, OFF=launch.offset, SUMMARY=launch.summary, MERGE=launch.merge,
            D=d, BM=bm, BN=bn, ONE_LOOP=bool(one_loop), F32=f32, num_warps=warps, num_stages=stages,
            **_reg_cap(maxnreg),
        )  # fmt: skip
    return out, lse


def _backward(q, k, v, out, lse, do, plan: tuple[Launch, ...], scale: float):
    kern = _kernels()
    b, h, n, d = q.shape
    delta = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    kern._delta_kernel[(-(-n // 64), b * h)](
        out, do, delta, *out.stride(), *do.stride(), n, h, D=d, BM=64, num_warps=4
    )
    grads = torch.empty((3, b, h, n, d), dtype=q.dtype, device=q.device)
    dq, dk, dv = grads[0], grads[1], grads[2]
    qk_scale = scale * 1.4426950408889634
    f32 = _f32_dots(q.dtype)
    for launch in plan:
        heads, starts = head_tables(launch, q.device)
        groups = min(launch.stride, n)
        n_eff = -(-n // groups)
        bm1, bn1, bm2, bn2, warps, stages, maxnreg, fused, one_loop = _config("bwd", launch, d, q.dtype, n_eff)
        fused = bool(fused) and launch.summary == 0
        nks = _summary_tiles(launch, n, bn1)
        if fused:  # one program per tile of bn1 rows; its loops step by tiles that divide bn1
            bm1, bm2, bn2 = min(bm1, bn1), bn1, min(bn2, bn1)
            programs = -(-n_eff // bn1)
        else:
            programs = -(-n_eff // bn1) + nks + -(-n_eff // bm2)
        grid = (programs * groups, b * len(launch.heads))
        kern._bwd_kernel[grid](
            q, k, v, do, dq, dk, dv, lse, delta, heads, starts,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            n, h, len(launch.heads), groups, qk_scale, scale, launch.width, launch.summary_stride,
            launch.summary_size, nks,
            BAND=launch.band, OFF=launch.offset, SUMMARY=launch.summary, MERGE=launch.merge,
            D=d, BM1=bm1, BN1=bn1, BM2=bm2, BN2=bn2, FUSED=fused, ONE_LOOP=bool(one_loop), F32=f32,
            num_warps=warps, num_stages=stages, **_reg_cap(maxnreg),
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
    _validate(q, k, v)
    if not torch.compiler.is_compiling():  # eager: fail before any launch; compiled: checked when first traced
        launch_plan(pattern, q.shape[1])  # a pattern without kernels raises here
        _kernels()
    from .ops import attention_forward, pattern_key

    out, _ = attention_forward(q, k, v, pattern_key(pattern), scale)
    return out
