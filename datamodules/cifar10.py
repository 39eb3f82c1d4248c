"""CIFAR10DataModule: 32x32 RGB images as 3,072-byte raster sequences, the paper's 48,000/2,000/10,000 split."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .archive import safe_extract
from .base import RecordDataModule
from .decode import load_pickle, planar_to_interleaved
from .fetch import ensure_file, verify_file
from .store import read_cache, write_cache

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILE_MD5S = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
RECORD = 32 * 32 * 3


class CIFAR10DataModule(RecordDataModule):
    """CIFAR-10 (python version) for unconditional density modeling; each sample is one image of 3,072 bytes.

    Byte order: raster order, R, G, B interleaved per pixel (the batches store R, G, B planes; they are
    transposed CHW → HWC once, when the cache is built). Splits as the paper: `val_size` (2,000) images of the
    50,000 training images held out by a seeded permutation — the algorithm of scikit-learn's
    `train_test_split(test_size=2000, random_state=11172018)` used by the authors' DistAug code (same
    RandomState stream; not checked bit for bit against scikit-learn here) — and the official test batch as test.

    `prepare_data` uses `data_dir/cifar-10-batches-py/` when its batches are present and verified (the layout
    torchvision also uses), else `data_dir/cifar-10-python.tar.gz` (downloaded unless offline). Batches are
    unpickled with a restricted unpickler (numpy arrays and builtins only) and cached as
    `data_dir/cifar10-{train,test}.u8` (uint8 [N, 3072]); the batch files are not read again.

    Args:
        data_dir: folder of the archive / extracted batches / caches.
        seq_len: must be 3072 (one image); linked to the model's seq_len.
        batch_size, num_workers, pin_memory: DataLoader settings.
        download: fetch `url` when files are missing; False = offline.
        url, md5: the archive and its md5 (None skips the check).
        file_md5s: md5 per batch file (None skips the checks).
        val_size: images held out of the training batches for validation.
        split_seed: seed of the hold-out permutation (11172018 as the authors).
        seed: seed of the training order (a permutation per epoch, seeded (seed, epoch)).
        verify: hash the caches in full before use and rebuild one whose content differs from its manifest.
    """

    def __init__(
        self,
        data_dir: str = "data/cifar10",
        seq_len: int = RECORD,
        batch_size: int = 16,
        num_workers: int = 0,
        download: bool = True,
        url: str = CIFAR10_URL,
        md5: str | None = CIFAR10_MD5,
        file_md5s: dict[str, str] | None = None,
        val_size: int = 2000,
        split_seed: int = 11172018,
        pin_memory: bool = False,
        seed: int = 0,
        verify: bool = False,
    ) -> None:
        super().__init__(seq_len=seq_len, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         seed=seed)
        if seq_len != RECORD:
            raise ValueError(f"seq_len={seq_len}, but a CIFAR-10 image is {RECORD} bytes (32x32x3); set seq_len: 3072")
        self.data_dir = Path(data_dir).expanduser()
        self.verify = verify
        self.download, self.url, self.md5 = download, url, md5
        self.file_md5s = dict(CIFAR10_FILE_MD5S if file_md5s is None else file_md5s)
        self.val_size, self.split_seed = val_size, split_seed

    def cache_path(self, split: str) -> Path:
        """The uint8 cache of `split` in {train, test}."""
        return self.data_dir / f"cifar10-{split}.u8"

    def _batches_folder(self) -> Path:
        folder = self.data_dir / CIFAR10_FOLDER
        if not all((folder / name).exists() for name in [*TRAIN_BATCHES, "test_batch"]):
            try:
                archive = ensure_file(self.data_dir / "cifar-10-python.tar.gz", url=self.url,
                                      download=self.download, checksums={"md5": self.md5})
            except FileNotFoundError as err:
                raise FileNotFoundError(f"{err}. Alternatively put the extracted folder at {folder}.") from None
            safe_extract(archive, self.data_dir, members=[CIFAR10_FOLDER])
        for name in [*TRAIN_BATCHES, "test_batch"]:
            verify_file(folder / name, checksums={"md5": self.file_md5s.get(name)})
        return folder

    @staticmethod
    def _read_batch(path: Path) -> np.ndarray:
        batch = load_pickle(path)
        data = batch.get("data") if isinstance(batch, dict) else None
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                and data.shape[1] == RECORD and len(batch.get("labels", ())) == len(data)):
            raise ValueError(f"{path} is not a CIFAR-10 batch (expected a dict with 'data' uint8 [N, {RECORD}] and "
                             "N 'labels'); delete it and run again")
        return planar_to_interleaved(data, channels=3)

    def prepare_folder(self) -> Path:
        """The folder prepared (and locked meanwhile): `data_dir`."""
        return self.data_dir

    def prepare(self) -> None:
        """Build the train and test caches once (from the extracted batches or the archive)."""
        if all(read_cache(self.cache_path(s), {"record_size": RECORD}, verify=self.verify) for s in ("train", "test")):
            return
        folder = self._batches_folder()

        def images(names: list[str]) -> Iterator[np.ndarray]:
            for name in names:
                yield self._read_batch(folder / name)

        for split, names in (("train", TRAIN_BATCHES), ("test", ["test_batch"])):
            write_cache(self.cache_path(split), images(names), {"record_size": RECORD, "source": CIFAR10_FOLDER})

    def setup(self, stage: str | None = None) -> None:
        """Open the caches; split train into 48,000 / 2,000 (by default) with the seeded hold-out.

        Training items are records; validation/test items are (record, first_scored) pairs padded to a multiple of
        the world size with records that score nothing, so DDP bits/dim count every image once.
        """
        self.setup_records(RECORD, self.val_size, self.split_seed)
