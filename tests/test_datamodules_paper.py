"""The paper's DataModules against small fixtures in the exact release formats, served on 127.0.0.1."""

from __future__ import annotations

import csv
import hashlib
import pickle

import numpy as np
import pytest
import torch
from data_fixtures import (
    CIFAR_BATCHES,
    FileServer,
    chrabaszcz_batch,
    cifar_archive,
    enwik8_zip,
    evil_pickle_bytes,
    oord_pngs,
    tar_bytes,
    write_audio,
    write_members,
    zip_bytes,
)

from lightning_sparse.datamodules import (
    AudioDataModule,
    ChecksumError,
    CIFAR10DataModule,
    Enwik8DataModule,
    ImageNet64DataModule,
    UnsafeArchiveError,
)


@pytest.fixture
def server():
    with FileServer() as s:
        yield s


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _hwc(images_chw: np.ndarray) -> np.ndarray:
    return images_chw.transpose(0, 2, 3, 1).reshape(len(images_chw), -1)


# ---------------------------------------------------------------------------------------------------------------
# Enwik8
# ---------------------------------------------------------------------------------------------------------------

ENWIK8_BYTES = 20_000


def _enwik8(server, tmp_path, data: bytes, **kwargs) -> Enwik8DataModule:
    archive = enwik8_zip(data)
    url = server.add("enwik8.zip", archive)
    args = dict(data_dir=str(tmp_path / "enwik8"), seq_len=64, batch_size=5, url=url, zip_size=len(archive),
                size=len(data), md5=_md5(data), val_bytes=2000, test_bytes=1500, val_min_context=0,
                test_min_context=48, train_samples=7)
    return Enwik8DataModule(**{**args, **kwargs})


def test_enwik8_download_splits_and_tail_scoring(server, tmp_path):
    data = np.random.default_rng().integers(9, 127, ENWIK8_BYTES, dtype=np.uint8).tobytes()
    dm = _enwik8(server, tmp_path, data)
    dm.prepare_data()
    dm.setup("fit")
    assert (tmp_path / "enwik8" / "enwik8").read_bytes() == data
    train = torch.cat(list(dm.train_dataloader()))
    assert train.shape == (7, 65) and all(bytes(w.numpy()) in data[:16_500] for w in train)
    for loader, (a, b), min_context in ((dm.val_dataloader(), (16_500, 18_500), 0),
                                        (dm.test_dataloader(), (18_500, 20_000), 48)):
        scored, total = b"", 0
        for windows, first in loader:
            assert windows.dtype == torch.uint8 and windows.shape[1] == 65 and first.dtype == torch.int64
            assert bool((first >= min_context).all())
            total += int((64 - first).sum())
            for w, f in zip(windows, first, strict=True):
                scored += bytes(w[1 + f:].numpy())
        assert total == b - a and scored == data[a:b]  # every split byte scored once, in order
    dm.prepare_data()  # a valid copy is there: no second download
    assert [r[0] for r in server.requests] == ["enwik8.zip"]


def test_enwik8_offline_error_names_the_files(tmp_path):
    dm = Enwik8DataModule(data_dir=str(tmp_path / "e8"), seq_len=64, batch_size=1, download=False)
    with pytest.raises(FileNotFoundError) as err:
        dm.prepare_data()
    message = str(err.value)
    for needle in ("'enwik8.zip'", str(tmp_path / "e8" / "enwik8.zip"), str(tmp_path / "e8"),
                   "http://mattmahoney.net/dc/enwik8.zip", str(tmp_path / "e8" / "enwik8")):
        assert needle in message


def test_enwik8_archive_with_parent_member_is_refused(server, tmp_path):
    data = b"x" * ENWIK8_BYTES
    archive = enwik8_zip(data, extra={"../escaped": b"evil"})
    url = server.add("enwik8.zip", archive)
    dm = Enwik8DataModule(data_dir=str(tmp_path / "e8"), seq_len=64, batch_size=1, url=url, zip_size=None,
                          size=len(data), md5=None, val_bytes=100, test_bytes=100)
    with pytest.raises(UnsafeArchiveError, match="'../escaped'"):
        dm.prepare_data()
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "e8" / "enwik8").exists()


def test_enwik8_wrong_checksum_removes_the_file(server, tmp_path):
    data = b"y" * ENWIK8_BYTES
    dm = _enwik8(server, tmp_path, data, md5="f" * 32)
    with pytest.raises(ChecksumError, match=f"enwik8: md5 mismatch: expected {'f' * 32}, got {_md5(data)}"):
        dm.prepare_data()
    assert not (tmp_path / "enwik8" / "enwik8").exists()


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------------------------


def _cifar(server, tmp_path, per_batch: int = 40):
    rng = np.random.default_rng()
    archive, files, train, test = cifar_archive(per_batch, rng)
    url = server.add("cifar-10-python.tar.gz", archive)
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "cifar"), batch_size=8, url=url, md5=_md5(archive),
                           file_md5s={name: _md5(files[name]) for name in CIFAR_BATCHES}, val_size=20)
    return dm, train, test


def _eval_records(loader) -> torch.Tensor:
    """All records of an evaluation loader of one process, checking that each is scored in full (no padding)."""
    records, first = (torch.cat(parts) for parts in zip(*loader, strict=True))
    assert first.tolist() == [0] * len(records)
    return records


def test_cifar10_records_are_interleaved_raster_and_split(server, tmp_path):
    dm, train, test = _cifar(server, tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    train_cache = np.fromfile(dm.cache_path("train"), dtype=np.uint8).reshape(-1, 3072)
    assert np.array_equal(train_cache, _hwc(train))
    r, g, b = train[0, :, 1, 2]
    assert train_cache[0, (1 * 32 + 2) * 3:(1 * 32 + 2) * 3 + 3].tolist() == [r, g, b]
    assert len(dm.train_set) == 180 and len(dm.val_set) == 20
    assert all(dm.val_set[i][1] == 0 for i in range(20))  # (record, first_scored 0): every byte is scored
    got = {bytes(dm.train_set[i].numpy()) for i in range(180)} | {bytes(dm.val_set[i][0].numpy()) for i in range(20)}
    assert got == {row.tobytes() for row in _hwc(train)}
    test_batches = _eval_records(dm.test_dataloader())
    assert test_batches.dtype == torch.uint8 and np.array_equal(test_batches.numpy(), _hwc(test))
    train_batch = next(iter(dm.train_dataloader()))
    assert train_batch.shape == (8, 3072)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_cifar10_ddp_evaluation_scores_every_image_once(server, tmp_path, batch_size):
    from types import SimpleNamespace

    from torch.utils.data import DataLoader, DistributedSampler

    from lightning_sparse.image import ImageDensityModel

    dm, train, test = _cifar(server, tmp_path, per_batch=5)  # 25 training images, 5 test images
    dm.val_size = 7
    dm.trainer = SimpleNamespace(world_size=2)  # what a 2-process Trainer shows its DataModule
    dm.setup("fit")
    model = ImageDensityModel(n_layer=1, n_head=2, d_model=32)
    train_rows = {row.tobytes() for row in _hwc(train)}
    for split, n, real in (("val", 7, train_rows), ("test", 5, {row.tobytes() for row in _hwc(test)})):
        dataset = getattr(dm, f"{split}_set")
        assert len(dataset) == n + 1  # padded to a multiple of 2 with one record
        dims, scored_records = 0, []
        for rank in range(2):  # Lightning's DistributedSampler for evaluation: no shuffling, ranks interleaved
            sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=False)
            for batch in DataLoader(dataset, batch_size=batch_size, sampler=sampler):
                _, targets, scored = model._inputs_and_targets(batch)
                assert targets.shape[1] == 3072
                dims += int(scored.sum())
                scored_records += [bytes(r.numpy()) for r, s in zip(batch[0], scored, strict=True) if s.any()]
        assert dims == n * 3072  # exactly N images' dims, none counted twice
        assert len(set(scored_records)) == n and set(scored_records) <= real  # n distinct real images
    with pytest.raises(ValueError, match="pad_to_multiple=0 must be a positive integer"):
        type(dm.val_set)(dm.val_set.records, pad_to_multiple=0)


def test_cifar10_planted_pixels(server, tmp_path):
    images = np.zeros((3, 3, 32, 32), dtype=np.uint8)
    images[1, :, 4, 5] = (11, 22, 33)  # image 1, pixel (row 4, col 5): R=11, G=22, B=33
    images[2, 0, 31, 31], images[2, 1, 0, 0] = 250, 7  # last R value of image 2; first G value of image 2
    from data_fixtures import cifar_batch

    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in CIFAR_BATCHES:
        (folder / name).write_bytes(cifar_batch(images, [0, 1, 2], name))
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "cifar"), batch_size=3, download=False, file_md5s={},
                           val_size=1)
    dm.prepare_data()
    dm.setup("test")
    records = _eval_records(dm.test_dataloader()).numpy()
    assert records[1, (4 * 32 + 5) * 3:(4 * 32 + 5) * 3 + 3].tolist() == [11, 22, 33]
    assert records[2, 3071 - 2] == 250 and records[2, 1] == 7
    assert records[0].sum() == 0 and int(records[1].astype(int).sum()) == 66


def test_cifar10_forbidden_global_is_refused_without_executing(tmp_path):
    marker = tmp_path / "executed"
    members = {f"cifar-10-batches-py/{name}": b"" for name in CIFAR_BATCHES}
    members["cifar-10-batches-py/data_batch_1"] = evil_pickle_bytes(f"touch {marker}")
    (tmp_path / "cifar").mkdir()
    (tmp_path / "cifar" / "cifar-10-python.tar.gz").write_bytes(tar_bytes(members))
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "cifar"), batch_size=1, download=False, md5=None, file_md5s={})
    with pytest.raises(pickle.UnpicklingError, match="data_batch_1: the pickle asks for (posix|os).system"):
        dm.prepare_data()
    assert not marker.exists()


def test_cifar10_truncated_batch_gives_a_clear_error(server, tmp_path):
    dm, _, _ = _cifar(server, tmp_path, per_batch=5)
    dm.file_md5s = {}
    dm.prepare_data()  # builds the caches; now simulate a cut-off batch file on a fresh build
    for split in ("train", "test"):
        dm.cache_path(split).unlink()
    batch = tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:5000])
    with pytest.raises(ValueError, match="data_batch_3: truncated or corrupt pickle"):
        dm.prepare_data()


def test_cifar10_bad_batch_checksum_and_offline_errors(server, tmp_path):
    dm, _, _ = _cifar(server, tmp_path, per_batch=5)
    dm.file_md5s["test_batch"] = "0" * 32
    with pytest.raises(ChecksumError, match="test_batch: md5 mismatch: expected 0{32}"):
        dm.prepare_data()
    assert not (tmp_path / "cifar" / "cifar-10-batches-py" / "test_batch").exists()
    offline = CIFAR10DataModule(data_dir=str(tmp_path / "none"), batch_size=1, download=False)
    with pytest.raises(FileNotFoundError, match="'cifar-10-python.tar.gz': put it at .*none/cifar-10-python.tar.gz"):
        offline.prepare_data()
    with pytest.raises(ValueError, match="seq_len=1024, but a CIFAR-10 image is 3072 bytes"):
        CIFAR10DataModule(seq_len=1024)


# ---------------------------------------------------------------------------------------------------------------
# ImageNet 64x64
# ---------------------------------------------------------------------------------------------------------------


def _images(n: int) -> np.ndarray:
    return np.random.default_rng().integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize("layout", ["folders", "tars"])
def test_imagenet64_oord_pngs(tmp_path, layout):
    train, valid = _images(9), _images(4)
    train_names = [f"{n:07d}.png" for n in (50, 3, 7000, 12, 999, 1, 64, 8, 20)]
    members = {**oord_pngs("train_64x64", train, train_names),
               **oord_pngs("valid_64x64", valid, [f"{n:05d}.png" for n in range(4)])}
    root = tmp_path / "in64"
    if layout == "folders":
        write_members(root, members)
    else:
        root.mkdir()
        for split in ("train_64x64", "valid_64x64"):
            part = {k: v for k, v in members.items() if k.startswith(split)}
            (root / f"{split}.tar").write_bytes(tar_bytes(part, mode="w"))
    dm = ImageNet64DataModule(data_dir=str(root), batch_size=2, download=False, val_size=2,
                              decode_workers=0 if layout == "folders" else 2)
    dm.prepare_data()
    dm.setup("fit")
    order = np.argsort(train_names)  # images are taken in sorted file-name order
    cache = np.fromfile(dm.cache_path("train"), dtype=np.uint8).reshape(-1, 12288)
    assert np.array_equal(cache, train[order].reshape(9, -1))
    assert len(dm.train_set) == 7 and len(dm.val_set) == 2
    test = _eval_records(dm.test_dataloader())
    assert np.array_equal(test.numpy(), valid.reshape(4, -1))
    r, g, b = valid[3, 10, 20]
    assert test[3, (10 * 64 + 20) * 3:(10 * 64 + 20) * 3 + 3].tolist() == [r, g, b]


def test_imagenet64_oord_rejects_wrong_image_size(tmp_path):
    from data_fixtures import png_bytes

    root = tmp_path / "in64"
    write_members(root, {"train_64x64/a.png": png_bytes(np.zeros((32, 32, 3), np.uint8)),
                         "valid_64x64/b.png": png_bytes(np.zeros((64, 64, 3), np.uint8))})
    dm = ImageNet64DataModule(data_dir=str(root), batch_size=1, download=False, val_size=0, decode_workers=0)
    with pytest.raises(ValueError, match="a.png is 32x32, expected 64x64"):
        dm.prepare_data()


@pytest.mark.parametrize("fmt", ["pickle", "npz"])
def test_imagenet64_chrabaszcz_batches(tmp_path, fmt):
    rng = np.random.default_rng()
    chw = rng.integers(0, 256, (10, 2, 3, 64, 64), dtype=np.uint8)  # 10 train batches of 2 images
    val = rng.integers(0, 256, (3, 3, 64, 64), dtype=np.uint8)
    suffix = ".npz" if fmt == "npz" else ""
    zip_suffix = "_npz" if fmt == "npz" else ""
    root = tmp_path / "in64"
    root.mkdir()
    for part, batches in (("part1", range(1, 6)), ("part2", range(6, 11))):
        members = {f"train_data_batch_{i}{suffix}": chrabaszcz_batch(chw[i - 1], [i] * 2, True, fmt) for i in batches}
        (root / f"Imagenet64_train_{part}{zip_suffix}.zip").write_bytes(zip_bytes(members))
    (root / f"Imagenet64_val{zip_suffix}.zip").write_bytes(
        zip_bytes({f"val_data{suffix}": chrabaszcz_batch(val, [1, 2, 3], False, fmt)}))
    dm = ImageNet64DataModule(data_dir=str(root), format="chrabaszcz", batch_size=3, download=False, val_size=5)
    dm.prepare_data()
    dm.setup("fit")
    cache = np.fromfile(dm.cache_path("train"), dtype=np.uint8).reshape(-1, 12288)
    assert np.array_equal(cache, _hwc(chw.reshape(20, 3, 64, 64)))
    test = _eval_records(dm.test_dataloader()).numpy()
    assert np.array_equal(test, _hwc(val))
    assert test[2, (5 * 64 + 6) * 3 + 1] == val[2, 1, 5, 6]  # G of pixel (5, 6)
    assert len(dm.train_set) == 15 and len(dm.val_set) == 5


def test_imagenet64_offline_error_and_format_check(tmp_path):
    dm = ImageNet64DataModule(data_dir=str(tmp_path / "x"), batch_size=1, download=False)
    with pytest.raises(FileNotFoundError, match=r"'train_64x64.tar': put it at .*Academic Torrents.*train_64x64"):
        dm.prepare_data()
    with pytest.raises(ValueError, match="format='jpeg'"):
        ImageNet64DataModule(format="jpeg")


# ---------------------------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------------------------


def _mu_law(x: np.ndarray) -> np.ndarray:
    import torchaudio.functional as taf

    return taf.mu_law_encoding(torch.from_numpy(x).clamp(-1, 1), 256).to(torch.uint8).numpy()


def test_audio_encoding_split_and_crops(tmp_path):
    root = tmp_path / "music"
    levels = {}
    for i in range(12):  # constant-level mono 12 kHz files: every window must be uniform
        level = -0.9 + 0.15 * i
        write_audio(root / f"piece_{i:02d}.wav", np.full(3000 + 100 * i, level, np.float32), 12_000)
        levels[f"piece_{i:02d}.wav"] = int(_mu_law(np.array([level], np.float32))[0])
    stereo = np.stack([np.linspace(-0.5, 0.5, 4000), np.linspace(0.5, -0.1, 4000)], axis=1).astype(np.float32)
    write_audio(root / "sub" / "stereo.flac", stereo, 12_000, subtype="PCM_16")
    write_audio(root / "fast.wav", np.zeros(24_000, np.float32), 24_000)
    with open(tmp_path / "meta.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["canonical_title", "split", "audio_filename", "duration"])
        for i in range(12):
            writer.writerow([f"t{i}", ["train", "validation", "test"][i % 3], f"piece_{i:02d}.wav", 0.3])
        writer.writerow(["s", "train", "sub/stereo.flac", 0.3])
        writer.writerow(["z", "test", "fast.wav", 1.0])
    dm = AudioDataModule(data_dir=str(root), seq_len=255, batch_size=4, cache_dir=str(tmp_path / "cache"),
                         split_csv=str(tmp_path / "meta.csv"), train_samples=40, decode_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    splits = dm.split_of(dm.files())
    assert splits["val"] == [f"piece_{i:02d}.wav" for i in (1, 4, 7, 10)]
    assert splits["test"] == ["fast.wav"] + [f"piece_{i:02d}.wav" for i in (2, 5, 8, 11)]
    # the test cache: fast.wav resampled 24 kHz -> 12 kHz (12,000 samples of silence = μ-law 128), then the pieces
    test_cache = np.fromfile(dm.cache_path("test", splits["test"]), dtype=np.uint8)
    assert len(test_cache) == 12_000 + sum(3000 + 100 * i for i in (2, 5, 8, 11))
    assert (test_cache[:12_000] == 128).all() and (test_cache[12_000:15_200] == levels["piece_02.wav"]).all()
    # the stereo file is mixed to mono before μ-law encoding
    train_cache = np.fromfile(dm.cache_path("train", splits["train"]), dtype=np.uint8)
    mono = stereo.mean(axis=1)
    quantized = np.round(mono * 32767) / 32767  # PCM_16 round trip
    assert np.abs(train_cache[-4000:].astype(int) - _mu_law(quantized.astype(np.float32)).astype(int)).max() <= 1
    crops = torch.cat(list(dm.train_dataloader()))
    assert crops.shape == (40, 256)
    stereo_bytes = train_cache[-4000:].tobytes()
    for w in crops:  # a crop lies inside one file: a uniform piece, or a slice of the stereo file
        assert (len(set(w.tolist())) == 1 and int(w[0]) in levels.values()) or bytes(w.numpy()) in stereo_bytes
    scored = 0
    for windows, first in dm.val_dataloader():  # windows stay inside one file; all but each file's first scored
        assert all(len(set(w.tolist())) == 1 for w in windows)
        scored += int((255 - first).sum())
    assert scored == sum(3000 + 100 * i - 1 for i in (1, 4, 7, 10))


def test_audio_hash_split_workers_and_errors(tmp_path):
    root = tmp_path / "clips"
    for i in range(40):
        write_audio(root / f"clip_{i:03d}.wav", np.random.default_rng().uniform(-1, 1, 800).astype(np.float32), 16_000)
    dm = AudioDataModule(data_dir=str(root), seq_len=64, batch_size=2, cache_dir=str(tmp_path / "c"),
                         val_fraction=0.2, test_fraction=0.2, decode_workers=2)
    splits = dm.split_of(dm.files())
    assert sorted(sum(splits.values(), [])) == dm.files() and all(splits.values())
    assert dm.split_of(dm.files()) == splits  # deterministic
    dm.prepare_data()
    dm.setup("fit")
    assert next(iter(dm.train_dataloader())).shape == (2, 65)
    assert dm.cache_path("val", splits["val"]).stat().st_size == 600 * len(splits["val"])  # 800 @16k -> 600 @12k
    too_long = AudioDataModule(data_dir=str(root), seq_len=4096, batch_size=1, cache_dir=str(tmp_path / "c"),
                               val_fraction=0.2, test_fraction=0.2, decode_workers=0)
    with pytest.raises(ValueError, match="no train file holds one window of seq_len \\+ 1 = 4097 samples"):
        too_long.setup("fit")
    with pytest.raises(FileNotFoundError, match="no .mp3 files below"):
        AudioDataModule(data_dir=str(tmp_path), extensions=[".mp3"], cache_dir=str(tmp_path / "c")).files()
    few = AudioDataModule(data_dir=str(root), val_fraction=0.001, test_fraction=0.001)
    with pytest.raises(ValueError, match="split\\(s\\) of the 40 files .* are empty"):
        few.split_of(few.files())

