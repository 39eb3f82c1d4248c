"""The attention engine of lightning-sparse: Sparse Transformer patterns and ``sparse_attention``.

Knows nothing of Lightning; installed as ``lightning_sparse.kernels``.
"""

from .attention import BACKENDS, reference_attention, sparse_attention
from .patterns import (
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

__all__ = [
    "BACKENDS",
    "Dense",
    "Fixed",
    "FixedBlock",
    "FixedSummary",
    "HeadSplit",
    "Interleaved",
    "Local",
    "Pattern",
    "Strided",
    "StridedColumns",
    "head_masks",
    "reference_attention",
    "sparse_attention",
]
