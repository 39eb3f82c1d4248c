"""``TextDensityModel``: a byte-level language model; ``markdown_code_block`` shows its samples as text."""

from __future__ import annotations

import re
from typing import Any

from lightning_sparse.kernels import Fixed, Interleaved, Pattern
from lightning_sparse.modules import DensityModel

__all__ = ["TextDensityModel", "markdown_code_block"]


def markdown_code_block(text: str) -> str:
    """``text`` in a fenced Markdown code block whose fence is longer than any run of backticks inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


class TextDensityModel(DensityModel):
    """A Sparse Transformer over text bytes (stream data, no start token); defaults to the paper's Enwik8 pattern.

    Samples during training: add ``lightning_sparse.sample_logging.TextSampleLogger`` to the Trainer's callbacks.

    Args:
        pattern: Attention pattern (default ``Fixed(stride=128, summary=32)``, the paper's Enwik8 choice).
        **kwargs: Every other :class:`~lightning_sparse.modules.DensityModel` argument.
    """

    def __init__(
        self,
        *,
        pattern: Pattern | Interleaved = Fixed(stride=128, summary=32),  # noqa: B008 - frozen, immutable default
        **kwargs: Any,
    ) -> None:
        super().__init__(pattern=pattern, **kwargs)
