"""GPU checks of cached sampling (``python -m pytest -m gpu tests/test_sampling_gpu.py``; skipped without CUDA).

Imports only the network, the sampler and the kernels (no jsonargparse on the GPU machine). Checked there: the
Triton decode kernel against the PyTorch decode at paper sizes, cached bf16 logits against a float64-accurate
reference within twice the error of the full bf16 forward pass, CUDA-graph replay identical to eager steps, and
cached sampling giving the same bytes as the uncached reference in float32.
"""

from __future__ import annotations

import pytest
import torch

from lightning_sparse.kernels import Dense, Fixed, HeadSplit, Interleaved, Local, Strided, StridedColumns
from lightning_sparse.kernels.decode import decode_step, decode_table
from lightning_sparse.kv_cache import KVCache
from lightning_sparse.model import SparseTransformer, SparseTransformerConfig
from lightning_sparse.sampling import sample

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PATTERNS = {
    "dense": Dense(),
    "strided": Strided(64),
    "fixed_per_head": Fixed(64, 16, (0, 1, 2, 3)),
    "head_split": HeadSplit((Local(64), StridedColumns(64))),
    "interleaved": Interleaved((Local(64), StridedColumns(64), Fixed(64, 16))),
}


def network(pattern, seq_len=1024, backend="auto", **kw) -> SparseTransformer:
    cfg = dict(seq_len=seq_len, n_layer=4, n_head=4, d_model=256, qk_ratio=0.5, pattern=pattern,
               attention_backend=backend)
    cfg.update(kw)
    torch.manual_seed(0)
    model = SparseTransformer(SparseTransformerConfig(**cfg)).cuda().eval()
    torch.nn.init.normal_(model.head.weight, std=cfg["d_model"] ** -0.5)
    return model


def cached_logits(model, x, prompt):
    cache = KVCache(model, x.shape[0], length=x.shape[1])
    outs = [model(x[:, :prompt], cache=cache)]
    for t in range(prompt, x.shape[1]):
        outs.append(model(x[:, t : t + 1], cache=cache))
    return torch.cat(outs, dim=1).float()


@pytest.mark.parametrize(
    ("pattern", "n", "heads", "d_qk", "d_v", "batch"),
    [
        (Fixed(128, 32, (0, 1, 2, 3)), 12288, 8, 64, 64, 1),  # Enwik8, one stream: split-K
        (Fixed(128, 32, (0, 1, 2, 3)), 12288, 8, 64, 64, 16),
        (Strided(96), 3072, 2, 64, 128, 16),  # CIFAR-10: half-width queries/keys
        (Strided(128), 12288, 16, 32, 32, 4),  # ImageNet 64
        (Strided(256), 65536, 16, 32, 32, 1),  # audio 65,536
        (Dense(), 4096, 4, 64, 64, 2),
    ],
)
def test_triton_decode_matches_pytorch_decode_at_paper_sizes(pattern, n, heads, d_qk, d_v, batch):
    from lightning_sparse.kernels.decode_triton import triton_decode_step

    gen = torch.Generator(device="cuda").manual_seed(0)
    table = decode_table(pattern, n, heads, "cuda")
    k = torch.randn(batch, heads, n, d_qk, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(batch, heads, n, d_v, device="cuda", generator=gen, dtype=torch.bfloat16)
    for t in (0, 1, 127, 128, n // 2 + 3, n - 1):
        q, k_new = (torch.randn(batch, heads, 1, d_qk, device="cuda", generator=gen, dtype=torch.bfloat16)
                    for _ in range(2))  # fmt: skip
        v_new = torch.randn(batch, heads, 1, d_v, device="cuda", generator=gen, dtype=torch.bfloat16)
        position = torch.tensor([t], device="cuda")
        k_ref, v_ref = k.double(), v.double()
        ref = decode_step(q.double(), k_new.double(), v_new.double(), k_ref, v_ref, table, position, d_qk**-0.5)
        k_plain, v_plain = k.clone(), v.clone()
        plain = decode_step(q, k_new, v_new, k_plain, v_plain, table, position, d_qk**-0.5).double()  # bf16 ops
        out = triton_decode_step(q, k_new, v_new, k, v, table, position, d_qk**-0.5).double()
        err, plain_err = (out - ref).abs().max().item(), (plain - ref).abs().max().item()
        assert err <= 2 * plain_err + 1e-3, (t, err, plain_err)
        assert torch.equal(k, k_plain) and torch.equal(v, v_plain)  # the kernel wrote the step's row


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("prompt", [1, 100, 700])
def test_cached_bf16_logits_are_as_accurate_as_the_full_forward_pass(name, prompt):
    model = network(PATTERNS[name])
    x = torch.randint(0, 256, (2, 1024), device="cuda")
    with torch.no_grad():
        model.config.attention_backend = "torch"  # a float32 reference on the same weights
        for block in model.blocks:
            block.attn.backend = "torch"
        ref = model(x).float()
        model.config.attention_backend = "auto"
        for block in model.blocks:
            block.attn.backend = "auto"
        with torch.autocast("cuda", dtype=torch.bfloat16):
            full = model(x).float()
            cached = cached_logits(model, x, prompt)
    err, full_err = (cached - ref).abs().max().item(), (full - ref).abs().max().item()
    assert err <= 2 * full_err + 1e-2, (err, full_err)


@pytest.mark.parametrize("bf16", [False, True])
def test_cuda_graph_steps_give_the_eager_logits(bf16):
    from lightning_sparse.sampling import _GraphStep

    model = network(Fixed(64, 16, (0, 1, 2, 3)))
    x = torch.randint(0, 256, (3, 300), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        eager = cached_logits(model, x, 37)[:, 37:]
        cache = KVCache(model, 3, length=300)
        model(x[:, :37], cache=cache)
        step = _GraphStep(model, cache, x[:, 37:38])
        graph = torch.stack([step(x[:, t : t + 1]).clone() for t in range(37, 300)], dim=1)
    tol = 3e-2 if bf16 else 1e-4
    torch.testing.assert_close(graph, eager, atol=tol, rtol=tol)


def test_cuda_graph_sampling_gives_the_eager_bytes_in_float32():
    model = network(Fixed(64, 16, (0, 1, 2, 3)))
    prompt = torch.randint(0, 256, (3, 37), device="cuda")
    graph = sample(model, prompt, 300, generator=torch.Generator("cuda").manual_seed(5), cuda_graph=True)
    eager = sample(model, prompt, 300, generator=torch.Generator("cuda").manual_seed(5), cuda_graph=False)
    assert torch.equal(graph, eager)
    assert len(set(graph.flatten().tolist())) > 50


@pytest.mark.parametrize("name", ["strided", "fixed_per_head", "interleaved"])
def test_cached_sampling_gives_the_uncached_bytes_in_float32(name):
    model = network(PATTERNS[name], seq_len=256)
    prompt = torch.randint(0, 256, (2, 9), device="cuda")
    a = sample(model, prompt, 200, generator=torch.Generator("cuda").manual_seed(3))
    b = sample(model, prompt, 200, generator=torch.Generator("cuda").manual_seed(3), cache=False)
    assert torch.equal(a, b)
