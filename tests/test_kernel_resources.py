"""benchmarks/kernel_resources.py: the kernels compiled for Hopper on a machine without a GPU, and what they need."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import kernel_resources as kr  # noqa: E402  (benchmarks/kernel_resources.py)

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles real kernels")


def _resources(registers: int, warps: int, shared_kb: float) -> kr.KernelResources:
    return kr.KernelResources("k", warps, 2, registers, 0, 0, int(shared_kb * 1024), 1, 0, 0)


def test_programs_per_multiprocessor_and_what_limits_them():
    # the fixed backward's default (Nsight Compute, session 8: 2 programs of 8 warps, registers and shared memory)
    assert _resources(128, 8, 80).fit == (2, "registers+shared")
    assert _resources(168, 4, 48).fit == (3, "registers")
    assert _resources(126, 8, 64).fit == (2, "registers")  # 126 registers are given out as 128
    assert _resources(32, 4, 100).fit == (2, "shared")  # 101 KB a program with the reserved 1 KB
    assert _resources(16, 1, 0).fit == (32, "programs")
    assert _resources(16, 2, 0).fit == (32, "warps+programs")


def test_ptxas_log_is_parsed_and_a_log_without_counts_is_refused():
    log = ("ptxas info    : Compiling entry function '_bwd_kernel' for 'sm_90a'\n"
           "ptxas info    : Function properties for _bwd_kernel\n"
           "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 128 registers, used 1 barriers, 8 bytes cumulative stack size\n")
    assert kr.parse_ptxas_log(log) == (128, 4, 12)
    with pytest.raises(ValueError, match="no register/spill lines"):
        kr.parse_ptxas_log("ptxas info    : Compile time = 1 ms")


def test_compile_only_records_a_kernel_and_restores_triton():
    triton = pytest.importorskip("triton")
    import torch
    import triton.language as tl
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    @triton.jit
    def matmul(A, B, C, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
        acc = tl.zeros((BM, BN), tl.float32)
        for k in range(0, K, BK):
            a = tl.load(A + rm[:, None] * K + (k + rk)[None, :])
            acc = tl.dot(a, tl.load(B + (k + rk)[:, None] * BN + rn[None, :]), acc)
        tl.store(C + rm[:, None] * BN + rn[None, :], acc)

    a, b = torch.ones(128, 256, dtype=torch.bfloat16), torch.ones(256, 128, dtype=torch.bfloat16)
    c = torch.zeros(128, 128)
    run, active = JITFunction.run, driver._active
    found: list = []
    with kr.compile_only(found):
        matmul[(1,)](a, b, c, 256, BM=128, BN=128, BK=64, num_warps=4, num_stages=3)
    assert JITFunction.run is run and driver._active is active
    assert len(found) == 1 and found[0].kernel == "matmul" and 0 < found[0].registers <= 255
    # a pipelined accumulation: Hopper matrix instructions, the next step's loads overlapping products in flight
    assert found[0].wgmma > 0 and found[0].mma == 0 and found[0].overlapped > 0
    assert torch.equal(c, torch.zeros(128, 128))  # compiled, not run


def test_paper_shape_and_sweep_candidates_from_the_command_line(tmp_path):
    out = tmp_path / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--shapes", "cifar10", "--kinds", "fwd",
           "--layouts", "strided", "--candidates", "--json", str(out)]
    printed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=True).stdout
    rows = json.loads(out.read_text())["rows"]
    from attention import SWEEP

    assert len(rows) == 1 + len(SWEEP[("fwd", "strided", 128)])  # the default, then each candidate
    assert [r["default"] for r in rows] == [True] + [False] * (len(rows) - 1)
    for r in rows:
        assert r["kernel"] == "_fwd_kernel" and r["layout"] == "strided" and 0 < r["registers"] <= 255
        assert r["wgmma"] + r["mma"] > 0  # the products compiled to tensor-core instructions
        assert r["programs_per_sm"] >= 1
    assert "prog/SM" in printed and "_fwd_kernel" not in printed.splitlines()[0]
