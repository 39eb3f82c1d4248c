"""The paper configs: parsed by the project's CLI, the network built on the meta device, checked against the paper.

Paper facts (Child et al. 2019, §6–7, Tables 1 and 4): parameter counts, layers/heads/width, feed-forward and
query-key widths, attention pattern, dropout, learning rate, epochs; warmup 5,000, weight decay 0.01, clipping 1.0
for every model. The audio networks' shapes are our choices (the paper gives only their parameter counts).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_sparse.cli import SparseCLI, build_cli
from lightning_sparse.kernels import Fixed, Strided

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# name: (paper parameters, {"cls": module class, "lr": learning rate, config field: value}, max_epochs or None = not
# stated). Position embeddings [P §5.3]: (row, column, channel) for images, (row, column) of a stride-wide matrix else.
PAPER = {
    "cifar10": (59e6, dict(cls="ImageDensityModel", seq_len=3072, n_layer=128, n_head=2, d_model=256, d_ff=512,
                           d_qk=128, dropout=0.25, pattern=Strided(96), position_shape=(32, 32, 3), start_token=True,
                           lr=0.00035), 120),
    "enwik8": (95e6, dict(cls="TextDensityModel", seq_len=12288, n_layer=30, n_head=8, d_model=512, d_ff=2048,
                          d_qk=512, dropout=0.4, pattern=Fixed(128, 32, (0, 1, 2, 3)), position_shape=(96, 128),
                          start_token=False), 80),
    "imagenet64": (152e6, dict(cls="ImageDensityModel", seq_len=12288, n_layer=48, n_head=16, d_model=512,
                               d_ff=2048, d_qk=512, dropout=0.01, pattern=Strided(128), position_shape=(64, 64, 3),
                               start_token=True), 70),
    "audio_65k": (152e6, dict(cls="AudioDensityModel", seq_len=65536, n_layer=48, d_model=512, pattern=Strided(256),
                              position_shape=(256, 256)), None),
    "audio_262k": (25e6, dict(cls="AudioDensityModel", seq_len=262144, n_layer=31, d_model=256, pattern=Strided(512),
                              position_shape=(512, 512)), None),
    "audio_1m": (3e6, dict(cls="AudioDensityModel", seq_len=1048576, n_layer=25, d_model=96, pattern=Strided(1024),
                           position_shape=(1024, 1024)), None),
}


def parse(name: str, *overrides: str) -> SparseCLI:
    """Parse and instantiate ``configs/<name>.yaml`` through the project's CLI, on the CPU, without running anything."""
    args = ["--config", str(CONFIGS / f"{name}.yaml"), "--trainer.accelerator=cpu", "--trainer.devices=1",
            "--trainer.strategy=auto", "--trainer.logger=false", *overrides]
    return build_cli(args, run=False)


def test_every_paper_experiment_has_a_config():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} >= set(PAPER)


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_config_matches_the_paper(name):
    params, expected, epochs = PAPER[name]
    expected = dict(expected)
    cli = parse(name)
    model, trainer = cli.model, cli.trainer
    expected_cls = expected.pop("cls")
    assert type(model).__name__ == expected_cls
    lr = expected.pop("lr", None)
    for field, value in expected.items():
        assert getattr(model.config, field) == value, field
    if lr is not None:
        assert model.lr == lr
    # The paper's optimization and memory settings, shared by every experiment [P §5.4–5.6, §6].
    assert model.config.recompute and model.config.attention_backend == "auto"
    assert (model.warmup_steps, model.weight_decay) == (5000, 0.01)
    assert trainer.gradient_clip_val == 1.0 and trainer.precision == "bf16-mixed"
    if epochs is not None:
        assert trainer.max_epochs == epochs
    assert cli.datamodule.seq_len == model.config.seq_len
    # Samples come from the modality's callback (lightning_sparse.sample_logging), configured in the YAML.
    loggers = [type(c).__name__ for c in trainer.callbacks if type(c).__module__ == "lightning_sparse.sample_logging"]
    assert loggers == [expected_cls.replace("DensityModel", "SampleLogger")]

    # Build the network on the meta device: no memory, no initialization.
    with torch.device("meta"):
        model.configure_model()
    assert all(p.is_meta for p in model.parameters())
    count = model.model.num_parameters()
    assert abs(count - params) / params < 0.03, f"{name}: {count / 1e6:.2f}M parameters, the paper {params / 1e6:.0f}M"


def test_image_config_with_a_mismatched_image_shape_fails_at_parse_time():
    with pytest.raises(ValueError, match="seq_len=3072 but image_shape=\\(64, 64, 3\\)"):
        parse("cifar10", "--model.init_args.image_shape=[64, 64, 3]")
