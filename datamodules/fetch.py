"""Fetching files: downloads with HTTP Range resume, size and checksum verification, offline errors, and the
per-folder lock that makes concurrent preparation of one folder safe.

Standard library plus filelock (a torch dependency) for the lock; tqdm (a Lightning dependency) draws the progress bar.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import filelock

from lightning_sparse.atomic import atomic_write, fsync_dir

log = logging.getLogger(__name__)
LOCK_NAME = ".lightning-sparse.lock"

CHUNK = 1 << 20  # 1 MiB: large enough for fast hashing and copying, small enough for a smooth progress bar
HASH_ALGORITHMS = ("md5", "sha1", "sha256")


class ChecksumError(ValueError):
    """A file's size or checksum differs from the expected value (the bad file has been removed)."""


class DownloadError(RuntimeError):
    """A download failed after its retries (a partial file is kept so that the next attempt resumes)."""


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
# One preparer per folder
# ----------------------------------------------------------------------------------------------------------------

_locks: dict[str, filelock.FileLock] = {}  # one re-entrant lock object per folder and process
_locks_guard = threading.Lock()


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive lock of `folder` (`folder/.lightning-sparse.lock`) while preparing data in it.

    Another process (a second job, another node on a shared filesystem) that prepares the same folder waits
    here, logging that it waits and who holds the lock, and afterwards finds the finished files and only checks
    them. Re-entrant within a process, so nested preparation steps may take it again.
    """
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    with _locks_guard:
        lock = _locks.setdefault(str(path.resolve()), filelock.FileLock(str(path)))
    try:
        lock.acquire(timeout=1.0)  # a short wait goes unmentioned (and gives a new holder time to sign its name)
    except filelock.Timeout:
        holder = _read_holder(path)
        log.warning("Waiting for the lock %s: another process (%s) is preparing data in %s; this one continues when "
                    "it is done", path, holder, folder)
        lock.acquire()
    try:
        if lock.lock_counter == 1:
            with contextlib.suppress(OSError), atomic_write(_holder_path(path)) as f:
                f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                        .encode())
        yield
    finally:
        lock.release()


def _holder_path(lock: Path) -> Path:
    return lock.with_name(lock.name + ".holder")


def _read_holder(lock: Path) -> str:
    try:
        return _holder_path(lock).read_text().strip() or "unknown"
    except OSError:
        return "holder unknown"
