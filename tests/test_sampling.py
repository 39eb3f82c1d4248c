"""Sampling: decode tables against the masks, cached logits against full forward passes, cached against uncached
bytes, the context limit, and the Triton decode kernel under ``TRITON_INTERPRET=1`` (in a child process)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from interpreter_child import in_child, in_parent, parent_only, run_under_interpreter

from lightning_sparse.audio import AudioDensityModel
from lightning_sparse.image import ImageDensityModel
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
)
from lightning_sparse.kernels.decode import decode_step, decode_table
from lightning_sparse.kv_cache import KVCache
from lightning_sparse.model import START, SparseTransformer, SparseTransformerConfig
from lightning_sparse.sampling import sample


@pytest.fixture(autouse=True)
def one_thread():
    """Decoding runs many tiny ops: on a shared, oversubscribed CI machine intra-op threads only add barrier waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

PATTERNS = {
    "dense": Dense(),
    "local": Local(5),
    "strided_columns": StridedColumns(8),
    "fixed_block": FixedBlock(8),
    "fixed_summary": FixedSummary(8, 2),  # a standalone summary: queries of block 0 may see no key at all
    "strided": Strided(8),
    "fixed": Fixed(8, 2),
    "fixed_per_head_summaries": Fixed(8, 2, (0, 1, 2, 3)),
    "fixed_uneven": Fixed(8, 3),  # period lcm(8, 3) = 24
    "head_split": HeadSplit((Local(8), StridedColumns(8))),
    "head_split_mixed": HeadSplit((Fixed(8, 2, (0, 1)), Strided(4))),
    "interleaved": Interleaved((Local(8), StridedColumns(8), Fixed(8, 2, (0, 1, 2, 3)))),
}


def network(pattern, seq_len: int = 32, **overrides) -> SparseTransformer:
    """A small random network whose logits are O(1) (the zero-initialized head would make every test vacuous)."""
    kw = dict(seq_len=seq_len, n_layer=3, n_head=4, d_model=32, qk_ratio=0.5, pattern=pattern,
              attention_backend="torch")
    kw.update(overrides)
    model = SparseTransformer(SparseTransformerConfig(**kw)).eval()
    torch.nn.init.normal_(model.head.weight, std=kw["d_model"] ** -0.5)
    return model


def cached_logits(model: SparseTransformer, x: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of every position: the prompt through the prefill, then one position per decoding step."""
    cache = KVCache(model, x.shape[0], length=x.shape[1])
    outs = [model(x[:, :prompt], cache=cache)]
    for t in range(prompt, x.shape[1]):
        outs.append(model(x[:, t : t + 1], cache=cache))
    return torch.cat(outs, dim=1)


# ---------------------------------------------------------------- decode tables


@pytest.mark.parametrize("name", [k for k in PATTERNS if k != "interleaved"])
@pytest.mark.parametrize("n", [1, 7, 32, 37])
def test_decode_table_rows_are_the_mask_rows(name, n):
    pattern = PATTERNS[name]
    try:
        pattern.check_length(n)
    except ValueError:
        pytest.skip("pattern does not serve this length")
    heads = 2 * pattern.head_groups
    table = decode_table(pattern, n, heads)
    masks = head_masks(pattern, n, heads)
    for h in range(heads):
        for t in range(n):
            assert torch.equal(table.keys(h, t), masks[h, t].nonzero()[:, 0]), (h, t)
    assert table.offsets.dtype == torch.int32 and table.offsets.shape[:2] == (heads, min(table.period, n))


def test_decode_table_width_is_the_patterns_not_n():
    n = 4096
    assert decode_table(Strided(64), n, 1).width == 64 + (n - 1) // 64  # l + n/l keys per step
    assert decode_table(Fixed(64, 16), n, 1).width == 64 + 16 * (n // 64 - 1)  # own block + earlier summaries
    assert decode_table(Local(64), n, 1).width == 64
    assert decode_table(Dense(), n, 1).width == n


@dataclass(frozen=True)
class FirstKeys(Pattern):
    """Not periodic: every query sees the first ``count`` positions only."""

    count: int

    def _allowed(self, i, j):
        return (j <= i) & (j < self.count)


def test_a_pattern_that_is_not_periodic_is_refused():
    with pytest.raises(ValueError, match="not periodic .* cache=False"):
        decode_table(FirstKeys(4), 32, 1)


# ---------------------------------------------------------------- cached logits = full forward


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("prompt", [1, 5, 19])  # one position, part of a block, several blocks
def test_cached_logits_equal_a_full_forward_pass(name, prompt):
    torch.manual_seed(0)
    model = network(PATTERNS[name], seq_len=40 if name != "fixed_uneven" else 48)
    x = torch.randint(0, 256, (2, model.config.seq_len))
    with torch.no_grad():
        full = model(x)
        cached = cached_logits(model, x, prompt)
    assert full.abs().max() > 0.1  # the comparison is not vacuous
    assert (cached - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("length", [12, 27])
def test_a_cache_shorter_than_seq_len_gives_the_same_logits(length):
    torch.manual_seed(1)
    model = network(Strided(8), seq_len=32)
    x = torch.randint(0, 256, (3, length))
    with torch.no_grad():
        assert (cached_logits(model, x, 4) - model(x)).abs().max().item() <= 1e-5


def test_image_network_with_a_start_token_and_audio_network_decode_exactly():
    torch.manual_seed(2)
    image = ImageDensityModel(image_shape=(4, 4, 3), n_layer=2, n_head=2, d_model=32, qk_ratio=0.5,
                              attention_backend="torch")
    audio = AudioDensityModel(seq_len=64, n_layer=2, n_head=2, d_model=32, attention_backend="torch")
    for module, first in ((image, START), (audio, None)):
        module.configure_model()
        model = module.model.eval()
        torch.nn.init.normal_(model.head.weight, std=32**-0.5)
        x = torch.randint(0, 256, (2, module.config.seq_len))
        if first is not None:
            x[:, 0] = first
        with torch.no_grad():
            assert (cached_logits(model, x, 1) - model(x)).abs().max().item() <= 1e-5


def test_decoding_never_reallocates_the_cache():
    model = network(Fixed(8, 2))
    cache = KVCache(model, 2)
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 3)), cache=cache)
        pointers = [(layer.k.data_ptr(), layer.v.data_ptr()) for layer in cache.layers]
        for _ in range(10):
            model(torch.randint(0, 256, (2, 1)), cache=cache)
    assert [(layer.k.data_ptr(), layer.v.data_ptr()) for layer in cache.layers] == pointers
    assert cache.position.item() == 13
    assert cache.layers[0].k.shape == (2, 4, 32, 4) and cache.layers[0].v.shape == (2, 4, 32, 8)  # d_qk, d_v


def test_cache_misuse_raises_with_the_rule():
    model = network(Strided(8))
    cache = KVCache(model, 2, length=8)
    with torch.no_grad(), pytest.raises(ValueError, match="does not fit a cache of length 8"):
        model(torch.randint(0, 256, (2, 9)), cache=cache)
    with pytest.raises(ValueError, match=r"length must be an integer in \[1, seq_len=32\]"):
        KVCache(model, 2, length=33)
    cache = KVCache(model, 2)
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 3)), cache=cache)
        with pytest.raises(ValueError, match="one position"):
            model(torch.randint(0, 256, (2, 2)), cache=cache)
        with pytest.raises(ValueError, match="built for batch 2"):
            model(torch.randint(0, 256, (1, 1)), cache=cache)


# ---------------------------------------------------------------- sample()


@pytest.mark.parametrize("name", ["dense", "strided", "fixed_per_head_summaries", "interleaved"])
def test_cached_and_uncached_sampling_give_the_same_bytes(name):
    torch.manual_seed(3)
    model = network(PATTERNS[name])
    prompt = torch.randint(0, 256, (3, 5))
    a = sample(model, prompt, 28, generator=torch.Generator().manual_seed(7))  # 5 + 28 - 1 = 32 = seq_len
    b = sample(model, prompt, 28, generator=torch.Generator().manual_seed(7), cache=False)
    assert a.shape == (3, 28) and torch.equal(a, b)
    assert len(set(a.flatten().tolist())) > 10  # really sampled from a spread distribution


def test_image_samples_from_the_start_token_match_the_reference_sampler():
    torch.manual_seed(4)
    module = ImageDensityModel(image_shape=(4, 4, 3), n_layer=2, n_head=2, d_model=32, attention_backend="torch")
    module.configure_model()
    torch.nn.init.normal_(module.model.head.weight, std=32**-0.5)
    start = torch.full((2, 1), START)
    a = sample(module.model, start, 48, generator=torch.Generator().manual_seed(0))  # a whole image
    b = sample(module.model, start, 48, generator=torch.Generator().manual_seed(0), cache=False)
    assert a.shape == (2, 48) and torch.equal(a, b)


@pytest.mark.parametrize("cache", [True, False])
def test_sampling_shapes_determinism_mode_and_the_context_limit(cache):
    torch.manual_seed(0)
    model = network(Fixed(8, 2), dropout=0.1).train()
    prompt = torch.randint(0, 256, (2, 5))
    a = sample(model, prompt, 20, generator=torch.Generator().manual_seed(7), cache=cache)
    b = sample(model, prompt, 20, generator=torch.Generator().manual_seed(7), cache=cache)
    assert a.shape == (2, 20) and a.dtype == torch.long and 0 <= a.min() and a.max() < 256
    assert torch.equal(a, b)
    assert model.training  # mode restored
    assert sample(model, prompt, 0, cache=cache).shape == (2, 0)
    assert sample(model, prompt, 28, cache=cache).shape == (2, 28)  # the last input is position 31
    with pytest.raises(ValueError, match="need 33 input positions.* seq_len=32; ask for at most length=28"):
        sample(model, prompt, 29, cache=cache)
    with pytest.raises(ValueError, match="temperature"):
        sample(model, prompt, 4, temperature=0.0, cache=cache)
    with pytest.raises(ValueError, match="prompt"):
        sample(model, torch.zeros(2, 0, dtype=torch.long), 4, cache=cache)
    counted = []
    sample(model, prompt, 6, cache=cache, progress=counted.append)
    assert sum(counted) == 6


def test_sampling_follows_the_model_distribution():
    """A model rigged to put all mass on one byte after a given context must sample exactly that."""
    model = network(Fixed(8, 2), start_token=True)
    with torch.no_grad():
        model.norm.weight.zero_()
        model.norm.bias.fill_(1.0)
        model.head.weight.zero_()
        model.head.weight[65] = 100.0
    for cache in (True, False):
        out = sample(model, torch.tensor([[START]]), 32, generator=torch.Generator().manual_seed(0), cache=cache)
        assert torch.equal(out, torch.full((1, 32), 65))


def test_cuda_graph_needs_cuda():
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        sample(network(Dense()), torch.zeros(1, 1, dtype=torch.long), 2, cuda_graph=True)


# ---------------------------------------------------------------- the Triton decode kernel (interpreter)


@parent_only
def test_decode_kernel_under_interpreter():
    """Run this file's kernel tests in a child process with TRITON_INTERPRET=1 set before triton is imported."""
    run_under_interpreter(__file__, "-k", "triton_decode")


KERNEL_CASES = [  # pattern, n, heads, d_qk, d_v, splits
    (Strided(8), 37, 2, 16, 32, 1),
    (Fixed(8, 2, (0, 1, 2, 3)), 40, 4, 8, 24, 3),  # per-head summaries, a non-power-of-2 value width, split-K
    (FixedSummary(8, 2), 24, 2, 16, 16, 2),  # queries that see no key
    (HeadSplit((Local(8), StridedColumns(8))), 33, 2, 32, 32, None),
    (Dense(), 150, 1, 16, 16, 2),  # 150 keys: tiles past the position are masked out
]


@in_child
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(KERNEL_CASES)))
def test_triton_decode_matches_the_pytorch_decode(case, dtype):
    from lightning_sparse.kernels.decode_triton import triton_decode_step

    pattern, n, heads, d_qk, d_v, splits = KERNEL_CASES[case]
    gen = torch.Generator().manual_seed(case)
    table = decode_table(pattern, n, heads)
    b = 2
    k_ref = torch.randn(b, heads, n, d_qk, generator=gen).to(dtype)
    v_ref = torch.randn(b, heads, n, d_v, generator=gen).to(dtype)
    k_cache, v_cache = k_ref.clone(), v_ref.clone()
    for t in sorted({0, 1, 7, 8, 9, n // 2, n - 1}):
        q = torch.randn(b, heads, 1, d_qk, generator=gen).to(dtype)
        k_new = torch.randn(b, heads, 1, d_qk, generator=gen).to(dtype)  # differs from the cache's stale row t
        v_new = torch.randn(b, heads, 1, d_v, generator=gen).to(dtype)
        position = torch.tensor([t])
        ref = decode_step(q, k_new, v_new, k_ref, v_ref, table, position, scale=d_qk**-0.5).float()
        out = triton_decode_step(
            q, k_new, v_new, k_cache, v_cache, table, position, scale=d_qk**-0.5, splits=splits, block_k=16
        )
        assert out.shape == (b, heads, 1, d_v) and out.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)  # the kernel wrote row t, nothing else


@in_parent
def test_cached_sampling_on_the_cpu_needs_no_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from lightning_sparse.kernels import Strided\n"
        "from lightning_sparse.model import SparseTransformer, SparseTransformerConfig\n"
        "from lightning_sparse.sampling import sample\n"
        "cfg = SparseTransformerConfig(seq_len=32, n_layer=1, n_head=2, d_model=16, pattern=Strided(8))\n"
        "out = sample(SparseTransformer(cfg), torch.zeros(2, 3, dtype=torch.long), 20)\n"
        "print('sampled', tuple(out.shape))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "sampled (2, 20)" in res.stdout
