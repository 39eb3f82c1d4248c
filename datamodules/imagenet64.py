"""ImageNet64DataModule: 64x64 RGB images as 12,288-byte raster sequences, from either published release."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np

from .archive import check_tar_members, safe_extract
from .base import RecordDataModule
from .decode import load_pickle, planar_to_interleaved
from .fetch import ensure_file
from .store import ordered_map, read_cache, write_cache

SIDE = 64
RECORD = SIDE * SIDE * 3
OORD_SPLITS = {"train": "train_64x64", "test": "valid_64x64"}
OORD_SOURCE = ("Academic Torrents 96816a530ee002254d29bf7a61c0c158d3dedc3b (formerly image-net.org/small/"
               "train_64x64.tar and valid_64x64.tar)")
CHRABASZCZ_SOURCE = "https://image-net.org/download-images (login), 'Downsampled ImageNet 64x64'"
CHRABASZCZ_FILES = {"train": [f"train_data_batch_{i}" for i in range(1, 11)], "test": ["val_data"]}
CHRABASZCZ_ARCHIVES = {"train": ["Imagenet64_train_part1", "Imagenet64_train_part2"], "test": ["Imagenet64_val"]}
PNG_CHUNK = 256  # images per task sent to a decoding process
MAX_PNG_BYTES = 1 << 20  # a 64x64 RGB PNG holds 12,288 bytes of pixels; a member this large is not one


def _decode_pngs(items: list[tuple[str, bytes | None]]) -> np.ndarray:
    """Decode PNGs (bytes, or read from the path when None) into raster rows [k, 12288] (runs in a worker)."""
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError("decoding ImageNet PNGs needs Pillow: pip install lightning-sparse[vision]") from err
    import io

    out = np.empty((len(items), RECORD), dtype=np.uint8)
    for i, (name, data) in enumerate(items):
        try:
            with Image.open(io.BytesIO(data) if data is not None else name) as img:
                array = np.asarray(img.convert("RGB"))
        except Exception as err:  # PIL raises many types; name the file whatever it is
            raise ValueError(f"cannot decode image {name}: {err}") from err
        if array.shape != (SIDE, SIDE, 3):
            raise ValueError(f"image {name} is {array.shape[1]}x{array.shape[0]}, expected 64x64; is this the 64x64 "
                             "release?")
        out[i] = array.reshape(-1)
    return out


class ImageNet64DataModule(RecordDataModule):
    """ImageNet 64x64 for unconditional density modeling; each sample is one image of 12,288 bytes (HWC raster).

    `format="oord"` (the benchmark of the paper's 3.44 bits/dim): van den Oord et al.'s flat folders of PNGs,
    `data_dir/train_64x64/` and `data_dir/valid_64x64/`, or the tars `train_64x64.tar` / `valid_64x64.tar` in
    `data_dir` (read directly, not extracted). Images are taken in sorted file-name order and decoded by
    `decode_workers` processes with a progress bar.

    `format="chrabaszcz"`: Chrabaszcz et al.'s batches `train_data_batch_1..10` and `val_data` (pickles, or
    `.npz`), extracted in `data_dir/` or inside the released zips `Imagenet64_train_part1.zip`,
    `Imagenet64_train_part2.zip`, `Imagenet64_val.zip` (or their `_npz` variants); `data` is [N, 12288]
    channel-major and is transposed to HWC. Its bits/dim are not comparable with the Oord release.

    Both are preprocessed once into `data_dir/imagenet64-{format}-{train,test}.u8` (uint8 [N, 12288]). The
    official validation set is the test set; `val_size` training images held out by a seeded permutation
    (`split_seed`) are the validation set (the authors' code held out the last 50,000 instead).

    Args:
        data_dir: folder of the release files and caches.
        format: "oord" or "chrabaszcz".
        seq_len: must be 12288 (one image); linked to the model's seq_len.
        batch_size, num_workers, pin_memory: DataLoader settings.
        download: download files named in `urls` when missing; False = offline.
        urls: {file name: URL} of mirrors, e.g. {"train_64x64.tar": "https://..."} (no official URL remains).
        md5s: {file name: md5} to verify those files.
        val_size: training images held out for validation.
        split_seed: seed of the hold-out permutation.
        decode_workers: processes that decode PNGs (default: all CPUs; 0 decodes in this process).
        seed: seed of the training order (a permutation per epoch, seeded (seed, epoch)).
        verify: hash the caches in full before use and rebuild one whose content differs from its manifest.
    """

    def __init__(
        self,
        data_dir: str = "data/imagenet64",
        format: Literal["oord", "chrabaszcz"] = "oord",
        seq_len: int = RECORD,
        batch_size: int = 4,
        num_workers: int = 0,
        download: bool = True,
        urls: dict[str, str] | None = None,
        md5s: dict[str, str] | None = None,
        val_size: int = 50_000,
        split_seed: int = 0,
        decode_workers: int | None = None,
        pin_memory: bool = False,
        seed: int = 0,
        verify: bool = False,
    ) -> None:
        super().__init__(seq_len=seq_len, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         seed=seed)
        if format not in ("oord", "chrabaszcz"):
            raise ValueError(f"format={format!r}: use 'oord' (van den Oord PNG folders, the paper's benchmark) or "
                             "'chrabaszcz' (Chrabaszcz et al. batches)")
        if seq_len != RECORD:
            raise ValueError(f"seq_len={seq_len}, but a 64x64 RGB image is {RECORD} bytes; set seq_len: {RECORD}")
        if decode_workers is not None and decode_workers < 0:
            raise ValueError(f"decode_workers={decode_workers} must be >= 0 (0 = decode in this process)")
        self.data_dir = Path(data_dir).expanduser()
        self.verify = verify
        self.format = format
        self.download, self.urls, self.md5s = download, dict(urls or {}), dict(md5s or {})
        self.val_size, self.split_seed = val_size, split_seed
        self.decode_workers = (os.cpu_count() or 1) if decode_workers is None else decode_workers

    def cache_path(self, split: str) -> Path:
        """The uint8 cache of `split` in {train, test}."""
        return self.data_dir / f"imagenet64-{self.format}-{split}.u8"

    def _get(self, name: str, source: str) -> Path:
        """`data_dir/name`, verified, downloaded from `urls[name]` when missing (unless offline)."""
        try:
            return ensure_file(self.data_dir / name, url=self.urls.get(name), download=self.download,
                               checksums={"md5": self.md5s.get(name)})
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err}; the files come from {source}") from None

    # ---- van den Oord PNGs -------------------------------------------------------------------------------------

    def _oord_chunks(self, split: str) -> tuple[int, Iterator[list[tuple[str, bytes | None]]]]:
        folder = self.data_dir / OORD_SPLITS[split]
        if folder.is_dir():
            names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() == ".png")
            if not names:
                raise FileNotFoundError(f"{folder} contains no .png files; put the {OORD_SPLITS[split]} images there")

            def from_folder() -> Iterator[list[tuple[str, bytes | None]]]:
                for i in range(0, len(names), PNG_CHUNK):
                    yield [(str(folder / n), None) for n in names[i:i + PNG_CHUNK]]

            return len(names), from_folder()
        try:
            archive = self._get(f"{OORD_SPLITS[split]}.tar", OORD_SOURCE)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err}. Alternatively put the extracted folder at {folder}.") from None
        tar = tarfile.open(archive)
        members = sorted((m for m in check_tar_members(tar, archive) if m.isfile() and m.name.lower().endswith(".png")),
                         key=lambda m: m.name)
        if not members:
            tar.close()
            raise FileNotFoundError(f"{archive} contains no .png files; is it {OORD_SPLITS[split]}.tar?")
        if large := next((m for m in members if m.size > MAX_PNG_BYTES), None):
            tar.close()
            raise ValueError(f"{archive}: member {large.name!r} declares {large.size} bytes, more than a 64x64 PNG "
                             f"can take ({MAX_PNG_BYTES}); is it {OORD_SPLITS[split]}.tar?")

        def from_tar() -> Iterator[list[tuple[str, bytes | None]]]:
            with tar:
                for i in range(0, len(members), PNG_CHUNK):
                    yield [(f"{archive}:{m.name}", tar.extractfile(m).read()) for m in members[i:i + PNG_CHUNK]]

        return len(members), from_tar()

    def _oord_images(self, split: str) -> Iterator[np.ndarray]:
        from tqdm.auto import tqdm

        count, chunks = self._oord_chunks(split)
        with tqdm(total=count, desc=f"decoding {OORD_SPLITS[split]}", unit="img") as bar:
            for rows in ordered_map(_decode_pngs, chunks, self.decode_workers):
                bar.update(len(rows))
                yield rows

    # ---- Chrabaszcz et al. batches -----------------------------------------------------------------------------

    def _find_batch(self, split: str, name: str) -> Path | None:
        # The zips may hold the batches at their top level or in a folder named after the archive.
        folders = [self.data_dir] + [self.data_dir / a for a in CHRABASZCZ_ARCHIVES[split]]
        folders += [self.data_dir / f"{a}_npz" for a in CHRABASZCZ_ARCHIVES[split]]
        for folder in folders:
            for candidate in (folder / name, folder / f"{name}.npz"):
                if candidate.is_file():
                    return candidate
        return None

    def _chrabaszcz_file(self, split: str, name: str) -> Path:
        if found := self._find_batch(split, name):
            return found
        for archive_name in CHRABASZCZ_ARCHIVES[split]:
            for zip_name in (f"{archive_name}.zip", f"{archive_name}_npz.zip"):
                if (self.data_dir / zip_name).exists() or zip_name in self.urls:
                    safe_extract(self._get(zip_name, CHRABASZCZ_SOURCE), self.data_dir)
        if found := self._find_batch(split, name):
            return found
        zips = [f"{a}.zip (or {a}_npz.zip)" for a in CHRABASZCZ_ARCHIVES[split]]
        raise FileNotFoundError(f"Missing file {name!r}: put it (or {name}.npz) in {self.data_dir}, or put "
                                f"{', '.join(zips)} there; they come from {CHRABASZCZ_SOURCE}")

    @staticmethod
    def _read_chrabaszcz(path: Path) -> np.ndarray:
        if path.suffix == ".npz":
            try:
                with np.load(path, allow_pickle=False) as npz:
                    data = npz["data"]
            except (OSError, ValueError, KeyError, EOFError) as err:
                raise ValueError(f"{path}: truncated or corrupt npz batch ({err}); delete it and run again") from err
        else:
            batch = load_pickle(path)
            data = batch.get("data") if isinstance(batch, dict) else None
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == RECORD):
            raise ValueError(f"{path} is not an ImageNet 64x64 batch (expected 'data' uint8 [N, {RECORD}])")
        return planar_to_interleaved(data, channels=3)

    def _chrabaszcz_images(self, split: str) -> Iterator[np.ndarray]:
        paths = [self._chrabaszcz_file(split, name) for name in CHRABASZCZ_FILES[split]]
        for path in paths:
            yield self._read_chrabaszcz(path)

    # ---- hooks -------------------------------------------------------------------------------------------------

    def prepare_folder(self) -> Path:
        """The folder prepared (and locked meanwhile): `data_dir`."""
        return self.data_dir

    def prepare(self) -> None:
        """Decode/convert each split once into its uint8 cache."""
        for split in ("train", "test"):
            if read_cache(self.cache_path(split), {"record_size": RECORD}, verify=self.verify):
                continue
            images = self._oord_images(split) if self.format == "oord" else self._chrabaszcz_images(split)
            write_cache(self.cache_path(split), images, {"record_size": RECORD, "format": self.format})

    def setup(self, stage: str | None = None) -> None:
        """Open the caches; hold out `val_size` training images for validation.

        Training items are records; validation/test items are (record, first_scored) pairs padded to a multiple of
        the world size with records that score nothing, so DDP bits/dim count every image once.
        """
        self.setup_records(RECORD, self.val_size, self.split_seed)

