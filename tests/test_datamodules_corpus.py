"""ByteCorpusDataModule: the offline default corpus, user files, splits, loaders and errors."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_sparse.datamodules import ByteCorpusDataModule
from lightning_sparse.datamodules.byte_corpus import stdlib_sources


def _write_files(folder: Path, sizes: list[int]) -> tuple[list[Path], bytes]:
    rng = np.random.default_rng()
    folder.mkdir(parents=True, exist_ok=True)
    paths, blobs = [], []
    for i, n in enumerate(sizes):
        blob = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        path = folder / f"part_{i:02d}.bin"
        path.write_bytes(blob)
        paths.append(path)
        blobs.append(blob)
    return paths, b"".join(blobs)


def test_default_corpus_is_the_stdlib_sources(tmp_path):
    files = stdlib_sources()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert files == sorted(files) and files == stdlib_sources()  # deterministic order
    assert all(f.suffix == ".py" and stdlib in f.parents and "site-packages" not in f.parts for f in files)
    assert stdlib / "os.py" in files
    total = sum(f.stat().st_size for f in files)
    assert 5_000_000 < total < 200_000_000  # ≈30 MB on CPython 3.11

    dm = ByteCorpusDataModule(seq_len=512, batch_size=4, cache_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    cache = dm.cache_path()
    assert cache.stat().st_size == total
    head = b""
    for f in files:  # the stream is the files' bytes in sorted order
        head += f.read_bytes()
        if len(head) >= 513:
            break
    assert bytes(dm.train_set[0].numpy()) == head[:513]
    bounds = dm.split_bounds(total)
    n_val, n_test = bounds["val"][1] - bounds["val"][0], bounds["test"][1] - bounds["test"][0]
    assert n_val == n_test == int(total * 0.05) and bounds["train"] == (0, total - n_val - n_test)
    assert bounds["train"][1] == bounds["val"][0] and bounds["val"][1] == bounds["test"][0]
    assert len(dm.val_set) == -(-n_val // 512) and len(dm.train_sampler) == bounds["train"][1] // 512
    batch = next(iter(dm.train_dataloader()))
    assert batch.dtype == torch.uint8 and batch.shape == (4, 513)


def test_user_files_globs_and_windows(tmp_path):
    paths, stream = _write_files(tmp_path / "data", [3000, 1, 4999, 2000])
    dm = ByteCorpusDataModule(paths=[str(tmp_path / "data" / "part_0[0-1].bin"), str(paths[3]), str(paths[2])],
                              seq_len=64, batch_size=3, cache_dir=str(tmp_path / "cache"), train_samples=10)
    dm.prepare_data()
    dm.setup("fit")
    expected = (tmp_path / "data" / "part_00.bin").read_bytes() + paths[1].read_bytes() + paths[3].read_bytes() \
        + paths[2].read_bytes()  # glob matches sorted, then the files in the order given
    assert dm.cache_path().read_bytes() == expected
    total = len(expected)
    bounds = dm.split_bounds(total)
    scored = b""
    for windows, first in dm.val_dataloader():  # (window, first_scored): each val byte is a target once
        assert windows.shape[1] == 65
        for w, f in zip(windows, first, strict=True):
            assert bytes(w.numpy()) in expected
            scored += bytes(w[1 + f:].numpy())
    assert scored == expected[bounds["val"][0]:bounds["val"][1]]
    train = torch.cat(list(dm.train_dataloader()))
    assert train.shape == (10, 65)
    train_bytes = expected[:bounds["train"][1]]
    assert all(bytes(w.numpy()) in train_bytes for w in train)  # crops come from the training split only


def test_loader_with_two_workers(tmp_path):
    _, stream = _write_files(tmp_path / "d", [20_000])
    dm = ByteCorpusDataModule(paths=[str(tmp_path / "d")], seq_len=100, batch_size=4, num_workers=2,
                              cache_dir=str(tmp_path / "cache"), train_samples=16)
    dm.prepare_data()
    dm.setup("fit")
    train = torch.cat(list(dm.train_dataloader()))
    assert train.shape == (16, 101)
    assert all(bytes(w.numpy()) in stream[:18_000] for w in train)
    windows, first = next(iter(dm.test_dataloader()))
    assert bytes(windows[0].numpy()) == stream[18_999:19_100] and int(first[0]) == 0  # context: the last val byte


def test_changed_corpus_replaces_its_cache(tmp_path):
    paths, _ = _write_files(tmp_path / "d", [5000])
    dm = ByteCorpusDataModule(paths=[str(paths[0])], seq_len=16, batch_size=2, cache_dir=str(tmp_path / "c"))
    dm.prepare_data()
    first = dm.cache_path()
    paths[0].write_bytes(b"x" * 6000)
    os.utime(paths[0], ns=(1, 1))
    dm.prepare_data()
    assert dm.cache_path() == first and first.read_bytes() == b"x" * 6000
    assert sorted(p.name for p in (tmp_path / "c").glob("*.u8")) == [first.name]  # the old content is gone


def test_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ByteCorpusDataModule(paths=[str(tmp_path / "missing.txt")], seq_len=8, batch_size=1).prepare_data()
    with pytest.raises(FileNotFoundError, match="matches no file"):
        ByteCorpusDataModule(paths=[str(tmp_path / "*.nothing")], seq_len=8, batch_size=1).prepare_data()
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        ByteCorpusDataModule(paths=[str(tmp_path / "empty.txt")], seq_len=8, batch_size=1,
                             cache_dir=str(tmp_path / "c")).prepare_data()
    (tmp_path / "small.txt").write_bytes(b"a" * 1000)
    dm = ByteCorpusDataModule(paths=[str(tmp_path / "small.txt")], seq_len=64, batch_size=1,
                              cache_dir=str(tmp_path / "c"))
    dm.prepare_data()
    with pytest.raises(ValueError, match="smallest split has 50 bytes, shorter than one window of seq_len"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="paths=\\[\\] names no file"):
        ByteCorpusDataModule(paths=[], seq_len=8, batch_size=1)
    with pytest.raises(ValueError, match="seq_len=0 must be a positive integer"):
        ByteCorpusDataModule(seq_len=0, batch_size=1)
