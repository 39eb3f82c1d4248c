"""DataModules of byte sequences: a byte corpus (the offline default) and the paper's datasets.

Each dataset is a short subclass of `StreamDataModule` or `RecordDataModule` (base.py). The shared duties live
by job: fetch.py (downloads, checksums), archive.py (safe extraction), store.py (memmap caches), decode.py (release
formats), datasets.py (datasets and samplers), loader.py (the resumable training loader). The paper's datasets
import torchvision/torchaudio/soundfile only when they decode data.
"""

from lightning_sparse.atomic import atomic_write  # re-exported: it lived here before

from .archive import ArchiveTooLargeError, ExtractionConflictError, UnsafeArchiveError, safe_extract
from .audio import AudioDataModule
from .base import ByteDataModule, RecordDataModule, StreamDataModule
from .byte_corpus import ByteCorpusDataModule
from .cifar10 import CIFAR10DataModule
from .datasets import (
    PaddedEvaluationSet,
    RandomWindowSampler,
    RecordDataset,
    ScoredRecords,
    SeededShuffleSampler,
    TailScoredWindows,
    WindowDataset,
    holdout_split,
)
from .decode import load_pickle
from .enwik8 import Enwik8DataModule
from .fetch import ChecksumError, DownloadError, download_url, ensure_file, folder_lock, verify_file
from .imagenet64 import ImageNet64DataModule
from .loader import ResumableLoader
from .store import LazyMemmap, default_cache_dir, read_cache, write_cache

__all__ = [
    "ArchiveTooLargeError",
    "AudioDataModule",
    "ByteCorpusDataModule",
    "ByteDataModule",
    "CIFAR10DataModule",
    "ChecksumError",
    "DownloadError",
    "Enwik8DataModule",
    "ExtractionConflictError",
    "ImageNet64DataModule",
    "LazyMemmap",
    "PaddedEvaluationSet",
    "RandomWindowSampler",
    "RecordDataModule",
    "RecordDataset",
    "ResumableLoader",
    "ScoredRecords",
    "SeededShuffleSampler",
    "StreamDataModule",
    "TailScoredWindows",
    "UnsafeArchiveError",
    "WindowDataset",
    "atomic_write",
    "default_cache_dir",
    "download_url",
    "ensure_file",
    "folder_lock",
    "holdout_split",
    "load_pickle",
    "read_cache",
    "safe_extract",
    "verify_file",
    "write_cache",
]
