"""Storing preprocessed data: uint8 memmap caches that know their content, and parallel preprocessing.

A cache `<name>.u8` comes with a manifest `<name>.u8.json`, written last, that records the cache's size and
blake2b hash and, for caches built from user files, a fingerprint of every source: its size, mtime, the blake2b of
its bytes as they were read and a quick hash of its first and last MiB. A cache is reused when its size matches and
every source still has its size and quick fingerprint; a source whose quick fingerprint differs (a rewrite, also at
the same size with its mtime restored) is hashed in full and the cache is rebuilt when its content changed.
`verify=True` also hashes the cache and every source in full (e.g. after a disk error).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_sparse.atomic import atomic_write

CHUNK = 1 << 20
QUICK_BYTES = 1 << 20  # the quick fingerprint reads this much at each end of a source
log = logging.getLogger(__name__)


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


def _blake2b() -> Any:
    return hashlib.blake2b(digest_size=20)


def _blake2b_of(data: bytes) -> str:
    h = _blake2b()
    h.update(data)
    return h.hexdigest()


def file_blake2b(path: str | os.PathLike) -> str:
    """blake2b (160 bits) of a file's bytes."""
    h = _blake2b()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def quick_fingerprint(path: str | os.PathLike) -> str:
    """A cheap fingerprint: blake2b of the size, the mtime and the first and last MiB of the file."""
    st = os.stat(path)
    h = _blake2b()
    h.update(f"{st.st_size}\0{st.st_mtime_ns}\0".encode())
    with open(path, "rb") as f:
        h.update(f.read(QUICK_BYTES))
        if st.st_size > QUICK_BYTES:
            f.seek(max(QUICK_BYTES, st.st_size - QUICK_BYTES))
            h.update(f.read(QUICK_BYTES))
    return h.hexdigest()


class SourceReader:
    """Reads source files for a cache and records their fingerprints (`sources`) as their bytes go by."""

    def __init__(self) -> None:
        self.sources: list[dict[str, Any]] = []

    def read(self, path: str | os.PathLike) -> bytes:
        """The bytes of `path`, fingerprinted: size, mtime, quick fingerprint and blake2b of exactly these bytes."""
        quick = quick_fingerprint(path)  # taken before reading: a file changed meanwhile fails the next check
        st = os.stat(path)
        data = Path(path).read_bytes()
        self.sources.append({"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "quick": quick,
                             "blake2b": _blake2b_of(data)})
        return data


def write_cache(cache: str | os.PathLike, chunks: Iterable[bytes | np.ndarray], meta: Mapping[str, Any],
                sources: Iterable[Mapping[str, Any]] | None = None) -> dict:
    """Write a uint8 cache from `chunks` atomically, check it, then write its manifest `<cache>.json`.

    The manifest holds `meta`, `nbytes`, `blake2b` (of the bytes written; the file on disk is hashed again and
    must match) and `sources` (fingerprints from a `SourceReader`, read after `chunks` is consumed). It is written
    last, so a cache without a valid manifest is incomplete and is rebuilt.
    """
    cache = Path(cache)
    nbytes, h = 0, _blake2b()
    with atomic_write(cache) as f:
        for chunk in chunks:
            data = memoryview(np.ascontiguousarray(chunk, dtype=np.uint8) if isinstance(chunk, np.ndarray)
                              else chunk).cast("B")
            f.write(data)
            h.update(data)
            nbytes += len(data)
    digest = h.hexdigest()
    if file_blake2b(cache) != digest:  # what the disk returns is not what was written
        cache.unlink()
        raise OSError(f"{cache}: the cache read back differs from the bytes written (a disk or filesystem error); "
                      "it was removed; check the disk and run again")
    manifest = {**meta, "nbytes": nbytes, "blake2b": digest}
    if sources is not None:
        manifest["sources"] = list(sources)
    with atomic_write(_manifest_path(cache)) as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def _source_changed(source: Mapping[str, Any], full: bool) -> str | None:
    """Why a recorded source no longer matches (None when it does); the full hash decides when the quick one differs."""
    path = source["path"]
    try:
        st = os.stat(path)
        if st.st_size != source["size"]:
            return f"{path} changed size ({source['size']} -> {st.st_size} bytes)"
        if not full and quick_fingerprint(path) == source["quick"]:
            return None
        if file_blake2b(path) != source["blake2b"]:
            return f"{path} changed content (same size)"
    except OSError as err:
        return f"{path} cannot be read ({err})"
    return None


def read_cache(cache: str | os.PathLike, expect: Mapping[str, Any] | None = None, verify: bool = False) -> dict | None:
    """The manifest of a complete, current cache, or None when the cache must be (re)built.

    A cache is complete when its manifest exists and records its hash, its size equals the manifest's `nbytes`,
    and every key in `expect` has the expected value (e.g. the parameters it was built with); it is current when
    every recorded source passes the checks of this module's docstring. `verify=True` also hashes the cache and
    the sources in full. The reason a cache is not reused is logged.
    """
    cache = Path(cache)
    try:
        manifest = json.loads(_manifest_path(cache).read_text())
        if cache.stat().st_size != manifest["nbytes"] or "blake2b" not in manifest:
            return None
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        return None
    if any(manifest.get(k) != v for k, v in (expect or {}).items()):
        return None
    for source in manifest.get("sources", ()):
        if reason := _source_changed(source, full=verify):
            log.warning("Rebuilding the cache %s: its source %s", cache, reason)
            return None
    if verify and file_blake2b(cache) != manifest["blake2b"]:
        log.warning("Rebuilding the cache %s: its content differs from the hash recorded when it was built "
                    "(corrupted on disk)", cache)
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
