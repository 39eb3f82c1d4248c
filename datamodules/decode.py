"""Decoding the released file formats: a restricted unpickler and the channel-major to raster transpose."""

from __future__ import annotations

import os
import pickle
from typing import Any, BinaryIO

import numpy as np

# Everything a CIFAR-10 / Chrabaszcz ImageNet pickle needs: numpy array reconstruction under its old and new
# module names, and pure builtins. `_codecs.encode` is how Python 3 writes bytes at protocol 2 (str -> bytes).
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("_codecs", "encode"): ("_codecs", "encode"),
    **{("builtins", n): ("builtins", n) for n in ("list", "dict", "str", "bytes", "int", "bytearray")},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, source: str | os.PathLike) -> None:
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        target = _PICKLE_ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(
                f"{self.source}: the pickle asks for {module}.{name}, which a dataset file never contains; refusing "
                "to load it (only numpy arrays, lists, dicts, strings, bytes and ints are allowed)"
            )
        if target[0] == "numpy._core.multiarray" and not hasattr(np, "_core"):  # numpy < 2
            target = ("numpy.core.multiarray", target[1])
        return super().find_class(*target)


def load_pickle(path: str | os.PathLike) -> Any:
    """Unpickle a dataset file admitting only numpy arrays and plain builtins (bytes keys are decoded to str).

    Anything else in the pickle (e.g. `os.system`) raises `pickle.UnpicklingError` before it can run; a truncated
    or corrupt file raises `ValueError` naming the file.
    """
    with open(path, "rb") as f:
        try:
            obj = _RestrictedUnpickler(f, path).load()
        except pickle.UnpicklingError as err:
            if "refusing" in str(err):
                raise
            raise ValueError(f"{path}: truncated or corrupt pickle ({err}); delete it and run again") from err
        except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as err:
            raise ValueError(f"{path}: truncated or corrupt pickle ({type(err).__name__}: {err}); delete it and "
                             "run again") from err
    if isinstance(obj, dict):
        obj = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    return obj


def planar_to_interleaved(rows: np.ndarray, channels: int = 3) -> np.ndarray:
    """[N, C*H*W] channel-major rows (CIFAR, Chrabaszcz) → [N, H*W*C] raster rows with channels per pixel."""
    rows = np.asarray(rows, dtype=np.uint8)
    n, d = rows.shape
    return np.ascontiguousarray(rows.reshape(n, channels, d // channels).transpose(0, 2, 1)).reshape(n, d)
