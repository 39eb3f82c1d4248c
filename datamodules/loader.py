"""The training DataLoader that saves and restores its position in the epoch (exact resume).

Lightning 2.x saves `state_dict()` of every training loader that has `state_dict`/`load_state_dict` into the
checkpoint (`FitLoop.on_save_checkpoint` → `CombinedLoader._state_dicts`) and, on resume, calls `load_state_dict`
before it creates the epoch's iterator (`FitLoop.setup_data`). The position is the number of batches this loader
has handed to the training loop in the current epoch: Lightning's fetcher does not read ahead of a sized loader,
so that is the number of batches the loop consumed, whatever the workers and the sampler prefetched. A resumed
epoch draws the same indices (the samplers are functions of (seed, epoch)) and skips the consumed batches at the
index level, without loading their data.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import Any

from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)


class _SkippableBatches:
    """The loader's batch sampler with a one-shot skip of its first `skip` batches (index lists only, no data)."""

    def __init__(self, batch_sampler: Any) -> None:
        self.batch_sampler = batch_sampler
        self.skip = 0

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: the skip is taken at the first draw, not when torch calls iter() (it does twice per epoch).
        skip, self.skip = self.skip, 0
        yield from itertools.islice(iter(self.batch_sampler), skip, None)


def _sampler_epoch(loader: DataLoader) -> int:
    """The epoch the loader's sampler draws (Lightning calls `set_epoch` on it; under DDP on its wrapper)."""
    return int(getattr(loader.sampler, "epoch", 0))


class ResumableLoader(DataLoader):
    """A `DataLoader` (same arguments) whose `state_dict` is its position in the epoch, for exact resume.

    State: `{"epoch", "batches", "batch_size"}` — the sampler's epoch and the batches of it yielded so far.
    `load_state_dict` sets the sampler to that epoch and makes the next iteration skip those batches; the sampler
    must draw the same order again for the same epoch (`RandomWindowSampler`, `SeededShuffleSampler` and
    Lightning's `DistributedSampler` do; torch's unseeded `RandomSampler` does not).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.batch_sampler is None:
            raise ValueError("ResumableLoader needs batches (batch_size=None is not supported)")
        self._batches = _SkippableBatches(self.batch_sampler)
        self._epoch = _sampler_epoch(self)
        self._yielded = 0

    @property
    def _index_sampler(self) -> _SkippableBatches:
        # torch's iterators take their index lists from here (also a persistent-worker iterator, for every epoch).
        return self._batches

    def __iter__(self) -> Iterator[Any]:
        self._epoch = _sampler_epoch(self)
        self._yielded = self._batches.skip  # the batches a restored position skips count as consumed
        return self._counted(super().__iter__())

    def _counted(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The position: the epoch being drawn and the batches of it handed out so far."""
        if self._yielded >= len(self):  # the epoch is complete: resume at the start of the next one
            return {"epoch": self._epoch + 1, "batches": 0, "batch_size": self.batch_size}
        return {"epoch": self._epoch, "batches": self._yielded, "batch_size": self.batch_size}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Restore a position saved by `state_dict`: the next iteration continues that epoch after those batches."""
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        saved_batch_size = int(state_dict.get("batch_size", self.batch_size))
        if saved_batch_size != self.batch_size:  # keep the position in samples, the nearest whole batch below
            log.warning("The checkpoint's training loader had batch_size=%d, this one has %d: resuming epoch %d "
                        "after %d of its samples (rounded down to whole batches)", saved_batch_size,
                        self.batch_size, epoch, batches * saved_batch_size)
            batches = batches * saved_batch_size // self.batch_size
        if batches > len(self):
            raise ValueError(f"the checkpoint's training position (epoch {epoch}, batch {batches}) lies beyond this "
                             f"loader's {len(self)} batches per epoch; the training data changed since the "
                             "checkpoint: resume with the same data settings, or start a new run")
        _set_sampler_epoch(self, epoch)
        self._epoch, self._batches.skip = epoch, batches
