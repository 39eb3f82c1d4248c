"""Enwik8DataModule: the first 100M bytes of English Wikipedia (Hutter prize), 90M/5M/5M, tail-scored evaluation."""

from __future__ import annotations

from pathlib import Path

from .archive import safe_extract
from .base import StreamDataModule
from .fetch import ensure_file, verify_file

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"


class Enwik8DataModule(StreamDataModule):
    """Enwik8 as bytes: train [0, 90M), validation [90M, 95M), test [95M, 100M).

    `prepare_data` uses `data_dir/enwik8` when it is present and valid; otherwise it takes (or downloads)
    `data_dir/enwik8.zip` and extracts its member `enwik8`. The extracted file is the cache (it is already bytes).

    Training draws `train_samples` random crops of `seq_len + 1` bytes per epoch. Validation and test follow the
    paper's protocol (Table 3): windows of `seq_len + 1` bytes in which only targets with at least `min_context`
    bytes of context are scored, advancing by `seq_len - min_context`, so that every byte of the split is scored
    exactly once; a window's context may reach back into the previous split. Items are (window, first_scored).

    Args:
        data_dir: folder of `enwik8.zip` and/or `enwik8`.
        seq_len: training context (the paper: 12,288).
        batch_size: windows per batch.
        num_workers: DataLoader worker processes.
        download: fetch `url` when the files are missing; False = offline (a missing file is an error that says
            where to put it).
        url: where to download enwik8.zip (a mirror or a file:// URL works).
        zip_size, zip_md5: expected size/md5 of the zip (None skips that check).
        size, md5, sha1: expected size and checksums of the extracted file (None skips that check).
        val_bytes, test_bytes: sizes of the validation and test splits at the end of the file.
        val_min_context: minimum context of scored validation bytes (0 = non-overlapping windows, the cheapest).
        test_min_context: minimum context of scored test bytes; None = `seq_len - 128` (12,160 at seq_len 12,288,
            the paper's best Table 3 setting: 128 bytes scored per window).
        train_samples: random crops per epoch (default train bytes // seq_len).
        pin_memory, seed: DataLoader pin_memory; seed of the training crops.
    """

    def __init__(
        self,
        data_dir: str = "data/enwik8",
        seq_len: int = 12288,
        batch_size: int = 1,
        num_workers: int = 0,
        download: bool = True,
        url: str = ENWIK8_URL,
        zip_size: int | None = 36_445_475,
        zip_md5: str | None = None,
        size: int | None = 100_000_000,
        md5: str | None = "a1fa5ffddb56f4953e226637dabbb36a",
        sha1: str | None = None,
        val_bytes: int = 5_000_000,
        test_bytes: int = 5_000_000,
        val_min_context: int = 0,
        test_min_context: int | None = None,
        train_samples: int | None = None,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(seq_len=seq_len, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         seed=seed, train_samples=train_samples)
        self.test_min_context = max(0, seq_len - 128) if test_min_context is None else test_min_context
        for name, value in (("val_min_context", val_min_context), ("test_min_context", self.test_min_context)):
            if not 0 <= value < seq_len:
                raise ValueError(f"{name}={value} must be in [0, seq_len={seq_len}): each window scores its last "
                                 f"seq_len - {name} bytes")
        if val_bytes <= 0 or test_bytes <= 0:
            raise ValueError(f"val_bytes={val_bytes} and test_bytes={test_bytes} must be positive")
        self.data_dir = Path(data_dir).expanduser()
        self.download, self.url = download, url
        self.zip_size, self.zip_md5 = zip_size, zip_md5
        self.size, self.checksums = size, {"md5": md5, "sha1": sha1}
        self.val_bytes, self.test_bytes = val_bytes, test_bytes
        self.val_min_context = val_min_context

    @property
    def path(self) -> Path:
        """The extracted enwik8 file."""
        return self.data_dir / "enwik8"

    def prepare_folder(self) -> Path:
        """The folder prepared (and locked meanwhile): `data_dir`."""
        return self.data_dir

    def prepare(self) -> None:
        """Verify `enwik8`, or get `enwik8.zip` (downloading it unless offline), extract and verify it."""
        if self.path.exists():
            verify_file(self.path, size=self.size, checksums=self.checksums)
            return
        try:
            archive = ensure_file(self.data_dir / "enwik8.zip", url=self.url, download=self.download,
                                  size=self.zip_size, checksums={"md5": self.zip_md5})
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err}. Alternatively put the extracted file at {self.path}.") from None
        safe_extract(archive, self.data_dir, members=["enwik8"], max_bytes=self.size)  # checked before writing
        verify_file(self.path, size=self.size, checksums=self.checksums)

    def setup(self, stage: str | None = None) -> None:
        """Build the random-crop training set and the tail-scored validation/test windows."""
        if not self.path.exists():
            self.prepare_data()
        total = self.path.stat().st_size
        n_train = total - self.val_bytes - self.test_bytes
        window = self.seq_len + 1
        if n_train < window:
            raise ValueError(f"{self.path} has {total} bytes: after val_bytes={self.val_bytes} and test_bytes="
                             f"{self.test_bytes} the training split ({n_train}) is shorter than one window "
                             f"({window}); use a smaller seq_len or smaller splits")
        val_stop = n_train + self.val_bytes
        # Context may reach back into the previous split (as the paper's sliding evaluation); nothing else leaks.
        self.setup_streams(train=(self.path, [(0, n_train)]),
                           val=(self.path, [(0, n_train, val_stop)], self.val_min_context),
                           test=(self.path, [(0, val_stop, total)], self.test_min_context))
