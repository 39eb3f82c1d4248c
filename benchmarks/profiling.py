"""What the GPU did during a profiled region (torch.profiler): busy time and the kernels that took it.

Shared by ``train_step.py`` and ``sampling.py``: ``busy_fraction`` is the union of kernel/memcpy/memset intervals,
``top_kernels`` the kernels grouped by name with their summed GPU time, so a table says where a step goes;
``idle_gaps`` where the GPU waited (for the host), between which kernels and, with host events, during which op.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

__all__ = ["busy_fraction", "device_events", "host_events", "idle_gaps", "top_kernels"]


def device_events(prof: Any) -> list[tuple[str, float, float]]:
    """(name, start µs, end µs) of every GPU activity of a finished ``torch.profiler.profile``."""
    cuda = torch.autograd.DeviceType.CUDA
    events = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == cuda]
    if not events:  # older/newer profilers: read the raw Kineto events
        for e in prof.profiler.kineto_results.events():
            if e.device_type() == cuda:
                start = e.start_ns() / 1e3 if hasattr(e, "start_ns") else e.start_us()
                length = e.duration_ns() / 1e3 if hasattr(e, "duration_ns") else e.duration_us()
                events.append((e.name(), start, start + length))
    return events


def busy_fraction(prof: Any) -> tuple[float | None, int]:
    """Union of the GPU kernel/memcpy/memset intervals of a profiled region, in seconds, and how many there were."""
    intervals = sorted((s, e) for _, s, e in device_events(prof))
    if not intervals:
        return None, 0
    busy, (lo, hi) = 0.0, intervals[0]
    for s, e in intervals[1:]:
        if s > hi:
            busy, lo, hi = busy + hi - lo, s, e
        else:
            hi = max(hi, e)
    return (busy + hi - lo) * 1e-6, len(intervals)


def top_kernels(prof: Any, count: int = 15, per: int = 1) -> str:
    """The ``count`` kernel names with the most GPU time, as a Markdown table; times and calls divided by ``per``
    (e.g. the profiled steps)."""
    total: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for name, s, e in device_events(prof):
        total[name] += e - s
        calls[name] += 1
    whole = sum(total.values()) or 1.0
    lines = [f"| kernel | GPU ms | calls | share |  (per {'step' if per == 1 else f'1/{per} of the region'})",
             "|---|---|---|---|"]
    for name, us in sorted(total.items(), key=lambda kv: -kv[1])[:count]:
        lines.append(f"| {name[:90]} | {us / per / 1e3:.3f} | {calls[name] / per:.0f} | {100 * us / whole:.1f}% |")
    lines.append(f"| (all {len(total)} names) | {whole / per / 1e3:.3f} | {sum(calls.values()) / per:.0f} | 100% |")
    return "\n".join(lines)


def host_events(prof: Any) -> list[tuple[str, float, float]]:
    """(name, start µs, end µs) of every host (CPU) event of a profile taken with ``ProfilerActivity.CPU``."""
    cpu = torch.autograd.DeviceType.CPU
    return [(e.name, e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == cpu]


def _host_during(hosts: list[tuple[str, float, float]], start: float, end: float) -> str:
    """The host event that best explains a GPU gap: the shortest one covering at least half of it (the innermost
    op the host was in), else the one overlapping it most; with the share of the gap it covers."""
    best, best_rank = None, None
    for name, s, e in hosts:
        overlap = min(e, end) - max(s, start)
        if overlap <= 0:
            continue
        covers = overlap >= 0.5 * (end - start)
        rank = (covers, -(e - s) if covers else overlap)
        if best_rank is None or rank > best_rank:
            best, best_rank = (name, overlap), rank
    return "" if best is None else f"{best[0][:60]} ({100 * best[1] / (end - start):.0f}%)"


def idle_gaps(prof: Any, count: int = 10) -> str:
    """The ``count`` longest stretches of a profiled region in which the GPU ran nothing, as a Markdown table with
    the activity before and after each (the host was late there), and the total idle time. A profile with host
    events (``ProfilerActivity.CPU``) adds the host op that ran during each gap (``_host_during``)."""
    events = sorted(device_events(prof), key=lambda e: e[1])
    if not events:
        return "(no GPU activity profiled)"
    gaps, last_name, last_end = [], events[0][0], events[0][2]
    for name, s, e in events[1:]:
        if s > last_end:
            gaps.append((s - last_end, last_name, name, last_end, s))
        if e >= last_end:
            last_name, last_end = name, e
    hosts = host_events(prof)
    lines = [f"| idle µs | after | before |{' host during |' if hosts else ''}  ({len(gaps)} gaps, "
             f"{sum(g[0] for g in gaps) / 1e3:.3f} ms idle, {(last_end - events[0][1]) / 1e3:.3f} ms first to last "
             "activity)", "|---|---|---|" + ("---|" if hosts else "")]
    for us, before, after, start, end in sorted(gaps, reverse=True)[:count]:
        during = f" {_host_during(hosts, start, end)} |" if hosts else ""
        lines.append(f"| {us:.0f} | {before[:60]} | {after[:60]} |{during}")
    return "\n".join(lines)
