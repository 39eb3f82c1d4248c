"""Compile the triton backend's kernels for a GPU architecture on a machine without one; report registers and stack.

``python benchmarks/compile_check.py --widths 64,64 32,32 64,128`` compiles, for each (d_qk, d_v), the forward and
backward kernels of the launches of ``Strided(128)`` (local band, strided order) and ``Fixed(128, 32)`` with the
tiles the backend would pick for bf16 at n = 16,384, for sm_90 (``--arch``), and prints the registers per thread
and the stack frame (spills show up there) that ``cuobjdump --dump-resource-usage`` reads from the binary. Nothing
runs; triton's bundled ptxas and cuobjdump do the work. Use it to check that a kernel change compiles on another
triton version (e.g. ``PYTHONPATH=<dir with triton 3.6> python benchmarks/compile_check.py``) and what it does to
register pressure before spending GPU time. ``--ordered-dq`` (and ``--segment ROWS``) or ``--ordered-kv`` compiles
the fixed pattern's backward with that 5-product design instead of the defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import tempfile

import torch

from lightning_sparse.kernels import Fixed, Strided
from lightning_sparse.kernels import triton_backend as tb
from lightning_sparse.kernels.launch_plan import launch_plan
from lightning_sparse.kernels.tiles import ordered_tiles

POINTERS = {"Q", "K", "V", "Out", "DO", "GRAD_Q", "GRAD_K", "GRAD_V"}
FLOAT32_POINTERS = {"LSE", "DELTA", "ACC", "KVACC"}
INT32_POINTERS = {"HEADS", "STARTS", "TURNS"}
FLOATS = {"qk_scale", "scale"}


def _signature(fn, constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = "*bf16"
        elif name in FLOAT32_POINTERS:
            sig[name] = "*fp32"
        elif name in INT32_POINTERS:
            sig[name] = "*i32"
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    return sig


def resources(fn, constexprs: dict, options: dict, arch: int) -> tuple[int, int]:
    """(registers per thread, stack bytes) of ``fn`` compiled with ``constexprs`` and launch ``options``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn, _signature(fn, constexprs), constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        report = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", report), re.search(r"STACK:(\d+)", report)
    return int(regs.group(1)) if regs else -1, int(stack.group(1)) if stack else -1


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", nargs="+", default=["64,64"], help="d_qk,d_v pairs")
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    ap.add_argument("--n", type=int, default=16384, help="sequence length (tiles are capped at a launch's rows)")
    ap.add_argument("--ordered-dq", action="store_true", help="fixed backward with the ordered dQ reduction")
    ap.add_argument("--segment", type=int, default=0, help="with --ordered-dq: query rows per summary key program")
    ap.add_argument("--ordered-kv", action="store_true", help="fixed backward with the ordered dK/dV reduction")
    args = ap.parse_args(argv)
    if args.ordered_dq and args.ordered_kv:
        ap.error("--ordered-dq and --ordered-kv are two designs of the same backward: pick one.")
    design = "dq" if args.ordered_dq else "kv" if args.ordered_kv else None
    with ordered_tiles(design, args.segment) if design else contextlib.nullcontext():
        _report(args)


def _report(args: argparse.Namespace) -> None:
    import triton

    kern = tb._kernels()
    print(f"triton {triton.__version__}, sm_{args.arch}")
    launches = [*launch_plan(Strided(128), 1), *launch_plan(Fixed(128, 32), 1)]
    for pair in args.widths:
        d_qk, d_v = (int(x) for x in pair.split(","))
        for launch in launches:
            layout = tb._layout(launch)
            n_eff = -(-args.n // launch.stride)
            for kind in ("fwd", "bwd"):
                t = tb._config(kind, launch, d_qk, d_v, torch.bfloat16, n_eff)
                common = {**tb._parts(launch), "DQK": d_qk, "DV": d_v, "ONE_LOOP": t.one_loop,
                          "HEAD_GROUP": tb._head_group(launch), "F32": False}
                if kind == "fwd":
                    fn, const = kern._fwd_kernel, {**common, "BM": t.bm, "BN": t.bn}
                else:
                    fn = kern._bwd_kernel
                    const = {**common, "BM1": t.bm1, "BN1": t.bn1, "BM2": t.bm2, "BN2": t.bn2, "FUSED": t.fused,
                             "ORDERED_DQ": t.ordered_dq, "SEGMENTS": t.segment > 0,
                             "ORDERED_KV": t.ordered_kv}
                regs, stack = resources(fn, const, tb._launch_options(t), args.arch)
                print(f"d_qk={d_qk:3d} d_v={d_v:3d} {kind}:{layout:8s} {t!r}: {regs} registers, {stack} B stack",
                      flush=True)


if __name__ == "__main__":
    main()
