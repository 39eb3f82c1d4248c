"""``lightning-sparse fit --config configs/<any>.yaml --trainer.fast_dev_run=true`` runs (one training step and one
validation step; a warmup longer than that run is shortened with a warning).

The paper configs are shrunk to a CPU-sized network through ordinary command-line overrides, and their DataModules
read small fixtures in the release formats (no download); everything else (schedule, callbacks, links, data
module class and its code path) is the config's own.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import CIFAR_BATCHES, cifar_archive, oord_pngs, write_audio, write_members
from test_cli import write_tiny_corpus

from lightning_sparse.cli import cli_main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true"]
SMALL = ["--model.init_args.n_layer=1", "--model.init_args.n_head=2", "--model.init_args.d_model=32",
         "--model.init_args.recompute=false"]


# the configs' sample callbacks, shrunk to the shrunk contexts
TEXT_SAMPLE = '--trainer.callbacks=[{"class_path": "lightning_sparse.sample_logging.TextSampleLogger", "init_args": {"length": 4, "prompt_length": 8}}]'
AUDIO_SAMPLE = '--trainer.callbacks=[{"class_path": "lightning_sparse.sample_logging.AudioSampleLogger", "init_args": {"length": 4, "prompt_length": 8}}]'
IMAGE_SAMPLE = '--trainer.callbacks=[{"class_path": "lightning_sparse.sample_logging.ImageSampleLogger", "init_args": {"num_samples": 0, "num_completions": 0}}]'


def _enwik8(tmp: Path) -> list[str]:
    (tmp / "enwik8").mkdir()
    data = np.random.default_rng(0).integers(9, 127, 6000, dtype=np.uint8).tobytes()
    (tmp / "enwik8" / "enwik8").write_bytes(data)
    return [*SMALL, "--model.init_args.n_head=4", "--data.init_args.seq_len=64",
            "--model.init_args.pattern.init_args.stride=16",
            "--model.init_args.pattern.init_args.summary=4", TEXT_SAMPLE,
            f"--data.init_args.data_dir={tmp / 'enwik8'}", "--data.init_args.download=false",
            f"--data.init_args.size={len(data)}", "--data.init_args.md5=null", "--data.init_args.zip_size=null",
            "--data.init_args.val_bytes=1000", "--data.init_args.test_bytes=1000",
            "--data.init_args.test_min_context=16"]


def _cifar10(tmp: Path) -> list[str]:
    _, files, _, _ = cifar_archive(4, np.random.default_rng(0))
    write_members(tmp / "cifar", {f"cifar-10-batches-py/{name}": files[name] for name in [*CIFAR_BATCHES,
                                                                                           "batches.meta"]})
    return [*SMALL, IMAGE_SAMPLE,
            f"--data.init_args.data_dir={tmp / 'cifar'}", "--data.init_args.download=false",
            "--data.init_args.md5=null", "--data.init_args.file_md5s={}", "--data.init_args.val_size=4",
            "--data.init_args.batch_size=2", "--data.init_args.num_workers=0"]


def _imagenet64(tmp: Path) -> list[str]:
    images = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    members = oord_pngs("train_64x64", images[:4], [f"t{i}.png" for i in range(4)])
    members |= oord_pngs("valid_64x64", images[4:], ["v0.png", "v1.png"])
    write_members(tmp / "imagenet64", members)
    return [*SMALL, IMAGE_SAMPLE,
            f"--data.init_args.data_dir={tmp / 'imagenet64'}", "--data.init_args.download=false",
            "--data.init_args.val_size=2", "--data.init_args.batch_size=1", "--data.init_args.num_workers=0",
            "--data.init_args.decode_workers=0"]


def _audio(tmp: Path) -> list[str]:
    root = tmp / "audio"
    rows = []
    for i, split in enumerate(["train", "validation", "test"]):
        write_audio(root / f"piece_{i}.wav", np.sin(np.arange(3000) * (0.01 + 0.01 * i)).astype(np.float32), 12_000)
        rows.append({"audio_filename": f"piece_{i}.wav", "split": split})
    with open(tmp / "split.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["audio_filename", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return [*SMALL, "--data.init_args.seq_len=256", "--model.init_args.pattern.init_args.stride=16",
            AUDIO_SAMPLE,
            f"--data.init_args.data_dir={root}", f"--data.init_args.split_csv={tmp / 'split.csv'}",
            f"--data.init_args.cache_dir={tmp / 'cache'}", "--data.init_args.num_workers=0"]


def _quickstart(tmp: Path) -> list[str]:
    return [TEXT_SAMPLE, f"--data.init_args.paths=[{write_tiny_corpus(tmp / 'corpus')}]",
            f"--data.init_args.cache_dir={tmp / 'cache'}"]


OVERRIDES = {"enwik8": _enwik8, "cifar10": _cifar10, "imagenet64": _imagenet64, "audio_65k": _audio,
             "audio_262k": _audio, "audio_1m": _audio, "quickstart": _quickstart}


def test_every_config_has_a_fast_dev_run_case():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(OVERRIDES)


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_fast_dev_run_works_for_the_config(name, tmp_path, monkeypatch):
    if name.startswith("audio"):
        pytest.importorskip("soundfile")
        pytest.importorskip("torchaudio")
    if name in ("cifar10", "imagenet64"):
        pytest.importorskip("torchvision")
    if name == "imagenet64":
        pytest.importorskip("PIL")
    monkeypatch.setattr("sys.argv", ["lightning-sparse"])
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(CONFIGS / f"{name}.yaml"), "--trainer.fast_dev_run=true", *CPU,
            *OVERRIDES[name](tmp_path)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli_main(args)
    assert any("is not shorter than the whole run (1 optimizer steps)" in str(w.message) for w in caught)
    assert not (tmp_path / "checkpoints").exists() and not list(tmp_path.rglob("*.ckpt"))
