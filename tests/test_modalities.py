"""Image and audio LightningModules and their sample callbacks: byte layout, every-dim scoring, sample/completion
grids, audio clips, ranks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import Precision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from lightning_sparse.audio import AudioDensityModel, mu_law_decode, sqrt_stride
from lightning_sparse.image import ImageDensityModel, sequences_to_images
from lightning_sparse.kernels import Strided
from lightning_sparse.model import START
from lightning_sparse.sample_logging import AudioSampleLogger, ImageSampleLogger

TINY = dict(n_layer=1, n_head=2, d_model=32, warmup_steps=1, attention_backend="torch")
SHAPE = (4, 4, 3)  # H, W, C: 48 bytes per image


def recording_logger(tmp_path) -> tuple[TensorBoardLogger, list[tuple[str, str, dict]]]:
    """A real TensorBoard logger whose writer also records every add_image/add_audio call (tensors cloned)."""
    logger = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
    writer, calls = logger.experiment, []
    for method in ("add_image", "add_audio"):
        original = getattr(writer, method)

        def record(tag, value, *args, _method=method, _original=original, **kwargs):
            calls.append((_method, tag, {"value": value.detach().clone(), **kwargs}))
            return _original(tag, value, *args, **kwargs)

        setattr(writer, method, record)
    return logger, calls


def fit_one_step(model: L.LightningModule, train: torch.Tensor, val: torch.Tensor, logger, **trainer_kwargs
                 ) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, logger=logger,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs,
    )
    trainer.fit(model, DataLoader(train, batch_size=2), DataLoader(val, batch_size=4))
    return trainer


def assert_checkpoint_round_trip(trainer: L.Trainer, model: L.LightningModule, path) -> None:
    """The saved hyperparameters rebuild the same module (hidden, class-fixed arguments included)."""
    trainer.save_checkpoint(path)
    loaded = type(model).load_from_checkpoint(path)
    assert loaded.config == model.config
    loaded.configure_model()
    loaded.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def read_events(log_dir) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "audio": 0})
    events.Reload()
    return events


def fake_trainer(rank_zero: bool, loggers: list, epoch: int = 0) -> SimpleNamespace:
    """Enough of a Trainer for on_validation_epoch_end: rank, epoch, loggers and a no-op precision plugin."""
    return SimpleNamespace(sanity_checking=False, is_global_zero=rank_zero, loggers=loggers, global_step=7,
                           current_epoch=epoch, precision_plugin=Precision())


# ----- images -----


def test_sequences_to_images_is_raster_order_with_interleaved_channels():
    h, w, c = 2, 3, 3
    seqs = torch.randint(0, 256, (2, h * w * c), dtype=torch.uint8)
    images = sequences_to_images(seqs, (h, w, c))
    assert images.shape == (2, c, h, w) and images.dtype == torch.uint8
    for n in range(2):
        for y in range(h):
            for x in range(w):
                for ch in range(c):  # byte (y·W + x)·C + ch is channel ch of pixel (y, x)
                    assert images[n, ch, y, x] == seqs[n, (y * w + x) * c + ch]
    with pytest.raises(ValueError, match="expected \\[N, 18\\]"):
        sequences_to_images(seqs[:, :17], (h, w, c))


def test_image_model_scores_every_dim_with_a_start_token():
    model = ImageDensityModel(image_shape=SHAPE, **TINY)
    assert model.config.seq_len == 48 and model.config.start_token
    assert model.config.position_shape == SHAPE and model.config.pattern == Strided(12)  # default: one image row
    model.configure_model()
    assert [t.shape[0] for t in model.model.pos_emb.tables()] == [4, 4, 3]  # row, column, channel tables
    torch.nn.init.normal_(model.model.head.weight)  # zero-init logits would make every loss equal
    x = torch.randint(0, 256, (3, 48), dtype=torch.uint8)
    bits = model.predict_step(x, 0)
    inputs = torch.cat([torch.full((3, 1), START), x[:, :-1].long()], dim=1)
    nll = F.cross_entropy(model(inputs).transpose(1, 2), x.long(), reduction="none")
    assert nll.shape == (3, 48)  # seq_len targets: the first subpixel is scored too
    torch.testing.assert_close(bits, nll.mean(dim=1) / math.log(2))
    y = x.clone()
    y[:, 0] = (y[:, 0].long() + 128).remainder(256).to(torch.uint8)  # change only the first subpixel
    assert not torch.allclose(model.predict_step(y, 0), bits)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(image_shape=(32, 32, 3), seq_len=1024), ValueError, "seq_len=1024 .* 3072"),
        (dict(image_shape=(32, 32)), ValueError, "three positive integers"),
        (dict(image_shape=(32, 0, 3)), ValueError, "three positive integers"),
        (dict(start_token=False), TypeError, "start_token"),  # fixed by the class: every subpixel is scored
    ],
)
def test_image_model_rejects_bad_shapes(kwargs, error, match):
    with pytest.raises(error, match=match):
        ImageDensityModel(**kwargs, **TINY)


def test_image_sample_logger_rejects_bad_settings():
    with pytest.raises(ValueError, match="num_samples must be an integer >= 0"):
        ImageSampleLogger(num_samples=-1)
    with pytest.raises(ValueError, match="every_n_epochs must be an integer >= 1"):
        ImageSampleLogger(every_n_epochs=0)
    with pytest.raises(ValueError, match="C=2 channels"):
        ImageSampleLogger().setup(None, ImageDensityModel(image_shape=(4, 4, 2), **TINY), "fit")
    with pytest.raises(ValueError, match="needs an ImageDensityModel"):
        ImageSampleLogger().setup(None, AudioDensityModel(seq_len=32, **TINY), "fit")


@pytest.mark.parametrize("pairs", [False, True])
def test_image_model_logs_sample_and_completion_grids(tmp_path, pairs):
    torch.manual_seed(0)
    model = ImageDensityModel(image_shape=SHAPE, **TINY)
    val = torch.randint(0, 256, (5, 48), dtype=torch.uint8)
    val_items = val
    if pairs:  # as the image DataModules: (record, first_scored); padding records (first_scored 48) score nothing
        pad = torch.randint(0, 256, (48,), dtype=torch.uint8)
        val_items = [(pad, 48), (val[0], 0), (pad, 48), (val[1], 0), (val[2], 0)]  # no padding record is a prompt
    logger, calls = recording_logger(tmp_path)
    trainer = fit_one_step(model, torch.randint(0, 256, (4, 48), dtype=torch.uint8), val_items, logger,
                           val_check_interval=2, callbacks=[ImageSampleLogger(num_samples=3, num_completions=2)])
    assert_checkpoint_round_trip(trainer, model, tmp_path / "image.ckpt")

    images = {tag: kw for method, tag, kw in calls if method == "add_image"}
    assert set(images) == {"samples/images", "samples/completions"}
    # make_grid, padding 2: a tile is 4×4 px at offset 2 + 6·i.
    grid = images["samples/images"]["value"]
    assert grid.dtype == torch.uint8 and grid.shape == (3, 2 + 6, 2 + 3 * 6)
    assert images["samples/images"]["global_step"] == 2
    grid = images["samples/completions"]["value"]
    assert grid.dtype == torch.uint8 and grid.shape == (3, 2 + 2 * 6, 2 + 2 * 6)

    def tile(row: int, col: int) -> torch.Tensor:
        return grid[:, 2 + 6 * row: 6 + 6 * row, 2 + 6 * col: 6 + 6 * col]

    real = sequences_to_images(val[:2], SHAPE)
    for i in range(2):
        assert torch.equal(tile(0, i), real[i])  # top row: the real validation images
        assert torch.equal(tile(1, i)[:, :2], real[i, :, :2])  # completions keep the given top half ...
    bottoms = torch.stack([tile(1, i)[:, 2:] for i in range(2)])
    assert not torch.equal(bottoms, real[:, :, 2:])  # ... and sample the bottom half (2·48 random bytes)

    events = read_events(logger.log_dir)
    assert set(events.Tags()["images"]) == {"samples/images", "samples/completions"}
    event = events.Images("samples/completions")[-1]
    assert (event.height, event.width, event.step) == (14, 14, 2)


def count_forwards(model) -> list:
    """Calls of the network's forward: the prompt's prefill and every decoding step each count once."""
    forwards = []
    model.model.register_forward_hook(lambda *_: forwards.append(1))
    return forwards


def test_image_sampling_runs_on_every_rank_and_only_rank_zero_writes(tmp_path):
    model = ImageDensityModel(image_shape=SHAPE, **TINY)
    model.configure_model()
    callback = ImageSampleLogger(num_samples=2, num_completions=1)
    callback.real = torch.randint(0, 256, (1, 48), dtype=torch.uint8)
    forwards = count_forwards(model)
    for rank_zero in (False, True):
        written = []
        logger = TensorBoardLogger(tmp_path)
        logger._experiment = SimpleNamespace(add_image=lambda tag, *a, _w=written, **k: _w.append(tag))
        forwards.clear()
        callback.on_validation_epoch_end(fake_trainer(rank_zero, [logger]), model)
        # 48 positions for the unconditional samples and 48 - 24 for the completion (prefill + steps), every rank
        assert len(forwards) == 48 + 24
        assert written == (["samples/images", "samples/completions"] if rank_zero else [])


def test_image_sampling_is_off_with_zero_counts():
    model = ImageDensityModel(image_shape=SHAPE, **TINY)
    model.configure_model()
    forwards = count_forwards(model)
    ImageSampleLogger(num_samples=0, num_completions=0).on_validation_epoch_end(fake_trainer(True, []), model)
    assert forwards == []


@pytest.mark.parametrize("cls", [ImageDensityModel, AudioDensityModel])
def test_sampling_only_in_every_nth_epoch(cls):
    if cls is ImageDensityModel:
        model = cls(image_shape=SHAPE, **TINY)
        callback = ImageSampleLogger(num_samples=1, num_completions=0, every_n_epochs=3)
    else:
        model = cls(seq_len=32, **TINY)
        callback = AudioSampleLogger(length=5, prompt_length=4, every_n_epochs=3)
        callback.prompt = torch.randint(0, 256, (1, 4))
    model.configure_model()
    forwards = count_forwards(model)
    counts = []
    for epoch in range(6):
        forwards.clear()
        callback.on_validation_epoch_end(fake_trainer(False, [], epoch=epoch), model)
        counts.append(len(forwards))
    per_round = 48 if cls is ImageDensityModel else 5
    assert counts == [0, 0, per_round, 0, 0, per_round]  # epochs 3 and 6 (1-based)


# ----- audio -----


def test_mu_law_decode_matches_torchaudio_and_stays_in_range():
    codes = torch.arange(256)
    wave = mu_law_decode(codes)
    assert wave.dtype == torch.float32 and wave.abs().max() <= 1.0
    assert wave[0] == -1.0 and wave[255] == 1.0 and torch.all(wave[1:] > wave[:-1])  # monotone, full range
    taf = pytest.importorskip("torchaudio.functional")
    torch.testing.assert_close(wave, taf.mu_law_decoding(codes, 256), atol=1e-6, rtol=0)


def test_sqrt_stride_is_the_divisor_nearest_the_square_root():
    assert [sqrt_stride(n) for n in (65_536, 262_144, 1_048_576, 3072, 12)] == [256, 512, 1024, 48, 3]
    assert AudioDensityModel(seq_len=65_536, **TINY).config.pattern == Strided(256)


def test_audio_model_logs_decoded_clips_at_the_sample_rate(tmp_path):
    torch.manual_seed(0)
    model = AudioDensityModel(seq_len=32, sample_rate=8000, **TINY)
    assert model.config.position_shape == (8, 4)  # (row, column) of a stride-wide matrix, like text
    val = torch.randint(0, 256, (3, 33), dtype=torch.uint8)
    logger, calls = recording_logger(tmp_path)
    trainer = fit_one_step(model, torch.randint(0, 256, (4, 33), dtype=torch.uint8), val, logger, val_check_interval=2,
                           callbacks=[AudioSampleLogger(length=20, prompt_length=8)])
    assert_checkpoint_round_trip(trainer, model, tmp_path / "audio.ckpt")

    clips = {tag: kw for method, tag, kw in calls if method == "add_audio"}
    assert set(clips) == {"samples/audio", "samples/audio_with_prompt"}
    for tag, length in (("samples/audio", 20), ("samples/audio_with_prompt", 28)):
        wave = clips[tag]["value"]
        assert clips[tag]["sample_rate"] == 8000
        assert wave.shape == (1, length) and wave.dtype == torch.float32
        assert wave.min() >= -1.0 and wave.max() <= 1.0
    with_prompt = clips["samples/audio_with_prompt"]["value"][0]
    torch.testing.assert_close(with_prompt[:8], mu_law_decode(val[0, :8]))  # the real prompt, decoded
    torch.testing.assert_close(with_prompt[8:], clips["samples/audio"]["value"][0])

    events = read_events(logger.log_dir)
    event = events.Audio("samples/audio")[-1]
    assert (event.sample_rate, event.length_frames, event.step) == (8000, 20, 2)


def test_audio_model_rejects_a_data_module_at_another_sample_rate():
    class Data(L.LightningDataModule):
        sample_rate = 16_000

        def train_dataloader(self):
            return DataLoader(torch.randint(0, 256, (2, 33), dtype=torch.uint8), batch_size=2)

    model = AudioDensityModel(seq_len=32, sample_rate=12_000, **TINY)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="sample_rate=12000 .* sample_rate=16000"):
        trainer.fit(model, datamodule=Data())
    with pytest.raises(ValueError, match="sample_rate must be a positive integer"):
        AudioDensityModel(seq_len=32, sample_rate=0, **TINY)
    with pytest.raises(ValueError, match="need 35 input positions but the model's seq_len is 32"):
        AudioSampleLogger(length=20, prompt_length=16).setup(None, model, "fit")
