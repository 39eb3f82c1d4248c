"""Safe preparation: one preparer per folder, extraction that deletes nothing and refuses links and bombs, caches
that know their content."""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import multiprocessing
import os
import tarfile
import zipfile

import numpy as np
import pytest
from data_fixtures import CIFAR_BATCHES, FileServer, cifar_archive, tar_bytes, zip_bytes

from lightning_sparse.datamodules import CIFAR10DataModule, UnsafeArchiveError, safe_extract
from lightning_sparse.datamodules.archive import ArchiveTooLargeError, ExtractionConflictError, copy_limited


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# one preparer per folder
# ---------------------------------------------------------------------------------------------------------------


def _prepare_cifar(kwargs: dict, barrier, log_path: str) -> None:
    handler = logging.FileHandler(log_path)
    logging.getLogger("lightning_sparse").addHandler(handler)
    barrier.wait()  # both processes start preparing together
    dm = CIFAR10DataModule(**kwargs)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 20
    handler.flush()


def test_two_processes_preparing_one_folder_download_once_and_both_succeed(tmp_path):
    archive, files, _, _ = cifar_archive(5, np.random.default_rng())
    with FileServer(delay=1.0) as server:  # a slow server: the second process arrives while the first downloads
        url = server.add("cifar-10-python.tar.gz", archive)
        kwargs = dict(data_dir=str(tmp_path / "cifar"), batch_size=2, url=url, md5=_md5(archive),
                      file_md5s={name: _md5(files[name]) for name in CIFAR_BATCHES}, val_size=5)
        ctx = multiprocessing.get_context("fork")
        barrier = ctx.Barrier(2)
        logs = [tmp_path / f"log{i}.txt" for i in range(2)]
        procs = [ctx.Process(target=_prepare_cifar, args=(kwargs, barrier, str(log))) for log in logs]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0, 0]
        assert [r[0] for r in server.requests] == ["cifar-10-python.tar.gz"]  # one download
    waited = [log.read_text() for log in logs if "Waiting for the lock" in log.read_text()]
    assert len(waited) == 1 and "pid " in waited[0]  # the second says it waits, and for whom
    leftovers = sorted(p.name for p in (tmp_path / "cifar").iterdir() if not p.name.startswith(".lightning-sparse"))
    assert leftovers == ["cifar-10-batches-py", "cifar-10-python.tar.gz", "cifar10-test.u8", "cifar10-test.u8.json",
                         "cifar10-train.u8", "cifar10-train.u8.json"]  # no .part, no temporary folder


# ---------------------------------------------------------------------------------------------------------------
# extraction deletes nothing it did not create
# ---------------------------------------------------------------------------------------------------------------


def test_extraction_merges_beside_user_files_and_keeps_them(tmp_path):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_bytes({"data/x.bin": b"X", "data/y.bin": b"Y"}))
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "notes.txt").write_bytes(b"my notes")  # the user's file beside the data
    (out / "data" / "x.bin").write_bytes(b"X")  # an earlier extraction of the same member
    (out / "mine").mkdir()
    safe_extract(archive, out)
    assert (out / "data" / "notes.txt").read_bytes() == b"my notes" and (out / "mine").is_dir()
    assert (out / "data" / "x.bin").read_bytes() == b"X" and (out / "data" / "y.bin").read_bytes() == b"Y"
    assert sorted(p.name for p in out.iterdir()) == ["data", "mine"]  # no temporary folder left


def test_extraction_stops_at_a_different_entry_in_the_way(tmp_path):
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_bytes({"train_64x64/0.png": b"archive's", "train_64x64/1.png": b"one"}))
    out = tmp_path / "out"
    (out / "train_64x64").mkdir(parents=True)
    (out / "train_64x64" / "0.png").write_bytes(b"the user's own image")
    with pytest.raises(ExtractionConflictError, match=r"train_64x64/0\.png is in the way .* move it elsewhere or "
                                                      r"delete it"):
        safe_extract(archive, out)
    assert (out / "train_64x64" / "0.png").read_bytes() == b"the user's own image"
    (tmp_path / "b.zip").write_bytes(zip_bytes({"mine/inner.txt": b"i"}))
    (out / "mine").write_bytes(b"a file where the archive has a folder")
    with pytest.raises(ExtractionConflictError, match="mine is in the way"):
        safe_extract(tmp_path / "b.zip", out)
    assert (out / "mine").read_bytes() == b"a file where the archive has a folder"


# ---------------------------------------------------------------------------------------------------------------
# links refused, bombs stopped
# ---------------------------------------------------------------------------------------------------------------


def test_tar_link_chain_is_refused(tmp_path):
    # Passes a lexical check of each link (a -> . and b -> a/a/a/a/a/../../../.. both normalize inside the folder),
    # yet b/victim lands one level above it once the links exist on disk.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, target in (("a", "."), ("b", "a/a/a/a/a/../../../..")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
        info = tarfile.TarInfo("b/victim")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"owned"))
    archive = tmp_path / "chain.tar.gz"
    archive.write_bytes(buf.getvalue())
    out = tmp_path / "inside" / "out"
    with pytest.raises(UnsafeArchiveError, match="member 'a' is a link to '.'; no supported data set contains links"):
        safe_extract(archive, out)
    assert not (tmp_path / "inside" / "victim").exists() and list(out.iterdir()) == []


def test_hard_links_are_refused(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("f")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"f"))
        info = tarfile.TarInfo("g")
        info.type, info.linkname = tarfile.LNKTYPE, "f"
        tar.addfile(info)
    (tmp_path / "h.tar").write_bytes(buf.getvalue())
    with pytest.raises(UnsafeArchiveError, match="member 'g' is a link"):
        safe_extract(tmp_path / "h.tar", tmp_path / "out")


def test_zip_bomb_is_refused_before_writing(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", bytes(20_000_000))  # ~20 kB on disk
    archive = tmp_path / "bomb.zip"
    archive.write_bytes(buf.getvalue())
    assert archive.stat().st_size < 100_000
    out = tmp_path / "out"
    with pytest.raises(ArchiveTooLargeError, match="declare 20000000 bytes, more than the allowed"):
        safe_extract(archive, out)  # the default ratio bound (100 x the archive's size)
    with pytest.raises(ArchiveTooLargeError, match="max_bytes=1000"):
        safe_extract(archive, out, max_bytes=1000, max_ratio=1e6)
    assert list(out.iterdir()) == []  # nothing was written


def test_tar_gz_bomb_is_refused_before_writing(tmp_path):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("zeros.bin")
        info.size = 20_000_000
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    archive = tmp_path / "bomb.tar.gz"
    archive.write_bytes(gzip.compress(raw.getvalue()))
    out = tmp_path / "out"
    with pytest.raises(ArchiveTooLargeError, match="declare 20000000 bytes"):
        safe_extract(archive, out)
    with pytest.raises(ArchiveTooLargeError, match="max_bytes=4096"):
        safe_extract(archive, out, max_bytes=4096, max_ratio=1e6)
    assert list(out.iterdir()) == []


def test_copy_stops_before_writing_past_the_budget():
    dst = io.BytesIO()
    with pytest.raises(ArchiveTooLargeError, match="member 'm' expands beyond its limit of 1000 bytes"):
        copy_limited(io.BytesIO(bytes(5000)), dst, 1000, "member 'm'")
    assert len(dst.getvalue()) <= 1000
    assert copy_limited(io.BytesIO(b"abc"), io.BytesIO(), 3, "exact") == 3


def test_enwik8_zip_larger_than_its_known_size_is_refused_before_extracting(tmp_path):
    from lightning_sparse.datamodules import Enwik8DataModule

    folder = tmp_path / "e8"
    folder.mkdir()
    (folder / "enwik8.zip").write_bytes(zip_bytes({"enwik8": b"a" * 50_000}))
    dm = Enwik8DataModule(data_dir=str(folder), seq_len=64, download=False, zip_size=None, size=20_000, md5=None,
                          val_bytes=100, test_bytes=100)
    with pytest.raises(ArchiveTooLargeError, match="declare 50000 bytes, more than the allowed 20000"):
        dm.prepare_data()
    assert sorted(os.listdir(folder)) == [".lightning-sparse.lock", ".lightning-sparse.lock.holder", "enwik8.zip"]


# ---------------------------------------------------------------------------------------------------------------
# caches know their content
# ---------------------------------------------------------------------------------------------------------------


def _corpus(tmp_path, data: bytes, **kwargs):
    from lightning_sparse.datamodules import ByteCorpusDataModule

    path = tmp_path / "corpus.txt"
    if not path.exists() or path.read_bytes() != data:
        path.write_bytes(data)
    return path, ByteCorpusDataModule(paths=[str(path)], seq_len=16, batch_size=2, cache_dir=str(tmp_path / "c"),
                                      **kwargs)


def _caches(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "c").glob("*.u8"))


def test_same_size_rewrite_with_restored_mtime_rebuilds_the_cache(tmp_path, caplog):
    path, dm = _corpus(tmp_path, b"a" * 3000)
    dm.prepare_data()
    st = path.stat()
    path.write_bytes(b"b" * 3000)  # as `cp -p` / `rsync -t`: same size, the old mtime restored
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size
    with caplog.at_level(logging.WARNING, logger="lightning_sparse"):
        dm.prepare_data()
    assert dm.cache_path().read_bytes() == b"b" * 3000
    assert "changed content (same size)" in caplog.text
    dm.setup("fit")
    assert bytes(dm.train_set[0].numpy()) == b"b" * 17


def test_touched_but_unchanged_source_keeps_its_cache(tmp_path):
    path, dm = _corpus(tmp_path, b"x" * 3000)
    dm.prepare_data()
    built = dm.cache_path().stat().st_mtime_ns
    os.utime(path, ns=(1, 1))  # new mtime, same bytes: the full hash decides the cache is current
    dm.prepare_data()
    assert dm.cache_path().stat().st_mtime_ns == built


def test_same_size_cache_corruption_is_found_by_verify(tmp_path, caplog):
    data = np.random.default_rng().integers(0, 256, 5000, dtype=np.uint8).tobytes()
    _, dm = _corpus(tmp_path, data)
    dm.prepare_data()
    cache = dm.cache_path()
    with open(cache, "r+b") as f:  # one flipped byte, same size
        f.seek(2500)
        f.write(bytes([data[2500] ^ 0xFF]))
    dm.prepare_data()
    assert cache.read_bytes() != data  # the cheap check trusts the cache: this is what verify is for
    _, checked = _corpus(tmp_path, data, verify=True)
    with caplog.at_level(logging.WARNING, logger="lightning_sparse"):
        checked.prepare_data()
    assert cache.read_bytes() == data and "corrupted on disk" in caplog.text


def test_record_cache_corruption_is_found_by_verify(tmp_path):
    from data_fixtures import cifar_batch

    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = np.random.default_rng().integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    for name in CIFAR_BATCHES:
        (folder / name).write_bytes(cifar_batch(images, [0, 1], name))
    kwargs = dict(data_dir=str(tmp_path / "cifar"), download=False, file_md5s={}, val_size=1)
    dm = CIFAR10DataModule(**kwargs)
    dm.prepare_data()
    good = dm.cache_path("test").read_bytes()
    dm.cache_path("test").write_bytes(bytes(len(good)))
    CIFAR10DataModule(**kwargs, verify=True).prepare_data()
    assert dm.cache_path("test").read_bytes() == good


def test_old_cache_of_an_edited_corpus_is_removed(tmp_path):
    path, dm = _corpus(tmp_path, b"one" * 1000)
    dm.prepare_data()
    first = _caches(tmp_path)
    path.write_bytes(b"two" * 1500)
    dm.prepare_data()
    assert _caches(tmp_path) == first and dm.cache_path().read_bytes() == b"two" * 1500  # rebuilt in its place
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if not p.name.startswith(".lightning-sparse")) == [
        first[0], first[0] + ".json"]  # no other cache or temporary file left


def test_manifest_records_content_hashes(tmp_path):
    import json

    path, dm = _corpus(tmp_path, b"hash me" * 100)
    dm.prepare_data()
    manifest = json.loads(dm.cache_path().with_suffix(".u8.json").read_text())
    expected = hashlib.blake2b(b"hash me" * 100, digest_size=20).hexdigest()
    assert manifest["blake2b"] == expected and manifest["sources"][0]["blake2b"] == expected
    assert manifest["sources"][0]["path"] == str(path.resolve()) and manifest["sources"][0]["size"] == 700


def test_oversized_png_member_of_an_oord_tar_is_refused(tmp_path):
    from lightning_sparse.datamodules import ImageNet64DataModule

    root = tmp_path / "in64"
    root.mkdir()
    (root / "train_64x64.tar").write_bytes(tar_bytes({"train_64x64/0.png": bytes(2 << 20)}, mode="w"))
    dm = ImageNet64DataModule(data_dir=str(root), download=False, val_size=0, decode_workers=0)
    with pytest.raises(ValueError, match="member 'train_64x64/0.png' declares 2097152 bytes, more than a 64x64 PNG"):
        dm.prepare_data()
