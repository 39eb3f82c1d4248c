"""Samples in TensorBoard during training: one Lightning callback per modality, on the fast (KV-cached) sampler.

Configure them under ``trainer.callbacks`` in a config, e.g.::

    trainer:
      callbacks:
        - class_path: lightning_sparse.sample_logging.TextSampleLogger
          init_args: {length: 256, prompt_length: 64}

After validation in every ``every_n_epochs``-th epoch (never in the sanity check) each callback samples on every
rank (a sharded strategy needs every rank in each forward pass), under the Trainer's precision, with a generator
seeded the same way each time (so steps are comparable); global rank 0 writes to every TensorBoard logger.

* :class:`TextSampleLogger` — ``samples/text``: prompt and sample as Markdown code blocks.
* :class:`ImageSampleLogger` — ``samples/images`` (unconditional samples) and ``samples/completions`` (real
  validation images over their completions from the top half).
* :class:`AudioSampleLogger` — ``samples/audio`` and ``samples/audio_with_prompt``, μ-law decoded, at the model's
  sample rate.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from lightning_sparse.model import START, VOCAB_SIZE, SparseTransformer
from lightning_sparse.sampling import sample

__all__ = ["SampleLogger", "TextSampleLogger", "ImageSampleLogger", "AudioSampleLogger", "generate_images"]


def _count(owner: str, name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}: {name} must be an integer >= {low}, got {value!r}.")


def _fits(owner: str, prompt: int, length: int, seq_len: int) -> None:
    """Every input position of a sample must lie in the model's context."""
    if length and prompt + length - 1 > seq_len:
        raise ValueError(
            f"{owner}: a prompt of {prompt} and {length} sampled positions need {prompt + length - 1} input "
            f"positions but the model's seq_len is {seq_len}; lower length to at most {seq_len - prompt + 1} or "
            "shorten the prompt."
        )


def generate_images(
    model: SparseTransformer,
    image_shape: tuple[int, int, int],
    num_samples: int,
    real_images: torch.Tensor | None,
    generator: torch.Generator | None = None,
    progress=None,
    cuda_graph: bool | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``num_samples`` unconditional images and completions of ``real_images`` (uint8 ``[k, H·W·C]``).

    A completion is given the start token and the top ``H // 2`` rows and samples the rest. Returns uint8 byte
    sequences ``([num_samples, H·W·C] or None, [k, H·W·C] or None)``. ``progress`` and ``cuda_graph`` go to
    :func:`~lightning_sparse.sampling.sample`.
    """
    h, w, c = image_shape
    seq_len = h * w * c
    device = next(model.parameters()).device
    samples = completions = None
    if num_samples:
        start = torch.full((num_samples, 1), START, dtype=torch.long, device=device)
        samples = sample(model, start, seq_len, generator=generator, progress=progress, cuda_graph=cuda_graph)
        samples = samples.to(torch.uint8)
    if real_images is not None and len(real_images):
        given = real_images[:, : (h // 2) * w * c].to(device=device, dtype=torch.long)
        start = torch.full((len(given), 1), START, dtype=torch.long, device=device)
        rest = sample(model, torch.cat([start, given], dim=1), seq_len - given.shape[1], generator=generator,
                      progress=progress, cuda_graph=cuda_graph)
        completions = torch.cat([given, rest], dim=1).to(torch.uint8)
    return samples, completions


def _cuda_graph(trainer: L.Trainer) -> bool | None:
    """CUDA graphs (the default on CUDA) only where every rank holds the whole model; sharded forwards stay eager."""
    replicated = isinstance(getattr(trainer, "strategy", None), (DDPStrategy, SingleDeviceStrategy))
    return None if replicated else False


def _tensorboards(trainer: L.Trainer) -> list:
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


class SampleLogger(Callback):
    """Base of the sample callbacks: when to sample, the validation prompt, and rank-0-only writing.

    Subclasses implement :meth:`generate` (every rank; returns what to write, or None) and :meth:`write` (rank 0).

    Args:
        every_n_epochs: Sample after validations in every n-th epoch only.
        seed: Seed of the sampling generator (the same every time, so samples of successive steps compare).
    """

    def __init__(self, every_n_epochs: int = 1, seed: int = 0) -> None:
        _count(type(self).__name__, "every_n_epochs", every_n_epochs, 1)
        self.every_n_epochs, self.seed = every_n_epochs, seed
        self.prompt: torch.Tensor | None = None  # inputs of the first validation sequence seen

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.prompt is None:
            inputs, _, _ = pl_module._inputs_and_targets(batch)
            self.prompt = inputs[:1].detach().clone()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or getattr(pl_module, "model", None) is None:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self.generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            result = self.generate(trainer, pl_module)
        if result is not None and trainer.is_global_zero:
            self.write(trainer, pl_module, result)

    def sample(self, trainer: L.Trainer, pl_module: L.LightningModule, prompt: torch.Tensor, length: int):
        """``sample`` with this callback's generator."""
        return sample(pl_module.model, prompt.to(pl_module.device), length, generator=self.generator,
                      cuda_graph=_cuda_graph(trainer))

    def generate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        raise NotImplementedError

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, result: Any) -> None:
        raise NotImplementedError


class TextSampleLogger(SampleLogger):
    """Log ``length`` sampled bytes (temperature 1.0) after a prompt to TensorBoard's Text tab (``samples/text``).

    Args:
        length: Bytes to generate (0 = off).
        prompt: Text to start from; None = the first ``prompt_length`` bytes of the validation data.
        prompt_length: Bytes of the first validation sequence used as the prompt when ``prompt`` is None.
        every_n_epochs, seed: See :class:`SampleLogger`.
    """

    def __init__(self, length: int = 256, prompt: str | None = None, prompt_length: int = 64,
                 every_n_epochs: int = 1, seed: int = 0) -> None:
        super().__init__(every_n_epochs, seed)
        _count("TextSampleLogger", "length", length, 0)
        _count("TextSampleLogger", "prompt_length", prompt_length, 1)
        if prompt is not None and not prompt:
            raise ValueError("TextSampleLogger: prompt must be a non-empty string, or None to prompt with validation "
                             "data.")
        self.length, self.text_prompt, self.prompt_length = length, prompt, prompt_length

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        given = len(self.text_prompt.encode()) if self.text_prompt is not None else self.prompt_length
        _fits("TextSampleLogger", given, self.length, pl_module.config.seq_len)

    def generate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        if self.text_prompt is not None:
            prompt = torch.tensor([list(self.text_prompt.encode())], dtype=torch.long)
        elif self.prompt is not None:
            prompt = self.prompt[:, : self.prompt_length]
        else:
            return None
        if not self.length:
            return None
        return prompt[0].cpu(), self.sample(trainer, pl_module, prompt, self.length)[0].cpu()

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, result: Any) -> None:
        from lightning_sparse.text import markdown_code_block

        prompt, sample_ = result
        prompt_text = bytes(prompt[prompt < VOCAB_SIZE].tolist()).decode("utf-8", errors="replace")
        sample_text = bytes(sample_.tolist()).decode("utf-8", errors="replace")
        text = (
            f"**prompt** ({len(prompt)} bytes)\n\n{markdown_code_block(prompt_text)}\n\n"
            f"**sample** ({len(sample_)} bytes, temperature 1.0, step {trainer.global_step})\n\n"
            f"{markdown_code_block(sample_text)}"
        )
        for writer in _tensorboards(trainer):
            writer.add_text("samples/text", text, global_step=trainer.global_step)


class ImageSampleLogger(SampleLogger):
    """Log grids of unconditional samples and of completions of real validation images (an ``ImageDensityModel``).

    ``samples/images``: ``num_samples`` samples; ``samples/completions``: the first ``num_completions`` real
    validation images of the run (top row; DDP padding records skipped; under DDP those of rank 0's shard) over the
    model's completions of them from their top ``H // 2`` rows (bottom row). Needs torchvision.

    Args:
        num_samples: Unconditional samples per validation (0 = none).
        num_completions: Completions of real validation images per validation (0 = none).
        every_n_epochs, seed: See :class:`SampleLogger`.
    """

    def __init__(self, num_samples: int = 4, num_completions: int = 4, every_n_epochs: int = 1,
                 seed: int = 0) -> None:
        super().__init__(every_n_epochs, seed)
        _count("ImageSampleLogger", "num_samples", num_samples, 0)
        _count("ImageSampleLogger", "num_completions", num_completions, 0)
        if (num_samples or num_completions) and importlib.util.find_spec("torchvision") is None:
            raise ImportError("ImageSampleLogger draws grids with torchvision, which is not installed: "
                              "pip install lightning-sparse[vision], or remove the callback.")
        self.num_samples, self.num_completions = num_samples, num_completions
        self.real: torch.Tensor | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        shape = getattr(pl_module, "image_shape", None)
        if shape is None:
            raise ValueError(f"ImageSampleLogger needs an ImageDensityModel (with image_shape), got "
                             f"{type(pl_module).__name__}; use TextSampleLogger or AudioSampleLogger for it.")
        if shape[2] not in (1, 3, 4) and (self.num_samples or self.num_completions):
            raise ValueError(f"ImageSampleLogger: image_shape={tuple(shape)} has C={shape[2]} channels; TensorBoard "
                             "shows 1, 3 or 4: remove the callback for other channel counts.")
        if self.num_completions and shape[0] < 2:
            raise ValueError(f"ImageSampleLogger: completions give the top H // 2 rows, but image_shape="
                             f"{tuple(shape)} has H={shape[0]}; set num_completions=0.")

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.real = None  # gathered afresh in each validation run (a short set never adds duplicates)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        have = 0 if self.real is None else len(self.real)
        if have >= self.num_completions:
            return
        records, scored = batch if isinstance(batch, (tuple, list)) else (batch, None)
        if scored is not None:  # a padding record (first_scored = seq_len) is no real image
            records = records[torch.as_tensor(scored, device=records.device) < pl_module.config.seq_len]
        new = records[: self.num_completions - have].detach().clone()
        self.real = new if self.real is None else torch.cat([self.real, new])

    def generate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        real = self.real if self.num_completions else None
        if not self.num_samples and real is None:
            return None
        samples, completions = generate_images(pl_module.model, pl_module.image_shape, self.num_samples, real,
                                               self.generator, cuda_graph=_cuda_graph(trainer))
        return samples, real, completions

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, result: Any) -> None:
        from lightning_sparse.image import image_grid, sequences_to_images

        samples, real, completions = result
        grids = {}
        if samples is not None:
            grids["samples/images"] = image_grid(sequences_to_images(samples.cpu(), pl_module.image_shape),
                                                 nrow=min(8, len(samples)))
        if completions is not None and real is not None:
            both = torch.cat([real[: len(completions)].cpu(), completions.cpu()])
            grids["samples/completions"] = image_grid(sequences_to_images(both, pl_module.image_shape),
                                                      nrow=len(completions))
        for writer in _tensorboards(trainer):
            for tag, grid in grids.items():
                writer.add_image(tag, grid, global_step=trainer.global_step, dataformats="CHW")


class AudioSampleLogger(SampleLogger):
    """Log a generated clip and the real prompt followed by it, μ-law decoded, at the model's ``sample_rate``.

    Tags ``samples/audio`` and ``samples/audio_with_prompt`` (an ``AudioDensityModel``).

    Args:
        length: Samples to generate (2,400 = 0.2 s at 12 kHz; 0 = off).
        prompt_length: Real validation samples the clip continues (12,000 = 1 s at 12 kHz).
        every_n_epochs, seed: See :class:`SampleLogger`.
    """

    def __init__(self, length: int = 2400, prompt_length: int = 12_000, every_n_epochs: int = 1,
                 seed: int = 0) -> None:
        super().__init__(every_n_epochs, seed)
        _count("AudioSampleLogger", "length", length, 0)
        _count("AudioSampleLogger", "prompt_length", prompt_length, 1)
        self.length, self.prompt_length = length, prompt_length

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "sample_rate"):
            raise ValueError(f"AudioSampleLogger needs an AudioDensityModel (with sample_rate), got "
                             f"{type(pl_module).__name__}.")
        _fits("AudioSampleLogger", self.prompt_length, self.length, pl_module.config.seq_len)

    def generate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        if self.prompt is None or not self.length:
            return None
        prompt = self.prompt[:, : self.prompt_length]
        return prompt[0].cpu(), self.sample(trainer, pl_module, prompt, self.length)[0].cpu()

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, result: Any) -> None:
        from lightning_sparse.audio import mu_law_decode

        prompt, clip = result
        clips = {"samples/audio": mu_law_decode(clip), "samples/audio_with_prompt": mu_law_decode(torch.cat([prompt, clip]))}
        for writer in _tensorboards(trainer):
            for tag, wave in clips.items():
                writer.add_audio(tag, wave.reshape(1, -1), global_step=trainer.global_step,
                                 sample_rate=pl_module.sample_rate)
