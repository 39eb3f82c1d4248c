"""The ``lightning-sparse`` command: LightningCLI over any DensityModel and any ByteDataModule.

    lightning-sparse fit --config configs/quickstart.yaml
    lightning-sparse fit --config configs/quickstart.yaml --print_config
    lightning-sparse sample --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt --prompt "def "

Model and data are chosen by ``class_path`` (subclass mode). ``seq_len`` is set once, on the data, and linked to the
model. A ModelCheckpoint on ``val/bpd`` (under ``checkpoint``) and a LearningRateMonitor (under ``lr_monitor``) are
always present and configurable; the default logger is TensorBoard (under ``runs/``) without the ``hp_metric``
placeholder.
"""

from __future__ import annotations

import sys

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_sparse.datamodules import ByteDataModule
from lightning_sparse.modules import DensityModel

__all__ = ["SparseCLI", "build_cli", "cli_main"]

DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "runs", "name": "lightning_sparse", "default_hp_metric": False},
}


class SparseCLI(LightningCLI):
    """LightningCLI with the project's links and always-present callbacks."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.init_args.seq_len", "model.init_args.seq_len")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/bpd",
                "checkpoint.mode": "min",
                # "/" in a metric name would create sub-folders: name the value explicitly.
                "checkpoint.filename": "step{step:07d}-val_bpd{val/bpd:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.save_last": True,
            }
        )
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})


def build_cli(args: list[str] | None = None, run: bool = True) -> SparseCLI:
    """The project's CLI over ``args`` (default ``sys.argv[1:]``); ``run=False`` only instantiates (for tests)."""
    return SparseCLI(
        DensityModel,
        ByteDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"logger": DEFAULT_LOGGER},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def cli_main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-sparse`` console script (returns None, which the script passes to sys.exit)."""
    if sample_requested(args):
        return run_sample_command(args)
    build_cli(args)


# ----- `lightning-sparse sample`: a separate argparse command (lightning_sparse.sample_cli), not a Trainer method -----


def sample_requested(args: list[str] | None) -> bool:
    """True when the command line (``args``, default ``sys.argv[1:]``) starts with the ``sample`` subcommand."""
    argv = sys.argv[1:] if args is None else args
    return argv[:1] == ["sample"]


def run_sample_command(args: list[str] | None) -> None:
    """``lightning-sparse sample ...``: generate files from a checkpoint (see ``lightning_sparse.sample_cli``)."""
    from lightning_sparse.sample_cli import sample_main

    sample_main((sys.argv[1:] if args is None else args)[1:])


if __name__ == "__main__":
    cli_main()
