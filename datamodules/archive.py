"""Archive extraction that cannot write outside its folder (zip and tar, checked member by member)."""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from lightning_sparse.atomic import fsync_dir


class UnsafeArchiveError(ValueError):
    """An archive member would write outside the extraction folder, or is a link or special file."""


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
