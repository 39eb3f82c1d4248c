"""Benchmark of the triton backend against dense causal SDPA and FlexAttention, forward and forward+backward.

Run on one GPU: ``python benchmarks/attention.py`` (options: ``--help``). For n in {4096, …, 1048576} and head_dim
64 and 128 (8 heads at 64, 4 at 128; batch·n = 2^18 tokens, batch >= 1), bf16, it times the paper's strided
(l ≈ √n) and fixed (l ≈ √n, c = l/4) patterns with the triton kernels and with FlexAttention on the same mask
(compiled, block mask compiled), and dense causal SDPA. It prints one table (ms, useful TFLOP/s counting only the
allowed (query, key) pairs: 4·nnz·d per head forward, 3.5× that forward+backward, and speed-ups), a batch-1
scaling table for strided l ≈ √n, and writes a log-log plot of forward+backward time against n with the fitted
exponent of each method. ``--sweep`` first times candidate tile configurations at the target shapes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from lightning_sparse.atomic import atomic_write
from lightning_sparse.kernels import Dense, Fixed, Pattern, Strided, sparse_attention
from lightning_sparse.kernels import triton_backend as tb


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

    def fixed(b, h, q, kv):
        return (q >= kv) & (((q // st) == (kv // st)) | ((kv % st) >= (st - c)))

    return fixed


def timeit(fn, budget_s: float = 0.4) -> float:
    """Median milliseconds of ``fn`` (CUDA events); fewer repeats for slow calls."""
    import triton

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
    def __init__(self, b: int, h: int, n: int, d: int):
        g = torch.Generator(device="cuda").manual_seed(n + d)
        self.q, self.k, self.v, self.do = (
            torch.randn(b, h, n, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(4)
        )
        for t in (self.q, self.k, self.v):
            t.requires_grad_(True)

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


def flex_method(pattern: Pattern, n: int):
    global _FLEX
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _FLEX is None:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = 256
        torch._dynamo.config.recompile_limit = 256
        _FLEX = torch.compile(flex_attention, dynamic=False)
    bm = create_block_mask(mask_mod(pattern), None, None, n, n, device="cuda", _compile=True)
    flex = _FLEX
    return lambda q, k, v: flex(q, k, v, block_mask=bm)


def _compile_flex(task: tuple[str, int, int, int, int]) -> str:
    """Worker: compile FlexAttention forward and backward for one (pattern, b, h, n, d) into the shared caches."""
    expr, b, h, n, d = task
    pattern = eval(expr, {"Strided": Strided, "Fixed": Fixed})
    t0 = time.perf_counter()
    inputs = Inputs(b, h, n, d)
    inputs.fwd_bwd(flex_method(pattern, n))()
    inputs.fwd(flex_method(pattern, n))()
    torch.cuda.synchronize()
    return f"  compiled flex {expr} b={b} n={n} d={d} in {time.perf_counter() - t0:.0f}s"


def warm_flex(tasks: list[tuple[str, int, int, int, int]], workers: int) -> None:
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


def measure(rows, name, pattern, n, d, b, h, inputs, f, useful_nnz):
    t0 = time.perf_counter()
    try:
        tf = timeit(inputs.fwd(f))
        tfb = timeit(inputs.fwd_bwd(f))
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        print(f"  {name} n={n} d={d}: out of memory", flush=True)
        return
    flops = 4.0 * useful_nnz * d * b * h
    row = dict(method=name, pattern=repr(pattern), n=n, d=d, b=b, h=h, fwd_ms=tf, fb_ms=tfb,
               fwd_tflops=flops / tf / 1e9, fb_tflops=3.5 * flops / tfb / 1e9)
    rows.append(row)
    print(f"  {name:8s} {pattern!r:48s} n={n:8d} d={d:3d} b={b:3d} fwd {tf:9.3f} ms  fwd+bwd {tfb:9.3f} ms "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)


SWEEP = {
    # (head_dim, launch layout) -> candidate configs tried besides the library default (see triton_backend.TUNING:
    # fwd (BM, BN, warps, stages, maxnreg, one_loop), bwd (BM1, BN1, BM2, BN2, warps, stages, maxnreg, fused,
    # one_loop))
    (64, "fwd:local"): [(64, 32, 4, 3, 0, 1), (64, 64, 4, 3, 128, 0), (64, 32, 4, 2, 0, 0)],
    (64, "fwd:strided"): [(64, 32, 4, 3, 0, 0), (128, 64, 8, 3, 128, 0), (64, 64, 4, 2, 0, 1)],
    (64, "fwd:natural"): [(128, 64, 4, 3, 0, 0), (64, 64, 4, 3, 128, 0), (128, 64, 8, 4, 128, 0)],
    (64, "bwd:local"): [(32, 64, 64, 32, 4, 2, 168, 1, 1), (32, 64, 64, 32, 4, 1, 168, 1, 1),
                        (32, 64, 64, 32, 4, 2, 0, 0, 0)],
    (64, "bwd:strided"): [(32, 64, 64, 32, 4, 2, 168, 1, 1), (64, 64, 64, 64, 4, 2, 168, 1, 0)],
    (64, "bwd:natural"): [(32, 128, 128, 32, 8, 3, 128, 0, 0), (32, 128, 128, 64, 8, 4, 128, 0, 0)],
    (128, "fwd:local"): [(128, 64, 8, 3, 0, 0), (64, 64, 4, 3, 0, 1)],
    (128, "fwd:strided"): [(128, 64, 8, 3, 0, 0), (64, 64, 4, 3, 0, 1)],
    (128, "fwd:natural"): [(128, 64, 8, 3, 0, 0), (128, 64, 8, 3, 128, 0)],
    (128, "bwd:local"): [(32, 64, 64, 32, 4, 2, 0, 1, 0), (32, 64, 64, 32, 4, 2, 0, 1, 1)],
    (128, "bwd:strided"): [(32, 64, 64, 32, 4, 2, 0, 1, 0), (32, 64, 64, 32, 4, 2, 0, 1, 1)],
    (128, "bwd:natural"): [(64, 64, 64, 64, 8, 2, 0, 0, 0), (32, 128, 128, 64, 8, 3, 128, 0, 0)],
}


def sweep(args):
    """Time the default and the candidate tiles of each launch kind (others at their defaults) at n = 16384; keep
    the fastest."""
    results = []
    for d in args.dims:
        h = 8 if d == 64 else 4
        n = 16384
        inp = Inputs(max(1, args.tokens // n), h, n, d)
        for pattern, layouts in ((Strided(128), ("local", "strided")), (Fixed(128, 32), ("natural",))):
            f = triton_method(pattern)
            for kind in ("fwd", "bwd"):
                for layout in layouts:
                    key = f"{kind}:{layout}"
                    best = None
                    default = tb.DEFAULTS[(kind, layout, 64 if d <= 64 else 128)]
                    for cand in [default, *SWEEP.get((d, key), [])]:
                        tb.TUNING.clear()
                        tb.TUNING[key] = cand
                        try:
                            ms = timeit(inp.fwd(f) if kind == "fwd" else inp.fwd_bwd(f), budget_s=0.15)
                        except Exception as err:  # a config that does not compile or fit: record and go on
                            print(f"  sweep d={d} {key} {cand}: {type(err).__name__}", flush=True)
                            continue
                        results.append(dict(pattern=repr(pattern), n=n, d=d, key=key, cand=cand, ms=ms))
                        print(f"  sweep {pattern!r:28.28s} n={n} d={d} {key:12s} {cand} {ms:8.3f} ms", flush=True)
                        if best is None or ms < best[1]:
                            best = (cand, ms)
                    if best is not None:
                        results.append(dict(d=d, key=key, best=best[0], ms=best[1]))
        tb.TUNING.clear()
        del inp
        torch.cuda.empty_cache()
    print("\n=== fastest tiles (applied to the runs below) ===")
    for r in results:
        if "best" in r:
            tb.TUNING[f"{r['key']}:d{r['d']}"] = tuple(r["best"])
            print(f"d={r['d']} {r['key']}: {r['best']} {r['ms']:.3f} ms")
    return results


def fit_exponent(ns, ts):
    x = [math.log(n) for n in ns]
    y = [math.log(t) for t in ts]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / sum((a - mx) ** 2 for a in x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", default="4096,16384,65536,262144,1048576")
    ap.add_argument("--dims", default="64,128")
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
    args = ap.parse_args(argv)
    args.dims = [int(x) for x in args.dims.split(",") if x]
    ns = [int(x) for x in args.ns.split(",") if x]
    import triton

    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}", flush=True)
    start = time.perf_counter()
    out = {"sweep": sweep(args) if args.sweep else []}
    scaling, rows = [], []
    out.update(rows=rows, scaling=scaling)

    def save() -> None:  # after every measurement, so a run cut short keeps what it measured
        if args.json:
            write_json(out, args.json)

    shapes = [(n, d, 8 if d == 64 else 4, max(1, args.tokens // n)) for d in args.dims for n in ns]
    if not args.no_main:
        warm_flex([(repr(p), b, h, n, d) for n, d, h, b in shapes if n <= (args.max_flex_n if d == 64 else
                   args.max_flex_n_128) for p in main_patterns(n, args)], args.flex_workers)
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
    print_tables(rows, scaling)
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
    return s.replace(", ", ",")


def print_tables(rows, scaling):
    dense = {(r["n"], r["d"]): r for r in rows if r["method"] == "sdpa"}
    flex = {(r["n"], r["d"], r["pattern"]): r for r in rows if r["method"] == "flex"}
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
