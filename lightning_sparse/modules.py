"""``DensityModel``: the LightningModule base shared by every modality (text, images, audio).

It owns the next-byte loss, the bits-per-dim metrics, the optimizer and learning-rate schedule (refitted to the run's
length on resume), building the network in ``configure_model``, sampling at the end of validation, and adds the
training-safety callbacks of :mod:`lightning_sparse.callbacks` (atomic checkpoints, divergence stop, ``last.ckpt`` at
every stop). Modalities are thin subclasses that override hooks.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_sparse import kernels
from lightning_sparse.callbacks import safety_callbacks
from lightning_sparse.kernels import Dense, Interleaved, Pattern
from lightning_sparse.metrics import BitsPerDim
from lightning_sparse.model import START, VOCAB_SIZE, SparseTransformer, SparseTransformerConfig, default_position_shape
from lightning_sparse.sampling import sample

__all__ = ["DensityModel", "WarmupCosine"]

# Checkpoints of modules built in Python (not through the CLI) store Pattern objects in their hyperparameters;
# let torch.load(weights_only=True), Lightning's default, rebuild these plain frozen dataclasses of ints.
PATTERN_CLASSES = [obj for obj in map(vars(kernels).get, kernels.__all__) if isinstance(obj, type)]
torch.serialization.add_safe_globals(PATTERN_CLASSES)
# Serialize an Interleaved schedule with its class_path, so a printed or saved config parses back unambiguously
# against the `Pattern | Interleaved` type (jsonargparse otherwise writes the bare dataclass fields).
set_parsing_settings(subclasses_enabled=[Interleaved])


class WarmupCosine:
    """Learning-rate factor: linear warmup over ``warmup_steps``, then cosine decay to 0 at ``total_steps`` [P §6].

    A callable object (not a lambda) so ``LambdaLR`` can save it in checkpoints.
    """

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class DensityModel(L.LightningModule):
    """A Sparse Transformer trained as a byte-level density model; the base of every modality.

    Batches come in three forms, all handled by :meth:`_inputs_and_targets`:

    * stream data (text, audio): uint8 ``[B, seq_len + 1]``; inputs ``x[:, :-1]``, targets ``x[:, 1:]``;
    * record data (images, ``start_token=True``): uint8 ``[B, seq_len]``; inputs ``[START, x[:-1]]``, targets ``x``,
      so every dimension is scored;
    * evaluation pairs ``(window, first_scored)`` of either layout, with ``first_scored`` ``[B]``: only target
      positions ``t >= first_scored`` (indices into the targets) count in loss and bits/dim. Stream windows use it
      for Enwik8's minimum-context protocol; every evaluation set pads itself for DDP with items whose
      ``first_scored`` is the number of targets (they score nothing).

    Hooks for modality subclasses (override any of them):

    * :meth:`position_shape` — axes of the factorized position embeddings (images: ``(H, W, C)``);
    * :meth:`sample_prompt` — the ids sampling starts from (default: the first ``sample_prompt_length`` inputs of
      the first validation batch; with a start token that begins with START, so ``sample_prompt_length=1`` samples
      unconditionally);
    * :meth:`log_samples` — how a generated sample is shown (text: TensorBoard ``add_text``). It is called on global
      rank 0 only, after every rank has run the sampling forward passes;
    * :meth:`sample_and_log` — the whole sampling step (images replace it to draw sample and completion grids);
      :meth:`on_validation_epoch_end` calls it after validations in every ``sample_every_n_epochs``-th epoch.

    Reload a checkpoint with the concrete class, e.g. ``TextDensityModel.load_from_checkpoint(path)``: this base class
    has no ``**kwargs``, so Lightning would drop a subclass's arguments and build the base class.

    Args:
        seq_len: Model context: inputs per sequence. Linked from ``data.seq_len`` by the CLI.
        n_layer: Number of residual blocks.
        n_head: Attention heads per block.
        d_model: Width of the residual stream.
        ff_mult: Feed-forward hidden width as a multiple of d_model (4.0; the paper's "half-size" = 2.0).
        qk_ratio: Query/key width as a multiple of d_model (1.0; 0.5 halves it as in the paper's CIFAR-10 model).
        dropout: Dropout at the end of each residual branch.
        pattern: Attention pattern of every block (e.g. ``lightning_sparse.kernels.Fixed``) or an ``Interleaved``
            schedule, one pattern per block.
        position_shape: Axes of the factorized position embeddings (product = seq_len); None = the
            :meth:`position_shape` hook's default, ``(seq_len // stride, stride)`` for 1-D data.
        start_token: Prepend a learned start token so the first byte is scored too (record data such as images).
        attention_backend: "auto" (triton on CUDA, torch elsewhere), "torch", "triton" or "reference".
        recompute: Recompute attention and feed-forward activations in the backward pass to save memory.
        lr: Peak learning rate of AdamW.
        weight_decay: Decoupled weight decay, applied only to tensors with at least 2 dimensions (as the authors'
            code): weight matrices and embeddings, not biases or LayerNorm parameters.
        betas: AdamW betas.
        warmup_steps: Optimizer steps of linear warmup from 0 to ``lr``.
        decay_steps: Optimizer step at which the cosine decay reaches 0; None = ``trainer.estimated_stepping_batches``.
        sample_length: Bytes to generate at the end of each validation (0 = no samples).
        sample_prompt_length: Inputs of the first validation sequence used as the sampling prompt.
        sample_every_n_epochs: Sample only after validations in every n-th epoch (sampling costs a full forward pass
            per generated byte, which can take longer than a short epoch); turn sampling off with the modality's
            own setting (``sample_length=0``; images: ``num_samples=0, num_completions=0``).
    """

    def __init__(
        self,
        seq_len: int = 1024,
        n_layer: int = 4,
        n_head: int = 4,
        d_model: int = 256,
        ff_mult: float = 4.0,
        qk_ratio: float = 1.0,
        dropout: float = 0.0,
        pattern: Pattern | Interleaved = Dense(),  # noqa: B008 - frozen, immutable default
        position_shape: tuple[int, ...] | None = None,
        start_token: bool = False,
        attention_backend: str = "auto",
        recompute: bool = False,
        lr: float = 3.5e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 5000,
        decay_steps: int | None = None,
        sample_length: int = 0,
        sample_prompt_length: int = 64,
        sample_every_n_epochs: int = 1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(
                f"{type(self).__name__}: lr must be a finite number > 0, got {lr!r}; the paper uses 3.5e-4 on CIFAR-10."
            )
        if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(
                f"{type(self).__name__}: weight_decay must be a finite number >= 0, got {weight_decay!r}; the paper "
                "uses 0.01."
            )
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(
                f"{type(self).__name__}: betas must be two numbers in [0, 1), got {betas!r}; e.g. [0.9, 0.999]."
            )
        for name, value, low in (
            ("warmup_steps", warmup_steps, 0),
            ("sample_length", sample_length, 0),
            ("sample_prompt_length", sample_prompt_length, 1),
            ("sample_every_n_epochs", sample_every_n_epochs, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{type(self).__name__}: {name} must be an integer >= {low}, got {value!r}.")
        if decay_steps is not None and (not isinstance(decay_steps, int) or decay_steps <= warmup_steps):
            raise ValueError(
                f"{type(self).__name__}: decay_steps={decay_steps!r} must be an integer > warmup_steps={warmup_steps} "
                "(or None to decay over the whole run)."
            )
        # Validate the network's hyperparameters now (errors at construction), build the network in configure_model.
        self.config = SparseTransformerConfig(
            seq_len=seq_len,
            n_layer=n_layer,
            n_head=n_head,
            d_model=d_model,
            ff_mult=ff_mult,
            qk_ratio=qk_ratio,
            dropout=dropout,
            pattern=pattern,
            position_shape=position_shape if position_shape is not None else self.position_shape(seq_len, pattern),
            start_token=start_token,
            attention_backend=attention_backend,
            recompute=recompute,
        )
        # Read settings from attributes, not self.hparams: under LightningCLI hparams are the parsed config, which
        # holds patterns as dicts and lacks arguments a subclass fixes in its super().__init__ call.
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.decay_steps = warmup_steps, decay_steps
        self.sample_length, self.sample_prompt_length = sample_length, sample_prompt_length
        self.sample_every_n_epochs = sample_every_n_epochs
        self.model: SparseTransformer | None = None
        self.train_bpd, self.val_bpd, self.test_bpd = BitsPerDim(), BitsPerDim(), BitsPerDim()
        self._prompt: torch.Tensor | None = None  # first validation inputs, the default sampling prompt

    # ----- hooks for modality subclasses -----

    def position_shape(self, seq_len: int, pattern: Pattern | Interleaved) -> tuple[int, ...]:
        """Axes of the factorized position embeddings when the ``position_shape`` argument is None; product = seq_len.

        Default: ``(seq_len // stride, stride)`` of the pattern's stride (one axis for dense attention). Images
        override this with ``(H, W, C)`` (or pass ``position_shape``). Called from ``__init__`` before the network
        exists: a subclass that needs its own arguments here sets them as attributes before ``super().__init__``.
        """
        return default_position_shape(seq_len, pattern)

    def sample_prompt(self) -> torch.Tensor | None:
        """Ids ``[1, p]`` that sampling starts from, or None to skip sampling (no validation batch seen yet)."""
        return self._prompt

    def log_samples(self, prompt: torch.Tensor, sample: torch.Tensor) -> None:
        """Show one generated sample (``prompt`` ``[p]`` ids, ``sample`` ``[length]`` bytes); rank 0 only."""
        raise NotImplementedError(
            f"{type(self).__name__} sets sample_length > 0 but does not say how to show samples: override "
            "log_samples (see TextDensityModel) or set sample_length=0."
        )

    # ----- the network -----

    def configure_model(self) -> None:
        """Build the network once (idempotent; Lightning calls this on every fit/validate/test and on load)."""
        if self.model is None:
            self.model = SparseTransformer(self.config)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, n, 256]`` for input ids ``[batch, n]``."""
        if self.model is None:
            raise RuntimeError(
                f"{type(self).__name__}: the network is built in configure_model(); call model.configure_model() "
                "before using it outside a Trainer."
            )
        return self.model(idx)

    # ----- loss and metrics -----

    def _inputs_and_targets(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(inputs, targets, scored)`` from any of the three batch forms; ``scored`` is None when all count."""
        first_scored = None
        if isinstance(batch, (tuple, list)):
            if len(batch) != 2:
                raise ValueError(
                    f"{type(self).__name__}: a tuple batch must be (window, first_scored); got {len(batch)} items."
                )
            batch, first_scored = batch
        if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or batch.dtype != torch.uint8:
            raise ValueError(
                f"{type(self).__name__}: batches must be uint8 tensors [batch, length], got "
                f"{getattr(batch, 'dtype', type(batch))} {tuple(getattr(batch, 'shape', ()))}."
            )
        window = batch.long()
        if self.config.start_token:
            start = torch.full_like(window[:, :1], START)
            inputs, targets = torch.cat([start, window[:, :-1]], dim=1), window
        else:
            inputs, targets = window[:, :-1], window[:, 1:]
        if inputs.shape[1] != self.config.seq_len:
            expected = self.config.seq_len + (0 if self.config.start_token else 1)
            raise ValueError(
                f"{type(self).__name__}: got sequences of length {window.shape[1]}, expected {expected} (seq_len="
                f"{self.config.seq_len}, start_token={self.config.start_token}: stream data yields seq_len + 1 bytes, "
                "record data with a start token yields seq_len). Make data.seq_len and model.seq_len agree."
            )
        scored = None
        if first_scored is not None:
            first_scored = torch.as_tensor(first_scored, device=targets.device).reshape(-1, 1)
            scored = torch.arange(targets.shape[1], device=targets.device)[None, :] >= first_scored
        return inputs, targets, scored

    def _nats(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-byte NLL in nats (cross-entropy in float32) and the number of scored dims of a batch."""
        inputs, targets, scored = self._inputs_and_targets(batch)
        logits = self(inputs).float()
        nll = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1), reduction="none")
        if scored is None:
            return nll.sum(), torch.tensor(nll.numel(), device=nll.device)
        scored = scored.reshape(-1)
        return (nll * scored).sum(), scored.sum()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        nats, dims = self._nats(batch)
        loss = nats / dims.clamp(min=1)
        self.train_bpd(nats.detach(), dims)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        self.log("train/bpd", self.train_bpd, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0 and self._prompt is None:
            inputs, _, _ = self._inputs_and_targets(batch)
            self._prompt = inputs[:1, : self.sample_prompt_length].clone()
        self.val_bpd.update(*self._nats(batch))
        self.log("val/bpd", self.val_bpd, on_step=False, on_epoch=True, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.test_bpd.update(*self._nats(batch))
        self.log("test/bpd", self.test_bpd, on_step=False, on_epoch=True)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Bits per dim of each sequence in the batch, ``[batch]`` (NaN for a padding window that scores nothing)."""
        inputs, targets, scored = self._inputs_and_targets(batch)
        nll = F.cross_entropy(self(inputs).float().transpose(1, 2), targets, reduction="none")
        if scored is None:
            return nll.mean(dim=1) / math.log(2)
        return (nll * scored).sum(dim=1) / scored.sum(dim=1) / math.log(2)

    # ----- sampling -----

    def on_validation_epoch_end(self) -> None:
        """Sample (:meth:`sample_and_log`) after validations in every ``sample_every_n_epochs``-th epoch, not in the
        sanity check."""
        if self.trainer.sanity_checking or self.model is None:
            return
        if (self.current_epoch + 1) % self.sample_every_n_epochs:
            return
        self.sample_and_log()

    def sample_and_log(self) -> None:
        """Generate a sample on every rank (sharded strategies need every rank in each forward); rank 0 shows it."""
        if self.sample_length == 0:
            return
        prompt = self.sample_prompt()
        if prompt is None:
            return
        generator = torch.Generator(device=self.device).manual_seed(0)  # same randomness every time: compare steps
        with self.trainer.precision_plugin.forward_context():  # sample under the training precision (e.g. bf16)
            out = sample(self.model, prompt.to(self.device), self.sample_length, generator=generator)
        if self.trainer.is_global_zero:
            self.log_samples(prompt[0].cpu(), out[0].cpu())

    # ----- optimization -----

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (decay on ≥2-D tensors only) with per-step linear warmup then cosine decay to 0 [P §6; DA]."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": self.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr, betas=self.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(*self._schedule_steps(warn=True)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _schedule_steps(self, warn: bool = False) -> tuple[int, int]:
        """``(warmup, total)`` optimizer steps of the schedule for the run the Trainer is set up for now."""
        total = self.decay_steps
        if total is None:
            total = self.trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError(
                    "The cosine schedule needs a finite run length: set trainer.max_steps (or max_epochs), or "
                    "model.decay_steps."
                )
        total, warmup = int(total), self.warmup_steps
        if warmup >= total:  # e.g. fast_dev_run (1 step) or a short trial run of a paper config
            warmup = total // 10
            if warn:
                rank_zero_warn(
                    f"warmup_steps={self.warmup_steps} is not shorter than the whole run ({total} optimizer steps): "
                    f"warming up over the first tenth ({warmup} steps) instead. Set model.warmup_steps below the run "
                    "length to choose it."
                )
        return warmup, total

    def on_train_start(self) -> None:
        """Refit the schedule to this run: a checkpoint restores the schedule of the run that wrote it, so a run
        resumed with a larger ``max_steps`` (or ``max_epochs``) would otherwise train its new steps at lr 0."""
        warmup, total = self._schedule_steps()
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            lambdas = getattr(scheduler, "lr_lambdas", [])
            stale = [f for f in lambdas
                     if isinstance(f, WarmupCosine) and (f.warmup_steps, f.total_steps) != (warmup, total)]
            if not stale:
                continue
            rank_zero_info(
                f"Resuming at step {self.global_step}: the learning-rate schedule now spans {total} optimizer steps "
                f"({warmup} warmup), the checkpoint's spanned {stale[0].total_steps} ({stale[0].warmup_steps} warmup)."
            )
            for f in stale:
                f.warmup_steps, f.total_steps = warmup, total
            # The optimizer's restored lr came from the old schedule: set the one of the next step.
            for group, base, f in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, lambdas, strict=True):
                group["lr"] = base * f(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]

    def configure_callbacks(self) -> list[Callback]:
        """The training-safety callbacks (:mod:`lightning_sparse.callbacks`) that the Trainer does not have yet."""
        have = {type(c) for c in self.trainer.callbacks}
        return [c for c in safety_callbacks() if type(c) not in have]
