"""The per-layer KV cache of incremental decoding, for :class:`~lightning_sparse.model.SparseTransformer`.

Use: ``cache = KVCache(model, batch, length)``; ``model(prompt, cache=cache)`` is a normal forward pass (the
training kernels) that also stores every layer's keys and values; after it, ``model(ids[:, None], cache=cache)``
takes one position per call for the whole batch: each layer writes the new key/value at ``cache.position`` (inside
the decode kernel on CUDA) and its query attends only to the keys of its pattern, gathered through the pattern's decode table
(``lightning_sparse.kernels.decode``): O(n/l + l) keys for strided, not O(n).

Buffers are allocated once, at the prompt, for ``length`` positions (no reallocation per step), in the dtype the
layers produce (bf16 under bf16 autocast). The position lives in a device tensor that the model advances itself,
so a decoding step can be captured in a CUDA graph and replayed.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from lightning_sparse.kernels.decode import DecodeTable, decode_step, decode_table

if TYPE_CHECKING:
    from lightning_sparse.model import SparseTransformer

__all__ = ["KVCache", "LayerCache"]


@functools.lru_cache(maxsize=32)
def _table(pattern, n: int, heads: int, device: str) -> DecodeTable:
    """Decode tables are shared by every layer (and every sampling call) with the same pattern and length."""
    return decode_table(pattern, n, heads, device)


def _decode_backend(backend: str, device: torch.device) -> str:
    """The model's attention backend → the decode implementation ("triton" only on CUDA, with triton installed)."""
    if backend in ("auto", "triton") and device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            if backend == "triton":
                raise ImportError("attention_backend='triton' needs triton: pip install triton") from None
            return "torch"
        return "triton"
    return "torch"


class LayerCache:
    """Keys ``[B, H, N, d_qk]`` and values ``[B, H, N, d_v]`` of one layer, and the decode table of its pattern."""

    def __init__(self, owner: KVCache, table: DecodeTable, backend: str) -> None:
        self.owner, self.table, self.backend = owner, table, backend
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def decoding(self) -> bool:
        """True after the prompt: calls take one position and attend through the cache."""
        return self.owner.decoding

    def prefill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the prompt's keys and values (positions ``[0, n)``) in buffers for the cache's whole length."""
        owner = self.owner
        b, h, n, _ = k.shape
        if b != owner.batch:
            raise ValueError(f"KVCache: built for batch {owner.batch}, got a batch of {b}.")
        if n > owner.length:
            raise ValueError(f"KVCache: a prompt of {n} positions does not fit a cache of length {owner.length}.")
        self.k = k.new_empty(b, h, owner.length, k.shape[-1])
        self.v = v.new_empty(b, h, owner.length, v.shape[-1])
        self.k[:, :, :n] = k
        self.v[:, :, :n] = v

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """One decoding step: store the new key/value ``[B, H, 1, ·]`` at ``position`` and attend the new query to
        its pattern's cached keys → ``[B, H, 1, d_v]``."""
        if q.shape[0] != self.owner.batch:
            raise ValueError(f"KVCache: built for batch {self.owner.batch}, got a batch of {q.shape[0]}.")
        if q.shape[2] != 1:
            raise ValueError(f"KVCache: after the prompt every call takes one position, got {q.shape[2]}.")
        args = (q, k, v, self.k, self.v, self.table, self.owner.position, scale)
        if self.backend == "triton":
            from lightning_sparse.kernels.decode_triton import triton_decode_step

            return triton_decode_step(*args)
        return decode_step(*args)


class KVCache:
    """Everything a :class:`SparseTransformer` needs to decode ``batch`` sequences of up to ``length`` positions.

    ``length`` (default ``seq_len``) bounds the positions ever fed to the model, prompt included; it may not
    exceed ``seq_len``. ``position`` (int64 ``[1]``, on the model's device) is the next position to be written.
    """

    def __init__(self, model: SparseTransformer, batch: int, length: int | None = None) -> None:
        config = model.config
        length = config.seq_len if length is None else length
        if isinstance(length, bool) or not isinstance(length, int) or not 0 < length <= config.seq_len:
            raise ValueError(
                f"KVCache: length must be an integer in [1, seq_len={config.seq_len}] (the positions the model "
                f"will see, prompt included); got {length!r}."
            )
        if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
            raise ValueError(f"KVCache: batch must be a positive integer, got {batch!r}.")
        device = next(model.parameters()).device
        self.batch, self.length = batch, length
        self.decoding = False
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        backend = _decode_backend(config.attention_backend, device)
        self.position_table = model.pos_emb(length).detach()  # one row read per step, not the per-axis sum
        self.layers = [
            LayerCache(self, _table(config.layer_pattern(r), length, config.n_head, str(device)), backend)
            for r in range(config.n_layer)
        ]

    def position_embeddings(self) -> torch.Tensor:
        """The position embedding of the step at ``position``, ``[1, d_model]`` (on the device: graph-safe)."""
        return self.position_table.index_select(0, self.position)

    def advance(self, n: int) -> None:
        """Called by the model after every forward: the prompt fills ``[0, n)``; a step moves on by one."""
        if self.decoding:
            self.position += 1  # in place, on the device: part of a captured step
            return
        self.position.fill_(n)
        self.decoding = True
