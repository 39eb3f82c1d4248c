"""The Triton kernels on a CUDA GPU at realistic shapes (``pytest -m gpu tests/test_gpu_attention.py``).

Every check uses the bar of tests/test_attention_triton.py: the kernel's max error against a float64 reference is
at most twice the error of plain PyTorch ops in the input dtype (plus a tiny floor), and never NaN. The references
run chunk by chunk of query rows, so n = 65,536 fits; the longest sequence is checked against the ``torch``
backend. Set ``GPU_ERR_LOG=path`` to append one line of max relative errors per check.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from lightning_sparse.kernels import (
    Dense,
    Fixed,
    FixedSummary,
    HeadSplit,
    Local,
    Pattern,
    Strided,
    StridedColumns,
    sparse_attention,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _log(line: str) -> None:
    print(line)
    path = os.environ.get("GPU_ERR_LOG")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def chunked_attention(q, k, v, do, pattern: Pattern, scale: float, dtype: torch.dtype, chunk: int = 1024):
    """out, dq, dk, dv of masked causal attention in plain PyTorch ops in ``dtype``, a block of query rows at a time.

    Rows that see no key give zeros. Gradients of k and v are summed over the blocks in float64.
    """
    b, h, n, d = q.shape
    d_v = v.shape[-1]
    groups = pattern.head_groups
    qd, kd, vd, dod = (x.to(dtype) for x in (q, k, v, do))
    out = torch.empty(b, h, n, d_v, dtype=dtype, device=q.device)
    dq = torch.empty(b, h, n, d, dtype=dtype, device=q.device)
    dk = torch.zeros(b, h, n, d, dtype=torch.float64, device=q.device)
    dv = torch.zeros(b, h, n, d_v, dtype=torch.float64, device=q.device)
    head_group = torch.arange(h, device=q.device) % groups
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        i = torch.arange(r0, r1, device=q.device)[:, None]
        j = torch.arange(r1, device=q.device)[None, :]
        mask = torch.stack([pattern.head_group(g)._allowed(i, j) for g in range(groups)])[head_group]
        qc = qd[:, :, r0:r1].detach().requires_grad_()
        kc = kd[:, :, :r1].detach().requires_grad_()
        vc = vd[:, :, :r1].detach().requires_grad_()
        s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
        empty = ~mask.any(-1, keepdim=True)
        s = s.masked_fill(~mask, float("-inf")).masked_fill(empty, 0.0)
        p = torch.softmax(s, dim=-1) * (~empty).to(s.dtype)
        o = torch.matmul(p, vc)
        gq, gk, gv = torch.autograd.grad(o, (qc, kc, vc), dod[:, :, r0:r1])
        out[:, :, r0:r1] = o.detach()
        dq[:, :, r0:r1] = gq
        dk[:, :, :r1] += gk.double()
        dv[:, :, :r1] += gv.double()
    return out, dq, dk.to(dtype), dv.to(dtype)


def kernel_attention(q, k, v, do, pattern: Pattern, scale: float | None, backend: str = "triton"):
    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
    o = sparse_attention(qq, kk, vv, pattern, scale=scale, backend=backend)
    dq, dk, dv = torch.autograd.grad(o, (qq, kk, vv), do)
    return o.detach(), dq, dk, dv


def check(b, h, n, d, dtype, pattern, scale=None, layout="bhnd", seed=0):
    """``d``: one head width, or (d_qk, d_v) for query/key rows of width d_qk and value rows of width d_v."""
    d_qk, d_v = (d, d) if isinstance(d, int) else d
    g = torch.Generator(device="cuda").manual_seed(seed)
    widths = (d_qk, d_qk, d_v, d_v)
    if layout == "bnhd":  # the model's layout: [batch, n, heads, d] storage seen as [batch, heads, n, d]
        q, k, v, do = (torch.randn(b, n, h, w, device="cuda", generator=g).to(dtype).transpose(1, 2) for w in widths)
    else:
        q, k, v, do = (torch.randn(b, h, n, w, device="cuda", generator=g).to(dtype) for w in widths)
    sc = d_qk**-0.5 if scale is None else scale
    chunk = max(256, min(4096, 2**26 // (b * h * n)))
    ref = chunked_attention(q, k, v, do, pattern, sc, torch.float64, chunk)
    plain = chunked_attention(q, k, v, do, pattern, sc, dtype, chunk)
    got = kernel_attention(q, k, v, do, pattern, scale)
    rel = []
    for name, x, p, r in zip(("out", "dq", "dk", "dv"), got, plain, ref, strict=True):
        assert x.shape == r.shape, f"{name}: shape {tuple(x.shape)}, expected {tuple(r.shape)}"
        assert not torch.isnan(x).any(), f"{name} has NaN"
        err, err_plain = (x.double() - r).abs().max().item(), (p.double() - r).abs().max().item()
        scale_r = r.abs().max().item()
        rel.append(err / scale_r)
        bound = 2 * err_plain + 1e-6 * max(1.0, scale_r)
        assert err <= bound, f"{pattern!r} n={n} d={d} {dtype} {name}: error {err:.3e} > {bound:.3e}"
    _log(
        f"{pattern!r} b={b} h={h} n={n} d={d} {str(dtype)[6:]} {layout}: max rel err "
        + " ".join(f"{nm}={e:.2e}" for nm, e in zip(("out", "dq", "dk", "dv"), rel, strict=True))
        + " (vs float64 reference)"
    )


CASES = [
    # (b, h, n, d, dtype, pattern)
    (2, 4, 4096, 64, torch.bfloat16, Dense()),
    (2, 4, 4096, 64, torch.bfloat16, Local(256)),
    (2, 4, 4096, 64, torch.bfloat16, StridedColumns(64)),
    (2, 4, 4096, 64, torch.bfloat16, FixedSummary(128, 32)),
    (2, 4, 4096, 64, torch.bfloat16, Strided(64)),
    (2, 4, 4096, 64, torch.bfloat16, Fixed(128, 32, (0, 1, 2, 3))),
    (2, 4, 4096, 64, torch.bfloat16, HeadSplit((Local(64), StridedColumns(64)))),
    (2, 4, 4096, 32, torch.bfloat16, Strided(64)),
    (2, 4, 4096, 128, torch.bfloat16, Fixed(128, 32, (0, 1))),
    (2, 4, 4096, 128, torch.float16, Strided(64)),
    (1, 2, 2000, 64, torch.float32, Fixed(128, 32)),
    (1, 2, 2000, 64, torch.float32, Strided(40)),
    (2, 8, 16384, 64, torch.bfloat16, Strided(128)),
    (2, 8, 16384, 64, torch.bfloat16, Fixed(128, 32)),
    (1, 2, 65536, 64, torch.bfloat16, Strided(256)),
    (1, 2, 65536, 128, torch.bfloat16, Fixed(256, 64, (0, 1))),
    # the paper configs' shapes (smaller batches): ImageNet 64 (16 heads of 32), CIFAR-10 (d_qk 64, d_v 128),
    # Enwik8 (per-head summaries), audio (width 32 at n = 65,536); separate widths both ways, fp16 and fp32
    (2, 16, 12288, 32, torch.bfloat16, Strided(128)),
    (4, 2, 3072, (64, 128), torch.bfloat16, Strided(96)),
    (2, 8, 12288, 64, torch.bfloat16, Fixed(128, 32, (0, 1, 2, 3))),
    (1, 4, 65536, 32, torch.bfloat16, Strided(256)),
    (2, 4, 4096, (128, 32), torch.float16, Fixed(128, 32, (0, 1))),
    (2, 4, 4096, (32, 64), torch.bfloat16, HeadSplit((Local(64), StridedColumns(64)))),
    (1, 2, 2000, (64, 32), torch.float32, Strided(40)),
]


def _case_id(c) -> str:
    d = c[3] if isinstance(c[3], int) else f"{c[3][0]}-{c[3][1]}"
    return f"{c[5]!r}-n{c[2]}-d{d}-{c[4]}"


@pytest.mark.parametrize("b,h,n,d,dtype,pattern", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_reference(b, h, n, d, dtype, pattern):
    check(b, h, n, d, dtype, pattern)


@pytest.mark.parametrize("fused", [0, 1], ids=["split", "fused"])
def test_both_backward_programs(fused):
    """Band launches' backward either way (separate dK/dV and dQ programs, or one fused program per tile)."""
    from lightning_sparse.kernels.tiles import BwdTiles, tile_override

    with tile_override(bwd=BwdTiles(32, 64, 64, 32, warps=4, stages=2, fused=bool(fused))):
        check(1, 2, 8192, 64, torch.bfloat16, Strided(128))
        check(1, 2, 4096, 64, torch.bfloat16, Dense())
        check(1, 2, 4096, (32, 128), torch.bfloat16, Local(256))


@pytest.mark.parametrize("design,segment", [("dq", 0), ("dq", 1024), ("kv", 0)],
                         ids=["ordered_dq", "segments", "ordered_kv"])
def test_ordered_backwards(design, segment):
    """The fixed pattern's 5-product backwards: the summary part's dQ added in turn (BwdTiles.ordered_dq), whole
    summary key tiles or split into segments of 1,024 query rows (BwdTiles.segment), or the summary keys' dK/dV added
    in turn by query tiles (BwdTiles.ordered_kv): against the reference at the Enwik8 shape and a long one, and
    bit-identical twice."""
    from lightning_sparse.kernels.tiles import ordered_tiles

    with ordered_tiles(design, segment):
        check(2, 8, 12288, 64, torch.bfloat16, Fixed(128, 32, (0, 1, 2, 3)))
        check(1, 2, 65536, 64, torch.bfloat16, Fixed(256, 64))
        check(2, 4, 4096, 32, torch.float16, Fixed(128, 32, (0, 1)))
        g = torch.Generator(device="cuda").manual_seed(5)
        q, k, v, do = (torch.randn(2, 8, 16384, 64, device="cuda", generator=g).to(torch.bfloat16) for _ in range(4))
        a = kernel_attention(q, k, v, do, Fixed(128, 32, (0, 1)), None)
        b = kernel_attention(q, k, v, do, Fixed(128, 32, (0, 1)), None)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)


def test_model_layout_odd_length_and_scale():
    check(2, 4, 3001, 64, torch.bfloat16, Strided(50), scale=0.2, layout="bnhd")
    check(2, 4, 3001, 64, torch.bfloat16, Fixed(64, 16, (0, 2)), scale=0.2, layout="bnhd")
    check(2, 2, 3001, (64, 128), torch.bfloat16, Strided(96), scale=0.2, layout="bnhd")


def test_longest_sequence_matches_torch_backend():
    """n = 262,144 (beyond the float64 reference): the kernels against the torch backend, both in bf16."""
    n, pattern = 262144, Strided(512)
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v, do = (torch.randn(1, 2, n, 64, device="cuda", generator=g).to(torch.bfloat16) for _ in range(4))
    got = kernel_attention(q, k, v, do, pattern, None)
    other = kernel_attention(q, k, v, do, pattern, None, backend="torch")
    rel = []
    for name, x, r in zip(("out", "dq", "dk", "dv"), got, other, strict=True):
        assert not torch.isnan(x).any(), f"{name} has NaN"
        rel.append(((x.float() - r.float()).abs().max() / r.float().abs().max()).item())
        assert rel[-1] < 3e-2, f"{name}: max relative difference {rel[-1]:.3e} to the torch backend"
    _log(f"{pattern!r} b=1 h=2 n={n} d=64 bfloat16: max rel diff to torch backend " + " ".join(
        f"{nm}={e:.2e}" for nm, e in zip(("out", "dq", "dk", "dv"), rel, strict=True)))


def test_deterministic_backward():
    g = torch.Generator(device="cuda").manual_seed(5)
    q, k, v, do = (torch.randn(2, 8, 16384, 64, device="cuda", generator=g).to(torch.bfloat16) for _ in range(4))
    a = kernel_attention(q, k, v, do, Fixed(128, 32, (0, 1)), None)
    b = kernel_attention(q, k, v, do, Fixed(128, 32, (0, 1)), None)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_million_tokens_fwd_bwd_fit():
    """n = 1,048,576 with 8 heads, forward and backward, without running out of memory; finite results."""
    n = 2**20
    q, k, v, do = (torch.randn(1, 8, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    torch.cuda.reset_peak_memory_stats()
    o, dq, dk, dv = kernel_attention(q, k, v, do, Strided(1024), None)
    peak = torch.cuda.max_memory_allocated() / 2**30
    for x in (o, dq, dk, dv):
        assert torch.isfinite(x).all()
    # inputs + output + 3 grads + do = 8 tensors of 1 GiB; LSE and delta are n*heads floats
    assert peak < 12, f"peak memory {peak:.1f} GiB"
    _log(f"Strided(1024) b=1 h=8 n={n} d=64 bfloat16: fwd+bwd ran, peak {peak:.2f} GiB")


def test_training_matches_torch_backend():
    """A small SparseTransformer trains the same few steps with the triton and the torch backend (bf16 autocast)."""
    model_mod = pytest.importorskip("lightning_sparse.model")
    losses = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        cfg = model_mod.SparseTransformerConfig(
            seq_len=2048, n_layer=2, n_head=4, d_model=256, pattern=Fixed(64, 16, (0, 1)), attention_backend=backend
        )
        model = model_mod.SparseTransformer(cfg).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gen = torch.Generator(device="cuda").manual_seed(1)
        data = torch.randint(0, 256, (6, 2, cfg.seq_len + 1), device="cuda", generator=gen)
        losses[backend] = []
        for step in range(6):
            x = data[step]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses[backend].append(loss.item())
    _log(f"training losses triton {losses['triton']} torch {losses['torch']}")
    for a, b in zip(losses["triton"], losses["torch"], strict=True):
        assert math.isfinite(a) and abs(a - b) <= 5e-3 * abs(b), losses
    assert len(set(losses["triton"])) > 1  # the steps changed the model
