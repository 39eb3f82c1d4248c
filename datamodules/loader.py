"""The training DataLoader that saves and restores its position in the epoch (exact resume).

Lightning 2.x saves `state_dict()` of every training loader that has `state_dict`/`load_state_dict` into the
checkpoint (`FitLoop.on_save_checkpoint` → `CombinedLoader._state_dicts`) and, on resume, calls `load_state_dict`
before it creates the epoch's iterator (`FitLoop.setup_data`). The position is the number of batches this loader
has handed to the training loop in the current epoch: Lightning's fetcher does not read ahead of a sized loader,
so that is the number of batches the loop consumed, whatever the workers and the sampler prefetched. A resumed
epoch draws the same indices (the samplers are functions of (seed, epoch)) and skips the consumed batches at the
index level, without loading their data. Not covered: `reload_dataloaders_every_n_epochs` (a new loader object
each time starts from the sampler's epoch).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

log = logging.getLogger(__name__)


class _PositionedBatches:
    """The loader's batch sampler drawn for a given epoch from a given batch on (index lists only, no data).

    The epoch is set on the samplers at the first draw, after any `set_epoch` Lightning made before it.
    """

    def __init__(self, batch_sampler: Any, samplers: list[Any]) -> None:
        self.batch_sampler, self.samplers = batch_sampler, samplers
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: torch calls iter() twice per epoch and only draws from the second; nothing runs before.
        for sampler in self.samplers:
            sampler.set_epoch(self.epoch)
        yield from itertools.islice(iter(self.batch_sampler), self.start, None)


def _epoch_samplers(loader: DataLoader) -> list[Any]:
    """The loader's samplers that take `set_epoch` (its sampler, and its batch sampler's, once each)."""
    found = {id(s): s for s in (loader.sampler, getattr(loader.batch_sampler, "sampler", None))
             if callable(getattr(s, "set_epoch", None))}
    return list(found.values())


class ResumableLoader(DataLoader):
    """A `DataLoader` (same arguments) whose `state_dict` is its position in the epoch, for exact resume.

    State: `{"epoch", "batches", "batch_size"}` — the epoch being drawn and the batches of it handed out so far.
    The loader counts epochs itself: its first iteration draws the sampler's epoch (0, or what Lightning set), each
    iteration after one that yielded batches the next epoch, an iteration after one that yielded nothing the same
    position again (Lightning creates a spare iterator when it sets up), and the first iteration after
    `load_state_dict` the restored position. (Lightning's own `set_epoch` count runs one ahead after a resume from
    an end-of-epoch checkpoint.) The sampler must draw the same order again for the same epoch:
    `RandomWindowSampler`, `SeededShuffleSampler` and Lightning's `DistributedSamplerWrapper` around them do.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.batch_sampler is None:
            raise ValueError("ResumableLoader needs batches (batch_size=None is not supported)")
        self._batches = _PositionedBatches(self.batch_sampler, _epoch_samplers(self))
        self._pending: tuple[int, int] | None = None  # a restored (epoch, batches) for the next iteration
        self._iterated = False
        self._yielded = 0  # batches the current iteration has yielded (after its start)

    @property
    def _index_sampler(self) -> _PositionedBatches:
        # torch's iterators take their index lists from here (also a persistent-worker iterator, for every epoch).
        return self._batches

    def __iter__(self) -> Iterator[Any]:
        b = self._batches
        if self._pending is not None:
            (b.epoch, b.start), self._pending = self._pending, None
        elif not self._iterated:
            b.epoch, b.start = int(getattr(self.sampler, "epoch", 0)), 0
        elif self._yielded:
            b.epoch, b.start = b.epoch + 1, 0
        self._iterated, self._yielded = True, 0
        return self._counted(super().__iter__())

    def _counted(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The position: the epoch being drawn and the batches of it handed out so far."""
        if self._pending is not None:  # restored but not iterated yet: still that position
            epoch, batches = self._pending
        else:
            epoch, batches = self._batches.epoch, self._batches.start + self._yielded
        if batches >= len(self):  # the epoch is complete: resume at the start of the next one
            epoch, batches = epoch + 1, 0
        return {"epoch": epoch, "batches": batches, "batch_size": self.batch_size}

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
        self._pending = (epoch, batches)
