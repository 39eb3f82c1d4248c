"""``AudioDensityModel``: a Sparse Transformer over 8-bit μ-law audio; ``mu_law_decode`` makes its bytes listenable."""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_sparse.kernels import Interleaved, Pattern, Strided
from lightning_sparse.modules import DensityModel

__all__ = ["AudioDensityModel", "mu_law_decode", "sqrt_stride"]


def mu_law_decode(codes: torch.Tensor, quantization_channels: int = 256) -> torch.Tensor:
    """8-bit μ-law codes (0 … 255) → float32 waveform in [-1, 1]; the inverse of torchaudio's ``mu_law_encoding``.

    ``x = sign(y)·((1 + μ)^|y| − 1)/μ`` with ``y = 2·code/μ − 1`` and ``μ = quantization_channels − 1`` (the same
    formula as ``torchaudio.functional.mu_law_decoding``, written here so logging needs no torchaudio).
    """
    mu = quantization_channels - 1
    y = codes.to(torch.float32) / mu * 2.0 - 1.0
    return torch.sign(y) * torch.expm1(y.abs() * math.log1p(mu)) / mu


def sqrt_stride(seq_len: int) -> int:
    """The divisor of ``seq_len`` closest to √seq_len: the paper's stride rule l ≈ √n [P §4.2]."""
    root = math.isqrt(seq_len)
    divisors = [d for k in range(1, root + 1) if seq_len % k == 0 for d in (k, seq_len // k)]
    return min(divisors, key=lambda d: (abs(d - math.sqrt(seq_len)), d))


class AudioDensityModel(DensityModel):
    """A Sparse Transformer over raw audio as 8-bit μ-law bytes (stream data, no start token) [P §7.4].

    Positions are embedded like text: (row, column) of a matrix whose width is the attention stride [P §5.3].
    Clips during training: add ``lightning_sparse.sample_logging.AudioSampleLogger`` to the Trainer's callbacks;
    they are written at ``sample_rate``.

    Args:
        seq_len: Samples per sequence (the paper: 65,536, 262,144 or 1,048,576). The CLI links it from
            ``data.seq_len``.
        pattern: Attention pattern; None = ``Strided(l)`` with ``l`` the divisor of seq_len closest to √seq_len
            (256 for 65,536), the paper's rule.
        sample_rate: Sampling rate of the data in Hz (the paper: 12,000); samples are written at this rate. It must
            match the data module's ``sample_rate`` when that has one.
        **kwargs: Every other :class:`~lightning_sparse.modules.DensityModel` argument.
    """

    def __init__(
        self,
        *,
        seq_len: int = 65_536,
        pattern: Pattern | Interleaved | None = None,
        sample_rate: int = 12_000,
        **kwargs: Any,
    ) -> None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
            raise ValueError(f"AudioDensityModel: seq_len must be a positive integer, got {seq_len!r}.")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
            raise ValueError(
                f"AudioDensityModel: sample_rate must be a positive integer number of Hz, got {sample_rate!r}; "
                "the paper uses 12000."
            )
        if pattern is None:  # resolved here so that the saved hyperparameters hold the real pattern
            pattern = Strided(sqrt_stride(seq_len))
        super().__init__(seq_len=seq_len, pattern=pattern, **kwargs)
        # Settings as attributes, as the base class does: under LightningCLI self.hparams is the parsed config.
        self.sample_rate = sample_rate

    def setup(self, stage: str) -> None:
        """Check that the data is at the sample rate the clips are logged at."""
        datamodule = getattr(self.trainer, "datamodule", None)
        data_rate = getattr(datamodule, "sample_rate", None)
        if data_rate is not None and data_rate != self.sample_rate:
            raise ValueError(
                f"AudioDensityModel: model.sample_rate={self.sample_rate} but the data module's sample_rate="
                f"{data_rate}; set both to the same rate (the paper: 12000) so logged clips play at the right speed."
            )
