"""lightning-sparse: the Sparse Transformer (Child et al. 2019) as PyTorch Lightning modules.

Public names are imported lazily, so ``import lightning_sparse.kernels`` does not pay for importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SparseTransformer": "lightning_sparse.model",
    "SparseTransformerConfig": "lightning_sparse.model",
    "BitsPerDim": "lightning_sparse.metrics",
    "sample": "lightning_sparse.sampling",
    "DensityModel": "lightning_sparse.modules",
    "TextDensityModel": "lightning_sparse.text",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_sparse' has no attribute {name!r}")
