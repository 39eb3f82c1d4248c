"""Atomic file writes shared by the data, the checkpoints and the benchmarks: temp file, fsync, rename.

Standard library only, so any part of the project (and the benchmark scripts) can import it cheaply.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "fsync_dir"]


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable; filesystems that refuse to open a directory are skipped."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, expected_size: int | None = None) -> Iterator[BinaryIO]:
    """Open a temporary file next to `path` for binary writing; on success fsync it and rename it to `path`.

    On any exception (or a final size different from `expected_size`) the temporary file is removed, so `path`
    is either absent, the previous version, or complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        size = os.path.getsize(tmp)
        if expected_size is not None and size != expected_size:
            raise RuntimeError(f"wrote {size} bytes for {path}, expected {expected_size}; nothing was saved")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
