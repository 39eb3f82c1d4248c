"""Autoregressive sampling from a :class:`~lightning_sparse.model.SparseTransformer`.

``sample(..., cache=True)`` (the default) is the fast path: the prompt runs as one normal forward pass (the training
kernels) that fills a per-layer KV cache (:mod:`lightning_sparse.kv_cache`), then one position per step for the
whole batch, each query attending only to its pattern's keys. On CUDA a step is captured once in a CUDA graph and
replayed, so a deep model is not limited by kernel launches. ``cache=False`` is the plain reference: every new byte
recomputes a full forward pass over a ``seq_len`` window, O(length · forward). Both draw from the same logits
(equal to float32 rounding), so a seeded generator gives the same bytes on either path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lightning_sparse.kv_cache import KVCache
from lightning_sparse.model import SparseTransformer

__all__ = ["sample"]


def _check(model: SparseTransformer, prompt: torch.Tensor, length: int, temperature: float) -> None:
    if prompt.dim() != 2 or prompt.shape[0] < 1 or prompt.shape[1] < 1 or prompt.dtype.is_floating_point:
        raise ValueError(
            f"sample: prompt must be integer ids [batch, p] with batch, p >= 1, got {prompt.dtype} "
            f"{tuple(prompt.shape)}; pass e.g. torch.tensor([list(b'def ')])."
        )
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"sample: length must be a non-negative integer, got {length!r}.")
    if not temperature > 0:
        raise ValueError(f"sample: temperature must be > 0, got {temperature!r}; use 1.0 for plain sampling.")
    seq_len, p = model.config.seq_len, prompt.shape[1]
    if p + length - 1 > seq_len:
        raise ValueError(
            f"sample: a prompt of {p} ids and {length} new bytes need {p + length - 1} input positions, but the "
            f"model's context is seq_len={seq_len}; ask for at most length={seq_len - p + 1} (or a shorter prompt)."
        )


def _draw(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """One byte per row from ``softmax(logits / temperature)`` (float32), ``[batch, 1]``."""
    probs = F.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


class _GraphStep:
    """One decoding step (embed → every block → logits, position + 1) captured in a CUDA graph.

    Static buffers: the input ids ``[batch, 1]`` and the logits ``[batch, 256]``. Two eager warm-up steps on a
    side stream compile the kernels; both run at the current position (writing the key and value the first real
    step writes again) and the position is restored before capture. Under the caller's
    autocast the warm-up also fills autocast's cache of low-precision weights, so the graph reads those instead of
    casting every weight at every step; they stay alive while the graph is replayed, because autocast clears its
    cache only when the outermost autocast region exits, after ``sample`` returns.
    """

    def __init__(self, model: SparseTransformer, cache: KVCache, ids: torch.Tensor) -> None:
        self.ids = ids.clone()
        start = cache.position.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # both at the current position: the next one may lie beyond the cache
                model(self.ids, cache=cache)
                cache.position.copy_(start)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model(self.ids, cache=cache)[:, -1].float()
        cache.position.copy_(start)  # capture does not run the kernels, but keep the position exact regardless

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.graph.replay()
        return self.logits


def _sample_cached(model, ids, length, temperature, generator, progress, cuda_graph) -> torch.Tensor:
    batch, p = ids.shape
    cache = KVCache(model, batch, length=p + length - 1)
    out = torch.empty(batch, length, dtype=torch.long, device=ids.device)
    token = _draw(model(ids, cache=cache)[:, -1], temperature, generator)  # the prompt fills the cache
    out[:, :1] = token
    progress(1)
    if length == 1:
        return out
    step = _GraphStep(model, cache, token) if cuda_graph else (lambda x: model(x, cache=cache)[:, -1])
    for i in range(1, length):
        token = _draw(step(token), temperature, generator)
        out[:, i : i + 1] = token
        progress(1)
    return out


def _sample_uncached(model, ids, length, temperature, generator, progress) -> torch.Tensor:
    batch, p = ids.shape
    seq_len = model.config.seq_len
    window = torch.zeros(batch, seq_len, dtype=torch.long, device=ids.device)
    window[:, :p] = ids
    out = torch.empty(batch, length, dtype=torch.long, device=ids.device)
    for n in range(p, p + length):  # n inputs known; the model is causal, so the zero padding changes nothing read
        token = _draw(model(window)[:, n - 1], temperature, generator)
        out[:, n - p : n - p + 1] = token
        if n < seq_len:
            window[:, n : n + 1] = token
        progress(1)
    return out


@torch.no_grad()
def sample(
    model: SparseTransformer,
    prompt: torch.Tensor,
    length: int,
    *,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    cache: bool = True,
    cuda_graph: bool | None = None,
    progress: Callable[[int], object] | None = None,
) -> torch.Tensor:
    """Draw ``length`` new bytes after ``prompt`` (``[batch, p]`` input ids, p ≥ 1); returns ``[batch, length]``.

    Every input position must lie in the model's context: ``p + length − 1 <= seq_len`` (else ``ValueError``).
    ``cache=True`` decodes with the sparse KV cache; ``cache=False`` recomputes a full forward pass per byte (the
    reference). ``cuda_graph`` (default: on CUDA) replays the cached step as a CUDA graph. Sampling runs in eval
    mode (no dropout) and restores the model's mode afterwards; it runs under the caller's autocast, if any.
    ``temperature`` 1.0 samples the model's distribution, as the paper does. Pass a seeded ``generator`` (on the
    model's device) for reproducible samples; ``progress(k)`` is called after every ``k`` new positions.
    """
    _check(model, prompt, length, temperature)
    device = next(model.parameters()).device
    ids = prompt.to(device=device, dtype=torch.long)
    if length == 0:
        return ids[:, :0].clone()
    progress = progress or (lambda k: None)
    cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"sample: cuda_graph=True needs the model on a CUDA device, it is on {device}.")
    was_training = model.training
    model.eval()
    try:  # blocks compiled for training run eagerly here: the sampler captures its own CUDA graph
        with torch.compiler.set_stance("force_eager"):
            if cache:
                return _sample_cached(model, ids, length, temperature, generator, progress, cuda_graph)
            return _sample_uncached(model, ids, length, temperature, generator, progress)
    finally:
        model.train(was_training)
