"""The shared data duties: downloads (resume, checksums, offline), safe extraction, restricted unpickling, caches,
evaluation windows and samplers."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from data_fixtures import FileServer, evil_pickle_bytes, py2_pickle_dumps, tar_bytes, zip_bytes
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

from lightning_sparse.atomic import atomic_write
from lightning_sparse.datamodules import (
    ChecksumError,
    DownloadError,
    RandomWindowSampler,
    TailScoredWindows,
    UnsafeArchiveError,
    WindowDataset,
    download_url,
    ensure_file,
    holdout_split,
    load_pickle,
    read_cache,
    safe_extract,
    write_cache,
)


@pytest.fixture
def server():
    with FileServer() as s:
        yield s


def _payload(n: int) -> bytes:
    return np.random.default_rng().integers(0, 256, n, dtype=np.uint8).tobytes()


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# downloads
# ---------------------------------------------------------------------------------------------------------------


def test_fresh_download_verifies_and_renames(server, tmp_path):
    data = _payload(3_000_000)
    url = server.add("file.bin", data)
    out = download_url(url, tmp_path / "file.bin", size=len(data),
                       checksums={"md5": hashlib.md5(data).hexdigest(), "sha256": hashlib.sha256(data).hexdigest()},
                       progress=False)
    assert out.read_bytes() == data
    assert _leftovers(tmp_path) == ["file.bin"]  # no .part left behind


def test_interrupted_download_resumes_with_range(server, tmp_path):
    data = _payload(2_500_000)
    url = server.add("big.bin", data)
    server.cut_next("big.bin", after=1_000_000)
    dest = tmp_path / "big.bin"
    with pytest.raises(DownloadError, match="resumes"):
        download_url(url, dest, size=len(data), retries=0, progress=False)
    part = tmp_path / "big.bin.part"
    assert not dest.exists() and part.stat().st_size == 1_000_000
    download_url(url, dest, size=len(data), checksums={"sha1": hashlib.sha1(data).hexdigest()}, progress=False)
    assert dest.read_bytes() == data and not part.exists()
    assert server.requests == [("big.bin", None), ("big.bin", "bytes=1000000-")]


def test_interruption_is_retried_within_one_call(server, tmp_path):
    data = _payload(1_500_000)
    url = server.add("f.bin", data)
    server.cut_next("f.bin", after=123_457)
    download_url(url, tmp_path / "f.bin", checksums={"md5": hashlib.md5(data).hexdigest()}, retries=1,
                 retry_wait=0.0, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert server.requests[-1] == ("f.bin", "bytes=123457-")


def test_server_without_range_support_restarts_cleanly(tmp_path):
    data = _payload(400_000)
    with FileServer(support_range=False) as server:
        url = server.add("f.bin", data)
        (tmp_path / "f.bin.part").write_bytes(b"stale bytes that must not be kept")
        download_url(url, tmp_path / "f.bin", size=len(data), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == data


def test_wrong_checksum_is_rejected_and_leaves_nothing(server, tmp_path):
    data = _payload(200_000)
    url = server.add("f.bin", data)
    wrong = "0" * 32
    with pytest.raises(ChecksumError) as err:
        download_url(url, tmp_path / "f.bin", checksums={"md5": wrong}, progress=False)
    message = str(err.value)
    assert str(tmp_path / "f.bin") in message and wrong in message and hashlib.md5(data).hexdigest() in message
    assert _leftovers(tmp_path) == []


def test_wrong_size_is_rejected_and_leaves_nothing(server, tmp_path):
    url = server.add("f.bin", _payload(1000))
    with pytest.raises(ChecksumError, match="expected 999 bytes, got 1000 bytes"):
        download_url(url, tmp_path / "f.bin", size=999, progress=False)
    assert _leftovers(tmp_path) == []


def test_valid_copy_is_not_downloaded_again(server, tmp_path):
    data = _payload(5000)
    url = server.add("f.bin", data)
    md5 = hashlib.md5(data).hexdigest()
    ensure_file(tmp_path / "f.bin", url=url, download=True, checksums={"md5": md5}, progress=False)
    ensure_file(tmp_path / "f.bin", url=url, download=True, checksums={"md5": md5}, progress=False)
    assert len(server.requests) == 1


def test_corrupt_local_copy_is_removed_with_a_clear_error(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"garbage")
    with pytest.raises(ChecksumError, match="f.bin: md5 mismatch: expected 0{32}, got"):
        ensure_file(tmp_path / "f.bin", url=None, download=False, checksums={"md5": "0" * 32})
    assert not (tmp_path / "f.bin").exists()


def test_offline_error_names_file_folder_and_source(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        ensure_file(tmp_path / "sub" / "thing.zip", url="http://example.org/thing.zip", download=False,
                    checksums={"md5": "ab" * 16})
    message = str(err.value)
    for needle in ("'thing.zip'", str(tmp_path / "sub" / "thing.zip"), str(tmp_path / "sub"),
                   "http://example.org/thing.zip", "ab" * 16, "download=True"):
        assert needle in message


def test_http_404_is_not_retried(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_url(server.url("nope.bin"), tmp_path / "nope.bin", progress=False)
    assert len(server.requests) == 1


# ---------------------------------------------------------------------------------------------------------------
# archives
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../evil.txt", "ok/../../evil.txt", "/tmp/evil-abs.txt"])
def test_zip_member_outside_target_is_refused(tmp_path, bad):
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_bytes({"fine.txt": b"fine", bad: b"evil"}))
    out = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match=bad.replace(".", r"\.")):
        safe_extract(archive, out)
    assert _leftovers(out) == []  # nothing was extracted, not even the fine member
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize("mode", ["w:gz", "w"])
def test_tar_member_outside_target_is_refused(tmp_path, mode):
    archive = tmp_path / "a.tar"
    archive.write_bytes(tar_bytes({"fine.txt": b"fine", "../evil.txt": b"evil"}, mode=mode))
    with pytest.raises(UnsafeArchiveError, match=r"'\.\./evil\.txt'"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def test_tar_symlink_pointing_out_is_refused(tmp_path):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_bytes({"fine.txt": b"x"}, links={"d/link": "../../etc/passwd"}))
    with pytest.raises(UnsafeArchiveError, match="'d/link' is a link"):
        safe_extract(archive, tmp_path / "out")


def test_safe_extract_extracts_selected_members(tmp_path):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_bytes({"keep/a.bin": b"A", "keep/b.bin": b"B", "other.txt": b"O"}))
    safe_extract(archive, tmp_path / "out", members=["keep"])
    assert (tmp_path / "out" / "keep" / "a.bin").read_bytes() == b"A"
    assert sorted(_leftovers(tmp_path / "out")) == ["keep"]
    with pytest.raises(FileNotFoundError, match="does not contain"):
        safe_extract(archive, tmp_path / "out2", members=["missing"])


# ---------------------------------------------------------------------------------------------------------------
# restricted unpickling
# ---------------------------------------------------------------------------------------------------------------


def test_pickle_with_forbidden_global_is_refused_without_executing(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "data_batch_1"
    path.write_bytes(evil_pickle_bytes(f"touch {marker}"))
    with pytest.raises(pickle.UnpicklingError, match=r"(posix|os)\.system"):
        load_pickle(path)
    assert not marker.exists()


def test_truncated_pickle_gives_a_clear_error(tmp_path):
    full = py2_pickle_dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]})
    path = tmp_path / "data_batch_2"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match="data_batch_2: truncated or corrupt pickle"):
        load_pickle(path)


def test_py2_style_pickle_loads_with_str_keys(tmp_path):
    array = np.random.default_rng().integers(0, 256, (3, 3072), dtype=np.uint8)
    raw = py2_pickle_dumps({b"data": array, b"labels": [7, 8, 9], b"batch_label": b"training batch 1 of 5"})
    assert set(pickle.loads(raw, encoding="bytes")) == {b"data", b"labels", b"batch_label"}  # as the real files
    path = tmp_path / "batch"
    path.write_bytes(raw)
    loaded = load_pickle(path)
    assert np.array_equal(loaded["data"], array) and loaded["labels"] == [7, 8, 9]


# ---------------------------------------------------------------------------------------------------------------
# atomic writes and caches
# ---------------------------------------------------------------------------------------------------------------


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), atomic_write(tmp_path / "out.bin") as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert _leftovers(tmp_path) == []
    with pytest.raises(RuntimeError, match="expected 5"), atomic_write(tmp_path / "out.bin", expected_size=5) as f:
        f.write(b"123")
    assert _leftovers(tmp_path) == []


def test_cache_with_wrong_size_is_rebuilt(tmp_path):
    cache = tmp_path / "c.u8"
    manifest = write_cache(cache, [b"abc", np.arange(5, dtype=np.uint8)], {"kind": "test"})
    assert manifest["nbytes"] == 8 and cache.read_bytes() == b"abc\x00\x01\x02\x03\x04"
    assert read_cache(cache, {"kind": "test"}) is not None
    assert read_cache(cache, {"kind": "other"}) is None
    with open(cache, "ab") as f:
        f.write(b"x")  # e.g. a cache from an interrupted or different build
    assert read_cache(cache) is None
    (tmp_path / "d.u8").write_bytes(b"no manifest")
    assert read_cache(tmp_path / "d.u8") is None


# ---------------------------------------------------------------------------------------------------------------
# datasets and samplers
# ---------------------------------------------------------------------------------------------------------------


def _stream(tmp_path, n: int):
    data = np.random.default_rng().integers(0, 256, n, dtype=np.uint8)
    path = tmp_path / "stream.u8"
    path.write_bytes(data.tobytes())
    return path, data


@pytest.mark.parametrize(("segments", "seq_len", "min_context", "pad"), [
    ([(0, 700, 1000)], 64, 0, 1),
    ([(0, 700, 1000)], 64, 48, 1),
    ([(0, 700, 1000)], 64, 63, 3),
    ([(0, 0, 300)], 32, 16, 2),  # the stream start: no context before byte 0
    ([(0, 990, 1000)], 64, 32, 1),
    ([(0, 10, 1000)], 100, 99, 4),
    ([(0, 0, 200), (200, 200, 230), (230, 230, 231), (231, 231, 600)], 32, 8, 2),  # files: own context each
])
def test_tail_scored_windows_score_every_byte_exactly_once(tmp_path, segments, seq_len, min_context, pad):
    path, data = _stream(tmp_path, 1000)
    ds = TailScoredWindows(path, segments, seq_len, min_context, pad_to_multiple=pad)
    assert len(ds) % pad == 0
    counts = np.zeros(len(data), dtype=np.int64)
    for k in range(len(ds)):
        window, first = ds[k]
        a, _ = ds.layout(k)
        assert window.dtype == torch.uint8 and window.shape == (seq_len + 1,)
        assert bytes(window.numpy()) == data[a:a + seq_len + 1].tobytes()
        context_start = max(c for c, _, _ in segments if c <= a)
        assert not any(a < c < a + seq_len + 1 for c, _, _ in segments)  # a window lies inside one segment
        for j in range(first, seq_len):  # target j is stream byte a + 1 + j, seen after j + 1 bytes of context
            counts[a + 1 + j] += 1
            assert j + 1 >= min_context or a == context_start  # less context only at a segment's beginning
    expected = np.zeros(len(data), dtype=np.int64)
    for context_start, scored_start, stop in segments:
        if stop - context_start >= seq_len + 1:  # shorter segments are skipped
            expected[max(scored_start, context_start + 1):stop] = 1
    assert counts.tolist() == expected.tolist()  # every scored byte exactly once, nothing else


def test_tail_scored_windows_reject_bad_min_context(tmp_path):
    path, _ = _stream(tmp_path, 100)
    with pytest.raises(ValueError, match="min_context=16 must be in"):
        TailScoredWindows(path, [(0, 50, 100)], 16, 16)


def test_window_dataset_respects_segments(tmp_path):
    path, data = _stream(tmp_path, 100)
    ds = WindowDataset(path, [(0, 10), (10, 12), (12, 40)], window=5, stride=4)
    assert len(ds) == 2 + 0 + 6  # the 2-byte segment holds no window
    starts = [ds.position(i) for i in range(len(ds))]
    assert starts == [0, 4, 12, 16, 20, 24, 28, 32]
    assert bytes(ds[3].numpy()) == data[16:21].tobytes()
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_random_window_sampler_epochs_and_ddp_ranks(tmp_path):
    sampler = RandomWindowSampler(num_positions=10_000, num_samples=64, seed=3)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == epoch0  # reproducible
    sampler.set_epoch(1)
    assert list(sampler) != epoch0  # new crops each epoch
    assert all(0 <= i < 10_000 for i in epoch0) and len(epoch0) == 64
    # Lightning wraps a custom sampler in DistributedSamplerWrapper under DDP: the ranks split one draw.
    shares = []
    for rank in range(2):
        inner = RandomWindowSampler(num_positions=10_000, num_samples=64, seed=3)
        wrapper = DistributedSamplerWrapper(inner, num_replicas=2, rank=rank, shuffle=True, seed=0)
        wrapper.set_epoch(5)
        shares.append(list(wrapper))
    inner.set_epoch(5)
    assert sorted(shares[0] + shares[1]) == sorted(inner)
    assert shares[0] != shares[1]


def test_holdout_split_is_seeded_and_disjoint():
    kept, held = holdout_split(50_000, 2000, 11172018)
    assert len(kept) == 48_000 and len(held) == 2000
    assert np.union1d(kept, held).tolist() == list(range(50_000))
    kept2, held2 = holdout_split(50_000, 2000, 11172018)
    assert np.array_equal(held, held2) and not np.array_equal(held, holdout_split(50_000, 2000, 1)[1])
    with pytest.raises(ValueError, match="cannot hold out"):
        holdout_split(10, 10, 0)


def test_zip_symlink_pointing_out_is_refused(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "../../outside")
    (tmp_path / "l.zip").write_bytes(buf.getvalue())
    with pytest.raises(UnsafeArchiveError, match="'link' is a link"):
        safe_extract(tmp_path / "l.zip", tmp_path / "out")


def test_tar_device_member_is_refused(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("dev")
        info.type = tarfile.CHRTYPE
        tar.addfile(info)
    (tmp_path / "d.tar").write_bytes(buf.getvalue())
    with pytest.raises(UnsafeArchiveError, match="device"):
        safe_extract(tmp_path / "d.tar", tmp_path / "out")
    assert not os.path.exists(tmp_path / "out" / "dev")
