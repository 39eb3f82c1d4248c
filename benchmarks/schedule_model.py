"""A list-scheduling model of the fixed pattern's launches: how far the order of the programs is from balanced.

    python benchmarks/schedule_model.py                     # the Enwik8 shape and Fixed(128, 32) at batch 16

Each program's work is counted in matrix-product units (tile rows × tile columns × products) plus a fixed cost, as
the backward (``_bwd_kernel``: band key tiles, summary key tiles, query tiles) and the forward (query tiles) do it;
programs start in grid order on the first free slot (``slots`` = programs in flight: 2 per SM × 132 SMs at the
fixed launches' 8 warps and 128 registers). Printed: the makespan over the balanced time (total work / slots) for
each head's programs in turn (the kernels' order before session 6) and for the longest-first order across heads
(``triton_kernels._program``). CPU only, no torch.
"""

from __future__ import annotations

import argparse
import heapq


def makespan(works: list[float], slots: int) -> float:
    """Finish time of programs started in list order, each on the first slot to come free."""
    free = [0.0] * slots
    for w in works:
        heapq.heappush(free, heapq.heappop(free) + w)
    return max(free)


def fixed_backward(n: int, stride: int, c: int, bn1: int = 128, bm1: int = 32, bm2: int = 128, bn2: int = 64,
                   overhead: float = 2.0) -> tuple[list[float], list[float], list[float]]:
    """(summary key tiles, query tiles later first, band key tiles) of one head, in units of 10^4 pair-products."""
    summary = [overhead + (n - (j * bn1 // c) * stride) / bm1 * bn1 * bm1 * 4 / 1e4 for j in range(n // stride * c // bn1)]
    queries = [overhead + ((i * bm2 // stride) * c / bn2 + 2) * bm2 * bn2 * 3 / 1e4 for i in reversed(range(n // bm2))]
    band = [overhead + stride / bm1 * bn1 * bm1 * 4 / 1e4 for _ in range(n // bn1)]
    return summary, queries, band


def fixed_forward(n: int, stride: int, c: int, bm: int = 128, overhead: float = 20.0) -> list[float]:
    """Query tiles of one head, later (longer) first, in units of keys visited."""
    return [overhead + (t * bm // stride) * c + stride for t in reversed(range(n // bm))]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slots", type=int, default=264, help="programs in flight")
    args = ap.parse_args(argv)
    for name, b, h, n in (("Enwik8", 2, 8, 12288), ("batch 16", 16, 8, 16384)):
        summary, queries, band = fixed_backward(n, 128, 32)
        per_head = band + summary + queries  # the old role order
        head_by_head = per_head * (b * h)
        longest_first = [w for part in (summary, queries, band) for w in part for _ in range(b * h)]
        fwd = fixed_forward(n, 128, 32)
        balanced, balanced_fwd = sum(head_by_head) / args.slots, sum(fwd) * b * h / args.slots
        print(f"{name} ({b} x {h} heads, n = {n}): backward {makespan(head_by_head, args.slots) / balanced:.3f}x "
              f"balanced head by head, {makespan(longest_first, args.slots) / balanced:.3f}x longest first; forward "
              f"{makespan(fwd * (b * h), args.slots) / balanced_fwd:.3f}x / "
              f"{makespan([w for w in fwd for _ in range(b * h)], args.slots) / balanced_fwd:.3f}x")


if __name__ == "__main__":
    main()
