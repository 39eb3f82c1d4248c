"""Datasets and samplers over uint8 caches (map-style, picklable for DataLoader workers, DDP-friendly).

Sample layouts (the contract with the model):
- stream training data (text, audio): uint8 tensors of `seq_len + 1` bytes; input x[:-1], target x[1:];
- record training data (images): uint8 tensors of exactly `seq_len` bytes (the model prepends its start token);
- evaluation (every modality): tuples (sample, first_scored: int); only targets at indices >= first_scored are
  scored. Stream windows (uint8 [seq_len + 1]) score every byte of the split exactly once (`TailScoredWindows`);
  records (uint8 [seq_len]) score all their bytes (`ScoredRecords`). Both are padded to a multiple of the world
  size with items that score nothing (`PaddedEvaluationSet`), so DDP evaluation counts every target once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .store import LazyMemmap


def holdout_split(n: int, n_holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held_out) indices of a seeded random hold-out of `n_holdout` of `n` items.

    The algorithm of scikit-learn's `train_test_split(test_size=n_holdout, random_state=seed)` (ShuffleSplit):
    `RandomState(seed).permutation(n)`, the first `n_holdout` held out; the legacy RandomState stream is stable
    across numpy versions.
    """
    if not 0 <= n_holdout < n:
        raise ValueError(f"cannot hold out {n_holdout} of {n} items; choose 0 <= holdout < {n}")
    perm = np.random.RandomState(seed).permutation(n)
    return perm[n_holdout:], perm[:n_holdout]


class WindowDataset(Dataset):
    """Windows of `window` bytes of a uint8 file, every `stride` bytes inside each [start, stop) segment.

    Windows never cross a segment boundary (a segment is a split of a stream, or one audio file); a segment
    shorter than a window contributes none.
    """

    def __init__(self, path: str | os.PathLike, segments: Sequence[tuple[int, int]], window: int,
                 stride: int) -> None:
        if window <= 0 or stride <= 0:
            raise ValueError(f"window ({window}) and stride ({stride}) must be positive")
        self.data = LazyMemmap(path)
        self.window, self.stride = window, stride
        self.starts = np.array([start for start, _ in segments], dtype=np.int64)
        counts = [max(0, (stop - start - window) // stride + 1) for start, stop in segments]
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def position(self, index: int) -> int:
        """Offset in the file of window `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        segment = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return int(self.starts[segment] + (index - self.offsets[segment]) * self.stride)

    def __getitem__(self, index: int) -> torch.Tensor:
        a = self.position(index)
        return torch.from_numpy(np.array(self.data.array[a:a + self.window]))


class EpochSampler(Sampler[int]):
    """A sampler whose order is a function of (seed, epoch) only, so a resumed epoch draws it again exactly.

    Lightning calls `set_epoch` each epoch (under DDP through its `DistributedSamplerWrapper`, which then gives
    each rank a disjoint share of the same draw). Without `set_epoch` between two iterations the epoch advances
    by one, so a plain loop over epochs also sees a new order each time. `epoch` is the epoch of the last draw.
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0
        self._epoch_was_set = True  # the first draw uses epoch 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._epoch_was_set = epoch, True

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if not self._epoch_was_set:
            self.epoch += 1
        self._epoch_was_set = False
        return iter(self.draw(np.random.default_rng([self.seed, self.epoch])).tolist())

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """The epoch's indices from its generator."""
        raise NotImplementedError(f"{type(self).__name__} must implement draw(rng)")


class RandomWindowSampler(EpochSampler):
    """`num_samples` window indices drawn uniformly from [0, num_positions) by a generator seeded (seed, epoch).

    The crop at position i of an epoch is a function of (seed, epoch, i), so crops differ between epochs and
    between ranks while a run, and a resumed run, is reproducible from its seed.
    """

    def __init__(self, num_positions: int, num_samples: int, seed: int = 0) -> None:
        if num_positions <= 0 or num_samples <= 0:
            raise ValueError(f"num_positions ({num_positions}) and num_samples ({num_samples}) must be positive")
        super().__init__(num_samples, seed)
        self.num_positions = num_positions

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, self.num_positions, size=self.num_samples)


class SeededShuffleSampler(EpochSampler):
    """Every index of [0, num_samples) once per epoch, in a permutation seeded (seed, epoch) (record shuffling).

    Unlike torch's `RandomSampler`, whose order comes from the global RNG, the order is known again on resume.
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples ({num_samples}) must be positive")
        super().__init__(num_samples, seed)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        return rng.permutation(self.num_samples)


class RecordDataset(Dataset):
    """Fixed-size uint8 records (e.g. images) of a cache file, selected by `indices`."""

    def __init__(self, path: str | os.PathLike, record_size: int, indices: np.ndarray | Iterable[int]) -> None:
        self.data = LazyMemmap(path)
        self.record_size = record_size
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> torch.Tensor:
        a = int(self.indices[index]) * self.record_size
        return torch.from_numpy(np.array(self.data.array[a:a + self.record_size]))


class PaddedEvaluationSet(Dataset):
    """Evaluation items `(sample, first_scored)`, padded with items that score nothing to a multiple of a number.

    A subclass holds `num_real` real items, built by `real_item`; items past them repeat the last real sample with
    first_scored = `num_targets` (the length of its targets), so none of its targets count. With the padding a
    DistributedSampler need not repeat (and count twice) real items: evaluation under DDP gives exactly the
    single-process result. Pad to the Trainer's world size (`ByteDataModule.world_size`).
    """

    def __init__(self, num_real: int, num_targets: int, pad_to_multiple: int = 1) -> None:
        if isinstance(pad_to_multiple, bool) or not isinstance(pad_to_multiple, int) or pad_to_multiple < 1:
            raise ValueError(f"pad_to_multiple={pad_to_multiple!r} must be a positive integer (the world size)")
        self.num_real, self.num_targets = num_real, num_targets
        self.num_items = -(-num_real // pad_to_multiple) * pad_to_multiple

    def __len__(self) -> int:
        return self.num_items

    def resolve(self, index: int) -> tuple[int, bool]:
        """(the real item whose sample item `index` carries, whether item `index` is padding)."""
        if not 0 <= index < self.num_items:
            raise IndexError(f"item {index} out of range [0, {self.num_items})")
        return (index, False) if index < self.num_real else (self.num_real - 1, True)

    def real_item(self, index: int) -> tuple[torch.Tensor, int]:
        """Real item `index` < `num_real` as (sample, first_scored)."""
        raise NotImplementedError(f"{type(self).__name__} must implement real_item")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        real, padding = self.resolve(index)
        sample, first_scored = self.real_item(real)
        return sample, self.num_targets if padding else first_scored


class ScoredRecords(PaddedEvaluationSet):
    """Evaluation records as (record uint8 [record_size], 0): every byte is a target (the model prepends its start
    token), padded to a multiple of `pad_to_multiple` with records that score nothing (first_scored = record_size).
    """

    def __init__(self, records: RecordDataset, pad_to_multiple: int = 1) -> None:
        super().__init__(len(records), records.record_size, pad_to_multiple)
        self.records = records

    def real_item(self, index: int) -> tuple[torch.Tensor, int]:
        return self.records[index], 0


class TailScoredWindows(PaddedEvaluationSet):
    """Evaluation windows that score every byte of some ranges exactly once, each with >= `min_context` context.

    Item k is (window uint8 [seq_len + 1], first_scored): targets window[1:] at indices >= first_scored are
    scored. Target j of a window starting at stream position a is the byte at a + 1 + j, predicted from the
    j + 1 bytes before it. Each segment (context_start, scored_start, stop) scores the bytes [scored_start,
    stop) in steps of `seq_len - min_context`, each window ending with its last scored byte and reaching back
    no further than context_start (Enwik8 lets the test split take context from the validation split, as the
    paper; an audio file is its own context). Where a segment begins too close to context_start for a full
    context, its first window scores more bytes with less context; a segment shorter than a window is skipped.
    `pad_to_multiple` appends windows that score nothing (see `PaddedEvaluationSet`).
    """

    def __init__(self, path: str | os.PathLike, segments: Sequence[tuple[int, int, int]], seq_len: int,
                 min_context: int, pad_to_multiple: int = 1) -> None:
        if not 0 <= min_context < seq_len:
            raise ValueError(f"min_context={min_context} must be in [0, seq_len={seq_len}); "
                             "the scored tail of each window is seq_len - min_context bytes")
        self.data = LazyMemmap(path)
        self.window, self.seq_len, self.step = seq_len + 1, seq_len, seq_len - min_context
        self.spans: list[tuple[int, int, int]] = []  # (first scored position, end of the first window, stop)
        counts = []
        for context_start, scored_start, stop in segments:
            first = max(scored_start, context_start + 1)  # a segment's first byte has no context: not a target
            if stop - context_start < self.window or stop <= first:
                continue
            first_end = min(stop, max(first + self.step, context_start + self.window))
            self.spans.append((first, first_end, stop))
            counts.append(1 + -(-(stop - first_end) // self.step))
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        super().__init__(int(self.offsets[-1]), seq_len, pad_to_multiple)

    def layout(self, index: int) -> tuple[int, int]:
        """(start of the window in the stream, first scored target index) of item `index`."""
        real, padding = self.resolve(index)  # padding: the last real window, scoring nothing
        segment = int(np.searchsorted(self.offsets, real, side="right")) - 1
        first, first_end, stop = self.spans[segment]
        k = real - int(self.offsets[segment])
        scored_from = first if k == 0 else first_end + (k - 1) * self.step
        scored_end = first_end if k == 0 else min(scored_from + self.step, stop)
        a = scored_end - self.window  # the window ends with its last scored byte
        return a, self.seq_len if padding else scored_from - 1 - a

    def real_item(self, index: int) -> tuple[torch.Tensor, int]:
        a, first_scored = self.layout(index)
        return torch.from_numpy(np.array(self.data.array[a:a + self.window])), first_scored
