"""The Sparse Transformer network (Child et al. 2019, §5): byte embeddings → pre-norm blocks → 256-way logits.

Read top to bottom: the config, the initialized layers, the position embeddings, attention, the feed-forward
network, the residual block and the whole model. Sources named in the docstrings:

* [P]  the paper, arXiv 1904.10509 (§5.2 architecture, §5.3 embeddings, §5.4 dropout and recomputation, §6 init).
* [DA] openai/distribution_augmentation, the authors' later Sparse Transformer code. Where the paper's init
  notation is ambiguous (``N(0, 0.125/√d)``) we follow [DA]: 0.125 is a *variance* factor, std = √(0.125/d_in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_sparse.kernels import BACKENDS, Dense, Interleaved, Pattern, sparse_attention_qkv, split_qkv

if TYPE_CHECKING:  # the KV cache of incremental decoding (lightning_sparse.kv_cache), optional in every forward
    from lightning_sparse.kv_cache import KVCache, LayerCache

__all__ = [
    "VOCAB_SIZE",
    "START",
    "SparseTransformerConfig",
    "SparseTransformer",
    "compile_blocks",
    "default_position_shape",
    "quick_gelu",
]

VOCAB_SIZE = 256  # one output per byte value
START = 256  # input id of the learned start-of-sequence token (exists only when config.start_token)


def _pattern_stride(pattern: Pattern | Interleaved) -> int | None:
    """The stride (or local width) a pattern is built around, searching combined patterns; None for Dense."""
    for name in ("stride", "width"):
        if isinstance(getattr(pattern, name, None), int):
            return getattr(pattern, name)
    for inner in getattr(pattern, "patterns", ()):
        stride = _pattern_stride(inner)
        if stride is not None:
            return stride
    return None


def default_position_shape(seq_len: int, pattern: Pattern | Interleaved) -> tuple[int, ...]:
    """Factorized position shape for 1-D data [P §5.3]: (row, column) of a matrix of width = stride.

    Falls back to one axis ``(seq_len,)`` for dense attention or when the stride does not divide ``seq_len``.
    """
    stride = _pattern_stride(pattern)
    if stride is None or stride >= seq_len or seq_len % stride:
        return (seq_len,)
    return (seq_len // stride, stride)


@dataclass
class SparseTransformerConfig:
    """Hyperparameters of :class:`SparseTransformer`; validated on construction.

    Args:
        seq_len: Input length the model serves (the context), e.g. 12288 for Enwik8.
        n_layer: Number of residual blocks N.
        n_head: Attention heads per block.
        d_model: Width of the residual stream.
        ff_mult: Hidden width of the feed-forward network as a multiple of d_model (4.0; the paper's "half-size" = 2.0).
        qk_ratio: Width of the query/key projections as a multiple of d_model (1.0; 0.5 = the paper's halved QK).
        dropout: Dropout at the end of each residual branch [P §5.4]; none inside attention.
        pattern: Attention pattern of every block, or an :class:`Interleaved` schedule (block r uses ``layer(r)``).
        position_shape: Axes of the factorized learned position embeddings, product = seq_len; None derives
            ``(seq_len // stride, stride)`` from the pattern for 1-D data (see :func:`default_position_shape`).
            Images use ``(H, W, C)``.
        start_token: Add a learned start-of-sequence input token (id :data:`START` = 256) [DA].
        attention_backend: ``sparse_attention`` backend: "auto" (on CUDA sdpa for ``Dense()`` and triton for
            sparse patterns; torch elsewhere), "torch", "triton", "sdpa" (``Dense()`` only) or "reference".
        recompute: Recompute attention and feed-forward activations in the backward pass [P §5.4].
    """

    seq_len: int
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    ff_mult: float = 4.0
    qk_ratio: float = 1.0
    dropout: float = 0.0
    pattern: Pattern | Interleaved = field(default_factory=Dense)
    position_shape: tuple[int, ...] | None = None
    start_token: bool = False
    attention_backend: str = "auto"
    recompute: bool = False

    def __post_init__(self) -> None:
        for name in ("seq_len", "n_layer", "n_head", "d_model"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SparseTransformerConfig: {name} must be a positive integer, got {value!r}.")
        if self.d_model % self.n_head:
            raise ValueError(
                f"SparseTransformerConfig: d_model={self.d_model} must be divisible by n_head={self.n_head}; "
                f"choose e.g. d_model={self.n_head * max(1, round(self.d_model / self.n_head))}."
            )
        for name, width in (("ff_mult", self.ff_mult * self.d_model), ("qk_ratio", self.qk_ratio * self.d_model)):
            if getattr(self, name) <= 0 or width != int(width):
                raise ValueError(
                    f"SparseTransformerConfig: {name}={getattr(self, name)!r} times d_model={self.d_model} must be a "
                    f"positive whole number, got {width}; pick {name} so that {name}·d_model is an integer."
                )
        if self.d_qk % self.n_head:
            raise ValueError(
                f"SparseTransformerConfig: the query/key width qk_ratio·d_model = {self.d_qk} must be divisible by "
                f"n_head={self.n_head}; change qk_ratio or n_head."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SparseTransformerConfig: dropout must be in [0, 1), got {self.dropout!r}.")
        if not isinstance(self.pattern, (Pattern, Interleaved)):
            raise ValueError(
                "SparseTransformerConfig: pattern must be a lightning_sparse.kernels Pattern or Interleaved "
                f"schedule, e.g. Fixed(stride=128, summary=32); got {self.pattern!r}."
            )
        patterns = self.pattern.patterns if isinstance(self.pattern, Interleaved) else (self.pattern,)
        for p in patterns:
            p.check_length(self.seq_len)
            if self.n_head % p.head_groups:
                raise ValueError(
                    f"SparseTransformerConfig: {p!r} has {p.head_groups} distinct per-head masks, so n_head must be "
                    f"a multiple of {p.head_groups}; got n_head={self.n_head}."
                )
        if self.position_shape is None:
            self.position_shape = default_position_shape(self.seq_len, self.pattern)
        self.position_shape = tuple(self.position_shape)
        if not self.position_shape or any(
            isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in self.position_shape
        ):
            raise ValueError(
                f"SparseTransformerConfig: position_shape must be a non-empty tuple of positive integers, got "
                f"{self.position_shape!r}; e.g. (seq_len // stride, stride) for text or (H, W, C) for images."
            )
        if math.prod(self.position_shape) != self.seq_len:
            raise ValueError(
                f"SparseTransformerConfig: position_shape={self.position_shape} covers "
                f"{math.prod(self.position_shape)} positions but seq_len={self.seq_len}; their product must equal "
                f"seq_len (or pass position_shape=None to derive it from the pattern)."
            )
        if self.attention_backend not in BACKENDS:
            raise ValueError(
                f"SparseTransformerConfig: attention_backend must be one of {BACKENDS}, got {self.attention_backend!r}."
            )

    @property
    def d_qk(self) -> int:
        """Total width of the query (and key) projection."""
        return int(self.qk_ratio * self.d_model)

    @property
    def d_ff(self) -> int:
        """Hidden width of the feed-forward network."""
        return int(self.ff_mult * self.d_model)

    def layer_pattern(self, r: int) -> Pattern:
        """Attention pattern of residual block ``r``."""
        return self.pattern.layer(r) if isinstance(self.pattern, Interleaved) else self.pattern


# ---------------------------------------------------------------------------------------------------------------
# Layers that know their own initialization. Each owns a reset_parameters() that sets only its direct parameters,
# so meta-device materialization (which calls reset_parameters module by module) reproduces the init below.
# ---------------------------------------------------------------------------------------------------------------


class Linear(nn.Linear):
    """``nn.Linear`` with weights ~ N(0, std²) and zero bias (std = 0 gives an all-zero layer)."""

    def __init__(self, d_in: int, d_out: int, std: float, bias: bool = True) -> None:
        self.std = std  # set before nn.Linear.__init__, which calls reset_parameters
        super().__init__(d_in, d_out, bias=bias)

    def reset_parameters(self) -> None:
        """Weights ~ N(0, std²), bias = 0."""
        if self.std == 0.0:
            nn.init.zeros_(self.weight)
        else:
            nn.init.normal_(self.weight, std=self.std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Embedding(nn.Embedding):
    """``nn.Embedding`` with rows ~ N(0, std²)."""

    def __init__(self, num: int, dim: int, std: float) -> None:
        self.std = std  # set before nn.Embedding.__init__, which calls reset_parameters
        super().__init__(num, dim)

    def reset_parameters(self) -> None:
        """Rows ~ N(0, std²)."""
        nn.init.normal_(self.weight, std=self.std)


class PositionEmbedding(nn.Module):
    """Learned factorized position embeddings [P §5.3]: one table per axis of ``shape``.

    Position ``i`` is unravelled row-major into coordinates ``(c_0, …, c_{k-1})`` of ``shape`` and gets
    ``Σ_a table_a[c_a]``: (row, column) of a width-``stride`` matrix for 1-D data, (row, column, channel) for
    images. Init std 0.01/√k for k tables, as [DA] (0.01/√3 for images).
    """

    def __init__(self, shape: tuple[int, ...], d_model: int) -> None:
        super().__init__()
        self.shape = tuple(shape)
        for a, size in enumerate(self.shape):
            self.register_parameter(f"axis{a}", nn.Parameter(torch.empty(size, d_model)))
        self.reset_parameters()

    def tables(self) -> list[nn.Parameter]:
        """The per-axis tables, ``[shape[a], d_model]`` each."""
        return [getattr(self, f"axis{a}") for a in range(len(self.shape))]

    def reset_parameters(self) -> None:
        """Every table ~ N(0, (0.01/√k)²) [DA]."""
        std = 0.01 / math.sqrt(len(self.shape))
        for table in self.tables():
            nn.init.normal_(table, std=std)

    def forward(self, n: int) -> torch.Tensor:
        """Embeddings of positions ``0 … n-1``, ``[n, d_model]``."""
        k = len(self.shape)
        total = 0
        for a, table in enumerate(self.tables()):
            view = [1] * k + [table.shape[-1]]
            view[a] = self.shape[a]
            total = total + table.view(view)  # broadcasts to [*shape, d_model]
        return total.reshape(-1, total.shape[-1])[:n]


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU approximation ``x·sigmoid(1.702x)`` [P §5.2; DA 'quick_gelu']."""
    return x * torch.sigmoid(1.702 * x)


# ---------------------------------------------------------------------------------------------------------------
# The residual block
# ---------------------------------------------------------------------------------------------------------------


class SparseSelfAttention(nn.Module):
    """Multi-head causal self-attention restricted to one pattern, through ``kernels.sparse_attention_qkv``.

    Query/key heads have width ``d_qk / n_head`` (``qk_ratio``), value heads ``d_model / n_head``, passed to
    ``sparse_attention`` as they are (no padding); scores are scaled by ``1/√(query head width)`` as [RC]. Init [DA]: q, k, v std √(0.125/d_model); the output
    projection W_p std √(0.125/d_model)/√(2N) [P §5.2: W_p scaled by 1/√(2N)]; zero biases.
    """

    def __init__(self, config: SparseTransformerConfig, layer: int) -> None:
        super().__init__()
        self.pattern = config.layer_pattern(layer)
        self.backend = config.attention_backend
        self.n_head = config.n_head
        self.d_qk, self.d_v = config.d_qk, config.d_model
        std = math.sqrt(0.125 / config.d_model)
        self.qkv = Linear(config.d_model, 2 * self.d_qk + self.d_v, std=std)
        self.proj = Linear(config.d_model, config.d_model, std=std / math.sqrt(2 * config.n_layer))

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x)
        head_qk = self.d_qk // self.n_head
        scale = 1.0 / math.sqrt(head_qk)
        if cache is not None:  # incremental decoding: keep k, v; one new position attends through the cache
            q, k, v = split_qkv(qkv, self.n_head, head_qk)  # [b, h, n, head] views
            if cache.decoding:
                y = cache.step(q, k, v, scale=scale)
                return self.proj(y.transpose(1, 2).reshape(b, n, self.d_v))
            cache.prefill(k, v)
        # the packed form: on the triton backend no split/merge copies, one packed gradient of the projection
        return self.proj(sparse_attention_qkv(qkv, self.n_head, head_qk, self.pattern, scale=scale,
                                              backend=self.backend))  # fmt: skip


class FeedForward(nn.Module):
    """``W2 · quick_gelu(W1 x + b1) + b2`` [P §5.2]. Init [DA]: W1 std √(0.125/d_model), W2 std √(0.125/d_ff)/√(2N)."""

    def __init__(self, config: SparseTransformerConfig) -> None:
        super().__init__()
        self.fc1 = Linear(config.d_model, config.d_ff, std=math.sqrt(0.125 / config.d_model))
        self.fc2 = Linear(
            config.d_ff, config.d_model, std=math.sqrt(0.125 / config.d_ff) / math.sqrt(2 * config.n_layer)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class Block(nn.Module):
    """One pre-norm residual block [P §5.2]:

    ``a = dropout(attn(norm(H)))``, ``b = dropout(ff(norm(H + a)))``, output ``H + a + b``. Dropout only at the
    end of each residual branch [P §5.4]. With ``recompute`` each branch runs under ``torch.utils.checkpoint``
    (non-reentrant, RNG state preserved so dropout masks are identical on recomputation): only the residual stream
    is kept, attention and feed-forward activations are recomputed in the backward pass [P §5.4].
    """

    def __init__(self, config: SparseTransformerConfig, layer: int) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(config.d_model)
        self.attn = SparseSelfAttention(config, layer)
        self.norm_ff = nn.LayerNorm(config.d_model)
        self.ff = FeedForward(config)
        self.drop = nn.Dropout(config.dropout)
        self.recompute = config.recompute

    def attention_branch(self, h: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = self.norm_attn(h)
        return self.drop(self.attn(x) if cache is None else self.attn(x, cache))

    def feed_forward_branch(self, h: torch.Tensor) -> torch.Tensor:
        return self.drop(self.ff(self.norm_ff(h)))

    def _run(self, branch, h: torch.Tensor, *args) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(branch, h, *args, use_reentrant=False)
        return branch(h, *args)

    def forward(self, h: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        h = h + self._run(self.attention_branch, h, cache)  # H + a, computed once
        return h + self._run(self.feed_forward_branch, h)


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


class SparseTransformer(nn.Module):
    """Sparse Transformer density model over bytes [P §5]: ``[batch, n]`` input ids → ``[batch, n, 256]`` logits.

    ``H_0 = token_emb(x) + pos_emb``; ``H_k = H_{k-1} + resblock_k(H_{k-1})``; ``logits = norm(H_N) W_out``.
    Token embedding std 0.01 [DA]; the output matrix is untied, bias-free [P] and zero-initialized [P §6, DA]
    (so an untrained model predicts the uniform distribution: 8 bits per byte). Input ids are bytes 0–255, plus
    :data:`START` when ``config.start_token``; ``n`` may be at most ``config.seq_len``. The model is causal:
    logits at position t depend only on inputs ``0 … t``.
    """

    def __init__(self, config: SparseTransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.token_emb = Embedding(VOCAB_SIZE + int(config.start_token), config.d_model, std=0.01)
        self.pos_emb = PositionEmbedding(config.position_shape, config.d_model)
        self.blocks = nn.ModuleList(Block(config, r) for r in range(config.n_layer))
        self.norm = nn.LayerNorm(config.d_model)
        self.head = Linear(config.d_model, VOCAB_SIZE, std=0.0, bias=False)

    def reset_parameters(self) -> None:
        """Re-initialize every parameter (each submodule's own ``reset_parameters``)."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits ``[batch, n, 256]``. With a ``cache`` (see :mod:`lightning_sparse.kv_cache`) a fresh cache is
        filled by this normal forward pass (the prompt), and a decoding cache takes one position ``[batch, 1]``."""
        if idx.dim() != 2 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise ValueError(
                f"SparseTransformer: input must be integer ids [batch, n], got {idx.dtype} {tuple(idx.shape)}."
            )
        n = idx.shape[1]
        if not 0 < n <= self.config.seq_len:
            raise ValueError(f"SparseTransformer: input length {n} must be in [1, seq_len={self.config.seq_len}].")
        decoding = cache is not None and cache.decoding
        h = self.token_emb(idx) + (cache.position_embeddings() if decoding else self.pos_emb(n))
        for r, block in enumerate(self.blocks):
            h = block(h, None if cache is None else cache.layers[r])
        if cache is not None:
            cache.advance(n)
        return self.head(self.norm(h))

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def compile_blocks(model: SparseTransformer, mode: str | None = None) -> SparseTransformer:
    """``torch.compile`` each residual block and the output head in place (torchtitan style), from outside.

    Per-block compilation keeps compile time independent of depth: blocks that share a pattern object (every
    block but those of different ``Interleaved`` entries) reuse one compiled graph. ``nn.Module.compile`` compiles
    in place, so ``state_dict`` keys carry no ``_orig_mod.`` prefix and checkpoints load into uncompiled models.
    Idempotent: modules compiled already are left as they are (``configure_model`` runs on every fit/validate).
    """
    for module in (*model.blocks, model.norm, model.head):
        if getattr(module, "_compiled_call_impl", None) is None:
            module.compile(mode=mode)
    return model
