"""A pattern's forward and backward at a paper shape, run for Nsight Compute (``ncu``) to profile.

``--pattern fixed`` (default): the Enwik8 config's ``Fixed(128, 32)`` with per-head summaries at batch 2, 8 heads,
n = 12,288 (one launch a direction); ``--pattern strided``: issue 9's ``Strided(128)`` at batch 16, 8 heads,
n = 16,384 (two launches a direction: the local band, then the strided order). Runs forward+backward ``--reps``
times (the first compiles), so skipping one repetition's launches shows warm ones. ``--design kv|dq`` picks a
5-product backward for the fixed pattern (``lightning_sparse.kernels.tiles.ordered_tiles``)::

    ncu --kernel-name _bwd_kernel --launch-skip 1 --launch-count 1 --section SpeedOfLight \\
        --section WarpStateStats --section MemoryWorkloadAnalysis python benchmarks/ncu_attention.py
    ncu --kernel-name _bwd_kernel --launch-skip 2 --launch-count 2 … python benchmarks/ncu_attention.py --pattern strided
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from lightning_sparse.kernels import Fixed, Strided, sparse_attention
from lightning_sparse.kernels.tiles import ordered_tiles

# name -> (pattern, batch, n): the Enwik8 config's attention, issue 9's strided target
PATTERNS = {
    "fixed": (Fixed(stride=128, summary=32, summary_positions=(0, 1, 2, 3)), 2, 12288),
    "strided": (Strided(128), 16, 16384),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", choices=tuple(PATTERNS), default="fixed")
    ap.add_argument("--batch", type=int, default=None, help="default: the pattern's shape (2 fixed, 16 strided)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--n", type=int, default=None, help="default: the pattern's shape (12,288 fixed, 16,384 strided)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--design", choices=("", "kv", "dq"), default="", help="5-product backward ('' = 7 products)")
    ap.add_argument("--segment", type=int, default=1024, help="rows per ordered-dQ segment")
    args = ap.parse_args()
    pattern, batch, n = PATTERNS[args.pattern]
    args.batch = batch if args.batch is None else args.batch
    args.n = n if args.n is None else args.n
    if args.design and args.pattern != "fixed":
        ap.error(f"--design {args.design} is a backward of the fixed pattern; drop it or use --pattern fixed")
    for name in ("batch", "heads", "n", "dim", "reps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
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
