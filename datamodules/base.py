"""The DataModule bases: `ByteDataModule` (arguments and loaders), `StreamDataModule` and `RecordDataModule`.

Every dataset in this package is a stream or a set of records of bytes. A subclass says where the bytes come from
(`prepare_data`: fetch, verify, preprocess once into a uint8 memmap cache) and which part of the cache is which
split (`setup`); the two bases below turn that into the training set, its sampler and the evaluation sets
(layouts: `datasets.py`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from .datasets import (
    RandomWindowSampler,
    RecordDataset,
    ScoredRecords,
    SeededShuffleSampler,
    TailScoredWindows,
    WindowDataset,
    holdout_split,
)
from .fetch import folder_lock
from .loader import ResumableLoader
from .store import read_cache


class ByteDataModule(L.LightningDataModule):
    """Base of every DataModule here: holds the common arguments and builds the loaders.

    Subclasses download/verify/preprocess in `prepare` and name the folder it writes in `prepare_folder`;
    `prepare_data` (Lightning calls it once per node) runs `prepare` holding that folder's lock, so concurrent jobs
    or nodes sharing the folder prepare it once. `setup` (every process) sets `self.train_set`,
    `self.train_sampler` (an order that is a function of (seed, epoch)), `self.val_set` and `self.test_set`. The
    training loader is a `ResumableLoader`: its position in the epoch goes into
    Lightning's checkpoints and a resumed run continues with exactly the batches the uninterrupted run would have
    seen. `predict_dataloader` serves the test set.
    """

    def __init__(self, seq_len: int, batch_size: int, num_workers: int = 0, pin_memory: bool = False,
                 seed: int = 0) -> None:
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers={num_workers!r} must be an integer >= 0")
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.train_sampler: Sampler | None = None

    def prepare_folder(self) -> Path:
        """The folder `prepare` writes (downloads, extractions, caches); its lock is held while preparing."""
        raise NotImplementedError(f"{type(self).__name__} must implement prepare_folder()")

    def prepare(self) -> None:
        """Download, verify and preprocess what `setup` needs (called under the lock of `prepare_folder`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement prepare()")

    def prepare_data(self) -> None:
        """`prepare` under the lock of `prepare_folder` (a second process waits, then finds the files ready)."""
        with folder_lock(self.prepare_folder()):
            self.prepare()

    @property
    def world_size(self) -> int:
        """Number of processes of the attached Trainer (1 without one), used to pad evaluation sets."""
        return self.trainer.world_size if self.trainer is not None else 1

    def _loader(self, dataset: Dataset | None, name: str, sampler: Sampler | None = None,
                loader: type[DataLoader] = DataLoader) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: the {name} set is not built; call prepare_data() and "
                               f"setup() first (the Trainer does this for you)")
        return loader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        # Under DDP Lightning wraps the sampler in a DistributedSamplerWrapper: ranks share one seeded draw.
        if self.train_set is not None and self.train_sampler is None:
            raise RuntimeError(f"{type(self).__name__}.setup() set no train_sampler; training needs a seeded order")
        return self._loader(self.train_set, "training", self.train_sampler, ResumableLoader)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test")


class StreamDataModule(ByteDataModule):
    """Base of the byte-stream DataModules (text corpora, Enwik8, audio): random training crops, scored windows.

    A subclass's `setup` calls `setup_streams` with the segments of its cache(s) that form each split.
    `train_samples` random crops of `seq_len + 1` bytes are drawn per epoch (default: training bytes // seq_len).
    """

    def __init__(self, seq_len: int, batch_size: int, num_workers: int = 0, pin_memory: bool = False,
                 seed: int = 0, train_samples: int | None = None) -> None:
        super().__init__(seq_len=seq_len, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         seed=seed)
        if train_samples is not None and (not isinstance(train_samples, int) or train_samples <= 0):
            raise ValueError(f"train_samples={train_samples!r} must be a positive integer (or None for training "
                             "bytes // seq_len)")
        self.train_samples = train_samples

    def setup_streams(
        self,
        train: tuple[str | os.PathLike, Sequence[tuple[int, int]]],
        val: tuple[str | os.PathLike, Sequence[tuple[int, int, int]], int],
        test: tuple[str | os.PathLike, Sequence[tuple[int, int, int]], int],
    ) -> None:
        """Build the splits from (cache, segments[, min_context]) of each.

        Training crops lie inside one [start, stop) segment of `train`; `val` and `test` segments are
        (context_start, scored_start, stop) triples scored by `TailScoredWindows` with their `min_context`, padded
        to a multiple of the world size.
        """
        path, segments = train
        self.train_set = WindowDataset(path, segments, self.seq_len + 1, stride=1)
        train_bytes = sum(stop - start for start, stop in segments)
        samples = self.train_samples or max(1, train_bytes // self.seq_len)
        self.train_sampler = RandomWindowSampler(len(self.train_set), samples, seed=self.seed)
        pad = self.world_size
        self.val_set = TailScoredWindows(val[0], val[1], self.seq_len, val[2], pad_to_multiple=pad)
        self.test_set = TailScoredWindows(test[0], test[1], self.seq_len, test[2], pad_to_multiple=pad)


class RecordDataModule(ByteDataModule):
    """Base of the image DataModules: fixed-size records in a ``train`` and a ``test`` cache.

    A subclass provides `cache_path(split)` and builds both caches in `prepare_data`; `setup_records` holds out a
    seeded validation set from the training records. Training records are shuffled by a permutation seeded
    (seed, epoch).
    """

    def cache_path(self, split: str) -> os.PathLike:
        """The uint8 cache of `split` in {train, test}."""
        raise NotImplementedError(f"{type(self).__name__} must implement cache_path(split)")

    def setup_records(self, record_size: int, val_size: int, split_seed: int) -> None:
        """Open the ``train``/``test`` record caches of ``self.cache_path(split)`` (preparing them if missing) and
        hold out ``val_size`` seeded training records as the validation set; the test cache is the test set.

        Training items are plain records; validation and test items are ``(record, first_scored)`` pairs padded to
        a multiple of the world size with records that score nothing (`ScoredRecords`), so DDP evaluation is exact.
        """
        splits = ("train", "test")
        manifests = {s: read_cache(self.cache_path(s), {"record_size": record_size}) for s in splits}
        if not all(manifests.values()):
            self.prepare_data()
            manifests = {s: read_cache(self.cache_path(s), {"record_size": record_size}) for s in splits}
        train_idx, val_idx = holdout_split(manifests["train"]["nbytes"] // record_size, val_size, split_seed)
        n_test = manifests["test"]["nbytes"] // record_size
        self.train_set = RecordDataset(self.cache_path("train"), record_size, np.sort(train_idx))
        self.train_sampler = SeededShuffleSampler(len(self.train_set), seed=self.seed)
        pad = self.world_size
        self.val_set = ScoredRecords(RecordDataset(self.cache_path("train"), record_size, np.sort(val_idx)), pad)
        self.test_set = ScoredRecords(RecordDataset(self.cache_path("test"), record_size, np.arange(n_test)), pad)
