"""``AtomicCheckpointIO``: Lightning checkpoints written beside their final name, fsynced, then renamed into place.

Lightning's own ``TorchCheckpointIO`` goes through fsspec, whose local "transaction" writes a temporary file in
``$TMPDIR`` and copies it over the final name: when ``$TMPDIR`` is another filesystem (tmpfs, node-local scratch) a
kill during that copy leaves a truncated ``.ckpt`` under the final name. Here the bytes go straight into a hidden
temporary file in the checkpoint's own folder (``.<name>.<random>.tmp``, see :func:`lightning_sparse.atomic.atomic_write`),
which is fsynced and renamed over the final name, so a final name always holds a complete checkpoint.

A write killed half-way leaves only its hidden ``.tmp`` file: no loader looks at those (they do not end in
``.ckpt``), and the next save of the same checkpoint name removes them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH

from lightning_sparse.atomic import atomic_write

__all__ = ["AtomicCheckpointIO", "remove_orphaned_temporaries"]


def _is_local(path: _PATH) -> bool:
    """True for plain paths and ``file://`` URLs; remote URLs (``s3://`` …) keep Lightning's fsspec route."""
    text = os.fspath(path)
    return "://" not in text or text.startswith("file://")


def remove_orphaned_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the hidden temporary files that killed writes of ``path`` left beside it; returns what was removed."""
    path = Path(path)
    removed = []
    for orphan in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            orphan.unlink()
            removed.append(orphan)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic: temp file in the target folder, fsync, rename.

    Installed for every run of a :class:`~lightning_sparse.modules.DensityModel` (by the
    :class:`~lightning_sparse.callbacks.AtomicCheckpoints` callback the module adds, and as a trainer plugin by
    the CLI); other code can pass it as ``L.Trainer(plugins=[AtomicCheckpointIO()])``. Loading is
    ``TorchCheckpointIO``'s.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically (remote URLs: Lightning's own save)."""
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} does not take storage_options (got {storage_options!r}); they are for remote "
                "filesystems: save to a URL, or drop the argument."
            )
        target = Path(os.fspath(path).removeprefix("file://"))
        remove_orphaned_temporaries(target)  # left by a write that was killed before its rename
        with atomic_write(target) as f:
            torch.save(checkpoint, f)
