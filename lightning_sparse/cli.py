"""The ``lightning-sparse`` command: LightningCLI over any DensityModel and any ByteDataModule.

    lightning-sparse fit --config configs/quickstart.yaml
    lightning-sparse fit --config configs/quickstart.yaml --print_config
    lightning-sparse fit --model.help TextDensityModel
    lightning-sparse --version
    lightning-sparse sample --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt --prompt "def "

Model and data are chosen by ``class_path`` (subclass mode; the project's modules are imported, so short names such as
``TextDensityModel`` work). ``seq_len`` is set once, on the data, and linked to the model. A ModelCheckpoint on
``val/bpd`` (under ``checkpoint``) and a LearningRateMonitor (under ``lr_monitor``) are always present and
configurable; checkpoints are written atomically (``trainer.plugins``); the default logger is TensorBoard (under
``runs/``) without the ``hp_metric`` placeholder. ``validate``/``test``/``predict`` of a run's checkpoint log into
that run's folder (``<version>/validate`` …).

A bad value stops the command with one short message: the key, the library's own explanation and fix. Add
``--debug`` (or set ``LIGHTNING_SPARSE_DEBUG=1``) for the full traceback.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

import lightning_sparse
import lightning_sparse.audio  # noqa: F401 - registers the modality subclasses, so short class names resolve
import lightning_sparse.image  # noqa: F401
import lightning_sparse.text  # noqa: F401
from lightning_sparse import datamodules, kernels
from lightning_sparse.callbacks import DivergedError
from lightning_sparse.datamodules import ByteDataModule
from lightning_sparse.modules import DensityModel

__all__ = ["CLIError", "SparseCLI", "build_cli", "cli_main"]

DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "runs", "name": "lightning_sparse", "default_hp_metric": False},
}
DEBUG_ENV = "LIGHTNING_SPARSE_DEBUG"
# Where this library's own code lives (kernels/ and datamodules/ are separate folders in a source checkout).
OWN_DIRS = tuple({Path(m.__file__).resolve().parent for m in (lightning_sparse, kernels, datamodules)})


def package_version() -> str:
    """The installed lightning-sparse version."""
    try:
        return version("lightning-sparse")
    except PackageNotFoundError:  # a source tree on sys.path without an install
        return "unknown (not installed)"


def debug_requested() -> bool:
    """Full tracebacks instead of short messages (``--debug`` or ``LIGHTNING_SPARSE_DEBUG=1``)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


class CLIError(ValueError):
    """A bad command line or config value, with the key it came from; the CLI prints only this message."""

    def __init__(self, key: str | None, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


# ----- short messages -----

_NOISE = re.compile(
    r"Does not validate against any of the Union subtypes|^Subtypes:|^Errors:|^Given value type:|"
    r"Expected a <class 'NoneType'>|does not correspond to a subclass of"
)


def _condense_parser_message(message: str) -> CLIError:
    """A jsonargparse error (``Parser key "k": <nested union report>``) as the key and its informative lines."""
    key = None
    match = re.match(r'\s*Parser key "([^"]+)":\s*', message)
    if match:
        key, message = match.group(1), message[match.end():]
    lines = [line.strip().removeprefix("- ").strip() for line in message.splitlines()]
    kept = [line for line in lines if line and not _NOISE.search(line)]
    kept = [line for line in kept if not line.startswith("Given value:") or len(line) < 80][:6]
    return CLIError(key, "\n  ".join(kept) or message.strip())


def _innermost(error: BaseException) -> BaseException:
    """The exception at the start of ``error``'s chain (the original ``raise``)."""
    seen = {id(error)}
    while (cause := error.__cause__ or error.__context__) is not None and id(cause) not in seen:
        seen.add(id(cause))
        error = cause
    return error


def _frames(tb: TracebackType | None) -> list[Any]:
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _classes_in(config: Any, prefix: str = "") -> list[tuple[str, Any, dict[str, Any]]]:
    """``(key, class, init_args)`` of every ``class_path`` entry in a parsed config, outermost first."""
    found = []
    if isinstance(config, Namespace):
        config = config.as_dict()
    if isinstance(config, dict):
        if isinstance(config.get("class_path"), str):
            init_args = config.get("init_args") or {}
            found.append((prefix.rstrip("."), _import(config["class_path"]), init_args))
            return found + _classes_in(init_args, f"{prefix}init_args.")
        for name, value in config.items():
            found += _classes_in(value, f"{prefix}{name}.")
    elif isinstance(config, list):
        for i, value in enumerate(config):
            found += _classes_in(value, f"{prefix}{i}.")
    return found


def _explain_instantiation_error(error: BaseException, config: Any) -> CLIError:
    """The original message of an error raised while building the configured objects, with its config key(s).

    The key is found from the raising frames: the innermost ``self`` whose class is named in the config gives the
    entry (e.g. ``model.init_args.pattern``), argument names of that entry mentioned in the message give the keys.
    """
    leaf = _innermost(error)
    entries = _classes_in(config)
    key = None
    for frame in _frames(leaf.__traceback__):
        obj = frame.f_locals.get("self")
        for path, cls, init_args in entries:
            if cls is not None and type(obj) is cls:
                key, args = path, init_args
    message = str(leaf) or type(leaf).__name__
    if key is not None:
        names = [n for n in dict.fromkeys(re.findall(r"[A-Za-z_]\w*", message)) if n in args]
        if names:
            key = ", ".join(f"{key}.init_args.{n}" for n in names)
    return CLIError(key, message)


def _is_own_error(error: BaseException) -> bool:
    """Raised by this library's code (whose messages say what to change) or a Lightning configuration check."""
    if isinstance(error, (CLIError, DivergedError, MisconfigurationException)):
        return True
    frames = _frames(_innermost(error).__traceback__)
    return bool(frames) and any(Path(frames[-1].f_code.co_filename).resolve().is_relative_to(d) for d in OWN_DIRS)


# ----- the CLI -----


class SparseArgumentParser(LightningArgumentParser):
    """The CLI's parser: a parse error raises :class:`CLIError` (key and reason) instead of printing the usage."""

    def error(self, message: str, ex: Exception | None = None) -> None:
        if debug_requested():
            super().error(message, ex)
        raise _condense_parser_message(message) from ex


class SparseCLI(LightningCLI):
    """LightningCLI with the project's links, always-present callbacks, short errors and run-relative logging."""

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

    def _subcommand_config(self) -> Any:
        return self.config.get(self.subcommand) if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        """A ``fast_dev_run`` smoke test writes no ``checkpoints/`` folder (ModelCheckpoint's save_last would)."""
        config = self._subcommand_config()
        if config.get("trainer", {}).get("fast_dev_run") and config.get("checkpoint") is not None:
            config.checkpoint.save_last = False

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; a failure becomes a :class:`CLIError` naming the config key."""
        try:
            super().instantiate_classes()
        except CLIError:
            raise
        except Exception as error:
            if debug_requested():
                raise
            raise _explain_instantiation_error(error, self._subcommand_config()) from error

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with a one-line answer for a GPU config on a machine without one, and run-relative logs."""
        config = self._subcommand_config().get("trainer", {})
        accelerator = config.get("accelerator")
        if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise CLIError(
                "trainer.accelerator",
                f"{accelerator!r} but this machine has no CUDA GPU; add `--trainer.accelerator cpu` to run on the CPU "
                "(paper configs: also shrink the model, e.g. --model.init_args.n_layer 2).",
            )
        logger = self._logger_beside_checkpoint(config)
        if logger is not None:
            kwargs.setdefault("logger", logger)
        return super().instantiate_trainer(**kwargs)

    def _logger_beside_checkpoint(self, trainer_config: Any) -> Logger | None:
        """For a command given ``--ckpt_path <run>/checkpoints/x.ckpt``, the configured TensorBoard or CSV logger
        pointed at that run: ``fit`` (a resume) continues logging in ``<run>``; ``validate``/``test``/``predict`` log
        into ``<run>/<subcommand>/`` instead of new training-looking ``version_N`` folders."""
        ckpt_path = self._subcommand_config().get("ckpt_path")
        logger = trainer_config.get("logger")
        if self.subcommand is None or not isinstance(ckpt_path, str) or not ckpt_path.endswith(".ckpt"):
            return None
        if not isinstance(logger, (dict, Namespace)) or "class_path" not in logger:
            return None
        cls = _import(logger["class_path"])
        if not (isinstance(cls, type) and issubclass(cls, (TensorBoardLogger, CSVLogger))):
            return None
        folder = Path(ckpt_path).resolve().parent
        run = folder.parent if folder.name == "checkpoints" else folder
        init_args = logger.get("init_args") or {}
        init_args = init_args.as_dict() if isinstance(init_args, Namespace) else dict(init_args)
        if self.subcommand == "fit":
            if folder.name != "checkpoints":  # not a run folder of these loggers: a fresh version
                return None
            place = {"save_dir": str(run.parent.parent), "name": run.parent.name, "version": run.name}
        else:
            place = {"save_dir": str(run), "name": "", "version": self.subcommand}
        return cls(**{**init_args, **place})


def build_cli(args: list[str] | None = None, run: bool = True) -> SparseCLI:
    """The project's CLI over ``args`` (default ``sys.argv[1:]``); ``run=False`` only instantiates (for tests)."""
    return SparseCLI(
        DensityModel,
        ByteDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_class=SparseArgumentParser,
        parser_kwargs={"version": package_version()},
        trainer_defaults={
            "logger": DEFAULT_LOGGER,
            "plugins": [{"class_path": "lightning_sparse.checkpoint_io.AtomicCheckpointIO"}],
        },
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def cli_main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-sparse`` console script: short error messages, exit status 2 for a bad
    value and 1 for a failed run; ``--debug`` (or ``LIGHTNING_SPARSE_DEBUG=1``) re-raises with the full traceback."""
    if sample_requested(args):
        return run_sample_command(args)
    if args is not None:
        args = list(args)
    argv = sys.argv if args is None else args  # edit sys.argv itself: LightningCLI warns when given both
    if "--debug" in argv:
        argv.remove("--debug")
        os.environ[DEBUG_ENV] = "1"  # also seen by DDP worker processes
    try:
        build_cli(args)
    except Exception as error:
        if debug_requested() or not _is_own_error(error):
            raise
        bad_value = isinstance(error, CLIError)
        message = error if bad_value else f"{type(_innermost(error)).__name__}: {_innermost(error)}"
        print(f"error: {message}\n(add --debug or set {DEBUG_ENV}=1 for the full traceback)", file=sys.stderr)
        raise SystemExit(2 if bad_value else 1) from None


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
