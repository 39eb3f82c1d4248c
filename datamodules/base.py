"""The shared duties of every DataModule: files, downloads, archives, uint8 memmap caches, datasets and loaders.

Every dataset in this package is a stream or a set of records of bytes. A subclass of `ByteDataModule` says where
the bytes come from (`prepare_data`: download, verify, preprocess once into a uint8 memmap cache) and how a sample
is laid out (`setup`: build the datasets below from the cache). Everything here is standard library + numpy + torch.

Sample layouts (the contract with the model):
- stream training data (text, audio): uint8 tensors of `seq_len + 1` bytes; input x[:-1], target x[1:];
- record training data (images): uint8 tensors of exactly `seq_len` bytes (the model prepends its start token);
- evaluation (every modality): tuples (sample, first_scored: int); only targets at indices >= first_scored are
  scored. Stream windows (uint8 [seq_len + 1]) score every byte of the split exactly once (`TailScoredWindows`);
  records (uint8 [seq_len]) score all their bytes (`ScoredRecords`). Both are padded to a multiple of the world
  size with items that score nothing (`PaddedEvaluationSet`), so DDP evaluation counts every target once.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import pickle
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_sparse.atomic import atomic_write, fsync_dir

CHUNK = 1 << 20  # 1 MiB: large enough for fast hashing and copying, small enough for a smooth progress bar
HASH_ALGORITHMS = ("md5", "sha1", "sha256")


class ChecksumError(ValueError):
    """A file's size or checksum differs from the expected value (the bad file has been removed)."""


class UnsafeArchiveError(ValueError):
    """An archive member would write outside the extraction folder, or is a link or special file."""


class DownloadError(RuntimeError):
    """A download failed after its retries (a partial file is kept so that the next attempt resumes)."""


def default_cache_dir() -> Path:
    """`$LIGHTNING_SPARSE_CACHE`, else `$XDG_CACHE_HOME/lightning_sparse`, else `~/.cache/lightning_sparse`."""
    if env := os.environ.get("LIGHTNING_SPARSE_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lightning_sparse"


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------------------------


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    """Hex digest of a file with `algorithm` in md5, sha1, sha256."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _normalize_checksums(checksums: Mapping[str, str | None] | None) -> dict[str, str]:
    out = {}
    for algorithm, value in (checksums or {}).items():
        if value is None:
            continue
        if algorithm not in HASH_ALGORITHMS:
            raise ValueError(f"checksum algorithm {algorithm!r} is not supported; use one of {HASH_ALGORITHMS}")
        out[algorithm] = value.strip().lower()
    return out


def verify_file(
    path: str | os.PathLike,
    *,
    size: int | None = None,
    checksums: Mapping[str, str | None] | None = None,
    name: str | os.PathLike | None = None,
) -> None:
    """Check `path` against an expected size and checksums; on a mismatch remove it and raise `ChecksumError`.

    `name` is the file the message talks about (e.g. the final name of a temporary download).
    """
    path = Path(path)
    shown = Path(name) if name is not None else path
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        path.unlink()
        raise ChecksumError(
            f"{shown}: size mismatch: expected {size} bytes, got {actual_size} bytes. The bad file was removed; "
            "run again to download it, or put a correct copy there."
        )
    for algorithm, expected in _normalize_checksums(checksums).items():
        actual = file_digest(path, algorithm)
        if actual != expected:
            path.unlink()
            raise ChecksumError(
                f"{shown}: {algorithm} mismatch: expected {expected}, got {actual}. The bad file was removed; "
                "run again to download it, or put a correct copy there."
            )


# ----------------------------------------------------------------------------------------------------------------
# Downloads
# ----------------------------------------------------------------------------------------------------------------


def _progress_bar(total: int | None, initial: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm  # a dependency of lightning

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=not enabled, leave=False)


def _fetch_once(url: str, part: Path, size: int | None, timeout: float, progress: bool) -> None:
    """Fetch `url` into `part`, resuming from its current length with an HTTP Range request when possible."""
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:  # a stale partial file from another version of the file
        part.unlink()
        have = 0
    if size is not None and have == size:
        return
    headers = {"User-Agent": "lightning-sparse"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: the partial file is as long as the server's copy
            return
        raise
    with response:
        status = getattr(response, "status", None)
        resumed = bool(have) and status == 206
        if resumed and not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            raise DownloadError(f"{url}: the server answered Range {have}- with {response.headers['Content-Range']}")
        if not resumed:
            have = 0  # the server ignored the Range request: start over
        length = response.headers.get("Content-Length")
        expected_end = have + int(length) if length is not None else size
        received = have
        with open(part, "ab" if resumed else "wb") as f, \
                _progress_bar(expected_end, have, part.name.removesuffix(".part"), progress) as bar:
            while block := response.read(CHUNK):
                f.write(block)
                received += len(block)
                bar.update(len(block))
            f.flush()
            os.fsync(f.fileno())
    if expected_end is not None and received < expected_end:
        raise DownloadError(f"{url}: connection closed after {received} of {expected_end} bytes")


def download_url(
    url: str,
    dest: str | os.PathLike,
    *,
    size: int | None = None,
    checksums: Mapping[str, str | None] | None = None,
    retries: int = 3,
    retry_wait: float = 2.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download `url` to `dest`, resuming interrupted transfers, then verify it and rename it into place.

    The bytes go to `dest + ".part"`; an interrupted transfer is retried `retries` times with HTTP Range requests
    that continue where it stopped (a later call also resumes). The finished file is fsynced and checked against
    `size` and `checksums` ({"md5"|"sha1"|"sha256": hex}); a mismatch removes it and raises `ChecksumError`.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        try:
            _fetch_once(url, part, size, timeout, progress)
            break
        except urllib.error.HTTPError as err:
            if err.code < 500 or attempt >= retries:
                raise DownloadError(f"{url}: HTTP {err.code} {err.reason} while downloading {dest}") from err
        except (OSError, http.client.HTTPException, DownloadError) as err:
            if attempt >= retries:
                kept = part.stat().st_size if part.exists() else 0
                raise DownloadError(
                    f"{url}: download of {dest} failed after {attempt + 1} attempts ({err}); {kept} bytes are kept "
                    f"in {part} and the next attempt resumes from there"
                ) from err
        attempt += 1
        time.sleep(retry_wait * attempt)
    verify_file(part, size=size, checksums=checksums, name=dest)
    os.replace(part, dest)
    fsync_dir(dest.parent)
    return dest


def ensure_file(
    dest: str | os.PathLike,
    *,
    url: str | None,
    download: bool,
    size: int | None = None,
    checksums: Mapping[str, str | None] | None = None,
    progress: bool = True,
    retries: int = 3,
) -> Path:
    """Return `dest` after checking it; download it first when it is missing and `download` is True.

    A present file is verified and never downloaded again. Offline (`download=False`), a missing file raises
    `FileNotFoundError` saying which file to put in which folder and where to get it.
    """
    dest = Path(dest)
    if dest.exists():
        verify_file(dest, size=size, checksums=checksums)
        return dest
    if not download or url is None:
        expected = ", ".join(f"{k} {v}" for k, v in _normalize_checksums(checksums).items())
        details = "; ".join(x for x in (f"{size} bytes" if size is not None else "", expected) if x)
        raise FileNotFoundError(
            f"Missing file {dest.name!r}: put it at {dest} (folder {dest.parent})"
            + (f"; get it from {url}" if url else "")
            + (f" ({details})" if details else "")
            + ("" if download or not url else ", or set download=True to fetch it")
        )
    return download_url(url, dest, size=size, checksums=checksums, progress=progress, retries=retries)


# ----------------------------------------------------------------------------------------------------------------
# Archives
# ----------------------------------------------------------------------------------------------------------------


def check_member_name(name: str, archive: str | os.PathLike) -> PurePosixPath:
    """The member's relative path; raise `UnsafeArchiveError` for absolute paths and `..` components."""
    normalized = name.replace("\\", "/")
    path = PurePosixPath(normalized)
    is_drive = len(normalized) > 1 and normalized[1] == ":"
    if normalized.startswith("/") or is_drive or ".." in path.parts:
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} would write outside the extraction folder (absolute path or '..'); "
            "refusing to extract this archive"
        )
    return PurePosixPath(*[p for p in path.parts if p not in ("", ".")]) if path.parts else PurePosixPath()


def _check_link(member: str, link: str, relative_to_member: bool, archive: str | os.PathLike) -> None:
    base = PurePosixPath(member).parent if relative_to_member else PurePosixPath()
    target = os.path.normpath(str(base / link)) if not link.startswith("/") else link
    if link.startswith("/") or target == ".." or target.startswith("../"):
        raise UnsafeArchiveError(
            f"{archive}: member {member!r} is a link to {link!r}, outside the extraction folder; "
            "refusing to extract this archive"
        )


def check_tar_members(tar: tarfile.TarFile, archive: str | os.PathLike) -> list[tarfile.TarInfo]:
    """All members of `tar`, after checking every name and link (raises `UnsafeArchiveError`)."""
    members = tar.getmembers()
    for m in members:
        check_member_name(m.name, archive)
        if m.issym():
            _check_link(m.name, m.linkname, True, archive)
        elif m.islnk():
            check_member_name(m.linkname, archive)
            _check_link(m.name, m.linkname, False, archive)
        elif not (m.isfile() or m.isdir()):
            raise UnsafeArchiveError(f"{archive}: member {m.name!r} is a device or FIFO; refusing to extract")
    return members


def check_zip_members(zf: zipfile.ZipFile, archive: str | os.PathLike) -> list[zipfile.ZipInfo]:
    """All members of `zf`, after checking every name and symlink (raises `UnsafeArchiveError`)."""
    infos = zf.infolist()
    for info in infos:
        check_member_name(info.filename, archive)
        if stat.S_ISLNK(info.external_attr >> 16):
            _check_link(info.filename, zf.read(info).decode("utf-8", "replace"), True, archive)
    return infos


def _selected(name: str, members: Iterable[str] | None) -> bool:
    if members is None:
        return True
    rel = str(PurePosixPath(name.replace("\\", "/")))
    return any(rel == m or rel.startswith(m.rstrip("/") + "/") for m in members)


def safe_extract(archive: str | os.PathLike, dest_dir: str | os.PathLike, members: Iterable[str] | None = None) -> Path:
    """Extract a zip or tar(.gz/.bz2/.xz) archive into `dest_dir`; no member may write outside it.

    Every member is checked first (absolute paths, `..`, links pointing out, devices → `UnsafeArchiveError`
    naming the member). `members` limits extraction to those names (or folders). Files are extracted into a
    temporary folder inside `dest_dir`, fsynced, then renamed into place.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    members = list(members) if members is not None else None
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest_dir))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in check_zip_members(zf, archive):
                    if _selected(info.filename, members) and not stat.S_ISLNK(info.external_attr >> 16):
                        zf.extract(info, tmp)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:
                chosen = [m for m in check_tar_members(tar, archive) if _selected(m.name, members)]
                extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, members=chosen, **extra)
        else:
            raise ValueError(f"{archive} is neither a zip nor a tar archive (is the download corrupt? delete it)")
        if members is not None:
            missing = [m for m in members if not (tmp / m).exists()]
            if missing:
                raise FileNotFoundError(f"{archive} does not contain {missing}; is it the right archive?")
        for root, _, files in os.walk(tmp):
            for f in files:
                with open(os.path.join(root, f), "rb") as fh:
                    os.fsync(fh.fileno())
        for entry in sorted(tmp.iterdir()):
            target = dest_dir / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(entry, target)
        fsync_dir(dest_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest_dir


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


# ----------------------------------------------------------------------------------------------------------------
# uint8 memmap caches
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Restricted unpickling and splits
# ----------------------------------------------------------------------------------------------------------------

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


def holdout_split(n: int, n_holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held_out) indices of a seeded random hold-out of `n_holdout` of `n` items.

    The algorithm of scikit-learn's `train_test_split(test_size=n_holdout, random_state=seed)` (ShuffleSplit):
    `RandomState(seed).permutation(n)`, the first `n_holdout` held out; the legacy RandomState stream is stable
    across numpy versions.
    """
    if not 0 <= n_holdout < n:
        raise ValueError(f"cannot hold out {n_holdout} of {n} items; choose 0 <= holdout < {n}")
    perm = np.random.RandomState(seed).permutation(n)
    return perm[n_holdout:], perm[:n_holdout]


# ----------------------------------------------------------------------------------------------------------------
# Datasets and samplers (map-style, picklable, DDP-friendly)
# ----------------------------------------------------------------------------------------------------------------


class WindowDataset(Dataset):
    """Windows of `window` bytes of a uint8 file, every `stride` bytes inside each [start, stop) segment.

    Windows never cross a segment boundary (a segment is a split of a stream, or one audio file); a segment
    shorter than a window contributes none.
    """

    def __init__(self, path: str | os.PathLike, segments: Sequence[tuple[int, int]], window: int,
                 stride: int) -> None:
        if window <= 0 or stride <= 0:
            raise ValueError(f"window ({window}) and stride ({stride}) must be positive")
        self.data = LazyMemmap(path)
        self.window, self.stride = window, stride
        self.starts = np.array([start for start, _ in segments], dtype=np.int64)
        counts = [max(0, (stop - start - window) // stride + 1) for start, stop in segments]
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def position(self, index: int) -> int:
        """Offset in the file of window `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        segment = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return int(self.starts[segment] + (index - self.offsets[segment]) * self.stride)

    def __getitem__(self, index: int) -> torch.Tensor:
        a = self.position(index)
        return torch.from_numpy(np.array(self.data.array[a:a + self.window]))


class RandomWindowSampler(Sampler[int]):
    """`num_samples` window indices drawn uniformly from [0, num_positions) by a generator seeded (seed, epoch).

    Lightning calls `set_epoch` each epoch (under DDP through its `DistributedSamplerWrapper`, which then gives
    each rank a disjoint share of the same draw), so crops differ between epochs and between ranks while a run is
    reproducible from its seed. Without `set_epoch` the epoch advances on each iteration.
    """

    def __init__(self, num_positions: int, num_samples: int, seed: int = 0) -> None:
        if num_positions <= 0 or num_samples <= 0:
            raise ValueError(f"num_positions ({num_positions}) and num_samples ({num_samples}) must be positive")
        self.num_positions, self.num_samples, self.seed, self.epoch = num_positions, num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        return iter(rng.integers(0, self.num_positions, size=self.num_samples).tolist())


class RecordDataset(Dataset):
    """Fixed-size uint8 records (e.g. images) of a cache file, selected by `indices`."""

    def __init__(self, path: str | os.PathLike, record_size: int, indices: np.ndarray | Iterable[int]) -> None:
        self.data = LazyMemmap(path)
        self.record_size = record_size
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> torch.Tensor:
        a = int(self.indices[index]) * self.record_size
        return torch.from_numpy(np.array(self.data.array[a:a + self.record_size]))


class PaddedEvaluationSet(Dataset):
    """Evaluation items `(sample, first_scored)`, padded with items that score nothing to a multiple of a number.

    A subclass holds `num_real` real items, built by `real_item`; items past them repeat the last real sample with
    first_scored = `num_targets` (the length of its targets), so none of its targets count. With the padding a
    DistributedSampler need not repeat (and count twice) real items: evaluation under DDP gives exactly the
    single-process result. Pad to the Trainer's world size (`ByteDataModule.world_size`).
    """

    def __init__(self, num_real: int, num_targets: int, pad_to_multiple: int = 1) -> None:
        if isinstance(pad_to_multiple, bool) or not isinstance(pad_to_multiple, int) or pad_to_multiple < 1:
            raise ValueError(f"pad_to_multiple={pad_to_multiple!r} must be a positive integer (the world size)")
        self.num_real, self.num_targets = num_real, num_targets
        self.num_items = -(-num_real // pad_to_multiple) * pad_to_multiple

    def __len__(self) -> int:
        return self.num_items

    def resolve(self, index: int) -> tuple[int, bool]:
        """(the real item whose sample item `index` carries, whether item `index` is padding)."""
        if not 0 <= index < self.num_items:
            raise IndexError(f"item {index} out of range [0, {self.num_items})")
        return (index, False) if index < self.num_real else (self.num_real - 1, True)

    def real_item(self, index: int) -> tuple[torch.Tensor, int]:
        """Real item `index` < `num_real` as (sample, first_scored)."""
        raise NotImplementedError(f"{type(self).__name__} must implement real_item")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        real, padding = self.resolve(index)
        sample, first_scored = self.real_item(real)
        return sample, self.num_targets if padding else first_scored


class ScoredRecords(PaddedEvaluationSet):
    """Evaluation records as (record uint8 [record_size], 0): every byte is a target (the model prepends its start
    token), padded to a multiple of `pad_to_multiple` with records that score nothing (first_scored = record_size).
    """

    def __init__(self, records: RecordDataset, pad_to_multiple: int = 1) -> None:
        super().__init__(len(records), records.record_size, pad_to_multiple)
        self.records = records

    def real_item(self, index: int) -> tuple[torch.Tensor, int]:
        return self.records[index], 0


class TailScoredWindows(PaddedEvaluationSet):
    """Evaluation windows that score every byte of some ranges exactly once, each with >= `min_context` context.

    Item k is (window uint8 [seq_len + 1], first_scored): targets window[1:] at indices >= first_scored are
    scored. Target j of a window starting at stream position a is the byte at a + 1 + j, predicted from the
    j + 1 bytes before it. Each segment (context_start, scored_start, stop) scores the bytes [scored_start,
    stop) in steps of `seq_len - min_context`, each window ending with its last scored byte and reaching back
    no further than context_start (Enwik8 lets the test split take context from the validation split, as the
    paper; an audio file is its own context). Where a segment begins too close to context_start for a full
    context, its first window scores more bytes with less context; a segment shorter than a window is skipped.
    `pad_to_multiple` appends windows that score nothing (see `PaddedEvaluationSet`).
    """

    def __init__(self, path: str | os.PathLike, segments: Sequence[tuple[int, int, int]], seq_len: int,
                 min_context: int, pad_to_multiple: int = 1) -> None:
        if not 0 <= min_context < seq_len:
            raise ValueError(f"min_context={min_context} must be in [0, seq_len={seq_len}); "
                             "the scored tail of each window is seq_len - min_context bytes")
        self.data = LazyMemmap(path)
        self.window, self.seq_len, self.step = seq_len + 1, seq_len, seq_len - min_context
        self.spans: list[tuple[int, int, int]] = []  # (first scored position, end of the first window, stop)
        counts = []
        for context_start, scored_start, stop in segments:
            first = max(scored_start, context_start + 1)  # a segment's first byte has no context: not a target
            if stop - context_start < self.window or stop <= first:
                continue
            first_end = min(stop, max(first + self.step, context_start + self.window))
            self.spans.append((first, first_end, stop))
            counts.append(1 + -(-(stop - first_end) // self.step))
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        super().__init__(int(self.offsets[-1]), seq_len, pad_to_multiple)

    def layout(self, index: int) -> tuple[int, int]:
        """(start of the window in the stream, first scored target index) of item `index`."""
        real, padding = self.resolve(index)  # padding: the last real window, scoring nothing
        segment = int(np.searchsorted(self.offsets, real, side="right")) - 1
        first, first_end, stop = self.spans[segment]
        k = real - int(self.offsets[segment])
        scored_from = first if k == 0 else first_end + (k - 1) * self.step
        scored_end = first_end if k == 0 else min(scored_from + self.step, stop)
        a = scored_end - self.window  # the window ends with its last scored byte
        return a, self.seq_len if padding else scored_from - 1 - a

    def real_item(self, index: int) -> tuple[torch.Tensor, int]:
        a, first_scored = self.layout(index)
        return torch.from_numpy(np.array(self.data.array[a:a + self.window])), first_scored


# ----------------------------------------------------------------------------------------------------------------
# The DataModule base
# ----------------------------------------------------------------------------------------------------------------


class ByteDataModule(L.LightningDataModule):
    """Base of every DataModule here: holds the common arguments and builds the loaders.

    Subclasses download/verify/preprocess in `prepare_data` (once per node) and set `self.train_set`,
    `self.val_set`, `self.test_set` in `setup` (every process); the training set may come with
    `self.train_sampler` (random crops). `predict_dataloader` serves the test set.
    """

    def __init__(self, seq_len: int, batch_size: int, num_workers: int = 0, pin_memory: bool = False,
                 seed: int = 0) -> None:
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers={num_workers!r} must be an integer >= 0")
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.train_sampler: Sampler | None = None

    @property
    def world_size(self) -> int:
        """Number of processes of the attached Trainer (1 without one), used to pad evaluation sets."""
        return self.trainer.world_size if self.trainer is not None else 1

    def _loader(self, dataset: Dataset | None, name: str, sampler: Sampler | None = None,
                shuffle: bool = False) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: the {name} set is not built; call prepare_data() and "
                               f"setup() first (the Trainer does this for you)")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=shuffle if sampler is None else False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        # Record sets shuffle (Lightning swaps in a DistributedSampler under DDP); stream sets bring their sampler.
        return self._loader(self.train_set, "training", self.train_sampler, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test")

    def setup_image_records(self, record_size: int, val_size: int, split_seed: int) -> None:
        """Open the ``train``/``test`` record caches of ``self.cache_path(split)`` (preparing them if missing) and
        hold out ``val_size`` seeded training records as the validation set; the test cache is the test set.

        Training items are plain records; validation and test items are ``(record, first_scored)`` pairs padded to
        a multiple of the world size with records that score nothing (`ScoredRecords`), so DDP evaluation is exact.
        """
        splits = ("train", "test")
        manifests = {s: read_cache(self.cache_path(s), {"record_size": record_size}) for s in splits}
        if not all(manifests.values()):
            self.prepare_data()
            manifests = {s: read_cache(self.cache_path(s), {"record_size": record_size}) for s in splits}
        train_idx, val_idx = holdout_split(manifests["train"]["nbytes"] // record_size, val_size, split_seed)
        n_test = manifests["test"]["nbytes"] // record_size
        self.train_set = RecordDataset(self.cache_path("train"), record_size, np.sort(train_idx))
        pad = self.world_size
        self.val_set = ScoredRecords(RecordDataset(self.cache_path("train"), record_size, np.sort(val_idx)), pad)
        self.test_set = ScoredRecords(RecordDataset(self.cache_path("test"), record_size, np.arange(n_test)), pad)
