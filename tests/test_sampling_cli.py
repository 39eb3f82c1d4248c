"""``lightning-sparse sample`` end to end on the CPU: fit a tiny model through the CLI, then sample from its checkpoint
(no model arguments repeated) and check the text files and stdout, the PNGs and the WAV files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from data_fixtures import cifar_archive, write_audio, write_members
from test_cli import scalars, tiny_config

from lightning_sparse.cli import cli_main


@pytest.fixture(autouse=True)
def one_thread():
    """Decoding runs many tiny ops: on a shared, oversubscribed CI machine intra-op threads only add barrier waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning-sparse"])


def fit(config: Path) -> Path:
    """Run ``fit`` and return the run's last checkpoint."""
    cli_main(["fit", "--config", str(config)])
    (run,) = (config.parent / "runs").glob("*/version_0")
    return run / "checkpoints" / "last.ckpt"


def small_run(tmp_path: Path, name: str, model: dict, data: dict) -> Path:
    """A config of one training step and one validation batch, on the CPU, without sampling during fit."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 1, "limit_train_batches": 1, "limit_val_batches": 1,
            "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp_path / "runs"), "name": name, "default_hp_metric": False}},
        },
        "model": model,
        "data": data,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_text_samples_from_a_fitted_checkpoint(tmp_path, capsys):
    config = tiny_config(tmp_path)  # its TextSampleLogger also logs a sample during fit
    checkpoint = fit(config)
    assert scalars(checkpoint.parents[1], "val/bpd")
    capsys.readouterr()
    out = tmp_path / "text"
    cli_main(["sample", "--ckpt_path", str(checkpoint), "--num", "3", "--prompt", "def ", "--length", "12",
              "--out", str(out), "--seed", "1"])
    printed = capsys.readouterr().out
    files = sorted(out.glob("*.txt"))
    assert [f.name for f in files] == ["sample_000.txt", "sample_001.txt", "sample_002.txt"]
    for i, f in enumerate(files):
        data = f.read_bytes()
        assert data.startswith(b"def ") and len(data) == 4 + 12
        assert f"===== sample {i} (4 prompt + 12 sampled bytes) =====" in printed
    again = tmp_path / "again"
    cli_main(["sample", "--ckpt_path", str(checkpoint), "--num", "3", "--prompt", "def ", "--length", "12",
              "--out", str(again), "--seed", "1"])
    assert [f.read_bytes() for f in sorted(again.glob("*.txt"))] == [f.read_bytes() for f in files]  # seeded

    # Continuing validation text: the config is found next to checkpoints/ (config.yaml) for the data module.
    cli_main(["sample", "--ckpt_path", str(checkpoint), "--num", "2", "--complete_from", "val", "--prompt_length",
              "8", "--out", str(tmp_path / "val")])
    texts = [f.read_bytes() for f in sorted((tmp_path / "val").glob("*.txt"))]
    assert len(texts) == 2 and all(len(t) == 8 + 25 for t in texts)  # the rest of the 32-byte context
    with pytest.raises(SystemExit, match="need 40 input positions"):
        cli_main(["sample", "--ckpt_path", str(checkpoint), "--num", "1", "--prompt", "def ", "--length", "37",
                  "--out", str(tmp_path / "x")])


def test_image_samples_and_completions_are_pngs(tmp_path):
    from torchvision.io import decode_png, read_file

    _, files, train, _ = cifar_archive(4, np.random.default_rng(0))
    data_dir = tmp_path / "cifar"
    write_members(data_dir, {f"cifar-10-batches-py/{name}": data for name, data in files.items()})
    model = {"class_path": "lightning_sparse.image.ImageDensityModel",
             "init_args": {"n_layer": 1, "n_head": 2, "d_model": 16, "attention_backend": "torch", "warmup_steps": 0,
                           "pattern": {"class_path": "lightning_sparse.kernels.Strided", "init_args": {"stride": 96}}}}
    data = {"class_path": "lightning_sparse.datamodules.CIFAR10DataModule",
            "init_args": {"data_dir": str(data_dir), "batch_size": 2, "val_size": 4, "download": False, "md5": None,
                          "file_md5s": {name: hashlib.md5(blob).hexdigest() for name, blob in files.items()}}}
    checkpoint = fit(small_run(tmp_path, "cifar", model, data))
    cli_main(["sample", "--ckpt_path", str(checkpoint), "--num", "2", "--out", str(tmp_path / "images")])
    images = [decode_png(read_file(str(tmp_path / "images" / f"image_{i:03d}.png"))) for i in range(2)]
    assert all(im.shape == (3, 32, 32) and im.dtype == torch.uint8 for im in images)
    assert decode_png(read_file(str(tmp_path / "images" / "grid.png"))).shape == (3, 36, 70)  # 2 tiles, padding 2

    cli_main(["sample", "--ckpt_path", str(checkpoint), "--num", "2", "--complete_from", "val",
              "--out", str(tmp_path / "completions")])
    completions = [decode_png(read_file(str(tmp_path / "completions" / f"image_{i:03d}.png"))) for i in range(2)]
    val_images = {bytes(x.tobytes()) for x in train.transpose(0, 2, 3, 1)[:, :16]}  # top halves of training images
    for image in completions:  # the top half is a real (held-out) image's, the bottom half sampled
        assert bytes(image.permute(1, 2, 0)[:16].contiguous().numpy().tobytes()) in val_images
    grid = decode_png(read_file(str(tmp_path / "completions" / "grid.png")))
    assert grid.shape == (3, 2 + 2 * 34, 2 + 2 * 34)  # real images over their completions


def test_audio_samples_are_wav_files_at_the_model_rate(tmp_path):
    soundfile = pytest.importorskip("soundfile")
    rng = np.random.default_rng(0)
    for i in range(40):
        write_audio(tmp_path / "clips" / f"clip_{i:02d}.wav", rng.uniform(-0.5, 0.5, 800).astype(np.float32), 8000)
    model = {"class_path": "lightning_sparse.audio.AudioDensityModel",
             "init_args": {"n_layer": 1, "n_head": 2, "d_model": 16, "attention_backend": "torch", "warmup_steps": 0,
                           "sample_rate": 8000}}
    data = {"class_path": "lightning_sparse.datamodules.AudioDataModule",
            "init_args": {"data_dir": str(tmp_path / "clips"), "seq_len": 64, "batch_size": 2, "sample_rate": 8000,
                          "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.2, "test_fraction": 0.2,
                          "decode_workers": 0}}
    checkpoint = fit(small_run(tmp_path, "audio", model, data))
    out = tmp_path / "wav"
    cli_main(["sample", "--ckpt_path", str(checkpoint), "--num", "2", "--complete_from", "val", "--prompt_length",
              "16", "--length", "40", "--out", str(out)])
    for i in range(2):
        wave, rate = soundfile.read(str(out / f"sample_{i:03d}.wav"), dtype="float32")
        assert rate == 8000 and wave.shape == (16 + 40,) and np.abs(wave).max() <= 1.0
