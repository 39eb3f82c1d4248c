"""The attention engine of lightning-sparse: Sparse Transformer patterns and ``sparse_attention``.

Knows nothing of Lightning; installed as ``lightning_sparse.kernels``. Importing it registers the Triton kernels'
custom operators (``torch.ops.lightning_sparse``, :mod:`.ops`); Triton itself is imported only when a kernel runs.
"""

from . import ops
from .attention import BACKENDS, reference_attention, sparse_attention, sparse_attention_qkv, split_qkv
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
    "ops",
    "reference_attention",
    "sparse_attention",
    "sparse_attention_qkv",
    "split_qkv",
]
