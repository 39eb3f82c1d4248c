"""Custom ops and torch.compile on a CUDA GPU (``pytest -m gpu tests/test_gpu_train.py``).

* ``torch.library.opcheck`` of the ``lightning_sparse`` ops (separate and packed q, k, v) on CUDA tensors;
* one residual block compiled with ``fullgraph=True`` (triton ops, and Dense on sdpa) gives the eager outputs and
  gradients within bf16 tolerance;
* a small model trained 20 steps eager and with per-block ``torch.compile`` (recomputation inside the compiled
  blocks, fused AdamW, bf16 autocast), also with CUDA graphs (``mode="reduce-overhead"``), gives the same losses
  within bf16 tolerance;
* the sdpa backend with separate query/key and value widths (padded for FlashAttention) against the reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_sparse.kernels import Dense, Fixed, Strided, sparse_attention
from lightning_sparse.model import Block, SparseTransformer, SparseTransformerConfig, compile_blocks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _config(pattern, backend: str, **kw) -> SparseTransformerConfig:
    args = dict(seq_len=1024, n_layer=2, n_head=4, d_model=256, pattern=pattern, attention_backend=backend)
    args.update(kw)
    return SparseTransformerConfig(**args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("pattern", [Strided(32), Fixed(64, 16, (0, 1))], ids=repr)
def test_opcheck_on_cuda(pattern, dtype):
    from lightning_sparse.kernels.ops import pattern_key

    ops = torch.ops.lightning_sparse
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(2, 4, 300, 64, device="cuda", generator=g).to(dtype) for _ in range(4))
    key = pattern_key(pattern)
    torch.library.opcheck(ops.attention_forward, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), key, 0.125))
    out, lse = ops.attention_forward(q.detach(), k.detach(), v.detach(), key, 0.125)
    torch.library.opcheck(ops.attention_backward, (q.detach(), k.detach(), v.detach(), out, lse, do, key, 0.125))
    qkv = torch.randn(2, 300, 4 * (32 + 32 + 64), device="cuda", generator=g).to(dtype)  # the model's packed form
    torch.library.opcheck(ops.attention_qkv_forward, (qkv.clone().requires_grad_(), 4, 32, key, 0.125))
    out, lse = ops.attention_qkv_forward(qkv, 4, 32, key, 0.125)
    do = torch.randn_like(out)
    torch.library.opcheck(ops.attention_qkv_backward, (qkv, out, lse, do, 4, 32, key, 0.125))


def _block_results(block, x, compiled: bool):
    fn = torch.compile(block, fullgraph=True) if compiled else block
    xx = x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fn(xx)
    out.float().pow(2).mean().backward()
    res = [out.detach().float(), xx.grad.float(), *(p.grad.float().clone() for p in block.parameters())]
    block.zero_grad(set_to_none=True)
    return res


@pytest.mark.parametrize(
    ("pattern", "backend", "qk_ratio"),
    [(Strided(64), "triton", 1.0), (Fixed(64, 16, (0, 1)), "triton", 1.0), (Strided(64), "triton", 0.5),
     (Dense(), "sdpa", 0.5)],
    ids=["strided", "fixed", "strided-half-qk", "dense-sdpa-half-qk"],
)
def test_compiled_block_traces_fullgraph_and_matches_eager(pattern, backend, qk_ratio):
    torch.manual_seed(0)
    torch._dynamo.reset()
    block = Block(_config(pattern, backend, qk_ratio=qk_ratio, recompute=True), 0).cuda()
    x = torch.randn(2, 1024, 256, device="cuda")
    eager, compiled = _block_results(block, x, False), _block_results(block, x, True)
    for name, a, b in zip(["out", "dx", *(n for n, _ in block.named_parameters())], eager, compiled, strict=True):
        err = (a - b).abs().max().item() / max(a.abs().max().item(), 1e-6)
        assert err <= 2e-2, f"{name}: relative error {err:.2e}"


def _train(compiled: bool, steps: int = 20, mode: str | None = None) -> list[float]:
    torch.manual_seed(0)
    model = SparseTransformer(_config(Strided(64), "triton", n_layer=3, recompute=True)).cuda()
    if compiled:
        compile_blocks(model, mode=mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(1)
    motif = torch.randint(0, 16, (4, 64), device="cuda", generator=gen)  # 16 byte values, repeated: learnable
    losses = []
    for step in range(steps):
        x = motif[:, torch.arange(1025, device="cuda") % 64].roll(step, dims=1)
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # as DensityModel.forward does: a new step's graphs
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 256), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("mode", [None, "reduce-overhead"], ids=["default", "cudagraphs"])
def test_compiled_and_eager_training_give_the_same_losses(mode):
    torch._dynamo.reset()
    eager, compiled = _train(False), _train(True, mode=mode)
    print(f"eager {eager}\ncompiled {compiled}")
    for step, (a, b) in enumerate(zip(eager, compiled, strict=True)):
        assert math.isfinite(b) and abs(a - b) <= 2e-2 * abs(a) + 1e-3, (step, eager, compiled)
    assert eager[-1] < 0.8 * eager[0]  # the model learned something, so the comparison means something


@pytest.mark.parametrize(("d_qk", "d_v"), [(64, 128), (128, 64), (64, 64)])
def test_sdpa_separate_widths_match_reference(d_qk, d_v):
    g = torch.Generator(device="cuda").manual_seed(d_qk + d_v)
    q, k = (torch.randn(2, 2, 500, d_qk, device="cuda", generator=g, dtype=torch.bfloat16) for _ in "qk")
    v, do = (torch.randn(2, 2, 500, d_v, device="cuda", generator=g, dtype=torch.bfloat16) for _ in "vd")
    results = []
    for backend in ("sdpa", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = sparse_attention(*leaves, Dense(), scale=0.1, backend=backend)
        out.backward(do)
        results.append([out.float(), *(t.grad.float() for t in leaves)])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results, strict=True):
        assert a.shape == b.shape
        err = (a - b).abs().max().item() / b.abs().max().item()
        assert err <= 2e-2, f"{name}: relative error {err:.2e}"
