"""SparseTransformer: shapes, causality for every pattern kind, initialization, meta-device init, recomputation."""

import math

import pytest
import torch

from lightning_sparse.kernels import (
    Dense,
    Fixed,
    FixedBlock,
    FixedSummary,
    HeadSplit,
    Interleaved,
    Local,
    Strided,
    StridedColumns,
)
from lightning_sparse.model import (
    PositionEmbedding,
    SparseTransformer,
    SparseTransformerConfig,
    default_position_shape,
    quick_gelu,
)


def tiny(**overrides) -> SparseTransformerConfig:
    kw = dict(seq_len=32, n_layer=2, n_head=4, d_model=32, pattern=Fixed(8, 2))
    kw.update(overrides)
    return SparseTransformerConfig(**kw)


def with_random_head(model: SparseTransformer) -> SparseTransformer:
    """The logits matrix starts at zero (every output equal), which would make dependence tests vacuous."""
    torch.nn.init.normal_(model.head.weight, std=1.0)
    return model


def test_output_shape_and_uniform_start():
    model = SparseTransformer(tiny())
    x = torch.randint(0, 256, (3, 32))
    logits = model(x)
    assert logits.shape == (3, 32, 256)
    # Zero-initialized logits: an untrained model predicts the uniform distribution, exactly 8 bits per byte.
    assert torch.equal(logits, torch.zeros_like(logits))
    assert model(x[:, :20]).shape == (3, 20, 256)  # shorter inputs use the first position embeddings
    with pytest.raises(ValueError, match="seq_len=32"):
        model(torch.randint(0, 256, (1, 33)))
    with pytest.raises(ValueError, match="integer ids"):
        model(torch.rand(1, 8))


PATTERNS = {
    "dense": Dense(),
    "local": Local(5),
    "strided": Strided(8),
    "strided_columns": StridedColumns(8),
    "fixed": Fixed(8, 2),
    "fixed_per_head_summaries": Fixed(8, 2, (0, 1)),
    "fixed_block": FixedBlock(8),
    "head_split": HeadSplit((Local(8), StridedColumns(8))),
    "interleaved": Interleaved((Local(8), StridedColumns(8), Fixed(8, 2))),
    # The fixed components split across heads: early queries of the summary head see no key at all. The reference
    # backend returns NaN for such rows (softmax over nothing), so this one runs on the torch backend only.
    "fixed_components_split": HeadSplit((FixedBlock(8), FixedSummary(8, 3))),
}
CASES = [(name, backend) for name in PATTERNS for backend in ("reference", "torch")]
CASES.remove(("fixed_components_split", "reference"))


@pytest.mark.parametrize("name, backend", CASES)
def test_changing_a_future_byte_never_changes_earlier_logits(name, backend):
    torch.manual_seed(hash(name) % 1000)
    model = with_random_head(
        SparseTransformer(tiny(seq_len=40, n_layer=3, pattern=PATTERNS[name], attention_backend=backend))
    ).eval()
    x = torch.randint(0, 256, (2, 40))
    base = model(x)
    for t in (0, 7, 8, 23, 39):
        y = x.clone()
        y[:, t] = (y[:, t] + 1 + torch.randint(0, 254, (2,))) % 256  # a different byte at position t
        out = model(y)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, t], base[:, t])  # the changed byte is seen at its own position


def test_interleaved_schedule_gives_block_r_pattern_r():
    schedule = Interleaved((Local(4), StridedColumns(4)))
    model = SparseTransformer(tiny(n_layer=5, pattern=schedule))
    assert [b.attn.pattern for b in model.blocks] == [schedule.layer(r) for r in range(5)]


def test_widths_follow_ff_mult_and_qk_ratio():
    model = SparseTransformer(tiny(d_model=64, ff_mult=2.0, qk_ratio=0.5, n_head=4))
    attn, ff = model.blocks[0].attn, model.blocks[0].ff
    assert attn.qkv.weight.shape == (2 * 32 + 64, 64)  # q and k halved, v full width
    assert ff.fc1.weight.shape == (128, 64) and ff.fc2.weight.shape == (64, 128)
    with_random_head(model)(torch.randint(0, 256, (1, 32))).sum().backward()  # narrow q/k heads, both ways
    assert attn.qkv.weight.grad.abs().sum() > 0


def test_half_width_queries_match_explicit_attention():
    """qk_ratio=0.5: q·k over the narrow heads, scaled by 1/√(narrow width), applied to full-width values."""
    torch.manual_seed(0)
    cfg = tiny(n_layer=1, n_head=2, d_model=16, qk_ratio=0.5, pattern=Dense(), attention_backend="reference")
    attn = SparseTransformer(cfg).blocks[0].attn
    x = torch.randn(1, 32, 16)
    q, k, v = attn.qkv(x).split([8, 8, 16], dim=-1)
    q, k, v = (t.view(1, 32, 2, -1).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(4)
    scores = scores.masked_fill(~Dense().mask(32), float("-inf"))
    expected = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 32, 16))
    torch.testing.assert_close(attn(x), expected)


def test_attention_gets_unpadded_query_key_and_value_widths(monkeypatch):
    """qk_ratio=0.5: attention sees q, k of head width 4 and v of 8 (no zero padding), on every backend."""
    import lightning_sparse.model as model_module
    from lightning_sparse.kernels import sparse_attention_qkv, split_qkv

    seen = []

    def spy(qkv, heads, d_qk, pattern, **kw):
        seen.append((*(t.shape for t in split_qkv(qkv, heads, d_qk)), kw["scale"]))
        return sparse_attention_qkv(qkv, heads, d_qk, pattern, **kw)

    monkeypatch.setattr(model_module, "sparse_attention_qkv", spy)
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 32))
    outs = []
    for backend in ("reference", "torch"):
        torch.manual_seed(0)
        cfg = tiny(n_layer=1, n_head=2, d_model=16, qk_ratio=0.5, pattern=Strided(8), attention_backend=backend)
        outs.append(with_random_head(SparseTransformer(cfg))(x))
    assert seen[0] == ((2, 2, 32, 4), (2, 2, 32, 4), (2, 2, 32, 8), 0.5)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_position_embeddings_are_factorized_sums():
    emb = PositionEmbedding((3, 4, 2), d_model=5)
    a0, a1, a2 = emb.tables()
    out = emb(24)
    for i in range(24):
        r, c, ch = i // 8, (i // 2) % 4, i % 2
        torch.testing.assert_close(out[i], a0[r] + a1[c] + a2[ch])
    assert emb(10).shape == (10, 5)


def test_default_position_shape_uses_the_pattern_stride():
    assert default_position_shape(64, Fixed(8, 2)) == (8, 8)
    assert default_position_shape(64, Strided(16)) == (4, 16)
    assert default_position_shape(64, Interleaved((Local(8), StridedColumns(8)))) == (8, 8)
    assert default_position_shape(64, HeadSplit((Local(4), StridedColumns(4)))) == (16, 4)
    assert default_position_shape(64, Dense()) == (64,)
    assert default_position_shape(60, Strided(8)) == (60,)  # stride does not divide: one axis
    assert tiny(seq_len=48, pattern=Strided(8)).position_shape == (6, 8)
    assert tiny(seq_len=48, position_shape=(4, 4, 3)).position_shape == (4, 4, 3)


def test_quick_gelu():
    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(quick_gelu(x), x * torch.sigmoid(1.702 * x))
    assert torch.allclose(quick_gelu(x), torch.nn.functional.gelu(x), atol=0.03)  # it approximates GELU


def check_init(model: SparseTransformer) -> None:
    cfg = model.config
    d, d_ff, n = cfg.d_model, cfg.d_ff, cfg.n_layer

    def close_std(t: torch.Tensor, std: float) -> None:
        tol = 5 / math.sqrt(t.numel())  # five standard errors of the sample std (relative) and mean (in stds)
        assert abs(t.float().std().item() - std) < tol * std, (t.std().item(), std)
        assert abs(t.float().mean().item()) < tol * std

    close_std(model.token_emb.weight, 0.01)
    for table in model.pos_emb.tables():
        close_std(table, 0.01 / math.sqrt(len(cfg.position_shape)))
    for block in model.blocks:
        close_std(block.attn.qkv.weight, math.sqrt(0.125 / d))
        close_std(block.attn.proj.weight, math.sqrt(0.125 / d) / math.sqrt(2 * n))
        close_std(block.ff.fc1.weight, math.sqrt(0.125 / d))
        close_std(block.ff.fc2.weight, math.sqrt(0.125 / d_ff) / math.sqrt(2 * n))
        for lin in (block.attn.qkv, block.attn.proj, block.ff.fc1, block.ff.fc2):
            assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
        for ln in (block.norm_attn, block.norm_ff):
            assert torch.equal(ln.weight, torch.ones_like(ln.weight)) and torch.equal(
                ln.bias, torch.zeros_like(ln.bias)
            )
    assert model.head.bias is None and torch.equal(model.head.weight, torch.zeros_like(model.head.weight))


INIT_CONFIG = dict(seq_len=64, n_layer=4, n_head=4, d_model=128, pattern=Strided(8), start_token=True)


def test_initialization_follows_the_authors_code():
    torch.manual_seed(0)
    model = SparseTransformer(tiny(**INIT_CONFIG))
    assert model.token_emb.weight.shape == (257, 128)  # 256 bytes + the start token
    check_init(model)


def test_meta_device_init_then_reset_parameters_gives_a_sane_model():
    with torch.device("meta"):
        model = SparseTransformer(tiny(**INIT_CONFIG))
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    # As Lightning's FSDP2 materialization: every module that owns parameters resets its own.
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert callable(getattr(module, "reset_parameters", None)), type(module).__name__
            module.reset_parameters()
    check_init(model)
    with_random_head(model)
    out = model(torch.randint(0, 257, (2, 64)))
    assert torch.isfinite(out).all()
    # The root reset re-initializes everything too (fresh draws, same statistics).
    before = model.blocks[0].ff.fc1.weight.clone()
    model.reset_parameters()
    check_init(model)
    assert not torch.equal(before, model.blocks[0].ff.fc1.weight)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_recomputation_gives_identical_gradients(dropout):
    torch.manual_seed(0)
    plain = with_random_head(SparseTransformer(tiny(dropout=dropout, pattern=Strided(8), n_layer=3)))
    recomputed = SparseTransformer(tiny(dropout=dropout, pattern=Strided(8), n_layer=3, recompute=True))
    recomputed.load_state_dict(plain.state_dict())
    calls = []
    attn = recomputed.blocks[0].attn
    forward = attn.forward
    attn.forward = lambda h: calls.append(1) or forward(h)  # counts recomputations too (hooks do not run then)
    x = torch.randint(0, 256, (2, 32))
    grads = []
    for model in (plain, recomputed):
        torch.manual_seed(1)  # identical dropout masks in both runs
        torch.nn.functional.cross_entropy(model(x).reshape(-1, 256), x.roll(-1, 1).reshape(-1)).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    assert len(calls) == 2  # the forward pass, then its recomputation in backward: checkpointing is active
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=0, atol=0, msg=k)
    if dropout:
        torch.manual_seed(2)
        a = plain(x)
        torch.manual_seed(3)
        assert not torch.equal(a, plain(x))  # dropout is really on, so the masks had to match


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(seq_len=0), "seq_len must be a positive integer"),
        (dict(n_head=3), "divisible by n_head=3"),
        (dict(qk_ratio=0.3), "qk_ratio"),
        (dict(ff_mult=0.0), "ff_mult"),
        (dict(qk_ratio=0.125, n_head=8), "query/key width"),
        (dict(dropout=1.0), "dropout"),
        (dict(pattern="fixed"), "Pattern"),
        (dict(pattern=Fixed(8, 2, (0, 1, 2))), "multiple of 3"),
        (dict(position_shape=(4, 4)), "product must equal"),
        (dict(position_shape=(32, 0)), "positive integers"),
        (dict(attention_backend="cuda"), "attention_backend"),
    ],
)
def test_bad_config_raises_with_the_fix(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)


def test_compiled_density_model_shares_block_graphs_and_keeps_clean_state_dict_keys(tmp_path):
    """compile=True compiles each block in place (configure_model): one graph serves all identical blocks, and the
    state dict (what a checkpoint holds) has the uncompiled model's keys, so it loads into compile=False."""
    from torch._dynamo.utils import counters

    from lightning_sparse.text import TextDensityModel

    kw = dict(seq_len=32, n_layer=3, n_head=2, d_model=32, pattern=Strided(8), attention_backend="torch")
    compiled, plain = TextDensityModel(compile=True, **kw), TextDensityModel(**kw)
    for m in (compiled, plain):
        m.configure_model()
    assert all(block._compiled_call_impl is not None for block in compiled.model.blocks)
    torch.nn.init.normal_(compiled.model.head.weight)
    path = tmp_path / "weights.pt"
    torch.save(compiled.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert list(state) == list(plain.state_dict()) and not any("_orig_mod" in k for k in state)
    plain.load_state_dict(state)
    torch._dynamo.reset()
    counters.clear()
    x = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), plain(x), rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == 3  # one for the three blocks, the final norm, the head


def test_compile_mode_is_validated():
    from lightning_sparse.text import TextDensityModel

    with pytest.raises(ValueError, match="compile_mode must be one of"):
        TextDensityModel(seq_len=32, compile=True, compile_mode="fast")
