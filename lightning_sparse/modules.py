"""``DensityModel``: the LightningModule base shared by every modality (text, images, audio).

It owns the next-byte loss, the bits-per-dim metrics, the optimizer and learning-rate schedule (refitted to the run's
length on resume) and building the network in ``configure_model`` (then sharding and compiling it), and adds the
training-safety callbacks of :mod:`lightning_sparse.callbacks` (atomic checkpoints, divergence stop, ``last.ckpt`` at
every stop). Modalities are thin subclasses that override hooks. Samples during training are Lightning callbacks
(``lightning_sparse.sample_logging``).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_sparse import kernels, parallel
from lightning_sparse.callbacks import safety_callbacks
from lightning_sparse.kernels import Dense, Interleaved, Pattern
from lightning_sparse.metrics import BitsPerDim
from lightning_sparse.model import (
    START,
    VOCAB_SIZE,
    SparseTransformer,
    SparseTransformerConfig,
    compile_blocks,
    default_position_shape,
)

__all__ = ["COMPILE_MODES", "DensityModel", "WarmupCosine"]

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes whose compiled blocks replay CUDA graphs

# Checkpoints of modules built in Python (not through the CLI) store Pattern objects in their hyperparameters;
# let torch.load(weights_only=True), Lightning's default, rebuild these plain frozen dataclasses of ints.
PATTERN_CLASSES = [obj for obj in map(vars(kernels).get, kernels.__all__) if isinstance(obj, type)]
torch.serialization.add_safe_globals(PATTERN_CLASSES)
# Serialize an Interleaved schedule with its class_path, so a printed or saved config parses back unambiguously
# against the `Pattern | Interleaved` type (jsonargparse otherwise writes the bare dataclass fields).
try:  # jsonargparse is needed by the CLI only; the model, benchmarks and GPU tests run without it
    from jsonargparse import set_parsing_settings
except ImportError:
    pass
else:
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

    * :meth:`position_shape` — axes of the factorized position embeddings (images: ``(H, W, C)``).

    Samples in TensorBoard come from callbacks, one per modality (``lightning_sparse.sample_logging``).

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
        attention_backend: "auto" (on CUDA sdpa for ``Dense()``, triton otherwise; torch elsewhere), "torch",
            "triton", "sdpa" (``Dense()`` only) or "reference".
        recompute: Recompute attention and feed-forward activations in the backward pass to save memory.
        compile: ``torch.compile`` every residual block (and the output head) in ``configure_model``, from outside
            the network: compile time does not grow with depth, identical blocks share one graph, state-dict keys
            stay unchanged. The Triton kernels are opaque custom operators, so Inductor fuses everything around them.
        compile_mode: ``torch.compile`` mode when ``compile``: None (default), "max-autotune-no-cudagraphs", or
            "reduce-overhead" (CUDA graphs; only for static shapes).
        lr: Peak learning rate of AdamW.
        weight_decay: Decoupled weight decay, applied only to tensors with at least 2 dimensions (as the authors'
            code): weight matrices and embeddings, not biases or LayerNorm parameters.
        betas: AdamW betas.
        warmup_steps: Optimizer steps of linear warmup from 0 to ``lr``.
        decay_steps: Optimizer step at which the cosine decay reaches 0; None = ``trainer.estimated_stepping_batches``.
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
        compile: bool = False,
        compile_mode: str | None = None,
        lr: float = 3.5e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 5000,
        decay_steps: int | None = None,
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
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{type(self).__name__}: {name} must be an integer >= {low}, got {value!r}.")
        if decay_steps is not None and (not isinstance(decay_steps, int) or decay_steps <= warmup_steps):
            raise ValueError(
                f"{type(self).__name__}: decay_steps={decay_steps!r} must be an integer > warmup_steps={warmup_steps} "
                "(or None to decay over the whole run)."
            )
        if compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"{type(self).__name__}: compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}."
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
        self.compile_network, self.compile_mode = bool(compile), compile_mode  # (`self.compile` is nn.Module's)
        self.model: SparseTransformer | None = None
        self.train_bpd, self.val_bpd, self.test_bpd = BitsPerDim(), BitsPerDim(), BitsPerDim()

    # ----- hooks for modality subclasses -----

    def position_shape(self, seq_len: int, pattern: Pattern | Interleaved) -> tuple[int, ...]:
        """Axes of the factorized position embeddings when the ``position_shape`` argument is None; product = seq_len.

        Default: ``(seq_len // stride, stride)`` of the pattern's stride (one axis for dense attention). Images
        override this with ``(H, W, C)`` (or pass ``position_shape``). Called from ``__init__`` before the network
        exists: a subclass that needs its own arguments here sets them as attributes before ``super().__init__``.
        """
        return default_position_shape(seq_len, pattern)

    # ----- the network -----

    def configure_model(self) -> None:
        """Build the network once (idempotent; Lightning calls this on every fit/validate/test and on load), then
        apply the strategy's parallelism, then compile: build → shard (FSDP2) → compile."""
        if self.model is None:
            self.model = SparseTransformer(self.config)
            parallel.remember_ndims(self.model)  # FSDP1 flattens parameters; weight decay needs the built shapes
        # ----- distributed training (lightning_sparse.parallel): each step is idempotent, a no-op without its strategy
        if self._trainer is not None:  # FSDP's per-Block checkpointing replaces the blocks' own recomputation
            parallel.hand_over_recompute(self.model, self._trainer.strategy)
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2, fully_shard per Block, then the root
            parallel.shard_blocks(self.model, self.device_mesh, parallel.mixed_precision_policy(self.trainer.precision))
        if self.compile_network:  # torch.compile per Block, after sharding (idempotent)
            parallel.compile_under_ddp(self._trainer.strategy if self._trainer is not None else None)
            compile_blocks(self.model, mode=self.compile_mode)
        # ----- end of distributed training

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm=None
    ) -> None:
        """Norm clipping under FSDPStrategy goes through the FSDP root (Lightning's plugin refuses it). An optimizer
        that would unscale gradients itself (fused AdamW) is clipped here when no GradScaler runs (bf16, fp32):
        Lightning's mixed-precision plugin refuses to clip any such optimizer, though with bf16 nothing is scaled.
        Else Lightning's clipping."""
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            if parallel.clip_sharded_grad_norm(self.trainer.strategy, gradient_clip_val):
                return
        if gradient_clip_val and getattr(optimizer, "_step_supports_amp_scaling", False) and not self._grad_scaler():
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _grad_scaler(self) -> bool:
        """Whether the Trainer's precision scales the loss (fp16 mixed precision's GradScaler)."""
        return self._trainer is not None and getattr(self.trainer.precision_plugin, "scaler", None) is not None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, n, 256]`` for input ids ``[batch, n]``."""
        if self.model is None:
            raise RuntimeError(
                f"{type(self).__name__}: the network is built in configure_model(); call model.configure_model() "
                "before using it outside a Trainer."
            )
        if self.compile_network and self.compile_mode in CUDA_GRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the graphs may reuse the last step's outputs
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

    # ----- optimization -----

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (decay on ≥2-D tensors only) with per-step linear warmup then cosine decay to 0 [P §6; DA]."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if parallel.built_ndim(p) >= 2], "weight_decay": self.weight_decay},
            {"params": [p for p in params if parallel.built_ndim(p) < 2], "weight_decay": 0.0},
        ]
        # one fused multi-tensor kernel per step when every parameter is a CUDA floating tensor; not under a GradScaler,
        # whose fused unscaling inside the step would leave gradient clipping nothing unscaled to clip
        fused = (all(p.is_cuda and p.is_floating_point() for p in params) and not self._grad_scaler()) or None
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr, betas=self.betas, fused=fused)
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
