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
    """Stands in for a finished torch.profiler.profile: GPU events (name, start µs, end µs) and one host event."""

    def __init__(self, spans):
        cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
        self._events = [SimpleNamespace(name=n, device_type=cuda, time_range=SimpleNamespace(start=s, end=e))
                        for n, s, e in spans]
        self._events.append(SimpleNamespace(name="host", device_type=cpu, time_range=SimpleNamespace(start=0, end=999)))

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
