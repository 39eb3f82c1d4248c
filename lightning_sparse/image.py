"""``ImageDensityModel``: a Sparse Transformer over image bytes; byte sequences to images and image grids."""

from __future__ import annotations

from typing import Any

import torch

from lightning_sparse.kernels import Interleaved, Pattern, Strided
from lightning_sparse.modules import DensityModel

__all__ = ["ImageDensityModel", "image_grid", "sequences_to_images"]

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


def image_grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """uint8 images ``[N, C, H, W]`` → one grid ``[C, H', W']``, 2-pixel black padding (``torchvision.utils.make_grid``,
    torchvision imported only here, when a grid is drawn)."""
    try:
        from torchvision.utils import make_grid
    except ImportError as err:
        raise ImportError(f"Drawing image grids needs torchvision ({err}): {_VISION_HINT}.") from err
    return make_grid(images, nrow=nrow, padding=2, pad_value=0)


class ImageDensityModel(DensityModel):
    """A Sparse Transformer over images as bytes: raster order, channels interleaved per pixel (R, G, B of pixel 0, …).

    Every subpixel is scored: a learned start token is prepended, so batches are uint8 ``[B, H·W·C]`` records and
    the loss covers all ``H·W·C`` dims [DA]. Evaluation batches may be ``(records, first_scored)`` pairs, as the image
    DataModules yield them: records with ``first_scored = H·W·C`` are DDP padding and score nothing. Positions are embedded by three learned tables, row, column and
    channel of the byte [P §5.3].

    Samples and completions during training: add ``lightning_sparse.sample_logging.ImageSampleLogger`` to the
    Trainer's callbacks.

    Args:
        image_shape: ``(H, W, C)`` of the images; ``seq_len`` must equal ``H·W·C``.
        seq_len: Bytes per image; None = ``H·W·C``. The CLI links it from ``data.seq_len``.
        pattern: Attention pattern; None = ``Strided(W·C)``, one image row of local context plus the same
            column and channel of every earlier row.
        **kwargs: Every other :class:`~lightning_sparse.modules.DensityModel` argument (start token and position
            shape are fixed by this class).
    """

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int] = (32, 32, 3),
        seq_len: int | None = None,
        pattern: Pattern | Interleaved | None = None,
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
        if pattern is None:  # resolved here so that the saved hyperparameters hold the real pattern
            pattern = Strided(w * c)
        super().__init__(
            seq_len=seq_len,
            pattern=pattern,
            position_shape=image_shape,  # row, column and channel tables [P §5.3]
            start_token=True,
            **kwargs,
        )
        # Settings as attributes, as the base class does: under LightningCLI self.hparams is the parsed config.
        self.image_shape: tuple[int, int, int] = image_shape

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave out the arguments this class fixes, so ``load_from_checkpoint`` passes them only once."""
        for name in ("position_shape", "start_token"):
            checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY, {}).pop(name, None)
