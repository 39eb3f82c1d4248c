"""Training-safety callbacks: nothing lost (atomic checkpoints, ``last.ckpt`` at every stop), nothing wasted
(divergence stops the run, ``max_time`` bounds this run including its final validation).

Every :class:`~lightning_sparse.modules.DensityModel` adds them through ``configure_callbacks``
(:func:`safety_callbacks`); a callback of the same type that the Trainer already has is kept instead.
"""

from __future__ import annotations

import math
import time
from datetime import timedelta
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, Timer
from lightning.pytorch.utilities import rank_zero_info

from lightning_sparse.checkpoint_io import AtomicCheckpointIO

__all__ = [
    "AtomicCheckpoints",
    "DivergedError",
    "LastCheckpointOnStop",
    "StopOnDivergence",
    "TimeLimitPerRun",
    "safety_callbacks",
]


def safety_callbacks() -> list[Callback]:
    """One of each training-safety callback, in the order they should run."""
    return [AtomicCheckpoints(), StopOnDivergence(), TimeLimitPerRun(), LastCheckpointOnStop()]


class AtomicCheckpoints(Callback):
    """Install :class:`~lightning_sparse.checkpoint_io.AtomicCheckpointIO` when the Trainer has the plain default.

    Lightning 2.6 gives a LightningModule no way to choose the CheckpointIO, so this happens in ``setup``, before any
    checkpoint is written; a CheckpointIO chosen by the user (``Trainer(plugins=[...])``) is left alone.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()


class DivergedError(RuntimeError):
    """Training stopped because the loss, a validation metric or the weights became NaN or infinite."""


def _fix_hint(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
    lr = getattr(pl_module, "lr", None)
    clip = trainer.gradient_clip_val
    clipping = ("gradient clipping (trainer.gradient_clip_val=1.0, now off)" if not clip else
                f"a smaller gradient clipping value (trainer.gradient_clip_val, now {clip:g})")
    return (
        f"Try a lower learning rate (model.lr{f' = {lr:g}' if lr is not None else ''}), a longer warmup "
        f"(model.warmup_steps) or {clipping}; resume from the last good checkpoint with --ckpt_path."
    )


class StopOnDivergence(Callback):
    """Stop at the first non-finite training loss or validation monitor, and never write non-finite weights.

    The training loss is checked after every optimizer step (one device-to-host copy and, with several processes,
    one all-reduce of a flag), the checkpoint monitor after every validation (before ModelCheckpoint sees it), and the
    weights before every checkpoint is written. Each raises :class:`DivergedError` with the step and what to try.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            raise DivergedError(
                f"The training loss diverged: it is {loss.item() if bad else 'non-finite on another process'} in "
                f"optimizer step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch_idx}); training "
                f"stopped without saving this state. {_fix_hint(trainer, pl_module)}"
            )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        monitor = getattr(trainer.checkpoint_callback, "monitor", None)
        value = trainer.callback_metrics.get(monitor) if monitor else None
        if trainer.sanity_checking or value is None or bool(torch.isfinite(value).all()):
            return
        raise DivergedError(
            f"The model diverged: validation {monitor} is {value.item()} at step {trainer.global_step}; training "
            f"stopped without saving this state. {_fix_hint(trainer, pl_module)}"
        )

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Each process checks its own shard (FSDP/DTensor parameters: the local part); any bad shard stops all.
        params = [getattr(p, "to_local", lambda p=p: p)().detach() for p in pl_module.parameters()]
        params = [p for p in params if p.numel() and not p.is_meta]
        bad = bool(params) and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all())
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            raise DivergedError(
                f"The model diverged: its weights are NaN or infinite at step {trainer.global_step}, so no checkpoint "
                f"was written (the previous ones are kept). {_fix_hint(trainer, pl_module)}"
            )


class LastCheckpointOnStop(Callback):
    """Save ``last.ckpt`` (through the Trainer's ModelCheckpoint) whenever fitting stops, unless it is of this step.

    ModelCheckpoint saves ``last.ckpt`` only after validations, so the steps after the last validation were lost at a
    ``max_steps``/``max_epochs``/``max_time`` stop or a Ctrl-C. Nothing is saved for ``fast_dev_run``, without a
    ModelCheckpoint with ``save_last``, or after any other exception (such as :class:`DivergedError`).
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last(trainer, "end of fitting")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self._save_last(trainer, "interrupted")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """A save after a stop in mid-epoch (``max_steps``, ``max_time``): record the loops as a save at the last
        batch's ``on_train_batch_end`` would, so a resume continues inside the epoch.

        When a run stops mid-epoch, Lightning 2.6 still marks the epoch processed (before ``on_train_epoch_end``) and
        completed (before ``on_train_end``), so a checkpoint saved there (by this callback or by ModelCheckpoint)
        would resume at the next epoch and skip the rest of this one; the data loader's own position is right.
        """
        loops = checkpoint.get("loops", {}).get("fit_loop")
        if loops is None:
            return
        epochs, batches = loops["epoch_progress"], loops["epoch_loop.batch_progress"]
        if epochs["current"]["processed"] < epochs["current"]["started"] or batches["is_last_batch"]:
            return  # inside an epoch, or at its real end
        for part in ("total", "current"):
            epochs[part]["processed"] = epochs[part]["completed"] = epochs[part]["started"] - 1
        if batches["current"]["completed"] == batches["current"]["processed"]:  # as before the batch completed
            for part in ("total", "current"):
                batches[part]["completed"] -= 1
            loops["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1  # Lightning adds it back on restart
        checkpoint["epoch"] = epochs["current"]["completed"]

    @staticmethod
    def _save_last(trainer: L.Trainer, why: str) -> None:
        ckpt = trainer.checkpoint_callback
        if not isinstance(ckpt, ModelCheckpoint) or not ckpt.save_last or trainer.fast_dev_run:
            return
        # ModelCheckpoint's own bookkeeping (Lightning 2.6): the step of its last save, the last-checkpoint writer.
        if trainer.sanity_checking or ckpt._last_global_step_saved == trainer.global_step:
            return
        ckpt._save_last_checkpoint(trainer, ckpt._monitor_candidates(trainer))
        rank_zero_info(f"Saved {ckpt.last_model_path} at step {trainer.global_step} ({why}).")


class TimeLimitPerRun(Callback):
    """Make ``trainer.max_time`` bound this run, including the validation and sampling done when it stops.

    * On resume, the training time recorded in the checkpoint is logged and not counted: otherwise a run resumed
      with a larger ``max_steps`` stops at once when the first run ended by its time limit.
    * Stopping through ``max_time`` triggers one more validation (with samples); it is started early enough to end in
      time: training stops when the time left is less than the last validation took (plus 10%).
    """

    def __init__(self) -> None:
        self._validation_start: float | None = None
        self.last_validation_seconds = 0.0

    @staticmethod
    def _timer(trainer: L.Trainer) -> Timer | None:
        return next((c for c in trainer.callbacks if isinstance(c, Timer) and c._duration is not None), None)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Runs before the callbacks load their states: drop the Timer's, so this run gets the whole max_time.
        timer = self._timer(trainer)
        states = checkpoint.get("callbacks", {})
        if timer is None or timer.state_key not in states:
            return
        elapsed = states.pop(timer.state_key).get("time_elapsed", {}).get("train", 0.0)
        rank_zero_info(
            f"Resuming at step {checkpoint.get('global_step')}: the checkpoint had trained for "
            f"{timedelta(seconds=round(elapsed))}; trainer.max_time={timedelta(seconds=round(timer._duration))} "
            "limits this run, counted from now."
        )

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_start = time.monotonic()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._validation_start is not None and not trainer.sanity_checking:
            self.last_validation_seconds = time.monotonic() - self._validation_start
        self._validation_start = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        timer = self._timer(trainer)
        if timer is None or trainer.should_stop or not self.last_validation_seconds:
            return
        left = timer.time_remaining()
        stop = trainer.strategy.broadcast(left is not None and left < 1.1 * self.last_validation_seconds)
        if stop:
            trainer.should_stop = True
            rank_zero_info(
                f"Stopping at step {trainer.global_step}: {math.floor(left)} s of trainer.max_time are left and the "
                f"final validation takes about {math.ceil(self.last_validation_seconds)} s."
            )
