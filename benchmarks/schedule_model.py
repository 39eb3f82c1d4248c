"""A list-scheduling model of the fixed pattern's launches: how far the order of the programs is from balanced.

    python benchmarks/schedule_model.py                     # the Enwik8 shape and Fixed(128, 32) at batch 16

Each program's work is counted in matrix-product units (tile rows × tile columns × products) plus a fixed cost, as
the backward (``_bwd_kernel``: band key tiles, summary key tiles, query tiles) and the forward (query tiles) do it;
programs start in grid order on the first free slot (``slots`` = programs in flight: 2 per SM × 132 SMs at the
fixed launches' 8 warps and 128 registers). Printed: the makespan over the balanced time (total work / slots) for
each head's programs in turn (the kernels' order before session 6) and for the longest-first order across heads
(``triton_kernels._program``).

Then the ordered-dQ backward (``BwdTiles.ordered_dq``: 5 products per summary block instead of 7, each chunk's dQ
added by the summary key tiles in turn) at the Enwik8 shape, simulated event by event: programs start in ticket
order, a key tile's step waits until the tile before it has added its part to the chunk, and every add costs
``sigma`` extra units (the turn's atomics and the float32 read-add-write); with ``BwdTiles.segment`` the summary
key tiles' queries are split into programs of that many rows, whose dK/dV are added in turn at their end. And the
dual design (``BwdTiles.ordered_kv``): query-stationary programs adding the summary key tiles' dK/dV in turn.
Printed: makespans over the 7-product kernel's. CPU only, no torch.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
from collections.abc import Iterator


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


def simulate(programs: list[Iterator[tuple]], slots: int) -> float:
    """Finish time of programs started in list order on ``slots`` slots. A program yields ``("work", units)``,
    ``("wait", key, value)`` (hold its slot until counter ``key`` reaches ``value``) or ``("set", key, value)``."""
    counters: dict = {}
    waiting: dict = {}
    order = itertools.count()
    events: list = []
    queue = list(reversed(programs))
    free, finish = slots, 0.0

    def start(now: float) -> None:
        nonlocal free
        while free and queue:
            free -= 1
            heapq.heappush(events, (now, next(order), queue.pop()))

    start(0.0)
    while events:
        now, _, prog = heapq.heappop(events)
        for op in prog:
            if op[0] == "work":
                heapq.heappush(events, (now + op[1], next(order), prog))
                break
            if op[0] == "wait" and counters.get(op[1], 0) < op[2]:
                waiting.setdefault(op[1], []).append((op[2], prog))
                break
            if op[0] == "set":
                counters[op[1]] = op[2]
                ready = [p for v, p in waiting.get(op[1], []) if v <= op[2]]
                waiting[op[1]] = [(v, p) for v, p in waiting.get(op[1], []) if v > op[2]]
                for p in ready:
                    heapq.heappush(events, (now, next(order), p))
        else:  # the program ended
            free += 1
            finish = max(finish, now)
            start(now)
    return finish


def ordered_backward(heads: int, n: int, stride: int, c: int, sigma: float, segment: int = 0, bn1: int = 128,
                     bm1: int = 32, bm2: int = 128, bn2: int = 64, overhead: float = 2.0) -> list[Iterator[tuple]]:
    """The ordered-dQ backward's programs in ticket order (query tiles, summary key tiles segment by segment, band
    key tiles; ``triton_kernels._bwd_kernel``), units as in :func:`fixed_backward`."""

    def query_tile(h: int, i: int) -> Iterator[tuple]:
        yield "work", overhead + 2 * bm2 * bn2 * 3 / 1e4  # the band part's dQ
        for chunk in range(i * bm2 // bm1, (i + 1) * bm2 // bm1):
            yield "set", (h, chunk), 1

    def key_segment(h: int, j: int, lo: int, hi: int, rank: int, segments: int) -> Iterator[tuple]:
        yield "work", overhead
        for chunk in range(lo // bm1, hi // bm1):
            yield "work", bn1 * bm1 * 5 / 1e4  # S, dP, dV, dK, dQ
            yield "wait", (h, chunk), j + 1
            yield "work", sigma
            yield "set", (h, chunk), j + 2
        if segments > 1:
            yield "wait", (h, "kv", j), rank
            yield "work", sigma
            yield "set", (h, "kv", j), rank + 1

    def band_tile(h: int) -> Iterator[tuple]:
        yield "work", overhead + stride / bm1 * bn1 * bm1 * 4 / 1e4

    tickets = []
    for h in range(heads):
        per_head = [query_tile(h, i) for i in reversed(range(n // bm2))]
        for j in range(n // stride * c // bn1):
            first = (j * bn1 // c) * stride
            bounds = [first, *range((first // segment + 1) * segment, n, segment), n] if segment else [first, n]
            per_head += [key_segment(h, j, lo, hi, r, len(bounds) - 1) for r, (lo, hi) in enumerate(itertools.pairwise(bounds))]
        per_head += [band_tile(h) for _ in range(n // bn1)]
        tickets.append(per_head)
    return [prog for rank in itertools.zip_longest(*tickets) for prog in rank if prog is not None]  # slot-major


def ordered_kv_backward(heads: int, n: int, stride: int, c: int, sigma: float, bm: int = 128, bn: int = 64,
                        overhead: float = 2.0) -> list[Iterator[tuple]]:
    """The ordered dK/dV backward (``BwdTiles.ordered_kv``): the summary part query-stationary, 5 products per
    block, the summary key tiles' dK/dV added in turn (rank: later query tiles first, the programs' start order) —
    one turn per (query tile, key tile of ``bn`` keys) instead of one per (key tile, ``bm1`` query rows), and no long
    programs (a query tile sees at most n / stride · c summary keys). The band part's products as in the others."""
    tiles = n // bm
    tickets = []
    for h in range(heads):
        per_head = []
        for i in reversed(range(tiles)):

            def query_tile(h: int = h, i: int = i) -> Iterator[tuple]:
                yield "work", overhead + 2 * bm * bn * 3 / 1e4 + bm * bn * 2 / 1e4  # band: dQ, its keys' dK/dV
                for j in range((i * bm // stride) * c // bn):
                    yield "work", bm * bn * 5 / 1e4  # S, dP, dQ, dK, dV
                    yield "wait", (h, j), tiles - 1 - i
                    yield "work", sigma
                    yield "set", (h, j), tiles - i

            per_head.append(query_tile())
        tickets.append(per_head)
    return [prog for rank in itertools.zip_longest(*tickets) for prog in rank if prog is not None]


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
    summary, queries, band = fixed_backward(12288, 128, 32)
    seven = makespan([w for part in (summary, queries, band) for w in part for _ in range(16)], args.slots)
    print("Enwik8 5-product backwards, makespan over the 7-product kernel's. sigma: units per turn (a key tile's step "
          "of 32 queries is 2.05 units, a query tile's step of 64 keys 4.10)")
    print("  sigma  ordered dQ: whole  " + "  ".join(f"seg {s:5d}" for s in (4096, 2048, 1024, 512))
          + "  | ordered dK/dV")
    for sigma in (0.0, 0.2, 0.5, 1.0, 2.0):
        row = [simulate(ordered_backward(16, 12288, 128, 32, sigma, seg), args.slots) / seven
               for seg in (0, 4096, 2048, 1024, 512)]
        dual = simulate(ordered_kv_backward(16, 12288, 128, 32, sigma), args.slots) / seven
        print(f"  {sigma:5.1f}  {row[0]:17.3f}  " + "  ".join(f"{x:9.3f}" for x in row[1:]) + f"  | {dual:9.3f}")


if __name__ == "__main__":
    main()
