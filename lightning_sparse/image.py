"""``ImageDensityModel``: a Sparse Transformer over image bytes that shows samples and completions in TensorBoard."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_sparse.kernels import Interleaved, Pattern, Strided
from lightning_sparse.model import START
from lightning_sparse.modules import DensityModel
from lightning_sparse.sampling import sample

__all__ = ["ImageDensityModel", "sequences_to_images"]

_VISION_HINT = "pip install lightning-sparse[vision]"


def sequences_to_images(seqs: torch.Tensor, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """Byte sequences ``[N, H·W·C]`` in raster order (channels interleaved per pixel) → uint8 images ``[N, C, H, W]``."""
    h, w, c = image_shape
    if seqs.dim() != 2 or seqs.shape[1] != h * w * c:
        raise ValueError(
            f"sequences_to_images: expected [N, {h * w * c}] bytes for image_shape={tuple(image_shape)}, "
            f"got shape {tuple(seqs.shape)}."
        )
    return seqs.to(torch.uint8).reshape(-1, h, w, c).permute(0, 3, 1, 2).contiguous()


def _make_grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """``torchvision.utils.make_grid`` (torchvision imported only here, when a grid is drawn)."""
    try:
        from torchvision.utils import make_grid
    except ImportError as err:
        raise ImportError(
            f"ImageDensityModel draws sample grids with torchvision ({err}): {_VISION_HINT}, or set "
            "num_samples=0 and num_completions=0."
        ) from err
    return make_grid(images, nrow=nrow, padding=2, pad_value=0)


class ImageDensityModel(DensityModel):
    """A Sparse Transformer over images as bytes: raster order, channels interleaved per pixel (R, G, B of pixel 0, …).

    Every subpixel is scored: a learned start token is prepended, so batches are uint8 ``[B, H·W·C]`` records and
    the loss covers all ``H·W·C`` dims [DA]. Evaluation batches may be ``(records, first_scored)`` pairs, as the image
    DataModules yield them: records with ``first_scored = H·W·C`` are DDP padding and score nothing. Positions are embedded by three learned tables, row, column and
    channel of the byte [P §5.3].

    At the end of validation (not the sanity check) in every ``sample_every_n_epochs``-th epoch it logs to
    TensorBoard, from global rank 0:

    * ``samples/images``: a grid of ``num_samples`` unconditional samples (temperature 1.0);
    * ``samples/completions``: a two-row grid, the first ``num_completions`` real images of the validation data
      (top row; padding records are skipped; under DDP those of rank 0's shard) and the model's completions of them
      (bottom row): their top ``H // 2`` rows are given, the rest is sampled.

    Sampling runs on every rank (sharded strategies such as FSDP need every rank in each forward pass), under the
    Trainer's precision (bf16 autocast with ``bf16-mixed``); only global rank 0 writes. Cost: one full forward pass
    per sampled byte, ``H·W·C`` for the samples and ``H·W·C - (H // 2)·W·C`` for the completions.

    Args:
        image_shape: ``(H, W, C)`` of the images; ``seq_len`` must equal ``H·W·C``.
        seq_len: Bytes per image; None = ``H·W·C``. The CLI links it from ``data.seq_len``.
        pattern: Attention pattern; None = ``Strided(W·C)``, one image row of local context plus the same
            column and channel of every earlier row.
        num_samples: Unconditional samples per validation (0 = none).
        num_completions: Completions of real validation images per validation (0 = none).
        **kwargs: Every other :class:`~lightning_sparse.modules.DensityModel` argument, e.g.
            ``sample_every_n_epochs`` (start token and position shape are fixed by this class).
    """

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int] = (32, 32, 3),
        seq_len: int | None = None,
        pattern: Pattern | Interleaved | None = None,
        num_samples: int = 4,
        num_completions: int = 4,
        **kwargs: Any,
    ) -> None:
        image_shape = tuple(image_shape)
        if len(image_shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in image_shape):
            raise ValueError(
                f"ImageDensityModel: image_shape must be three positive integers (H, W, C), got {image_shape!r}; "
                "e.g. (32, 32, 3) for CIFAR-10 or (64, 64, 3) for ImageNet 64x64."
            )
        h, w, c = image_shape
        if seq_len is None:
            seq_len = h * w * c
        if seq_len != h * w * c:
            raise ValueError(
                f"ImageDensityModel: seq_len={seq_len} but image_shape={image_shape} has H·W·C = {h * w * c} bytes; "
                f"set seq_len (data.seq_len in a config) to {h * w * c} or fix image_shape."
            )
        for name, value in (("num_samples", num_samples), ("num_completions", num_completions)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ImageDensityModel: {name} must be an integer >= 0 (0 disables it), got {value!r}.")
        if num_samples or num_completions:
            if c not in (1, 3, 4):
                raise ValueError(
                    f"ImageDensityModel: image_shape={image_shape} has C={c} channels; TensorBoard shows 1, 3 or 4, "
                    "so set num_samples=0 and num_completions=0 to train on other channel counts."
                )
            if importlib.util.find_spec("torchvision") is None:
                raise ImportError(
                    f"ImageDensityModel logs sample grids with torchvision, which is not installed: {_VISION_HINT}, "
                    "or set num_samples=0 and num_completions=0."
                )
        if num_completions and h < 2:
            raise ValueError(
                f"ImageDensityModel: completions give the top H // 2 rows, but image_shape={image_shape} has H={h}; "
                "set num_completions=0."
            )
        if pattern is None:  # resolved here so that the saved hyperparameters hold the real pattern
            pattern = Strided(w * c)
        super().__init__(
            seq_len=seq_len,
            pattern=pattern,
            position_shape=image_shape,  # row, column and channel tables [P §5.3]
            start_token=True,
            sample_length=0,  # this class samples whole images itself (sample_and_log)
            sample_prompt_length=1,
            **kwargs,
        )
        # Settings as attributes, as the base class does: under LightningCLI self.hparams is the parsed config.
        self.image_shape: tuple[int, int, int] = image_shape
        self.num_samples, self.num_completions = num_samples, num_completions
        self._real_images: torch.Tensor | None = None  # first real validation images, the completion prompts

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave out the arguments this class fixes, so ``load_from_checkpoint`` passes them only once."""
        for name in ("position_shape", "start_token", "sample_length", "sample_prompt_length"):
            checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY, {}).pop(name, None)

    @property
    def given_bytes(self) -> int:
        """Bytes given to a completion: the top ``H // 2`` rows."""
        h, w, c = self.image_shape
        return (h // 2) * w * c

    def on_validation_epoch_start(self) -> None:
        """Gather the completion prompts afresh in each validation run (so a short set never adds duplicates)."""
        self._real_images = None

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)  # validates the batch first
        have = 0 if self._real_images is None else len(self._real_images)
        if have < self.num_completions:  # the first real images of the run, from as many batches as it takes
            records, scored = batch if isinstance(batch, (tuple, list)) else (batch, None)
            if scored is not None:  # a padding record (first_scored = seq_len) is no real image
                records = records[torch.as_tensor(scored, device=records.device) < self.config.seq_len]
            new = records[: self.num_completions - have].clone()
            self._real_images = new if self._real_images is None else torch.cat([self._real_images, new])

    @torch.no_grad()
    def generate(self, num_samples: int, real_images: torch.Tensor | None, seed: int = 0
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``num_samples`` unconditional images and completions of ``real_images`` (uint8 ``[k, seq_len]``).

        Returns uint8 byte sequences ``([num_samples, seq_len] or None, [k, seq_len] or None)``; a completion's
        first :attr:`given_bytes` bytes are the real image's.
        """
        if self.model is None:
            raise RuntimeError("ImageDensityModel.generate: call configure_model() first.")
        generator = torch.Generator(device=self.device).manual_seed(seed)
        samples = completions = None
        if num_samples:
            start = torch.full((num_samples, 1), START, dtype=torch.long, device=self.device)
            samples = sample(self.model, start, self.config.seq_len, generator=generator).to(torch.uint8)
        if real_images is not None and len(real_images):
            given = real_images[:, : self.given_bytes].to(device=self.device, dtype=torch.long)
            start = torch.full((len(given), 1), START, dtype=torch.long, device=self.device)
            rest = sample(self.model, torch.cat([start, given], dim=1), self.config.seq_len - self.given_bytes,
                          generator=generator)
            completions = torch.cat([given, rest], dim=1).to(torch.uint8)
        return samples, completions

    def sample_and_log(self) -> None:
        """Sample on every rank (each forward may be a collective), then log the grids from global rank 0."""
        if not (self.num_samples or self.num_completions):
            return
        real = self._real_images if self.num_completions else None
        with self.trainer.precision_plugin.forward_context():
            samples, completions = self.generate(self.num_samples, real)
        if self.trainer.is_global_zero:
            self.log_images(samples, real, completions)

    def log_images(self, samples: torch.Tensor | None, real: torch.Tensor | None,
                   completions: torch.Tensor | None) -> None:
        """Add the sample grid and the (real row over completion row) grid to every TensorBoard logger."""
        grids = {}
        if samples is not None:
            grids["samples/images"] = _make_grid(sequences_to_images(samples.cpu(), self.image_shape),
                                                 nrow=min(8, len(samples)))
        if completions is not None and real is not None:
            both = torch.cat([real[: len(completions)].cpu(), completions.cpu()])
            grids["samples/completions"] = _make_grid(sequences_to_images(both, self.image_shape),
                                                      nrow=len(completions))
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                for tag, grid in grids.items():
                    logger.experiment.add_image(tag, grid, global_step=self.global_step, dataformats="CHW")
