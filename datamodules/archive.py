"""Archive extraction that writes nothing outside its folder, deletes nothing it did not create, and stops bombs.

Rules (zip and tar alike), all checked before a byte is written unless said otherwise:
- every member is a plain file or a folder with a relative name free of `..`: links (symbolic or hard; no
  supported data set has one), devices and FIFOs are refused, which also rules out link-chain escapes that
  lexical link checks miss;
- the sizes the archive declares for the selected files must stay within `max_bytes` and within `max_ratio`
  times the archive's own size; while copying, each member is cut off at its declared size and the whole at the
  budget (the declared sizes of a zip can lie);
- members are extracted into a fresh temporary folder inside `dest_dir` and moved into place entry by entry: a new
  entry is renamed in; an existing folder is merged into; an existing file is kept when it already holds the
  member's bytes; anything else that is in the way stops the extraction with an error naming it.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from lightning_sparse.atomic import fsync_dir

CHUNK = 1 << 20
DEFAULT_MAX_RATIO = 100.0  # expanded bytes per archive byte; the supported releases are far below (text ~3, images ~1)


class UnsafeArchiveError(ValueError):
    """An archive member would write outside the extraction folder, or is a link or special file."""


class ArchiveTooLargeError(UnsafeArchiveError):
    """An archive declares or expands to more bytes than allowed (a decompression bomb, or the wrong archive)."""


class ExtractionConflictError(FileExistsError):
    """An entry in the extraction folder is in the way of a member and was not produced by this archive."""


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


def _refuse_link(member: str, target: str, archive: str | os.PathLike) -> None:
    raise UnsafeArchiveError(
        f"{archive}: member {member!r} is a link to {target!r}; no supported data set contains links, so this "
        "archive is refused (a link can make later members write outside the extraction folder)"
    )


def check_tar_members(tar: tarfile.TarFile, archive: str | os.PathLike) -> list[tarfile.TarInfo]:
    """All members of `tar` after checking them: relative names, plain files and folders only (else raises
    `UnsafeArchiveError` naming the member)."""
    members = tar.getmembers()
    for m in members:
        check_member_name(m.name, archive)
        if m.issym() or m.islnk():
            _refuse_link(m.name, m.linkname, archive)
        if not (m.isfile() or m.isdir()):
            raise UnsafeArchiveError(f"{archive}: member {m.name!r} is a device or FIFO; refusing to extract")
    return members


def check_zip_members(zf: zipfile.ZipFile, archive: str | os.PathLike) -> list[zipfile.ZipInfo]:
    """All members of `zf` after checking them: relative names, no symbolic links (raises `UnsafeArchiveError`)."""
    infos = zf.infolist()
    for info in infos:
        check_member_name(info.filename, archive)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            _refuse_link(info.filename, "(its stored target)", archive)
        if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # no type bits: a plain file
            raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a device or FIFO; refusing to extract")
    return infos


def _selected(name: str, members: Iterable[str] | None) -> bool:
    if members is None:
        return True
    rel = str(PurePosixPath(name.replace("\\", "/")))
    return any(rel == m or rel.startswith(m.rstrip("/") + "/") for m in members)


def copy_limited(src: BinaryIO, dst: BinaryIO, limit: int, what: str) -> int:
    """Copy `src` to `dst` and return the byte count; raise `ArchiveTooLargeError` before writing past `limit`."""
    written = 0
    while block := src.read(min(CHUNK, limit - written + 1)):
        if written + len(block) > limit:
            raise ArchiveTooLargeError(f"{what} expands beyond its limit of {limit} bytes; stopped before writing "
                                       "more (a decompression bomb, or the wrong archive)")
        dst.write(block)
        written += len(block)
    return written


def _check_budget(archive: Path, declared: int, max_bytes: int | None, max_ratio: float) -> int:
    """The byte budget of an extraction; raise `ArchiveTooLargeError` when the declared sizes exceed it."""
    by_ratio = int(max_ratio * max(archive.stat().st_size, 1))
    budget = by_ratio if max_bytes is None else min(max_bytes, by_ratio)
    if declared > budget:
        raise ArchiveTooLargeError(
            f"{archive}: its members declare {declared} bytes, more than the allowed {budget} bytes (max_bytes="
            f"{max_bytes}, max_ratio={max_ratio} x the archive's {archive.stat().st_size} bytes); refusing to "
            "extract it (a decompression bomb, or the wrong archive; a larger max_bytes/max_ratio admits it)"
        )
    return budget


def _move_into_place(src: Path, target: Path, archive: Path) -> None:
    """Move extracted `src` to `target`: rename when new, merge folders, keep identical files, else refuse."""
    if not (target.exists() or target.is_symlink()):
        os.replace(src, target)
        return
    if src.is_dir() and target.is_dir() and not target.is_symlink():
        for entry in sorted(src.iterdir()):
            _move_into_place(entry, target / entry.name, archive)
        return
    if src.is_file() and target.is_file() and not target.is_symlink() and filecmp.cmp(src, target, shallow=False):
        return  # already there from an earlier extraction of the same member
    raise ExtractionConflictError(
        f"{target} is in the way of the member {target.name!r} of {archive} and differs from it (it was not "
        "produced by this archive, so it is left untouched); move it elsewhere or delete it, then run again"
    )


def safe_extract(
    archive: str | os.PathLike,
    dest_dir: str | os.PathLike,
    members: Iterable[str] | None = None,
    max_bytes: int | None = None,
    max_ratio: float = DEFAULT_MAX_RATIO,
) -> Path:
    """Extract a zip or tar(.gz/.bz2/.xz) archive into `dest_dir` under the rules in this module's docstring.

    `members` limits extraction to those names (or folders); `max_bytes` bounds the bytes of the selected files
    (e.g. the known size of the data set). Raises `UnsafeArchiveError` (links, devices, names escaping the
    folder), `ArchiveTooLargeError` (declared or actual size over the budget), `ExtractionConflictError` (a
    different file in the way) and `FileNotFoundError` (a requested member is missing); on any error nothing
    new is left behind.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    members = list(members) if members is not None else None
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest_dir))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                chosen = [i for i in check_zip_members(zf, archive) if _selected(i.filename, members)]
                files = [(i, str(check_member_name(i.filename, archive)), i.file_size) for i in chosen
                         if not i.is_dir()]
                folders = [str(check_member_name(i.filename, archive)) for i in chosen if i.is_dir()]
                budget = _check_budget(archive, sum(size for *_, size in files), max_bytes, max_ratio)
                _write_members(archive, tmp, folders, files, budget, zf.open)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:
                chosen = [m for m in check_tar_members(tar, archive) if _selected(m.name, members)]
                files = [(m, str(check_member_name(m.name, archive)), m.size) for m in chosen if m.isfile()]
                folders = [str(check_member_name(m.name, archive)) for m in chosen if m.isdir()]
                budget = _check_budget(archive, sum(size for *_, size in files), max_bytes, max_ratio)
                _write_members(archive, tmp, folders, files, budget, tar.extractfile)
        else:
            raise ValueError(f"{archive} is neither a zip nor a tar archive (is the download corrupt? delete it)")
        if members is not None:
            missing = [m for m in members if not (tmp / m).exists()]
            if missing:
                raise FileNotFoundError(f"{archive} does not contain {missing}; is it the right archive?")
        for entry in sorted(tmp.iterdir()):
            _move_into_place(entry, dest_dir / entry.name, archive)
        fsync_dir(dest_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest_dir


def _write_members(archive: Path, tmp: Path, folders: list[str], files: list, budget: int, open_member) -> None:
    """Create `folders` and copy `files` [(member, relative name, declared size)] below `tmp` within `budget`."""
    for name in folders:
        (tmp / name).mkdir(parents=True, exist_ok=True)
    total = 0
    for member, name, declared in files:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        limit = min(declared, budget - total)
        with open_member(member) as src, open(path, "xb") as dst:
            total += copy_limited(src, dst, limit, f"{archive}: member {name!r} (declared {declared} bytes)")
            dst.flush()
            os.fsync(dst.fileno())
