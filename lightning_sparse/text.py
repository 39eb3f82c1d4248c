"""``TextDensityModel``: a byte-level language model that shows a generated sample in TensorBoard."""

from __future__ import annotations

import re
from typing import Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_sparse.kernels import Fixed, Interleaved, Pattern
from lightning_sparse.model import VOCAB_SIZE
from lightning_sparse.modules import DensityModel

__all__ = ["TextDensityModel", "markdown_code_block"]


def markdown_code_block(text: str) -> str:
    """``text`` in a fenced Markdown code block whose fence is longer than any run of backticks inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


class TextDensityModel(DensityModel):
    """A Sparse Transformer over text bytes (stream data, no start token); defaults to the paper's Enwik8 pattern.

    At the end of every validation (not the sanity check) it samples ``sample_length`` bytes at temperature 1.0
    from a fixed prompt, on every rank, and global rank 0 logs prompt and sample as Markdown code blocks to
    TensorBoard under ``samples/text`` (bytes decoded as UTF-8 with ``errors="replace"``).

    Args:
        pattern: Attention pattern (default ``Fixed(stride=128, summary=32)``, the paper's Enwik8 choice).
        sample_length: Bytes to generate at the end of each validation (0 = no samples).
        prompt: Text to start samples from; None = the first ``sample_prompt_length`` bytes of the validation data.
        **kwargs: Every other :class:`~lightning_sparse.modules.DensityModel` argument.
    """

    def __init__(
        self,
        *,
        pattern: Pattern | Interleaved = Fixed(stride=128, summary=32),  # noqa: B008 - frozen, immutable default
        sample_length: int = 256,
        prompt: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(pattern=pattern, sample_length=sample_length, **kwargs)
        if prompt is not None and not prompt:
            raise ValueError(
                "TextDensityModel: prompt must be a non-empty string, or None to prompt with validation data."
            )
        self.prompt = prompt

    def sample_prompt(self) -> torch.Tensor | None:
        """The configured ``prompt`` as bytes ``[1, p]``, else the first bytes of the validation data."""
        if self.prompt is None:
            return super().sample_prompt()
        return torch.tensor([list(self.prompt.encode())], dtype=torch.long)

    def log_samples(self, prompt: torch.Tensor, sample: torch.Tensor) -> None:
        """Log prompt and sample as Markdown code blocks with ``add_text`` to every TensorBoard logger."""
        prompt_text = bytes(prompt[prompt < VOCAB_SIZE].tolist()).decode("utf-8", errors="replace")
        sample_text = bytes(sample.tolist()).decode("utf-8", errors="replace")
        text = (
            f"**prompt** ({len(prompt)} bytes)\n\n{markdown_code_block(prompt_text)}\n\n"
            f"**sample** ({len(sample)} bytes, temperature 1.0, step {self.global_step})\n\n"
            f"{markdown_code_block(sample_text)}"
        )
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("samples/text", text, global_step=self.global_step)
