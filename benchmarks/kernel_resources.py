"""Registers, spills, shared memory and programs per multiprocessor of the triton backend's kernels on a Hopper GPU,
read from Triton's own compilation for ``sm_90a`` on any machine: no GPU needed.

For each paper shape (``attention.PAPER_SHAPES``) the pattern's forward and backward launches are compiled, not run,
at the default tiles and (``--candidates``) at every candidate of the tuning sweep (``attention.SWEEP``); each row
gives what ``ptxas`` reported (registers a thread, bytes of spill stores and loads), the shared memory Triton asked
for, and how many programs of that size fit one H100/H200 multiprocessor and which resource stops the next one.
So a sweep can skip what spills or fits one program per multiprocessor, and a slow launch's occupancy is known
before Nsight Compute runs. The numbers are those of the Triton installed (its ``ptxas``): put Triton 3.6 first on
``PYTHONPATH`` to see what the GPU machine compiles.

    python benchmarks/kernel_resources.py --shapes enwik8 --candidates --kinds bwd --layouts natural
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
from dataclasses import asdict, dataclass

import torch

# Hopper (sm_90) multiprocessor: registers, shared memory for programs (228 KB, 1 KB of it reserved per program),
# resident warps and programs
SM90_REGISTERS = 65536
SM90_SHARED = 233472
SM90_RESERVED_SHARED = 1024
SM90_WARPS = 64
SM90_PROGRAMS = 32


@dataclass(frozen=True)
class KernelResources:
    """What one compiled kernel needs per program, and what that allows on one multiprocessor."""

    kernel: str
    warps: int
    stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    wgmma: int  # Hopper warpgroup matrix instructions in the PTX (asynchronous, the fast path)
    mma: int  # warp-level mma.sync instructions (the pre-Hopper path Triton falls back to)
    overlapped: int  # waits for wgmma that leave products in flight (0: every product finishes before the next step)

    @property
    def fit(self) -> tuple[int, str]:
        """Programs per multiprocessor and the resource that stops one more (registers are given out in steps of
        8 a thread)."""
        threads = 32 * self.warps
        limits = {
            "registers": SM90_REGISTERS // (-(-self.registers // 8) * 8 * threads),
            "shared": SM90_SHARED // (self.shared + SM90_RESERVED_SHARED),
            "warps": SM90_WARPS // self.warps,
            "programs": SM90_PROGRAMS,
        }
        least = min(limits.values())
        return least, "+".join(name for name, value in limits.items() if value == least)


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_WAIT_IN_FLIGHT = re.compile(r"wgmma\.wait_group\.sync\.aligned\s+[1-9]")  # a PTX wait with products left running


def parse_ptxas_log(log: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` output of one kernel."""
    used, spill = _PTXAS_USED.search(log), _PTXAS_SPILL.search(log)
    if used is None or spill is None:
        raise ValueError(f"no register/spill lines in this ptxas log:\n{log[:2000]}")
    return int(used.group(1)), int(spill.group(1)), int(spill.group(2))


class _HopperTarget:
    """Stands in for Triton's CUDA driver: the current target is sm_90 (compilation asks nothing else)."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


_RESOURCES: dict[int, KernelResources] = {}  # id(compiled kernel) -> its resources (Triton keeps the kernels)


@contextlib.contextmanager
def compile_only(found: list[KernelResources]):
    """Inside the block, every Triton kernel launch compiles for sm_90a and returns without running; each launch
    appends its kernel's :class:`KernelResources` to ``found`` (outputs stay uninitialized)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("kernel_resources compiles real kernels: unset TRITON_INTERPRET (it is set to 1).")
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    seen = _RESOURCES
    launch = JITFunction.run

    def compile_kernel(self, *args, grid, warmup, **kwargs):
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        if id(kernel) not in seen:
            regs, stores, loads = parse_ptxas_log(log.getvalue())
            meta = kernel.metadata
            ptx = kernel.asm["ptx"]
            seen[id(kernel)] = KernelResources(self.__name__, meta.num_warps, meta.num_stages, regs, stores, loads,
                                               meta.shared, ptx.count("wgmma.mma_async"), ptx.count("mma.sync"),
                                               len(_WAIT_IN_FLIGHT.findall(ptx)))
        found.append(seen[id(kernel)])
        return kernel

    active = driver._active  # None until a real driver was asked for (none exists on a machine without a GPU)
    driver.set_active(_HopperTarget())
    JITFunction.run = compile_kernel
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True  # the log comes from a compilation
    try:
        yield
    finally:
        JITFunction.run = launch
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
        driver._active = active


def launch_resources(shape, kind: str) -> list[tuple[str, KernelResources]]:
    """(layout, resources) of each ``kind`` ("fwd" or "bwd") launch of a paper shape's plan, at the tiles in force."""
    from lightning_sparse.kernels import triton_backend as tb
    from lightning_sparse.kernels.launch_plan import launch_plan

    plan = launch_plan(shape.pattern, shape.h)
    q, k = (torch.empty(shape.b, shape.h, shape.n, shape.d_qk, dtype=torch.bfloat16) for _ in range(2))
    v = torch.empty(shape.b, shape.h, shape.n, shape.d_v, dtype=torch.bfloat16)
    found: list[KernelResources] = []
    with compile_only(found):
        if kind == "fwd":
            tb._forward(q, k, v, plan, 1.0)
        else:
            tb._backward(q, k, v, torch.empty_like(v), torch.empty(q.shape[:3]), torch.empty_like(v), plan, 1.0)
    launches = found if kind == "fwd" else found[1:]  # the backward's first launch is the delta pass
    return [(tb._layout(launch), res) for launch, res in zip(plan, launches, strict=True)]


def report(shapes, kinds: list[str], layouts: list[str] | None, candidates: bool) -> list[dict]:
    """One row per (shape, kind, layout, tiles): the defaults first, then (``candidates``) the sweep's."""
    from attention import SWEEP, _width_class

    from lightning_sparse.kernels import triton_backend as tb
    from lightning_sparse.kernels.launch_plan import launch_plan
    from lightning_sparse.kernels.tiles import select_tiles, tile_override

    rows = []
    for shape in shapes:
        plan_layouts = sorted({tb._layout(launch) for launch in launch_plan(shape.pattern, shape.h)})
        for kind in kinds:
            for layout in plan_layouts:
                if layouts and layout not in layouts:
                    continue
                default = select_tiles(kind, layout, shape.d_qk, shape.d_v, torch.bfloat16)
                extra = SWEEP.get((kind, layout, _width_class(shape.d_qk, shape.d_v)), []) if candidates else []
                for tiles in [default, *[t for t in extra if t != default]]:
                    with tile_override(**{kind: tiles}, layout=layout, widths=(shape.d_qk, shape.d_v)):
                        try:
                            found = launch_resources(shape, kind)
                        except Exception as err:  # a candidate that does not compile: say so, go on
                            rows.append(dict(shape=shape.name, kind=kind, layout=layout, tiles=repr(tiles),
                                             error=f"{type(err).__name__}: {str(err)[:200]}"))
                            continue
                    for res in dict.fromkeys(res for lay, res in found if lay == layout):  # distinct kernels
                        programs, limit = res.fit
                        rows.append(dict(shape=shape.name, kind=kind, layout=layout, tiles=repr(tiles),
                                         default=tiles == default, **asdict(res), programs_per_sm=programs,
                                         limited_by=limit))
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'shape':10s} {'kind':4s} {'layout':8s} {'regs':>4s} {'spill st/ld B':>13s} {'smem KB':>7s} "
          f"{'warps':>5s} {'prog/SM':>7s} {'limit':18s} {'wgmma/mma/ovl':>13s} tiles")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:10s} {r['kind']:4s} {r['layout']:8s} does not compile: {r['error']}  {r['tiles']}")
            continue
        spill = f"{r['spill_stores']}/{r['spill_loads']}"
        mark = "*" if r["default"] else " "
        print(f"{r['shape']:10s} {r['kind']:4s} {r['layout']:8s} {r['registers']:4d} {spill:>13s} "
              f"{r['shared'] / 1024:7.1f} {r['warps']:5d} {r['programs_per_sm']:7d} {r['limited_by']:18s} "
              f"{r['wgmma']:5d}/{r['mma']:<3d}/{r['overlapped']:<3d} {mark}{r['tiles']}")


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from attention import paper_shapes

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="all", help="paper shapes, comma-separated (attention.PAPER_SHAPES), or all")
    p.add_argument("--kinds", default="fwd,bwd", help="fwd, bwd or both")
    p.add_argument("--layouts", default="", help="only these launch layouts (local, natural, strided); default all")
    p.add_argument("--candidates", action="store_true", help="also every candidate of attention.SWEEP")
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in kinds if k not in ("fwd", "bwd")]
    if bad:
        raise SystemExit(f"--kinds takes fwd and/or bwd, got {bad}.")
    layouts = [x for x in args.layouts.split(",") if x]
    from lightning_sparse.kernels.tiles import LAYOUTS

    if any(x not in LAYOUTS for x in layouts):
        raise SystemExit(f"--layouts takes some of {LAYOUTS}, got {layouts}.")
    import triton

    print(f"triton {triton.__version__}, compiled for sm_90a (H100/H200); * marks the default tiles; the GPU machine "
          "runs triton 3.6", flush=True)
    rows = report(paper_shapes(args.shapes), kinds, layouts or None, args.candidates)
    print_rows(rows)
    if args.json:
        from lightning_sparse.atomic import atomic_write

        with atomic_write(args.json) as f:
            f.write(json.dumps(dict(triton=triton.__version__, rows=rows), indent=1).encode())


if __name__ == "__main__":
    main()
