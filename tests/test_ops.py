"""The Triton kernels as custom operators (``torch.ops.lightning_sparse``): fake tensors, opcheck, torch.compile of a
whole residual block, selective activation checkpointing.

Kernel runs need ``TRITON_INTERPRET=1`` set before triton is imported, so they run in a child pytest process
(``test_ops_under_interpreter``), as in ``test_attention_triton.py``. Fake-tensor shapes, pattern keys and the
compiled block on the torch backend run in the parent. Compile tests are few and tiny: CPU Inductor is slow.
"""

from __future__ import annotations

import functools

import pytest
import torch
from interpreter_child import in_child, in_parent, parent_only, run_under_interpreter
from torch._subclasses.fake_tensor import FakeTensorMode

from lightning_sparse.kernels import (
    Dense,
    Fixed,
    FixedSummary,
    HeadSplit,
    Local,
    Strided,
    StridedColumns,
    sparse_attention,
    sparse_attention_qkv,
    split_qkv,
)
from lightning_sparse.kernels.ops import ATTENTION_OPS, pattern_from_key, pattern_key
from lightning_sparse.model import Block, SparseTransformerConfig

OPS = torch.ops.lightning_sparse


@parent_only
def test_ops_under_interpreter(tmp_path):
    """Run this file's kernel tests in a child process with TRITON_INTERPRET=1 set before triton is imported.

    Inductor gets a fresh cache folder: a compiled graph cached with another version of the ops' fake kernels would
    otherwise be reused (the cache key does not cover a custom op's fake implementation)."""
    run_under_interpreter(__file__, env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})


def inputs(b, h, n, d_qk, d_v, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, n, d_qk, generator=g).to(dtype) for _ in "qk")
    v, do = (torch.randn(b, h, n, d_v, generator=g).to(dtype) for _ in "vd")
    return q, k, v, do


def tiny_block(backend: str, pattern, recompute: bool, seed: int = 0) -> Block:
    torch.manual_seed(seed)
    cfg = SparseTransformerConfig(
        seq_len=48, n_layer=2, n_head=2, d_model=64, pattern=pattern, attention_backend=backend, recompute=recompute
    )
    return Block(cfg, 0)


def eager_and_compiled(block: Block, x: torch.Tensor):
    """Output and parameter + input gradients of ``block`` eager, then of ``torch.compile(block, fullgraph=True)``."""
    results = []
    for fn in (block, torch.compile(block, fullgraph=True)):
        xx = x.clone().requires_grad_()
        out = fn(xx)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach(), xx.grad, *(p.grad.clone() for p in block.parameters())])
        block.zero_grad(set_to_none=True)
    return results


# ---------------------------------------------------------------- parent-process tests


@in_parent
@pytest.mark.parametrize(
    "pattern",
    [Dense(), Strided(8), Fixed(16, 4, (0, 1, 3)), HeadSplit((Local(8), StridedColumns(8, include_self=False))),
     FixedSummary(16, 4, (0, 2), previous_blocks_only=True)],
    ids=repr,
)
def test_pattern_keys_parse_back_to_equal_patterns(pattern):
    key = pattern_key(pattern)
    assert key == repr(pattern)
    assert pattern_from_key(key) is pattern  # the object recorded by pattern_key
    from lightning_sparse.kernels import ops

    assert ops._build(__import__("ast").parse(key, mode="eval").body) == pattern  # a key never seen parses back


@in_parent
@pytest.mark.parametrize("key", ["__import__('os').system('true')", "Strided(stride=open('x'))", "Pattern()", "Strided("])
def test_pattern_keys_refuse_anything_but_pattern_literals(key):
    with pytest.raises(ValueError, match="names no lightning_sparse.kernels pattern"):
        pattern_from_key(key)


@in_parent
def test_fake_tensors_propagate_shapes_and_dtypes():
    key = pattern_key(Strided(8))
    with FakeTensorMode():
        q, k, v, _ = (torch.empty(2, 4, 100, w, dtype=torch.bfloat16) for w in (32, 32, 64, 64))
        out, lse = OPS.attention_forward(q, k, v, key, 0.125)
        assert out.shape == (2, 4, 100, 64) and out.dtype == torch.bfloat16
        assert lse.shape == (2, 4, 100) and lse.dtype == torch.float32
        dq, dk, dv = OPS.attention_backward(q, k, v, out, lse, torch.empty_like(out), key, 0.125)
        assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
        assert dq.is_contiguous() and out.transpose(1, 2).is_contiguous()  # out is stored [b, n, h, d_v]
        assert dq.dtype == dk.dtype == dv.dtype == torch.bfloat16
        qkv = torch.empty(2, 100, 4 * (32 + 32 + 64), dtype=torch.bfloat16)
        out, lse = OPS.attention_qkv_forward(qkv, 4, 32, key, 0.125)
        assert out.shape == (2, 100, 4 * 64) and out.is_contiguous() and lse.shape == (2, 4, 100)
        grad = OPS.attention_qkv_backward(qkv, out, lse, torch.empty_like(out), 4, 32, key, 0.125)
        assert grad.shape == qkv.shape and grad.is_contiguous() and grad.dtype == torch.bfloat16


@in_parent
@pytest.mark.parametrize(("width", "heads", "d_qk"), [(101, 4, 8), (96, 0, 8), (96, 4, 12)])
def test_split_qkv_names_the_rule(width, heads, d_qk):
    with pytest.raises(ValueError, match="heads·\\(2·d_qk \\+ d_v\\)"):
        split_qkv(torch.zeros(1, 5, width), heads, d_qk)


@in_parent
def test_packed_attention_equals_split_attention_on_the_torch_backend():
    """sparse_attention_qkv = split the projection, attend, merge the heads (values and the gradient of qkv)."""
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 40, 3 * (16 + 16 + 24), generator=g, requires_grad=True)
    grad = torch.randn(2, 40, 3 * 24, generator=g)
    pattern = Fixed(8, 2, (0, 1, 2))
    packed = sparse_attention_qkv(qkv, 3, 16, pattern, backend="torch")
    (g_packed,) = torch.autograd.grad(packed, qkv, grad)
    q, k, v = split_qkv(qkv, 3, 16)
    split = sparse_attention(q, k, v, pattern, backend="reference").transpose(1, 2).reshape(2, 40, 72)
    (g_split,) = torch.autograd.grad(split, qkv, grad)
    torch.testing.assert_close(packed, split, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_packed, g_split, rtol=1e-5, atol=1e-6)


@in_parent
def test_triton_backend_checks_only_its_own_rules():
    """Head widths, dtypes and the device are the triton backend's; shapes were checked once by sparse_attention."""

    q, v = torch.zeros(1, 2, 16, 32), torch.zeros(1, 2, 16, 48)
    with pytest.raises(ValueError, match=r"value head_dim=48"):
        sparse_attention(q, q, v, Strided(4), backend="triton")


@in_parent
def test_compiled_block_on_the_torch_backend_matches_eager():
    """fullgraph=True: a whole residual block (norms, projections, attention, feed-forward) with no graph break."""
    torch._dynamo.reset()
    block = tiny_block("torch", Strided(8), recompute=False)
    x = torch.randn(2, 48, 64)
    eager, compiled = eager_and_compiled(block, x)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- kernel tests (child process)


@in_child
@pytest.mark.parametrize(
    ("pattern", "d_v"), [(Strided(8), 32), (Fixed(16, 4, (0, 1)), 32)], ids=["strided", "fixed_per_head"]
)
def test_opcheck(pattern, d_v):
    """Schema, fake-tensor, autograd-registration and AOT-dispatch checks of torch.library on both ops."""
    q, k, v, do = inputs(1, 2, 40, 32, d_v, seed=1)
    key = pattern_key(pattern)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(OPS.attention_forward, (q, k, v, key, 0.2))
    out, lse = OPS.attention_forward(q.detach(), k.detach(), v.detach(), key, 0.2)
    torch.library.opcheck(OPS.attention_backward, (q.detach(), k.detach(), v.detach(), out, lse, do, key, 0.2))
    qkv = torch.cat([t.detach().transpose(1, 2).flatten(2) for t in (q, k, v)], dim=-1).requires_grad_()
    torch.library.opcheck(OPS.attention_qkv_forward, (qkv, 2, 32, key, 0.2))
    out, lse = OPS.attention_qkv_forward(qkv.detach(), 2, 32, key, 0.2)
    do = do.transpose(1, 2).flatten(2)
    torch.library.opcheck(OPS.attention_qkv_backward, (qkv.detach(), out, lse, do, 2, 32, key, 0.2))


@in_child
@pytest.mark.parametrize(
    ("pattern", "d_qk", "d_v", "dtype"),
    [(Strided(8), 32, 64, torch.float32), (Fixed(16, 4, (0, 1)), 64, 32, torch.float32),
     (HeadSplit((Fixed(16, 4), Strided(8))), 32, 32, torch.bfloat16)],
    ids=["strided_32_64", "fixed_per_head_64_32", "headsplit_bf16"],
)  # fmt: skip
def test_packed_op_matches_reference(pattern, d_qk, d_v, dtype):
    """The packed triton op against the O(n²) reference: merged output and the packed gradient of qkv."""
    heads, b, n = 2, 2, 56
    g = torch.Generator().manual_seed(d_qk + d_v)
    qkv = torch.randn(b, n, heads * (2 * d_qk + d_v), generator=g).to(dtype).requires_grad_()
    grad = torch.randn(b, n, heads * d_v, generator=g).to(dtype)
    results = []
    for backend in ("triton", "reference"):
        out = sparse_attention_qkv(qkv, heads, d_qk, pattern, backend=backend)
        results.append((out, *torch.autograd.grad(out, qkv, grad)))
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    for got, want in zip(*results, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got.float(), want.float(), **tol)


@in_child
def test_selective_checkpointing_saves_the_attention_output():
    """A policy naming ATTENTION_OPS keeps the op's output: the forward kernels run once, not again in backward."""
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    from lightning_sparse.kernels import triton_backend

    calls = []
    forward = triton_backend._forward

    def counted(*args):
        calls.append(1)
        return forward(*args)

    def save_attention(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    def branch(q, k, v):
        return sparse_attention(q.sin(), k, v, Strided(8), backend="triton").cos()

    q, k, v, do = inputs(1, 2, 40, 32, 32, seed=2)
    grads, counts = [], []
    sac = functools.partial(create_selective_checkpoint_contexts, save_attention)
    triton_backend._forward = counted
    try:
        for run in (branch, lambda *a: checkpoint(branch, *a, use_reentrant=False),
                    lambda *a: checkpoint(branch, *a, use_reentrant=False, context_fn=sac)):
            calls.clear()
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            (run(*leaves) * do).sum().backward()
            grads.append([t.grad for t in leaves])
            counts.append(len(calls))
    finally:
        triton_backend._forward = forward
    assert counts == [1, 2, 1]  # plain: once; checkpoint: recomputed; selective checkpoint: saved
    for g in grads[1:]:
        for a, b in zip(grads[0], g, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@in_child
def test_compiled_block_with_triton_ops_matches_eager():
    """fullgraph=True around the opaque ops, recomputation (torch.utils.checkpoint) inside the compiled block."""
    torch._dynamo.reset()
    block = tiny_block("triton", Fixed(16, 4, (0, 1)), recompute=True)
    x = torch.randn(2, 48, 64)
    eager, compiled = eager_and_compiled(block, x)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@in_child
def test_compiled_with_dynamic_lengths():
    """dynamic=True: symbolic sequence lengths pass validation and reach the op (one graph for every n)."""
    torch._dynamo.reset()
    pattern = Strided(8)
    fn = torch.compile(lambda q, k, v: sparse_attention(q, k, v, pattern, backend="triton"), dynamic=True, fullgraph=True)
    for n in (40, 57):
        q, k, v, _ = inputs(2, 2, n, 32, 32, seed=n)
        torch.testing.assert_close(fn(q, k, v), sparse_attention(q, k, v, pattern, backend="reference"))
