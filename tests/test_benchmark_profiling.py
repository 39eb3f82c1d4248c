"""benchmarks/profiling.py: the GPU-busy fraction and the idle gaps of a profiled region, from known intervals."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch


def _profiling():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "profiling.py"
    spec = importlib.util.spec_from_file_location("profiling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Profile:
    """Stands in for a finished torch.profiler.profile: GPU and host events (name, start µs, end µs)."""

    def __init__(self, spans, host_spans=()):
        cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
        self._events = [SimpleNamespace(name=n, device_type=device, time_range=SimpleNamespace(start=s, end=e))
                        for device, events in ((cuda, spans), (cpu, host_spans)) for n, s, e in events]

        self.profiler = SimpleNamespace(kineto_results=SimpleNamespace(events=lambda: []))  # the fallback's source

    def events(self):
        return self._events


def test_busy_fraction_and_idle_gaps_of_known_intervals():
    profiling = _profiling()
    # a [0, 100] overlaps b [50, 120]; 380 µs idle before c [500, 600]; 50 µs before d [650, 700]
    prof = _Profile([("c", 500, 600), ("a", 0, 100), ("b", 50, 120), ("d", 650, 700)])
    busy_s, count = profiling.busy_fraction(prof)
    assert count == 4 and abs(busy_s - 270e-6) < 1e-12
    table = profiling.idle_gaps(prof, count=1).splitlines()
    assert "2 gaps, 0.430 ms idle, 0.700 ms first to last activity" in table[0]
    assert table[2] == "| 380 | b | c |" and len(table) == 3  # the longest gap only, after b (which ends last)
    assert profiling.idle_gaps(_Profile([])) == "(no GPU activity profiled)"


def test_idle_gaps_name_the_host_op_that_ran_during_each_gap():
    profiling = _profiling()
    gpu = [("a", 0, 100), ("b", 500, 600), ("c", 650, 700)]  # gaps [100, 500] (400 µs) and [600, 650] (50 µs)
    host = [("step", 0, 700),  # covers both gaps, but a shorter op covers the first one
            ("aten::cross_entropy", 90, 450),  # 350 of 400 µs: the innermost op covering at least half
            ("aten::add", 460, 480),
            ("cudaGraphLaunch", 610, 620)]  # 10 of 50 µs: less than half, and "step" covers all of it
    table = profiling.idle_gaps(_Profile(gpu, host), count=2).splitlines()
    assert "host during" in table[0] and table[1] == "|---|---|---|---|"
    assert table[2] == "| 400 | a | b | aten::cross_entropy (88%) |"
    assert table[3] == "| 50 | b | c | step (100%) |"
    only_short = profiling.idle_gaps(_Profile(gpu, [("aten::add", 460, 480), ("x", 100, 110)]), count=1)
    assert only_short.splitlines()[2].endswith("| aten::add (5%) |")  # none covers half: the largest overlap
