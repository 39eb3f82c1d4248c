"""One process of a fake two-node DDP job on CPU, started by tests/test_parallel_multinode.py with torchrun's
environment variables (TORCHELASTIC_RUN_ID, RANK, LOCAL_RANK, GROUP_RANK = node rank, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR/PORT), so Lightning picks its TorchElasticEnvironment exactly as on a real cluster.

Every node has its own copy of the data (a different absolute path) and its own cache folder, like node-local disks.
For the byte corpus and the audio DataModule it trains one step and validates, and writes per rank: which ranks ran
``prepare_data``, the split (audio: the file names of each split), a hash of the validation windows, and the
training and validation sample indices Lightning's distributed sampler gave this rank.

    python tests/multinode_run.py ROOT   (ROOT holds node0/ and node1/ with corpus/ and audio/ each)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from lightning_sparse.datamodules import AudioDataModule, ByteCorpusDataModule
from lightning_sparse.kernels import Fixed
from lightning_sparse.text import TextDensityModel

SEQ_LEN = 32


def recording(cls: type, marker_dir: Path, name: str) -> type:
    """``cls`` whose ``prepare_data`` leaves a marker file naming the global rank that ran it."""

    class Recording(cls):
        def prepare_data(self) -> None:
            (marker_dir / f"prepared-{name}-rank{os.environ['RANK']}").touch()
            super().prepare_data()

    return Recording


class Indices(Callback):
    """The sample indices this rank's training and validation loaders yield (Lightning's distributed samplers)."""

    def __init__(self) -> None:
        self.train: list[int] = []
        self.val: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.train = [int(i) for i in trainer.train_dataloader.sampler]

    def on_validation_start(self, trainer, pl_module) -> None:
        self.val = [int(i) for i in trainer.val_dataloaders.sampler]


def windows_hash(dataset) -> str:
    """sha256 of every (window, first_scored) item of an evaluation set, in order."""
    h = hashlib.sha256()
    for i in range(len(dataset)):
        window, first = dataset[i]
        h.update(bytes(window.numpy().tobytes()) + int(first).to_bytes(8, "little"))
    return h.hexdigest()


def main(root: Path) -> None:
    node = Path(root) / f"node{os.environ['GROUP_RANK']}"
    rank = int(os.environ["RANK"])
    modules = {
        "corpus": recording(ByteCorpusDataModule, root, "corpus")(
            paths=[str(node / "corpus" / "*.txt")], seq_len=SEQ_LEN, batch_size=2, cache_dir=str(node / "cache"),
            train_samples=8,
        ),
        "audio": recording(AudioDataModule, root, "audio")(
            data_dir=str(node / "audio"), seq_len=SEQ_LEN, batch_size=2, sample_rate=8000,
            cache_dir=str(node / "cache"), decode_workers=0, train_samples=8,
        ),
    }
    record = {"rank": rank, "node": int(os.environ["GROUP_RANK"])}
    for name, data in modules.items():
        model = TextDensityModel(
            seq_len=SEQ_LEN, n_layer=1, n_head=2, d_model=16, pattern=Fixed(8, 2), warmup_steps=1, decay_steps=10
        )
        indices = Indices()
        trainer = L.Trainer(
            accelerator="cpu",
            devices=int(os.environ["LOCAL_WORLD_SIZE"]),
            num_nodes=2,
            strategy="ddp",
            max_steps=1,
            limit_train_batches=1,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[indices],
        )
        trainer.fit(model, data)
        if name == "audio":  # file names per split, from the hash of each path relative to data_dir
            split = data.split_of(data.files())
        else:  # byte ranges of the concatenated corpus
            split = data.split_bounds(sum(f.stat().st_size for f in data.files()))
        record[name] = {
            "node_rank": trainer.node_rank,
            "world_size": trainer.world_size,
            "split": split,
            "val_hash": windows_hash(data.val_set),
            "val_len": len(data.val_set),
            "train": indices.train,
            "val": indices.val,
        }
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
