"""DataModules of byte sequences: a byte corpus (the offline default) and the paper's datasets.

`ByteDataModule` (base.py) holds the shared duties (downloads, archives, caches, loaders); each dataset is a
short subclass. The paper's datasets import torchvision/torchaudio/soundfile only when they decode data.
"""

from .audio import AudioDataModule
from .base import (
    ByteDataModule,
    ChecksumError,
    DownloadError,
    LazyMemmap,
    PaddedEvaluationSet,
    RandomWindowSampler,
    RecordDataset,
    ScoredRecords,
    TailScoredWindows,
    UnsafeArchiveError,
    WindowDataset,
    atomic_write,
    default_cache_dir,
    download_url,
    ensure_file,
    holdout_split,
    load_pickle,
    read_cache,
    safe_extract,
    verify_file,
    write_cache,
)
from .byte_corpus import ByteCorpusDataModule
from .cifar10 import CIFAR10DataModule
from .enwik8 import Enwik8DataModule
from .imagenet64 import ImageNet64DataModule

__all__ = [
    "AudioDataModule",
    "ByteCorpusDataModule",
    "ByteDataModule",
    "CIFAR10DataModule",
    "ChecksumError",
    "DownloadError",
    "Enwik8DataModule",
    "ImageNet64DataModule",
    "LazyMemmap",
    "PaddedEvaluationSet",
    "RandomWindowSampler",
    "RecordDataset",
    "ScoredRecords",
    "TailScoredWindows",
    "UnsafeArchiveError",
    "WindowDataset",
    "atomic_write",
    "default_cache_dir",
    "download_url",
    "ensure_file",
    "holdout_split",
    "load_pickle",
    "read_cache",
    "safe_extract",
    "verify_file",
    "write_cache",
]
