"""Storing preprocessed data: uint8 memmap caches with a manifest written last, and parallel preprocessing."""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_sparse.atomic import atomic_write


def default_cache_dir() -> Path:
    """`$LIGHTNING_SPARSE_CACHE`, else `$XDG_CACHE_HOME/lightning_sparse`, else `~/.cache/lightning_sparse`."""
    if env := os.environ.get("LIGHTNING_SPARSE_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lightning_sparse"


def _init_worker() -> None:
    # One intra-op thread per worker: no oversubscription, and a forked child never enters an OpenMP pool that
    # the parent already used (which can deadlock), as torch's own DataLoader workers do.
    torch.set_num_threads(1)


def ordered_map(fn: Callable[..., Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """`map(fn, items)` in order, on `workers` processes (0 = this process), with at most 2 × workers in flight.

    Unlike `Executor.map`, it does not consume `items` up front, so a large dataset is never fully in memory.
    """
    if workers == 0:
        yield from map(fn, items)
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, initializer=_init_worker) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _manifest_path(cache: Path) -> Path:
    return cache.with_name(cache.name + ".json")


def write_cache(cache: str | os.PathLike, chunks: Iterable[bytes | np.ndarray], meta: Mapping[str, Any]) -> dict:
    """Write a uint8 cache from `chunks` atomically, then its manifest `<cache>.json` with `meta` and `nbytes`.

    The manifest is written last, so a cache without a valid manifest is incomplete and is rebuilt.
    """
    cache = Path(cache)
    nbytes = 0
    with atomic_write(cache) as f:
        for chunk in chunks:
            data = np.ascontiguousarray(chunk, dtype=np.uint8) if isinstance(chunk, np.ndarray) else chunk
            f.write(memoryview(data).cast("B"))
            nbytes += len(memoryview(data).cast("B"))
    manifest = {**meta, "nbytes": nbytes}
    with atomic_write(_manifest_path(cache)) as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def read_cache(cache: str | os.PathLike, expect: Mapping[str, Any] | None = None) -> dict | None:
    """The manifest of a complete cache, or None when the cache must be (re)built.

    A cache is complete when its manifest exists, its size equals the manifest's `nbytes`, and every key in
    `expect` has the expected value (e.g. the number of records or the parameters it was built with).
    """
    cache = Path(cache)
    try:
        manifest = json.loads(_manifest_path(cache).read_text())
        if cache.stat().st_size != manifest["nbytes"]:
            return None
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        return None
    if any(manifest.get(k) != v for k, v in (expect or {}).items()):
        return None
    return manifest


class LazyMemmap:
    """A read-only uint8 memmap opened on first use in each process; pickles as its path (for DataLoader workers)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        self._array: np.ndarray | None = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            if os.path.getsize(self.path) == 0:
                self._array = np.zeros(0, dtype=np.uint8)
            else:
                self._array = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._array

    def __len__(self) -> int:
        return os.path.getsize(self.path)

    def __getstate__(self) -> dict:
        return {"path": self.path, "_array": None}
