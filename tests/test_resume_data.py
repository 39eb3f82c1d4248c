"""Exact resume of the training data: a run stopped at step k and resumed from its step-k checkpoint trains on
exactly the batches of the uninterrupted run (bit-identical losses, identical val bpd), for a byte corpus, an image
and an audio DataModule, with and without DataLoader workers."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from data_fixtures import CIFAR_BATCHES, cifar_batch, write_audio
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_sparse.audio import AudioDensityModel
from lightning_sparse.datamodules import (
    AudioDataModule,
    ByteCorpusDataModule,
    CIFAR10DataModule,
    RandomWindowSampler,
    ResumableLoader,
    SeededShuffleSampler,
)
from lightning_sparse.image import ImageDensityModel
from lightning_sparse.kernels import Fixed
from lightning_sparse.text import TextDensityModel

K = 3  # checkpoint step; each run trains 2K steps over epochs of 4 batches, so the resumed part crosses an epoch
SEQ = 16
TINY = dict(n_layer=1, n_head=2, d_model=16, lr=1e-2, warmup_steps=1)


class Record(Callback):
    """Keeps every training loss and the batch it came from."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.batches: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach().clone())
        self.batches.append(batch.clone())


def _text(tmp_path, workers):
    data = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    (tmp_path / "corpus.bin").write_bytes(data)
    dm = ByteCorpusDataModule(paths=[str(tmp_path / "corpus.bin")], seq_len=SEQ, batch_size=2, num_workers=workers,
                              cache_dir=str(tmp_path / "cache"), train_samples=8, seed=5)
    return dm, lambda: TextDensityModel(seq_len=SEQ, pattern=Fixed(4, 1), sample_length=0, **TINY)


def _image(tmp_path, workers):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in CIFAR_BATCHES:  # 5 training images, 1 of them held out: 4 records = 4 batches of 1
        (folder / name).write_bytes(cifar_batch(rng.integers(0, 256, (1, 3, 32, 32), dtype=np.uint8), [0], name))
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "cifar"), batch_size=1, num_workers=workers, download=False,
                           file_md5s={}, val_size=1, seed=5)
    return dm, lambda: ImageDensityModel(num_samples=0, num_completions=0, **TINY)


def _audio(tmp_path, workers):
    rng = np.random.default_rng(2)
    for i in range(12):
        write_audio(tmp_path / "audio" / f"clip_{i:02d}.wav", rng.uniform(-1, 1, 120).astype(np.float32), 12_000)
    dm = AudioDataModule(data_dir=str(tmp_path / "audio"), seq_len=SEQ, batch_size=2, num_workers=workers,
                         cache_dir=str(tmp_path / "cache"), val_fraction=0.2, test_fraction=0.2, train_samples=8,
                         decode_workers=0, seed=5)
    return dm, lambda: AudioDensityModel(seq_len=SEQ, sample_length=0, **TINY)


def _fit(tmp_path, name, make, ckpt_path=None, max_steps=2 * K, every_n_epochs=None):
    dm, model_fn = make
    L.seed_everything(0)
    model, record = model_fn(), Record()
    when = dict(every_n_epochs=every_n_epochs) if every_n_epochs else dict(every_n_train_steps=K)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / name, save_top_k=-1, filename="{step}", **when)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[record, checkpoints],
                        default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    val = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/bpd"]
    return record, val


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("data", [_text, _image, _audio], ids=["corpus", "cifar10", "audio"])
def test_resumed_run_matches_the_uninterrupted_run(tmp_path, data, workers):
    make = data(tmp_path, workers)
    full, full_val = _fit(tmp_path, "full", make)
    assert len(full.losses) == 2 * K
    resumed, resumed_val = _fit(tmp_path, "resumed", make, ckpt_path=tmp_path / "full" / f"step={K}.ckpt")
    assert len(resumed.losses) == K  # only the steps after the checkpoint ran
    for a, b in zip(full.batches[K:], resumed.batches, strict=True):
        assert torch.equal(a, b)  # exactly the batches the uninterrupted run saw
    assert torch.equal(torch.stack(full.losses[K:]), torch.stack(resumed.losses))  # bit-identical
    assert resumed_val == full_val
    assert not torch.equal(full.batches[0], full.batches[K])  # the batches differ: the check could fail


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_an_end_of_epoch_checkpoint(tmp_path, workers):
    # Saved at the end of epoch 0 (step 4): the resumed run starts epoch 1 with its first batch. Lightning's own
    # set_epoch count runs one ahead here; the loader's count does not.
    make = _text(tmp_path, workers)
    full, full_val = _fit(tmp_path, "full", make, max_steps=10, every_n_epochs=1)
    resumed, resumed_val = _fit(tmp_path, "resumed", make, ckpt_path=tmp_path / "full" / "step=4.ckpt",
                                max_steps=10, every_n_epochs=1)
    assert len(resumed.batches) == 6
    assert all(torch.equal(a, b) for a, b in zip(full.batches[4:], resumed.batches, strict=True))
    assert torch.equal(torch.stack(full.losses[4:]), torch.stack(resumed.losses)) and resumed_val == full_val


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_position_counts_consumed_batches_not_prefetched_ones(tmp_path, workers):
    dm, _ = _text(tmp_path, workers)
    dm.prepare_data()
    dm.setup("fit")
    epoch0 = list(dm.train_dataloader())
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableLoader) and len(loader) == 4
    it = iter(loader)
    next(it)
    next(it)  # with workers, the sampler and the workers are already further ahead
    assert loader.state_dict() == {"epoch": 0, "batches": 2, "batch_size": 2}
    fresh = dm.train_dataloader()
    fresh.load_state_dict(loader.state_dict())
    assert fresh.state_dict() == {"epoch": 0, "batches": 2, "batch_size": 2}  # restored, not yet iterated
    rest = list(fresh)
    assert len(rest) == 2 and all(torch.equal(a, b) for a, b in zip(rest, epoch0[2:], strict=True))
    assert fresh.state_dict() == {"epoch": 1, "batches": 0, "batch_size": 2}  # a finished epoch: the next one
    epoch1 = list(fresh)
    assert not any(torch.equal(a, b) for a, b in zip(epoch1, epoch0, strict=True))  # the next epoch's crops
    iter(fresh)  # an iterator never used (Lightning makes one when it sets up) does not count as an epoch
    epoch2 = torch.cat(list(fresh))
    reference = RandomWindowSampler(len(dm.train_set), 8, seed=5)
    reference.set_epoch(2)
    assert torch.equal(epoch2, torch.stack([dm.train_set[i] for i in reference]))
    with pytest.raises(ValueError, match="beyond this loader's 4 batches per epoch"):
        fresh.load_state_dict({"epoch": 0, "batches": 9, "batch_size": 2})


def test_epoch_samplers_are_functions_of_seed_and_epoch():
    for sampler in (RandomWindowSampler(1000, 16, seed=3), SeededShuffleSampler(16, seed=3)):
        first = list(sampler)  # epoch 0
        second = list(sampler)  # no set_epoch in between: the epoch advances
        assert sampler.epoch == 1 and first != second
        sampler.set_epoch(0)
        assert list(sampler) == first and sampler.epoch == 0
    assert sorted(SeededShuffleSampler(16, seed=3)) == list(range(16))
