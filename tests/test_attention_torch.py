"""The portable torch backend against the O(n²) reference: outputs and gradients, every pattern and combination mode.

Also: no tensor of n² entries is built for the sparse patterns, and a 65,536-long sequence runs forward and backward
on CPU far below the memory an n × n mask would need (measured in a child process). Run this file as a script
(``python tests/test_attention_torch.py strided``) to do that child's work by hand.
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import time
import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_sparse.kernels import (
    Dense,
    Fixed,
    FixedBlock,
    FixedSummary,
    HeadSplit,
    Interleaved,
    Local,
    Pattern,
    Strided,
    StridedColumns,
    head_masks,
    sparse_attention,
)

PATTERNS: dict[str, Pattern] = {
    "dense": Dense(),
    "local": Local(5),
    "columns": StridedColumns(4),
    "columns-noself": StridedColumns(4, include_self=False),
    "block": FixedBlock(6),
    "summary": FixedSummary(8, 2),
    "summary-previous": FixedSummary(8, 3, previous_blocks_only=True),
    "strided": Strided(4),
    "strided-7": Strided(7),
    "fixed": Fixed(8, 2),
    "fixed-positions": Fixed(8, 2, (0, 1, 3)),
    "split-strided": HeadSplit(Strided(5).components),
    "split-fixed": HeadSplit(Fixed(6, 2).components),
    "split-fixed-positions": HeadSplit(Fixed(8, 2, (0, 2)).components),
    "split-single": HeadSplit((Strided(3),)),
    "interleaved-strided-0": Interleaved(Strided(5).components).layer(0),
    "interleaved-strided-1": Interleaved(Strided(5).components).layer(1),
    "interleaved-fixed-0": Interleaved(Fixed(6, 3, (0, 1)).components).layer(0),
    "interleaved-fixed-1": Interleaved(Fixed(6, 3, (0, 1)).components).layer(1),
}

# (batch, heads per head group, n, head_dim): n not a multiple of the strides, n below them, n = 1.
SHAPES = [(2, 1, 37, 16), (1, 2, 20, 32), (1, 1, 3, 64), (2, 1, 1, 16)]


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Masked dense softmax attention (float64 for float64 inputs, else float32); rows that see no key give 0."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    seen = mask.any(-1, keepdim=True)
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~seen, 0.0)  # empty rows: finite, then zeroed
    probs = torch.softmax(scores, dim=-1).masked_fill(~mask, 0.0)
    return torch.matmul(probs, v.to(compute)).to(q.dtype)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float | None = None):
    """``backend="reference"``: masked dense attention, rows that see no key give 0."""
    return sparse_attention(q, k, v, pattern, scale=scale, backend="reference")


def inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """Fresh q, k, v (leaves that require grad) and an upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(4))
    return (*(x.to(dtype).requires_grad_() for x in (q, k, v)), g.to(dtype))


def seed_of(*key: object) -> int:
    """A seed of its own for each test case, stable across runs (unlike ``hash`` of a string)."""
    return zlib.crc32(repr(key).encode())


def run(backend_fn, q, k, v, g, pattern, scale=None) -> list[torch.Tensor]:
    """Output and (dq, dk, dv) of ``backend_fn`` for the loss ``sum(out · g)``."""
    out = backend_fn(q, k, v, pattern, scale)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    return [out.detach(), *grads]


def torch_backend(q, k, v, pattern, scale=None):
    return sparse_attention(q, k, v, pattern, scale=scale, backend="torch")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs error relative to the largest expected magnitude, or to 1 when that is smaller (exact zeros such as
    dq at n = 1 then allow rounding-level noise; inputs are unit normal, so 1 is their natural scale)."""
    scale = max(expected.double().abs().max().item(), 1.0)
    return (actual.double() - expected.double()).abs().max().item() / scale


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", PATTERNS)
def test_float32_matches_reference(name: str, shape: tuple[int, int, int, int]) -> None:
    pattern = PATTERNS[name]
    b, per_group, n, d = shape
    q, k, v, g = inputs((b, per_group * pattern.head_groups, n, d), torch.float32, seed_of(name, shape))
    scale = 0.3 if n == 37 else None
    got = run(torch_backend, q, k, v, g, pattern, scale)
    want = run(reference, q, k, v, g, pattern, scale)
    for what, a, e in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert a.dtype == torch.float32 and a.shape == e.shape
        assert torch.isfinite(a).all(), what
        assert rel_err(a, e) <= 1e-5, (what, rel_err(a, e))


@pytest.mark.parametrize("name", ["columns-noself", "summary", "summary-previous", "split-fixed"])
def test_rows_that_see_no_key_are_zero_with_finite_gradients(name: str) -> None:
    pattern = PATTERNS[name]
    q, k, v, g = inputs((1, 2 * pattern.head_groups, 30, 16), torch.float32, seed=7)
    out, *grads = run(torch_backend, q, k, v, g, pattern)
    empty = ~head_masks(pattern, 30, q.shape[1]).any(-1)  # [heads, n]
    assert empty.any(), "the pattern should leave some rows without keys"
    assert (out[:, empty] == 0).all()
    assert all(torch.isfinite(x).all() for x in grads)
    # The reference backend agrees on every row that sees a key (it gives NaN on the others).
    ref = sparse_attention(q, k, v, pattern, backend="reference").detach()
    assert rel_err(out[:, ~empty], ref[:, ~empty]) <= 1e-5


@pytest.mark.parametrize("name", ["dense", "strided", "fixed-positions", "split-fixed", "summary"])
def test_float64_matches_float64_ground_truth(name: str) -> None:
    pattern = PATTERNS[name]
    q, k, v, g = inputs((2, pattern.head_groups, 29, 8), torch.float64, seed=11)
    mask = head_masks(pattern, 29, q.shape[1])
    got = run(torch_backend, q, k, v, g, pattern)
    want = run(lambda q, k, v, p, s: masked_attention(q, k, v, mask, s), q, k, v, g, pattern)
    for a, e in zip(got, want, strict=True):
        assert a.dtype == torch.float64
        assert rel_err(a, e) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", PATTERNS)
def test_half_precision_is_as_accurate_as_the_reference(name: str, dtype: torch.dtype) -> None:
    """Both backends in half precision against float64 truth: the torch backend's error is at most 3× the reference's."""
    pattern = PATTERNS[name]
    q, k, v, g = inputs((2, 2 * pattern.head_groups, 45, 32), dtype, seed_of(name, dtype))
    got = run(torch_backend, q, k, v, g, pattern)
    ref = run(reference, q, k, v, g, pattern)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    mask = head_masks(pattern, 45, q.shape[1])
    truth = run(lambda q, k, v, p, s: masked_attention(q, k, v, mask, s), q64, k64, v64, g.double(), pattern)
    for what, a, r, t in zip(("out", "dq", "dk", "dv"), got, ref, truth, strict=True):
        assert a.dtype == dtype and torch.isfinite(a).all(), what
        err, ref_err = (a.double() - t).abs().max().item(), (r.double() - t).abs().max().item()
        assert err <= 3 * ref_err + 1e-6, (what, err, ref_err)


# --- separate query/key and value widths, the sdpa backend, validation ---------------------------------------------


def widths_inputs(b: int, h: int, n: int, d_qk: int, d_v: int, dtype: torch.dtype, seed: int):
    """q, k ``[b, h, n, d_qk]``, v and the upstream gradient ``[b, h, n, d_v]``."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, n, d_qk, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for _ in "qk")
    v, g = (torch.randn(b, h, n, d_v, generator=gen, dtype=torch.float64).to(dtype) for _ in "vg")
    return q, k, v.requires_grad_(), g


@pytest.mark.parametrize(("d_qk", "d_v"), [(16, 32), (32, 8), (8, 8)])
@pytest.mark.parametrize("name", ["dense", "local", "strided-7", "fixed-positions", "split-fixed", "summary-previous"])
def test_separate_widths_match_masked_attention(name: str, d_qk: int, d_v: int) -> None:
    """q, k of width d_qk and v of width d_v: torch and reference backends against float64 masked attention."""
    pattern = PATTERNS[name]
    q, k, v, g = widths_inputs(2, 2 * pattern.head_groups, 33, d_qk, d_v, torch.float64, seed_of(name, d_qk, d_v))
    mask = head_masks(pattern, 33, q.shape[1])
    want = run(lambda q, k, v, p, s: masked_attention(q, k, v, mask, s), q, k, v, g, pattern, 0.4)
    for backend_fn in (torch_backend, reference):
        got = run(backend_fn, q, k, v, g, pattern, 0.4)
        for what, a, e in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
            assert a.shape == e.shape, what
            assert rel_err(a, e) <= 1e-6, (backend_fn.__name__, what, rel_err(a, e))
    assert got[0].shape == (2, q.shape[1], 33, d_v)


@pytest.mark.parametrize(("d_qk", "d_v", "dtype"), [(16, 32, torch.float32), (32, 32, torch.bfloat16)])
def test_sdpa_backend_is_dense_causal_attention(d_qk: int, d_v: int, dtype: torch.dtype) -> None:
    q, k, v, g = widths_inputs(2, 3, 41, d_qk, d_v, dtype, seed_of("sdpa", d_qk, d_v))
    sdpa = run(lambda q, k, v, p, s: sparse_attention(q, k, v, p, scale=s, backend="sdpa"), q, k, v, g, Dense(), 0.3)
    ref = run(reference, q, k, v, g, Dense(), 0.3)
    for what, a, e in zip(("out", "dq", "dk", "dv"), sdpa, ref, strict=True):
        assert a.dtype == dtype and a.shape == e.shape, what
        assert rel_err(a, e) <= (1e-5 if dtype == torch.float32 else 2e-2), (what, rel_err(a, e))


@pytest.mark.parametrize("pattern", [Strided(4), Local(8), HeadSplit((Dense(), Local(4)))], ids=repr)
def test_sdpa_backend_refuses_sparse_patterns(pattern: Pattern) -> None:
    q = torch.zeros(1, 2, 16, 8)
    with pytest.raises(ValueError, match=r"backend='sdpa' computes dense causal attention only"):
        sparse_attention(q, q, q, pattern, backend="sdpa")


def test_auto_picks_sdpa_for_dense_on_cuda_only() -> None:
    from lightning_sparse.kernels.attention import resolve_backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_backend("auto", Dense(), cuda) == "sdpa"
    assert resolve_backend("auto", Strided(4), cuda) == "triton"
    assert resolve_backend("auto", Dense(), cpu) == resolve_backend("auto", Fixed(8, 2), cpu) == "torch"
    assert resolve_backend("torch", Dense(), cuda) == "torch"


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        (((1, 2, 8, 16), (1, 2, 8, 8), (1, 2, 8, 16)), r"q and k must be .* the same shape"),
        (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 9, 16)), r"v \[batch, heads, n, d_v\] with the same batch, heads and n"),
        (((1, 2, 8, 16), (1, 2, 8, 16), (2, 8, 16)), r"got q \(1, 2, 8, 16\), k \(1, 2, 8, 16\), v \(2, 8, 16\)"),
    ],
)
def test_bad_shapes_raise_once_for_every_backend(shapes, match: str) -> None:
    q, k, v = (torch.zeros(s) for s in shapes)
    for backend in ("reference", "torch", "sdpa", "triton"):
        with pytest.raises(ValueError, match=match):
            sparse_attention(q, k, v, Dense(), backend=backend)


@pytest.mark.parametrize("scale", [float("nan"), True, "0.1"])
def test_bad_scale_raises(scale) -> None:
    q = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"scale must be a finite number"):
        sparse_attention(q, q, q, Dense(), scale=scale, backend="torch")


def test_torch_attention_splits_head_groups_itself() -> None:
    """Called directly (not through sparse_attention), the torch backend still takes per-head patterns."""
    from lightning_sparse.kernels.torch_backend import torch_attention

    pattern = Fixed(8, 2, (0, 1, 3))
    q, k, v, g = widths_inputs(1, 6, 30, 8, 16, torch.float64, seed=5)
    got = run(torch_attention, q, k, v, g, pattern)
    want = run(reference, q, k, v, g, pattern)
    for a, e in zip(got, want, strict=True):
        assert rel_err(a, e) <= 1e-6


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


@pytest.mark.parametrize(
    ("pattern", "bound"),
    [(Strided(64), 1 / 8), (Fixed(64, 4), 1 / 8), (Fixed(64, 4, (0, 1)), 1 / 8), (Dense(), 1 / 2)],
    ids=repr,
)
def test_no_n_by_n_tensor_for_sparse_patterns(pattern: Pattern, bound: float) -> None:
    """Strided(√n) and Fixed(√n, c) keep every tensor below n²/8 entries; Dense shows the probe sees n²/2 chunks."""
    n = 4096
    q, k, v, g = inputs((1, pattern.head_groups, n, 16), torch.float32, seed=3)
    with LargestTensor() as probe:
        run(torch_backend, q, k, v, g, pattern)
    if isinstance(pattern, Dense):
        assert probe.largest >= bound * n * n  # the probe does see the quadratic chunks of dense attention
    else:
        assert probe.largest <= bound * n * n, probe.largest


# --- a 65,536-long sequence on CPU, in a child process so its peak memory can be read honestly ---------------------

LONG_N = 65536
LONG_PATTERNS = {"strided": Strided(256), "fixed": Fixed(256, 16)}
LONG_ROWS = [0, 1, 255, 256, 257, 4095, 4096, 30000, LONG_N - 257, LONG_N - 2, LONG_N - 1]


def long_row_mask(name: str, rows: torch.Tensor, n: int) -> torch.Tensor:
    """The masks of a few query rows, ``[len(rows), n]``, from the paper's definitions (no n × n tensor)."""
    i, j = rows[:, None], torch.arange(n)[None, :]
    stride = LONG_PATTERNS[name].stride
    if name == "strided":
        return (j <= i) & ((i - j < stride) | ((i - j) % stride == 0))
    summary = LONG_PATTERNS[name].summary
    return (j <= i) & ((j // stride == i // stride) | (j % stride >= stride - summary))


def current_rss() -> int:
    """Resident memory of this process now, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def long_sequence_child(name: str) -> dict[str, float]:
    """Forward and backward at n = 65,536 with the torch backend; peak memory, time, and a few rows checked."""
    q, k, v, g = inputs((1, 1, LONG_N, 32), torch.float32, seed=2024)
    before = current_rss()
    start = time.perf_counter()
    out = sparse_attention(q, k, v, LONG_PATTERNS[name], backend="torch")
    (out * g).sum().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    rows = torch.tensor(LONG_ROWS)
    q_rows = q.detach()[:, :, rows].double().requires_grad_()
    want = masked_attention(q_rows, k.detach().double(), v.detach().double(), long_row_mask(name, rows, LONG_N))
    (dq_want,) = torch.autograd.grad((want * g[:, :, rows].double()).sum(), q_rows)
    return {
        "peak_increase_bytes": peak - before,
        "seconds": seconds,
        "out_rel_err": rel_err(out.detach()[:, :, rows], want),
        "dq_rel_err": rel_err(q.grad[:, :, rows], dq_want),
        "finite": bool(torch.isfinite(out).all() and all(torch.isfinite(x.grad).all() for x in (q, k, v))),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", LONG_PATTERNS)
def test_65536_long_sequence_fits_far_below_an_n_by_n_mask(name: str) -> None:
    done = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    mask_bytes = LONG_N * LONG_N  # a boolean n × n mask alone: 4 GiB (the float32 scores would be 16 GiB)
    assert result["peak_increase_bytes"] < 1.5 * 2**30 < mask_bytes, result
    assert result["finite"], result
    assert result["out_rel_err"] <= 1e-5 and result["dq_rel_err"] <= 1e-4, result


if __name__ == "__main__":
    print(json.dumps(long_sequence_child(sys.argv[1])))
