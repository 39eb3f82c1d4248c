"""AudioDataModule: a folder of audio files as 8-bit μ-law byte streams at 12 kHz, cropped into long sequences."""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .base import StreamDataModule
from .store import SourceReader, default_cache_dir, ordered_map, read_cache, write_cache

SPLITS = ("train", "val", "test")
_CSV_SPLITS = {"train": "train", "validation": "val", "val": "val", "test": "test"}


def _audio_libs() -> tuple:
    try:
        import soundfile
        import torchaudio.functional as taf
    except ImportError as err:
        raise ImportError(f"AudioDataModule needs soundfile and torchaudio ({err}): "
                          "pip install lightning-sparse[audio]") from err
    return soundfile, taf


def encode_file(path: str, sample_rate: int) -> tuple[np.ndarray, dict]:
    """Read an audio file, mix to mono, resample to `sample_rate`, μ-law encode to uint8 (runs in a worker).

    Returns the codes and the fingerprint of the file's bytes as decoded (for the cache manifest).
    """
    soundfile, taf = _audio_libs()
    reader = SourceReader()
    try:
        samples, rate = soundfile.read(io.BytesIO(reader.read(path)), dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises LibsndfileError/RuntimeError; name the file either way
        raise ValueError(f"cannot read audio file {path}: {err}") from err
    wave = torch.from_numpy(samples.mean(axis=1))
    if rate != sample_rate:
        wave = taf.resample(wave, orig_freq=rate, new_freq=sample_rate)
    codes = taf.mu_law_encoding(wave.clamp(-1.0, 1.0), quantization_channels=256)
    return codes.to(torch.uint8).numpy(), reader.sources[0]


class AudioDataModule(StreamDataModule):
    """Raw audio as bytes: every file mixed to mono, resampled to `sample_rate` (12 kHz), 8-bit μ-law.

    The paper's classical-music set (Dieleman et al. 2018) is not public; MAESTRO v3 (piano, WAV 44.1-48 kHz;
    point `data_dir` at `maestro-v3.0.0/` and `split_csv` at its `maestro-v3.0.0.csv` to use its official
    train/validation/test split) and YouTubeMix (solo piano, 16 kHz WAV clips; the hash split below) are
    substitutes, so results are not comparable with the paper's.

    Files: every .wav/.flac/.ogg below `data_dir` (sorted relative paths). Split at the file level, either from
    `split_csv` (columns `audio_filename` relative to `data_dir` and `split` in train/validation/test) or by a hash
    of each relative path: deterministic, independent of which other files exist, `val_fraction` and
    `test_fraction` of the files in expectation. Each split is cached once as a uint8 memmap in `cache_dir`
    (named after the folder, its files and the sample rate) with per-file offsets and fingerprints in its manifest;
    an edited file rebuilds its split's cache in place (see `store.py`).

    Training: random crops of `seq_len + 1` bytes inside one file (`train_samples` per epoch, default one per
    `seq_len` bytes of training audio), uint8 [seq_len + 1] tensors. Validation/test: non-overlapping windows
    inside each file as (window, first_scored) pairs (see `TailScoredWindows`) that score every sample after a
    file's first exactly once (the last window of a file moves back to end with the file); a file shorter than
    one window contributes nothing.

    Args:
        data_dir: folder searched recursively for audio files.
        seq_len: samples per sequence (65,536 by default, up to 2^20 in the paper).
        batch_size, num_workers, pin_memory: DataLoader settings.
        sample_rate: target rate in Hz.
        cache_dir: cache folder (default `~/.cache/lightning_sparse/audio`).
        verify: hash the caches and every audio file in full before use (rebuilding what does not match).
        split_csv: optional CSV with `audio_filename` and `split` columns (MAESTRO's metadata file).
        val_fraction, test_fraction: expected fractions of files in val/test for the hash split.
        extensions: file suffixes to read.
        train_samples: random crops per epoch.
        decode_workers: processes that decode and resample (default: all CPUs; 0 = this process).
        seed: seed of the training crops.
    """

    def __init__(
        self,
        data_dir: str = "data/audio",
        seq_len: int = 65_536,
        batch_size: int = 1,
        num_workers: int = 0,
        sample_rate: int = 12_000,
        cache_dir: str | None = None,
        verify: bool = False,
        split_csv: str | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        extensions: list[str] | None = None,
        train_samples: int | None = None,
        decode_workers: int | None = None,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(seq_len=seq_len, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         seed=seed, train_samples=train_samples)
        if sample_rate <= 0:
            raise ValueError(f"sample_rate={sample_rate} must be a positive number of Hz (the paper: 12000)")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in (0, 1) with "
                             "a sum below 1")
        self.data_dir = Path(data_dir).expanduser()
        self.sample_rate = sample_rate
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "audio"
        self.verify = verify
        self.split_csv = Path(split_csv).expanduser() if split_csv else None
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}"
                                for e in (extensions or [".wav", ".flac", ".ogg"]))
        self.decode_workers = (os.cpu_count() or 1) if decode_workers is None else decode_workers

    def files(self) -> list[str]:
        """Relative paths (POSIX) of the audio files below `data_dir`, sorted."""
        if not self.data_dir.is_dir():
            raise FileNotFoundError(f"AudioDataModule: data_dir {self.data_dir} does not exist; point it at a folder "
                                    "of audio files (e.g. maestro-v3.0.0/)")
        found = sorted(p.relative_to(self.data_dir).as_posix() for p in self.data_dir.rglob("*")
                       if p.suffix.lower() in self.extensions and p.is_file())
        if not found:
            raise FileNotFoundError(f"AudioDataModule: no {'/'.join(self.extensions)} files below {self.data_dir}")
        return found

    def split_of(self, files: list[str]) -> dict[str, list[str]]:
        """{split: relative paths} from `split_csv` or from the hash of each path."""
        out: dict[str, list[str]] = {s: [] for s in SPLITS}
        if self.split_csv is not None:
            with open(self.split_csv, newline="") as f:
                rows = {r["audio_filename"]: r["split"] for r in csv.DictReader(f)}
            for name in files:
                split = rows.get(name)
                if split is None:
                    continue  # a file the metadata does not list is not part of the dataset
                if split not in _CSV_SPLITS:
                    raise ValueError(f"{self.split_csv}: split {split!r} of {name} is not train/validation/test")
                out[_CSV_SPLITS[split]].append(name)
        else:
            for name in files:
                u = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2.0**64
                split = "val" if u < self.val_fraction else "test" if u < self.val_fraction + self.test_fraction \
                    else "train"
                out[split].append(name)
        empty = [s for s in SPLITS if not out[s]]
        if empty:
            raise ValueError(f"AudioDataModule: the {empty} split(s) of the {len(files)} files below {self.data_dir} "
                             "are empty; add files, change val_fraction/test_fraction, or give split_csv")
        return out

    def cache_path(self, split: str, names: list[str]) -> Path:
        """Cache of one split, named after its folder, files and the sample rate (contents: in the manifest)."""
        key = hashlib.sha256(f"{self.data_dir.resolve()}\0{self.sample_rate}\n".encode())
        for name in names:
            key.update(f"{name}\n".encode())
        return self.cache_dir / f"audio-{split}-{self.sample_rate}hz-{key.hexdigest()[:16]}.u8"

    def _encoded(self, names: list[str], lengths: list[int], sources: list[dict]) -> Iterator[np.ndarray]:
        from tqdm.auto import tqdm

        paths = [str((self.data_dir / n).resolve()) for n in names]
        encode = functools.partial(encode_file, sample_rate=self.sample_rate)
        with tqdm(total=len(paths), desc="encoding audio", unit="file") as bar:
            for codes, source in ordered_map(encode, paths, self.decode_workers):
                lengths.append(len(codes))
                sources.append(source)
                bar.update()
                yield codes

    def prepare_folder(self) -> Path:
        """The folder prepared (and locked meanwhile): `cache_dir`."""
        return self.cache_dir

    def prepare(self) -> None:
        """Encode each split once into its cache (uint8 μ-law stream + per-file offsets in the manifest)."""
        for split, names in self.split_of(self.files()).items():
            cache = self.cache_path(split, names)
            if read_cache(cache, {"sample_rate": self.sample_rate, "files": names}, verify=self.verify):
                continue
            lengths: list[int] = []
            sources: list[dict] = []
            write_cache(cache, self._encoded(names, lengths, sources),
                        {"sample_rate": self.sample_rate, "files": names, "lengths": lengths}, sources=sources)

    def setup(self, stage: str | None = None) -> None:
        """Open the three caches and build training crops and evaluation windows."""
        splits = self.split_of(self.files())
        caches, files, lengths = {}, {}, {}
        for split, names in splits.items():
            cache = self.cache_path(split, names)
            manifest = read_cache(cache, {"sample_rate": self.sample_rate, "files": names})
            if manifest is None:  # used without a Trainer and without prepare_data()
                self.prepare_data()
                manifest = read_cache(cache, {"sample_rate": self.sample_rate, "files": names})
            ends = np.cumsum(manifest["lengths"], dtype=np.int64)
            caches[split], lengths[split] = cache, manifest["lengths"]
            files[split] = [(int(e - n), int(e)) for e, n in zip(ends, manifest["lengths"], strict=True)]
        window = self.seq_len + 1
        for split in SPLITS:
            if max(lengths[split]) < window:
                longest = max(lengths[split]) / self.sample_rate
                raise ValueError(f"AudioDataModule: no {split} file holds one window of seq_len + 1 = {window} samples "
                                 f"({window / self.sample_rate:.1f} s at {self.sample_rate} Hz; longest file "
                                 f"{longest:.1f} s); use a smaller seq_len or longer files")
        # Training crops lie inside one file; each evaluation file is its own context, every sample after its
        # first scored once.
        self.setup_streams(train=(caches["train"], files["train"]),
                           val=(caches["val"], [(a, a, b) for a, b in files["val"]], 0),
                           test=(caches["test"], [(a, a, b) for a, b in files["test"]], 0))
