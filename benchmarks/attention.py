"""Benchmark of the triton backend against dense causal SDPA and FlexAttention, forward and forward+backward.

Run on one GPU: ``python benchmarks/attention.py`` (options: ``--help``). Three sections, bf16:

* the paper configs' real attention shapes (``PAPER_SHAPES``: Enwik8, ImageNet 64, CIFAR-10 with d_qk 64 and d_v
  128, the audio models), each against dense causal SDPA and FlexAttention with the same mask (SDPA needs equal
  widths: for CIFAR-10 its q and k are zero-padded to the value width, outside the timed region; the output says
  so). ``--paper-shapes NAMES`` picks some, ``--paper-shapes ""`` none, ``--paper-shapes-only`` skips the rest;
* for n in {4096, …, 1048576} and head_dim 64 (``--dims 64,128`` adds 128; 8 heads at 64, 4 at 128; batch·n = 2^18
  tokens, batch >= 1) the paper's strided (l ≈ √n) and fixed (l ≈ √n, c = l/4) patterns, SDPA and Flex;
* a batch-1 scaling series for strided l ≈ √n, and a log-log plot of forward+backward time against n.

Times are medians in ms; "useful" TFLOP/s count only the allowed (query, key) pairs: 2·nnz·(d_qk + d_v) per head
forward, 3.5× that forward+backward. ``--sweep`` first times candidate tile configurations (of the paper shapes
with ``--paper-shapes-only``, else of the n = 16,384 targets), keeps the fastest for the rest of the run and
prints them as ``tiles.DEFAULTS`` entries. ``--ordered-dq`` / ``--ordered-kv`` run the fixed pattern's backward
with one of the experimental 5-product designs (``BwdTiles.ordered_dq``, with ``--segment ROWS`` splitting the
summary key tiles' queries; ``BwdTiles.ordered_kv``) for an A/B against the default. ``--cuda-graphs``
times replays of captured CUDA graphs instead of eager calls (kernel time only: at the Enwik8 shape one eager
forward+backward costs about as much host time as GPU time).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lightning_sparse.atomic import atomic_write
from lightning_sparse.kernels import Dense, Fixed, Pattern, Strided, sparse_attention
from lightning_sparse.kernels import triton_backend as tb
from lightning_sparse.kernels.launch_plan import launch_plan
from lightning_sparse.kernels.tiles import DEFAULTS, BwdTiles, FwdTiles, ordered_tiles, select_tiles, tile_override


def nnz(pattern: Pattern, n: int) -> float:
    """Allowed (query, key) pairs of one head, in closed form."""
    i = torch.arange(n, dtype=torch.float64)
    if isinstance(pattern, Dense):
        return float((i + 1).sum())
    if isinstance(pattern, Strided):
        st = pattern.stride
        return float((torch.clamp(i + 1, max=st) + torch.div(i, st, rounding_mode="floor")).sum())
    if isinstance(pattern, Fixed):
        st, c = pattern.stride, pattern.summary
        return float((i % st + 1 + torch.div(i, st, rounding_mode="floor") * c).sum())
    raise ValueError(f"no closed-form count for {pattern!r}")


def mask_mod(pattern: Pattern):
    """FlexAttention mask_mod of the same pattern."""
    if isinstance(pattern, Dense):
        return lambda b, h, q, kv: q >= kv
    if isinstance(pattern, Strided):
        st = pattern.stride

        def strided(b, h, q, kv):
            d = q - kv
            return (d >= 0) & ((d < st) | (d % st == 0))

        return strided
    st, c = pattern.stride, pattern.summary
    positions = pattern.summary_positions
    if len(positions) == 1:
        lo = st - (positions[0] + 1) * c

        def fixed(b, h, q, kv):
            r = kv % st
            return (q >= kv) & (((q // st) == (kv // st)) | ((r >= lo) & (r < lo + c)))

        return fixed
    # head h uses summary sub-block positions[h % len(positions)], counted back from the block end
    starts = torch.tensor([st - (p + 1) * c for p in positions], device="cuda")

    def fixed_per_head(b, h, q, kv):
        r = kv % st
        lo = starts[h % len(positions)]
        return (q >= kv) & (((q // st) == (kv // st)) | ((r >= lo) & (r < lo + c)))

    return fixed_per_head


CUDA_GRAPHS = False  # --cuda-graphs: time replays of a captured CUDA graph, so host time does not enter the numbers


def timeit(fn, budget_s: float = 0.4) -> float:
    """Median milliseconds of ``fn`` (CUDA events); fewer repeats for slow calls. With ``--cuda-graphs``, of the
    replays of a CUDA graph of ``fn`` (shapes where one eager call's host time rivals its GPU time, e.g. Enwik8's)."""
    import triton

    if CUDA_GRAPHS:
        return triton.testing.do_bench_cudagraph(fn, rep=int(max(50, budget_s * 1000)), return_mode="median")
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = time.perf_counter() - t0
    if once > 0.1:
        reps = max(1, min(5, int(budget_s * 5 / once)))
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        return sorted(times)[len(times) // 2]
    return triton.testing.do_bench(fn, warmup=25, rep=int(max(50, budget_s * 1000)), return_mode="median")


class Inputs:
    """bf16 q, k ``[b, h, n, d_qk]``, v, dO ``[b, h, n, d_v]`` on the GPU; q, k, v require grad."""

    def __init__(self, b: int, h: int, n: int, d: int, d_v: int | None = None):
        d_v = d if d_v is None else d_v
        g = torch.Generator(device="cuda").manual_seed(n + d)
        self.q, self.k, self.v, self.do = (
            torch.randn(b, h, n, w, device="cuda", generator=g, dtype=torch.bfloat16) for w in (d, d, d_v, d_v)
        )
        for t in (self.q, self.k, self.v):
            t.requires_grad_(True)

    def padded(self) -> Inputs:
        """The same inputs with q and k zero-padded to v's width (for SDPA, which needs equal widths)."""
        d_v, d = self.v.shape[-1], self.q.shape[-1]
        if d == d_v:
            return self
        other = object.__new__(Inputs)
        other.q, other.k = (F.pad(t.detach(), (0, d_v - d)).requires_grad_(True) for t in (self.q, self.k))
        other.v, other.do = self.v, self.do
        return other

    def fwd_bwd(self, f):
        def run():
            o = f(self.q, self.k, self.v)
            torch.autograd.grad(o, (self.q, self.k, self.v), self.do)

        return run

    def fwd(self, f):
        def run():
            with torch.no_grad():
                f(self.q, self.k, self.v)

        return run


_FLEX = None


def flex_method(pattern: Pattern, n: int, h: int | None = None):
    global _FLEX
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _FLEX is None:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = 256
        torch._dynamo.config.recompile_limit = 256
        _FLEX = torch.compile(flex_attention, dynamic=False)
    heads = h if pattern.head_groups > 1 else None  # a per-head mask needs the head count
    bm = create_block_mask(mask_mod(pattern), None, heads, n, n, device="cuda", _compile=True)
    flex = _FLEX
    return lambda q, k, v: flex(q, k, v, block_mask=bm)


def _compile_flex(task: tuple[str, int, int, int, int, int]) -> str:
    """Worker: compile FlexAttention forward and backward for one (pattern, b, h, n, d_qk, d_v) into the shared
    caches."""
    expr, b, h, n, d, d_v = task
    pattern = eval(expr, {"Strided": Strided, "Fixed": Fixed})
    t0 = time.perf_counter()
    try:
        inputs = Inputs(b, h, n, d, d_v)
        inputs.fwd_bwd(flex_method(pattern, n, h))()
        inputs.fwd(flex_method(pattern, n, h))()
        torch.cuda.synchronize()
    except Exception as err:  # reported here; the timed run then reports it again for its row
        return f"  flex {expr} b={b} n={n} d={d},{d_v} failed to compile: {type(err).__name__}: {err}"[:400]
    return f"  compiled flex {expr} b={b} n={n} d={d},{d_v} in {time.perf_counter() - t0:.0f}s"


def warm_flex(tasks: list[tuple[str, int, int, int, int, int]], workers: int) -> None:
    """Compile the FlexAttention kernels of every measured shape in parallel processes first: Inductor's on-disk
    caches then make the timed process's compilations cheap (serially they take most of a cold run)."""
    if not tasks or workers <= 0:
        return
    import concurrent.futures
    import multiprocessing

    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx) as pool:
        for line in pool.map(_compile_flex, tasks):
            print(line, flush=True)
    print(f"flex warm-up: {len(tasks)} shapes in {time.perf_counter() - t0:.0f}s", flush=True)


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def triton_method(pattern: Pattern):
    return lambda q, k, v: sparse_attention(q, k, v, pattern, backend="triton")


def measure(rows, name, pattern, n, d, b, h, inputs, f, useful_nnz, d_v=None, shape="", note=""):
    """Time forward and forward+backward of ``f`` on ``inputs``; append a row (a failure prints and is skipped)."""
    d_v = d if d_v is None else d_v
    t0 = time.perf_counter()
    try:
        tf = timeit(inputs.fwd(f))
        tfb = timeit(inputs.fwd_bwd(f))
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        print(f"  {name} {shape} n={n} d={d}: out of memory", flush=True)
        return
    except Exception as err:  # e.g. FlexAttention failing to compile a shape: say so, go on with the others
        print(f"  {name} {shape} {pattern!r} n={n} d={d},{d_v}: failed: {type(err).__name__}: {err}"[:500], flush=True)
        return
    flops = 2.0 * useful_nnz * (d + d_v) * b * h
    row = dict(method=name, pattern=repr(pattern), n=n, d=d, d_v=d_v, b=b, h=h, fwd_ms=tf, fb_ms=tfb,
               fwd_tflops=flops / tf / 1e9, fb_tflops=3.5 * flops / tfb / 1e9, shape=shape, note=note)
    rows.append(row)
    print(f"  {name:8s} {shape:10s} {pattern!r:48.48s} n={n:8d} d={d:3d},{d_v:3d} b={b:3d} fwd {tf:9.3f} ms  "
          f"fwd+bwd {tfb:9.3f} ms ({time.perf_counter() - t0:.1f}s){note and '  ' + note}", flush=True)


@dataclass(frozen=True)
class PaperShape:
    """One attention call of a paper config (configs/*.yaml): pattern, batch, heads, n, d_qk, d_v."""

    name: str
    pattern: Pattern
    b: int
    h: int
    n: int
    d_qk: int
    d_v: int
    flex: bool = True
    sdpa: bool = True


PAPER_SHAPES = [
    PaperShape("enwik8", Fixed(128, 32, summary_positions=(0, 1, 2, 3)), 2, 8, 12288, 64, 64),
    PaperShape("imagenet64", Strided(128), 16, 16, 12288, 32, 32),
    PaperShape("cifar10", Strided(96), 16, 2, 3072, 64, 128),  # qk_ratio 0.5: d_qk = 64, d_v = 128
    PaperShape("audio65k", Strided(256), 1, 16, 65536, 32, 32),
    PaperShape("audio262k", Strided(512), 1, 4, 262144, 64, 64, flex=False),  # configs/audio_262k: 4 heads of 64
    PaperShape("audio1m", Strided(1024), 1, 3, 1048576, 32, 32, flex=False, sdpa=False),  # 3 heads of 32
]


def paper_shapes(names: str) -> list[PaperShape]:
    """The named rows (comma-separated; "all" for every one, "" for none)."""
    if names.strip() == "all":
        return list(PAPER_SHAPES)
    known = {s.name: s for s in PAPER_SHAPES}
    chosen = [x.strip() for x in names.split(",") if x.strip()]
    bad = [x for x in chosen if x not in known]
    if bad:
        raise SystemExit(f"unknown paper shape(s) {bad}; choose from {sorted(known)} or 'all'.")
    return [known[x] for x in chosen]


def run_paper_shapes(shapes: list[PaperShape], rows: list, args, save) -> None:
    """Time the paper shapes: triton, then SDPA (q/k zero-padded where widths differ) and FlexAttention."""
    for s in shapes:
        inp = Inputs(s.b, s.h, s.n, s.d_qk, s.d_v)
        count = nnz(s.pattern, s.n)
        measure(rows, "triton", s.pattern, s.n, s.d_qk, s.b, s.h, inp, triton_method(s.pattern), count, s.d_v,
                shape=s.name)
        if args.top_kernels:  # where one forward+backward's GPU time goes, and how much of its wall time it fills
            print_kernels(s.name, inp.fwd_bwd(triton_method(s.pattern)), args.top_kernels)
        if s.sdpa and s.n <= args.max_dense_n:
            padded = inp.padded()
            note = "" if padded is inp else f"q,k zero-padded {s.d_qk}->{s.d_v} for SDPA (padding not timed)"
            measure(rows, "sdpa", Dense(), s.n, s.d_qk, s.b, s.h, padded, sdpa_scaled(s.d_qk), nnz(Dense(), s.n),
                    s.d_v, shape=s.name, note=note)
        if s.flex and not args.no_flex:
            try:
                flex = flex_method(s.pattern, s.n, s.h)
            except Exception as err:  # the block mask of this shape failed: say so, go on
                print(f"  flex {s.name}: block mask failed: {type(err).__name__}: {err}"[:500], flush=True)
            else:
                measure(rows, "flex", s.pattern, s.n, s.d_qk, s.b, s.h, inp, flex, count, s.d_v, shape=s.name)
        save()
        del inp
        torch.cuda.empty_cache()


def print_kernels(label: str, fn, count: int, reps: int = 10) -> None:
    """Profile ``reps`` calls of ``fn``: its kernels by GPU time, and GPU-busy time against wall time."""
    from profiling import busy_fraction, top_kernels
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / reps
    busy, _ = busy_fraction(prof)
    print(f"\n{label}: per call {wall * 1e3:.3f} ms wall, GPU busy {1e3 * (busy or 0) / reps:.3f} ms\n"
          f"{top_kernels(prof, count, per=reps)}\n", flush=True)


def sdpa_scaled(d_qk: int):
    """Dense causal SDPA with the unpadded width's scale 1/sqrt(d_qk)."""
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=d_qk**-0.5)


F_, B_ = FwdTiles, BwdTiles
# (kind, layout, head-width class) -> candidate tiles tried besides the current default of the launch
SWEEP = {
    ("fwd", "local", 64): [F_(64, 32, 4, 3, one_loop=True), F_(64, 64, 4, 3, 128), F_(64, 32, 4, 2)],
    ("fwd", "strided", 64): [F_(64, 32, 4, 3), F_(128, 64, 8, 3, 128), F_(64, 64, 4, 2, one_loop=True)],
    ("fwd", "natural", 64): [F_(128, 64, 4, 3), F_(64, 64, 4, 3, 128), F_(128, 64, 8, 4, 128)],
    ("bwd", "local", 64): [B_(32, 64, 64, 32, 4, 2, 168, True, True), B_(32, 64, 64, 32, 4, 1, 168, True, True),
                           B_(32, 64, 64, 32, 4, 2)],
    ("bwd", "strided", 64): [B_(32, 64, 64, 32, 4, 2, 168, True, True), B_(64, 64, 64, 64, 4, 2, 168, True)],
    ("bwd", "natural", 64): [B_(32, 128, 128, 32, 8, 3, 128), B_(32, 128, 128, 64, 8, 4, 128),
                             B_(64, 128, 128, 64, 8, 3, 0), B_(32, 64, 128, 64, 4, 3, 168),
                             B_(64, 64, 64, 64, 4, 3, 0),
                             # 3 programs of 4 warps per SM (ncu, session 8: 2 of 8 warps, bound by registers and
                             # shared memory, leave every other issue slot without a ready warp)
                             B_(32, 64, 64, 64, 4, 2, 168),
                             B_(32, 64, 64, 32, 4, 2, 168), B_(32, 64, 64, 64, 4, 3, 168),
                             B_(16, 64, 64, 64, 4, 2, 168), B_(64, 64, 64, 64, 4, 2, 168),
                             B_(32, 64, 64, 64, 4, 2, 0), B_(32, 128, 64, 64, 8, 2, 128),
                             # the default without the register cap (24,576 spill requests at 128, ncu) / 2 stages
                             B_(32, 128, 128, 64, 8, 3, 0), B_(32, 128, 128, 64, 8, 2, 128),
                             # spill-free at triton 3.6 (kernel_resources.py): 2 stages, less shared memory
                             B_(16, 128, 128, 64, 8, 2, 128), B_(32, 64, 128, 64, 8, 2, 128),
                             B_(16, 64, 128, 32, 8, 2, 128),
                             B_(32, 128, 128, 64, 8, 3, 128, ordered_dq=True),
                             B_(32, 128, 128, 64, 8, 3, 128, ordered_dq=True, segment=2048),
                             B_(32, 128, 128, 64, 8, 3, 128, ordered_dq=True, segment=1024),
                             B_(64, 128, 128, 64, 8, 3, 0, ordered_dq=True, segment=2048),
                             B_(64, 64, 64, 64, 4, 3, 0, ordered_dq=True),
                             # 5-product tilings with the fewest spills at >= 2 programs per SM (kernel_resources.py;
                             # the timed ordered designs ran the default tiles, with 512-896 bytes of spill stores)
                             B_(16, 64, 128, 32, 8, 2, 128, ordered_dq=True),
                             B_(16, 64, 64, 64, 4, 2, 168, ordered_dq=True),
                             B_(32, 128, 128, 32, 8, 2, 128, ordered_kv=True),
                             # ordered dK/dV, 3 stages, 128 cap: 64-key steps spill 896 B, 32-key steps 56 B (stores)
                             B_(32, 128, 128, 64, 8, 3, 128, ordered_kv=True),
                             B_(32, 128, 128, 32, 8, 3, 128, ordered_kv=True),
                             B_(32, 128, 128, 32, 8, 3, 0, ordered_kv=True),
                             B_(32, 128, 128, 64, 8, 3, 0, ordered_kv=True)],
    ("fwd", "local", 128): [F_(128, 64, 8, 3), F_(64, 64, 4, 3, one_loop=True), F_(64, 32, 4, 3), F_(32, 64, 4, 3)],
    ("fwd", "strided", 128): [F_(128, 64, 8, 3), F_(64, 64, 4, 3, one_loop=True), F_(32, 32, 4, 2, one_loop=True)],
    ("fwd", "natural", 128): [F_(128, 64, 8, 3), F_(128, 64, 8, 3, 128)],
    ("bwd", "local", 128): [B_(32, 64, 64, 32, 4, 2, fused=True), B_(32, 64, 64, 32, 4, 2, fused=True, one_loop=True),
                            B_(32, 64, 64, 32, 4, 3, fused=True), B_(32, 32, 32, 32, 4, 2, fused=True),
                            B_(64, 64, 64, 64, 8, 2, fused=True), B_(32, 64, 64, 32, 4, 2, 168, True, True),
                            # spill-free with more warps per SM than the default's 2 x 4 (228 registers; CIFAR-10
                            # widths, kernel_resources.py, triton 3.6)
                            B_(32, 32, 32, 32, 8, 2, 128), B_(32, 32, 32, 32, 4, 1, 168), B_(16, 64, 64, 32, 4, 1)],
    ("bwd", "strided", 128): [B_(32, 64, 64, 32, 4, 2, fused=True),
                              B_(32, 64, 64, 32, 4, 2, fused=True, one_loop=True),
                              B_(32, 32, 32, 32, 4, 2, fused=True), B_(32, 32, 32, 32, 4, 2, fused=True, one_loop=True),
                              B_(32, 32, 32, 32, 4, 2), B_(32, 64, 64, 32, 4, 2, 168, True, True),
                              B_(32, 64, 64, 32, 8, 2, 128), B_(32, 64, 64, 32, 4, 1, 168)],
    ("bwd", "natural", 128): [B_(64, 64, 64, 64, 8, 2), B_(32, 128, 128, 64, 8, 3, 128),
                              B_(32, 64, 64, 32, 4, 2, ordered_dq=True)],
    # head width 32 (ImageNet 64, audio): narrower operands leave room for longer tiles
    ("fwd", "local", 32): [F_(128, 32, 8, 3, 128), F_(64, 64, 4, 3), F_(64, 32, 4, 4), F_(64, 32, 4, 2, one_loop=True)],
    ("fwd", "strided", 32): [F_(64, 64, 4, 3, one_loop=True), F_(128, 32, 8, 3, 128, True)],
    ("fwd", "natural", 32): [F_(128, 128, 8, 3, 128), F_(128, 64, 4, 3)],
    # the defaults fill their 168-register cap (3 programs of 4 warps per SM); these fit 4 without spills
    # (kernel_resources.py, triton 3.6)
    ("bwd", "local", 32): [B_(32, 128, 128, 32, 8, 2, 128, True), B_(64, 64, 64, 64, 4, 2, 168, True),
                           B_(32, 64, 64, 32, 4, 1, 0, True), B_(16, 64, 64, 32, 4, 2, 128, True)],
    ("bwd", "strided", 32): [B_(32, 128, 128, 32, 8, 2, 128, True), B_(64, 64, 64, 64, 4, 2, 168, True, True),
                             B_(32, 64, 64, 32, 4, 2, 128, True), B_(32, 64, 64, 32, 4, 1, 0, True)],
    ("bwd", "natural", 32): [B_(32, 128, 128, 64, 8, 3, 128), B_(64, 128, 128, 64, 8, 3, 128),
                             B_(32, 128, 128, 128, 8, 3, 128, ordered_dq=True),
                             B_(32, 128, 128, 128, 8, 3, 128, ordered_dq=True, segment=2048),
                             B_(32, 128, 128, 32, 8, 3, 128, ordered_kv=True),
                             B_(32, 128, 128, 64, 8, 3, 0, ordered_kv=True)],
}


def _width_class(d_qk: int, d_v: int) -> int:
    return max(d_qk, d_v)


def _results(inp: Inputs, f) -> list[torch.Tensor]:
    o = f(inp.q, inp.k, inp.v)
    return [o.detach(), *torch.autograd.grad(o, (inp.q, inp.k, inp.v), inp.do)]


def sweep_shape(pattern: Pattern, b: int, h: int, n: int, d_qk: int, d_v: int, label: str, results: list) -> None:
    """Coordinate descent over the launch kinds of one shape: each (kind, layout) of the pattern's launches tries
    the current tiles and its candidates (the others at their current choice) and keeps the fastest whose out and
    gradients agree with the default tiles' (max difference / max value < 2e-2). The choices stay in force (for
    this shape's widths) for the rest of the run."""
    inp = Inputs(b, h, n, d_qk, d_v)
    f = triton_method(pattern)
    want = _results(inp, f)
    layouts = sorted({tb._layout(launch) for launch in launch_plan(pattern, h)})
    for kind in ("fwd", "bwd"):
        for layout in layouts:
            current = select_tiles(kind, layout, d_qk, d_v, torch.bfloat16)
            best = None
            for cand in [current, *SWEEP.get((kind, layout, _width_class(d_qk, d_v)), [])]:
                override = {kind: cand, "layout": layout, "widths": (d_qk, d_v)}
                try:
                    with tile_override(**override):
                        got = _results(inp, f)
                        bad = max(((g.float() - w.float()).abs().max() / w.float().abs().max()).item()
                                  for g, w in zip(got, want, strict=True))
                        if bad > 2e-2:
                            print(f"  sweep {label} {kind}:{layout} {cand}: results differ ({bad:.2e}), skipped",
                                  flush=True)
                            continue
                        ms = timeit(inp.fwd(f) if kind == "fwd" else inp.fwd_bwd(f), budget_s=0.15)
                except Exception as err:  # a config that does not compile or fit: record and go on
                    print(f"  sweep {label} {kind}:{layout} {cand}: {type(err).__name__}", flush=True)
                    continue
                results.append(dict(shape=label, d_qk=d_qk, d_v=d_v, kind=kind, layout=layout, cand=repr(cand),
                                    ms=ms))
                print(f"  sweep {label:10s} {kind}:{layout:8s} {cand!r} {ms:8.3f} ms", flush=True)
                if best is None or ms < best[1]:
                    best = (cand, ms)
            if best is not None:
                results.append(dict(shape=label, d_qk=d_qk, d_v=d_v, kind=kind, layout=layout, best=repr(best[0]),
                                    tiles=dataclasses.asdict(best[0]), ms=best[1]))
                _KEEP.enter_context(tile_override(**{kind: best[0]}, layout=layout, widths=(d_qk, d_v)))
    del inp, want
    torch.cuda.empty_cache()


_KEEP = contextlib.ExitStack()  # the sweep's choices, in force until the process ends


def sweep(args, shapes: list[PaperShape]) -> list:
    """Sweep the given paper shapes, or (none given) the n = 16,384 targets at each of ``args.dims``."""
    results: list = []
    if shapes:
        for s in shapes:
            sweep_shape(s.pattern, s.b, s.h, s.n, s.d_qk, s.d_v, s.name, results)
    else:
        for d in args.dims:
            h, n = (8 if d == 64 else 4), 16384
            for pattern in (Strided(128), Fixed(128, 32)):
                sweep_shape(pattern, max(1, args.tokens // n), h, n, d, d, f"{pattern.stride}-d{d}", results)
    print("\n=== fastest tiles (in force for the runs below), as tiles.DEFAULTS entries ===")
    for r in results:
        if "best" in r:
            default = DEFAULTS.get((r["kind"], r["layout"], r["d_qk"], r["d_v"]))
            same = " (the default)" if default is not None and repr(default) == r["best"] else ""
            print(f'    ("{r["kind"]}", "{r["layout"]}", {r["d_qk"]}, {r["d_v"]}): {r["best"]},  '
                  f'# {r["shape"]}: {r["ms"]:.3f} ms{same}')
    return results


def fit_exponent(ns, ts):
    x = [math.log(n) for n in ns]
    y = [math.log(t) for t in ts]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / sum((a - mx) ** 2 for a in x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", default="4096,16384,65536,262144,1048576")
    ap.add_argument("--dims", default="64", help="head widths of the main table (64,128 adds the 128 rows)")
    ap.add_argument("--paper-shapes", default="all",
                    help=f"paper-config rows: 'all', '' (none) or some of {','.join(s.name for s in PAPER_SHAPES)}")
    ap.add_argument("--paper-shapes-only", action="store_true", help="only the paper-config rows (and their sweep)")
    ap.add_argument("--tokens", type=int, default=2**18, help="batch·n of the main table")
    ap.add_argument("--max-dense-n", type=int, default=262144, help="skip dense SDPA above this n (time)")
    ap.add_argument("--max-flex-n", type=int, default=65536, help="skip FlexAttention above this n (compile time)")
    ap.add_argument("--max-flex-n-128", type=int, default=16384, help="the same at head_dim 128")
    ap.add_argument("--max-fixed-n", type=int, default=262144, help="skip Fixed above this n (its cost is ~n^2/8)")
    ap.add_argument("--scaling-ns", default="65536,262144,1048576", help="batch-1 strided series")
    ap.add_argument("--sweep", action="store_true", help="time tile configurations first")
    ap.add_argument("--no-main", action="store_true")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="after this many seconds time only the kernels")
    ap.add_argument("--png", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "attention.png"))
    ap.add_argument("--json", default=None, help="write all measurements here (after every measurement)")
    ap.add_argument("--flex-workers", type=int, default=8, help="processes compiling Flex kernels first (0: none)")
    ap.add_argument("--top-kernels", type=int, default=0, help="paper rows: print the N kernels with most GPU time")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compilation is most of a run)")
    ap.add_argument("--ordered-dq", action="store_true",
                    help="fixed-pattern backward with the summary part's dQ added in turn (BwdTiles.ordered_dq)")
    ap.add_argument("--segment", type=int, default=0,
                    help="with --ordered-dq: query rows per summary key program (BwdTiles.segment; 0: whole tile)")
    ap.add_argument("--ordered-kv", action="store_true",
                    help="fixed-pattern backward by query tiles, the summary keys' dK/dV added in turn (ordered_kv)")
    ap.add_argument("--head-group", type=int, default=tb.HEAD_GROUP,
                    help="heads a causal or summary launch schedules together, longest first (1: head by head)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="time replays of captured CUDA graphs (kernel time without the host's per-call time)")
    args = ap.parse_args(argv)
    if args.head_group < 1:
        ap.error(f"--head-group must be a positive number of heads, got {args.head_group}; e.g. 1 or 16.")
    tb.HEAD_GROUP = args.head_group
    global CUDA_GRAPHS
    CUDA_GRAPHS = args.cuda_graphs
    if args.ordered_dq and args.ordered_kv:
        ap.error("--ordered-dq and --ordered-kv are two designs of the same backward: pick one.")
    if args.ordered_dq or args.ordered_kv:
        _KEEP.enter_context(ordered_tiles("dq" if args.ordered_dq else "kv", args.segment))
    if args.no_flex:
        args.max_flex_n = args.max_flex_n_128 = 0
    args.dims = [int(x) for x in args.dims.split(",") if x]
    ns = [int(x) for x in args.ns.split(",") if x]
    chosen = paper_shapes(args.paper_shapes)
    if args.paper_shapes_only:
        args.no_main, args.scaling_ns = True, ""
    import triton

    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}", flush=True)
    start = time.perf_counter()
    out = {"sweep": sweep(args, chosen if args.paper_shapes_only else []) if args.sweep else []}
    scaling, rows, paper = [], [], []
    out.update(rows=rows, scaling=scaling, paper=paper)

    def save() -> None:  # after every measurement, so a run cut short keeps what it measured
        if args.json:
            write_json(out, args.json)

    shapes = [(n, d, 8 if d == 64 else 4, max(1, args.tokens // n)) for d in args.dims for n in ns]
    flex_tasks = [(repr(s.pattern), s.b, s.h, s.n, s.d_qk, s.d_v) for s in chosen if s.flex and not args.no_flex]
    if not args.no_main:
        flex_tasks += [(repr(p), b, h, n, d, d) for n, d, h, b in shapes
                       if n <= (args.max_flex_n if d == 64 else args.max_flex_n_128) for p in main_patterns(n, args)]
    warm_flex(flex_tasks, args.flex_workers)
    run_paper_shapes(chosen, paper, args, save)
    for n in [int(x) for x in args.scaling_ns.split(",") if x]:
        pattern = Strided(2 ** round(math.log2(math.sqrt(n))))
        inp = Inputs(1, 8, n, 64)
        torch.cuda.reset_peak_memory_stats()
        measure(scaling, "triton", pattern, n, 64, 1, 8, inp, triton_method(pattern), nnz(pattern, n))
        if scaling:
            scaling[-1]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        save()
        del inp
        torch.cuda.empty_cache()
    for n, d, h, b in [] if args.no_main else shapes:
        patterns = main_patterns(n, args)
        inp = Inputs(b, h, n, d)
        for p in patterns:
            measure(rows, "triton", p, n, d, b, h, inp, triton_method(p), nnz(p, n))
        in_time = time.perf_counter() - start < args.deadline_s
        if n <= args.max_dense_n and in_time:
            measure(rows, "sdpa", Dense(), n, d, b, h, inp, sdpa, nnz(Dense(), n))
        if n <= (args.max_flex_n if d == 64 else args.max_flex_n_128) and in_time:
            for p in patterns:
                measure(rows, "flex", p, n, d, b, h, inp, flex_method(p, n), nnz(p, n))
        save()
        del inp
        torch.cuda.empty_cache()
    print_paper_table(paper)
    print_tables(rows, scaling)
    print(f"total {time.perf_counter() - start:.0f}s")
    if rows or scaling:
        plot(rows, scaling, args.png)
    save()


def main_patterns(n: int, args) -> list[Pattern]:
    """The paper's patterns at length n: strided and fixed with l = 2^round(log2 √n), c = l/4."""
    st = 2 ** round(math.log2(math.sqrt(n)))
    return [Strided(st)] + ([Fixed(st, st // 4)] if n <= args.max_fixed_n else [])


def write_json(obj, path: str) -> None:
    """Write ``obj`` as JSON atomically (a reader never sees half a file)."""
    with atomic_write(path) as f:
        f.write(json.dumps(obj, indent=1).encode())


def short(pattern: str) -> str:
    """Strided(stride=128) -> Strided(l=128); Fixed(stride=128, summary=32, …) -> Fixed(l=128,c=32)."""
    s = pattern.replace("stride=", "l=").replace("summary=", "c=").replace(", summary_positions=(0,)", "")
    return s.replace("summary_positions=", "pos=").replace(", ", ",")


def print_paper_table(rows) -> None:
    """The paper-config rows: triton against SDPA and Flex at each config's own shape."""
    if not rows:
        return
    print("\n=== paper configs' attention shapes, bf16 (useful TFLOP/s count allowed pairs only) ===")
    print(f"{'shape':10} {'pattern':28} {'b':>3} {'h':>3} {'n':>8} {'d_qk,d_v':>8} {'method':7} {'fwd ms':>9} "
          f"{'fwd+bwd ms':>11} {'TF/s':>6} {'vs SDPA fwd':>11} {'vs SDPA f+b':>11} {'vs Flex fwd':>11} "
          f"{'vs Flex f+b':>11}")
    by = {(r["shape"], r["method"]): r for r in rows}
    for r in rows:
        cols = ["", "", "", ""]
        if r["method"] == "triton":
            for i, other in enumerate(("sdpa", "flex")):
                o = by.get((r["shape"], other))
                if o:
                    cols[2 * i] = f"{o['fwd_ms'] / r['fwd_ms']:.1f}x"
                    cols[2 * i + 1] = f"{o['fb_ms'] / r['fb_ms']:.1f}x"
        print(f"{r['shape']:10} {short(r['pattern']):28.28} {r['b']:3d} {r['h']:3d} {r['n']:8d} "
              f"{str(r['d']) + ',' + str(r['d_v']):>8} {r['method']:7} {r['fwd_ms']:9.3f} {r['fb_ms']:11.3f} "
              f"{r['fb_tflops']:6.0f} " + " ".join(f"{c:>11}" for c in cols)
              + (f"  [{r['note']}]" if r["note"] else ""))


def print_tables(rows, scaling):
    dense = {(r["n"], r["d"]): r for r in rows if r["method"] == "sdpa"}
    flex = {(r["n"], r["d"], r["pattern"]): r for r in rows if r["method"] == "flex"}
    if not rows and not scaling:
        return
    print("\n=== bf16, batch·n = 2^18 tokens (batch >= 1), 8 heads at d=64, 4 at d=128; useful TFLOP/s counts allowed "
          "pairs only ===")
    hdr = (f"{'n':>8} {'d':>4} {'b':>3} {'method':7} {'pattern':34} {'fwd ms':>9} {'TF/s':>6} {'fwd+bwd ms':>11} "
           f"{'TF/s':>6} {'vs SDPA fwd':>11} {'vs SDPA f+b':>11} {'vs Flex fwd':>11} {'vs Flex f+b':>11}")
    print(hdr)
    for r in rows:
        cols = ["", "", "", ""]
        if r["method"] == "triton":
            dn = dense.get((r["n"], r["d"]))
            fx = flex.get((r["n"], r["d"], r["pattern"]))
            if dn:
                cols[0] = f"{dn['fwd_ms'] / r['fwd_ms']:.1f}x"
                cols[1] = f"{dn['fb_ms'] / r['fb_ms']:.1f}x"
            if fx:
                cols[2] = f"{fx['fwd_ms'] / r['fwd_ms']:.1f}x"
                cols[3] = f"{fx['fb_ms'] / r['fb_ms']:.1f}x"
        print(f"{r['n']:8d} {r['d']:4d} {r['b']:3d} {r['method']:7} {short(r['pattern']):34} {r['fwd_ms']:9.3f} "
              f"{r['fwd_tflops']:6.0f} {r['fb_ms']:11.3f} {r['fb_tflops']:6.0f} "
              + " ".join(f"{c:>11}" for c in cols))
    if scaling:
        print("\n=== batch 1, 8 heads, d=64, bf16, triton Strided(l ≈ √n) ===")
        for r in scaling:
            print(f"n={r['n']:8d} {r['pattern']:22s} fwd {r['fwd_ms']:9.3f} ms fwd+bwd {r['fb_ms']:9.3f} ms "
                  f"peak {r.get('peak_gib', float('nan')):6.2f} GiB")
        if len(scaling) > 1:
            e = fit_exponent([r["n"] for r in scaling], [r["fb_ms"] for r in scaling])
            print(f"fitted exponent of fwd+bwd time: n^{e:.2f} (target <= 1.6)")


def plot(rows, scaling, path, note: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for r in rows:
        if r["d"] != 64:
            continue
        label = r["method"] + ("" if r["method"] == "sdpa" else " " + r["pattern"].split("(")[0])
        series.setdefault(label + " (b·n=2^18)", []).append((r["n"], r["fb_ms"]))
    for r in scaling:
        series.setdefault("triton Strided (batch 1)", []).append((r["n"], r["fb_ms"]))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for label, pts in series.items():
        pts.sort()
        ns, ts = zip(*pts, strict=True)
        fitted = f": n^{fit_exponent(ns, ts):.2f}" if len(pts) > 1 else ""
        ax.loglog(ns, ts, "o-", label=label + fitted)
    ax.set_xlabel("sequence length n")
    ax.set_ylabel("forward+backward time (ms)")
    ax.set_title("bf16, d=64, 8 heads; l = stride ≈ √n, fixed c = l/4" + (f"\n{note}" if note else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
