"""Plain autoregressive sampling from a :class:`~lightning_sparse.model.SparseTransformer`.

Every new byte recomputes the full forward pass over the last ``seq_len`` inputs: simple and obviously correct,
O(length · forward). Fast cached sampling is a later addition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_sparse.model import SparseTransformer

__all__ = ["sample"]


@torch.no_grad()
def sample(
    model: SparseTransformer,
    prompt: torch.Tensor,
    length: int,
    *,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ``length`` new bytes after ``prompt`` (``[batch, p]`` input ids, p ≥ 1); returns ``[batch, length]``.

    The context is the last ``seq_len`` ids, right-padded with zeros to ``seq_len`` so every forward pass has the
    same shape (the model is causal, so padding never changes the logits that are read). Sampling runs in eval
    mode (no dropout) and restores the model's mode afterwards. ``temperature`` 1.0 samples the model's
    distribution, as the paper does. Pass a seeded ``generator`` (on the model's device) for reproducible samples.
    """
    if prompt.dim() != 2 or prompt.shape[1] < 1 or prompt.dtype.is_floating_point:
        raise ValueError(
            f"sample: prompt must be integer ids [batch, p] with p >= 1, got {prompt.dtype} "
            f"{tuple(prompt.shape)}; pass e.g. torch.tensor([list(b'def ')])."
        )
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"sample: length must be a non-negative integer, got {length!r}.")
    if not temperature > 0:
        raise ValueError(f"sample: temperature must be > 0, got {temperature!r}; use 1.0 for plain sampling.")
    seq_len = model.config.seq_len
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        ids = prompt.to(device=device, dtype=torch.long)
        window = torch.zeros(ids.shape[0], seq_len, dtype=torch.long, device=device)
        for _ in range(length):
            context = ids[:, -seq_len:]
            n = context.shape[1]
            window[:, :n] = context
            logits = model(window)[:, n - 1].float() / temperature
            probs = F.softmax(logits, dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    finally:
        model.train(was_training)
    return ids[:, prompt.shape[1] :]
