"""Bits per dimension as a torchmetrics ``Metric`` whose state is two sums, so it is exact under DDP."""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric

__all__ = ["BitsPerDim"]


class BitsPerDim(Metric):
    """Mean negative log-likelihood in bits per dimension: ``Σ nats / (Σ dims · ln 2)``.

    ``update(nats, dims)`` adds a summed NLL in nats and the number of scored dimensions (bytes, subpixels).
    Both states are sums (``dist_reduce_fx="sum"``), so the value gathered across processes equals the
    single-process value on the same data (up to float64 rounding). Σ nats is float64 so that millions of
    additions do not lose precision; Σ dims is int64.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("nats", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("dims", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, nats: torch.Tensor | float, dims: torch.Tensor | int) -> None:
        """Add ``nats`` (summed NLL, natural log) over ``dims`` scored dimensions."""
        nats = torch.as_tensor(nats, dtype=torch.float64, device=self.nats.device)
        dims = torch.as_tensor(dims, dtype=torch.int64, device=self.dims.device)
        if nats.numel() != 1 or dims.numel() != 1:
            raise ValueError(
                f"BitsPerDim.update takes scalar sums; got nats of shape {tuple(nats.shape)} and dims of shape "
                f"{tuple(dims.shape)}. Sum them first: update(nll.sum(), nll.numel())."
            )
        self.nats += nats.reshape(())
        self.dims += dims.reshape(())

    def compute(self) -> torch.Tensor:
        """Bits per dim over everything added since the last reset (NaN when nothing was scored)."""
        return self.nats / self.dims.to(torch.float64) / math.log(2)
