"""The fixed pattern's forward and backward at the Enwik8 shape, run for Nsight Compute (``ncu``) to profile.

Runs forward+backward ``--reps`` times (the first compiles), so ``ncu --kernel-name _bwd_kernel --launch-skip 1
--launch-count 1`` sees one warm launch. ``--design kv|dq`` picks a 5-product backward
(``lightning_sparse.kernels.tiles.ordered_tiles``)::

    ncu --kernel-name _bwd_kernel --launch-skip 1 --launch-count 1 --section SpeedOfLight \\
        --section WarpStateStats --section MemoryWorkloadAnalysis python benchmarks/ncu_fixed.py
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from lightning_sparse.kernels import Fixed, sparse_attention
from lightning_sparse.kernels.tiles import ordered_tiles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--n", type=int, default=12288)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--design", choices=("", "kv", "dq"), default="", help="5-product backward ('' = 7 products)")
    ap.add_argument("--segment", type=int, default=1024, help="rows per ordered-dQ segment")
    args = ap.parse_args()
    for name in ("batch", "heads", "n", "dim", "reps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    pattern = Fixed(stride=128, summary=32, summary_positions=(0, 1, 2, 3))  # the Enwik8 config's pattern
    shape = (args.batch, args.heads, args.n, args.dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    design = ordered_tiles(args.design, args.segment) if args.design else contextlib.nullcontext()
    with design:
        for _ in range(args.reps):
            sparse_attention(q, k, v, pattern, backend="triton").backward(grad)
    torch.cuda.synchronize()
    print(f"ran {args.reps}× forward+backward of {pattern} at {shape}, design {args.design or 'default'}")


if __name__ == "__main__":
    main()
